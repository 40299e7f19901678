"""Model-level GPTQ: quantize decoder layers in order, each from the inputs it sees when
every earlier layer is already quantized (GPTQ's sequential mode).

    x = embed(calibration tokens)
    for each layer:   capture the inputs of its linears (dense pass)
                      GPTQ-quantize those linears from their captured inputs
                      x = layer(x)  (quantized pass: the next layer sees quantized outputs)
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from specquant.cache.static_kv import BlockKV
from specquant.layers.attention import AttnMetadata
from specquant.layers.linear import QLinear
from specquant.layers.rope import RopeTable
from specquant.models.llama import LlamaModel
from specquant.quant.gptq import quantize_gptq
from specquant.quant.spec import QuantSpec


def full_sequence_meta(model: LlamaModel, t: int) -> AttnMetadata:
    """Causal attention metadata for one pass over whole [B, t] sequences from position 0
    (calibration and evaluation passes, no KV cache kept)."""
    param = model.embed_tokens.weight
    rope = RopeTable(model.config, t, param.device, param.dtype)
    return AttnMetadata.plan(rope, 0, t, sliding_window=model.config.sliding_window)


@torch.no_grad()
def quantize_model_gptq(
    model: LlamaModel,
    spec: QuantSpec,
    calib_tokens: torch.Tensor,  # [B, T] calibration token ids
    *,
    damp: float = 0.01,
    act_order: bool = False,
    progress: bool = False,
) -> dict[str, float]:
    """Returns name -> relative weight round-trip error, like `quantize_model`."""
    if calib_tokens.dim() != 2 or calib_tokens.numel() == 0:
        raise ValueError(
            f"calibration tokens must be a non-empty [B, T] tensor, got {tuple(calib_tokens.shape)}"
        )
    tokens = calib_tokens.to(model.embed_tokens.weight.device)
    meta = full_sequence_meta(model, tokens.shape[1])
    x = model.embed_tokens(tokens)
    report: dict[str, float] = {}
    for i, layer in enumerate(tqdm(model.layers, desc=f"gptq {spec.name}", disable=not progress)):
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, QLinear)}
        captured: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
        hooks = [
            m.register_forward_pre_hook(
                lambda _m, args, store=captured[n]: store.append(
                    args[0].reshape(-1, args[0].shape[-1])
                )
            )
            for n, m in linears.items()
        ]
        try:
            layer(x, BlockKV(), meta)
        finally:
            for h in hooks:
                h.remove()
        for name, module in linears.items():
            inputs = torch.cat(captured[name]).float()
            report[f"layers.{i}.{name}"] = module.quantize_(
                spec,
                lambda w, s, inp=inputs: quantize_gptq(w, inp, s, damp=damp, act_order=act_order),
            )
        x = layer(x, BlockKV(), meta)
    return report
