"""SmoothQuant (Xiao et al. 2023): migrate activation outliers into the weights, exactly.

For a linear reading X [S, K] with weight W [N, K], per input channel j

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)      (max over calibration tokens / rows)
    X' = X diag(1/s),  W' = W diag(s)                 so X' W'^T = X W^T

and 1/s is folded into whatever writes X, so full-precision outputs do not change:

    linear         its input X                   1/s folded into
    qkv_proj       input_layernorm(x)            input_layernorm.weight
    gate_up_proj   post_attention_layernorm(x)   post_attention_layernorm.weight
    o_proj         attention output (per head)   v rows (+ bias): softmax(q k^T) v is linear
                                                 in v; one s per KV-head channel, shared by
                                                 the query heads of its group (GQA)
    down_proj      silu(gate) * up               up rows: the product is linear in up

Not smoothed: lm_head (never quantized), and nothing upstream of RoPE: q/k channels are
rotated in pairs by position, so per-channel scales on them would not commute with RoPE
(and they feed no linear layer anyway).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from specquant.cache.static_kv import BlockKV
from specquant.models.llama import LlamaModel
from specquant.quant.calibrate import full_sequence_meta
from specquant.quant.rotate import require_dense

SMOOTHED = ("self_attn.qkv_proj", "mlp.gate_up_proj", "self_attn.o_proj", "mlp.down_proj")


def _check_tokens(tokens: torch.Tensor, vocab: int) -> None:
    if tokens.dim() != 2 or tokens.numel() == 0:
        raise ValueError(
            f"calibration tokens must be a non-empty [B, T] tensor, got {tuple(tokens.shape)}"
        )
    if tokens.is_floating_point() or tokens.is_complex():
        raise ValueError(f"calibration tokens must be integer ids, got {tokens.dtype}")
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"calibration token ids must be in [0, {vocab}), got [{lo}, {hi}]")


def activation_absmax(model: LlamaModel, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-input-channel max |x| of every smoothable linear over `tokens` [B, T]:
    'layers.{i}.{linear}' -> float64 [K]."""
    tokens = tokens.to(model.embed_tokens.weight.device)
    meta = full_sequence_meta(model, tokens.shape[1])
    out: dict[str, torch.Tensor] = {}

    def record(name: str) -> Callable[[torch.nn.Module, tuple[torch.Tensor, ...]], None]:
        def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            amax = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).double()
            out[name] = amax if name not in out else torch.maximum(out[name], amax)

        return hook

    handles = [
        model.layers[i].get_submodule(lin).register_forward_pre_hook(record(f"layers.{i}.{lin}"))
        for i in range(len(model.layers))
        for lin in SMOOTHED
    ]
    try:
        x = model.embed_tokens(tokens)
        for layer in model.layers:
            x = layer(x, BlockKV(), meta)
    finally:
        for h in handles:
            h.remove()
    return out


def _scales(act: torch.Tensor, weight_colmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = act^alpha / w^(1-alpha); channels never active (or with zero weights) keep 1."""
    s = act.clamp(min=1e-5) ** alpha / weight_colmax.clamp(min=1e-5) ** (1 - alpha)
    return torch.where((act > 0) & (weight_colmax > 0), s, torch.ones_like(s))


def _spread(a: torch.Tensor) -> float:
    """Outlier measure of channel maxima: max / median."""
    return float(a.max() / a.median().clamp(min=1e-12))


@torch.no_grad()
def smooth_model_(
    model: LlamaModel, calib_tokens: torch.Tensor, alpha: float = 0.5
) -> dict[str, float]:
    """Smooth every decoder layer's linears in place (before quantizing). Returns, per
    linear, how many times smaller the spread (max / median) of its input's per-channel
    maxima became."""
    if not isinstance(alpha, int | float) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"migration strength alpha must be in [0, 1], got {alpha!r}")
    _check_tokens(calib_tokens, model.config.vocab_size)
    require_dense(model, "smooth_model_")
    acts = activation_absmax(model, calib_tokens)
    cfg = model.config
    report: dict[str, float] = {}
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        p = f"layers.{i}."
        scales: dict[str, torch.Tensor] = {}
        for norm, lin, name in (
            (layer.input_layernorm, attn.qkv_proj, "self_attn.qkv_proj"),
            (layer.post_attention_layernorm, mlp.gate_up_proj, "mlp.gate_up_proj"),
        ):
            s = _scales(acts[p + name], lin.weight.double().abs().amax(0), alpha)
            norm.weight.copy_(norm.weight.double() / s)
            lin.weight.copy_(lin.weight.double() * s[None, :])
            scales[name] = s
        # o_proj: one scale per (KV head, channel), the max over the query heads sharing it
        d, n_kv = cfg.head_dim, cfg.num_kv_heads
        group = cfg.num_heads // n_kv
        act_o = acts[p + "self_attn.o_proj"].view(n_kv, group, d).amax(1)
        w_o = attn.o_proj.weight.double().abs().amax(0).view(n_kv, group, d).amax(1)
        s_v = _scales(act_o, w_o, alpha).reshape(-1)  # [kv_size], v's channel order
        v = slice(cfg.q_size + cfg.kv_size, cfg.q_size + 2 * cfg.kv_size)
        attn.qkv_proj.weight[v] = attn.qkv_proj.weight[v].double() / s_v[:, None]
        if attn.qkv_proj.bias is not None:
            attn.qkv_proj.bias[v] = attn.qkv_proj.bias[v].double() / s_v
        s_o = s_v.view(n_kv, 1, d).expand(n_kv, group, d).reshape(-1)  # [q_size]
        attn.o_proj.weight.copy_(attn.o_proj.weight.double() * s_o[None, :])
        scales["self_attn.o_proj"] = s_o
        # down_proj: 1/s into the up half of gate_up's rows
        inter = cfg.intermediate_size
        s_d = _scales(acts[p + "mlp.down_proj"], mlp.down_proj.weight.double().abs().amax(0), alpha)
        mlp.gate_up_proj.weight[inter:] = mlp.gate_up_proj.weight[inter:].double() / s_d[:, None]
        mlp.down_proj.weight.copy_(mlp.down_proj.weight.double() * s_d[None, :])
        scales["mlp.down_proj"] = s_d
        for name, s in scales.items():
            a = acts[p + name]
            report[p + name] = _spread(a) / _spread(a / s)
    return report
