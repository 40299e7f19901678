"""Llama-family decoder as plain math (Llama 2/3/3.1, Mistral, Qwen2, SmolLM2).

Runtime state is an argument: `forward(tokens, cache, meta)` gets the KV cache and the
attention metadata (positions, rope, block/tree mask) from the engine.

Parameter names follow HF except for two fused projections (see `PACKED_MODULES`):
``qkv_proj = [q_proj; k_proj; v_proj]`` and ``gate_up_proj = [gate_proj; up_proj]``
(stacked along the output dimension), which halve the number of matmuls per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from specquant.cache.static_kv import KVCache, StaticKVCache
from specquant.config import ModelConfig
from specquant.kernels.reference import MmaOrderActivations, QuantizedActivations
from specquant.kernels.registry import KernelMemo
from specquant.layers.activation import SiluMul
from specquant.layers.attention import AttnMetadata, merge_heads_for
from specquant.layers.linear import QLinear, prepare_linears
from specquant.layers.norm import RMSNorm, norm_for
from specquant.layers.rope import rope_qk_reference

# fused parameter -> the HF parameters stacked (in order) along dim 0
PACKED_MODULES: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [B, N, V] for the requested positions
    hidden: torch.Tensor | None = None  # [B, T, H] post-final-norm features
    layer_hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # i -> [B, T, H]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        self.qkv_proj = QLinear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.qkv_bias)
        self.o_proj = QLinear(cfg.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.split = (cfg.q_size, cfg.kv_size, cfg.kv_size)
        self._kernels = KernelMemo()  # the registry's "rope" pick

    def _rope(self, q: torch.Tensor) -> Any:
        """The "rope" kernel for q's device and dtype; the reference where autograd needs a
        backward (training)."""
        if torch.is_grad_enabled() and q.requires_grad:
            return rope_qk_reference
        return self._kernels("rope", q.device, q.dtype)

    def forward(
        self,
        x: torch.Tensor | QuantizedActivations | MmaOrderActivations,
        cache: KVCache,
        meta: AttnMetadata,
    ) -> torch.Tensor:  # x [B, T, H] -> [B, T, H]
        b, t, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        q = q.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # [B, Hq, T, D]
        k = k.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = v.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self._rope(q)(q, k, meta.cos, meta.sin)  # [B, H, T, D] each, contiguous
        cache.write(self.layer, meta.cache_len, k, v)
        keys, values = cache.view(self.layer, meta.cache_len + t)
        o = meta.attn_fn(q, keys, values, meta.mask)  # [B, Hq, T, D]
        return self.o_proj(merge_heads_for(o, self.o_proj))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = QLinear(cfg.hidden_size, 2 * cfg.intermediate_size)
        self.down_proj = QLinear(cfg.intermediate_size, cfg.hidden_size)
        self.act = SiluMul()

    def forward(self, x: torch.Tensor | QuantizedActivations | MmaOrderActivations) -> torch.Tensor:
        # one kernel for silu(gate) * up, which also quantizes down_proj's input when that
        # layer takes int8/fp8 activations, or writes it in the K order its W4A16 kernel reads
        h = self.gate_up_proj(x)
        mma = self.down_proj.takes_mma_order(h.numel() // h.shape[-1])
        return self.down_proj(self.act(h, self.down_proj.act_quant, mma_order=mma))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cache: KVCache, meta: AttnMetadata) -> torch.Tensor:
        # With int8/fp8 activations the norms also quantize (one fused kernel) and hand
        # QuantizedActivations to qkv_proj / gate_up_proj; o_proj and down_proj quantize
        # their own inputs.
        h = norm_for(self.input_layernorm, x, self.self_attn.qkv_proj)
        x = x + self.self_attn(h, cache, meta)
        return x + self.mlp(norm_for(self.post_attention_layernorm, x, self.mlp.gate_up_proj))


def lm_head_rows(lm_head: QLinear, vocab_ids: torch.Tensor) -> tuple[QLinear, torch.Tensor]:
    """A dense lm_head's rows for `vocab_ids` only (FR-Spec) as a new layer, and the ids on
    its device: logits over the kept tokens, in the order of `vocab_ids`."""
    if lm_head.spec is not None:
        raise ValueError("a reduced vocabulary needs a dense lm_head")
    weight = lm_head.weight.detach()
    ids = vocab_ids.to(device=weight.device, dtype=torch.long)
    head = QLinear(weight.shape[1], ids.numel())
    head.weight = nn.Parameter(weight[ids].clone(), requires_grad=False)
    head.prepare()
    return head, ids


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = QLinear(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # FR-Spec (reduced draft vocabulary): logits are computed for these token ids only
        # and every other token gets -inf; set by `restrict_lm_head`.
        self.vocab_ids: torch.Tensor | None = None

    def forward(
        self,
        tokens: torch.Tensor,  # [B, T]
        cache: KVCache,
        meta: AttnMetadata,
        *,
        logits_index: torch.Tensor | None = None,  # [N] positions in T to project; None = all
        return_hidden: bool = False,
        hidden_layers: tuple[int, ...] = (),
    ) -> ModelOutput:
        """Run the new block; write its K/V into `cache` (not committed)."""
        assert meta.sliding_window == self.config.sliding_window, (
            f"metadata planned with sliding_window={meta.sliding_window}, "
            f"model has {self.config.sliding_window}"
        )
        x = self.embed_tokens(tokens)
        layer_hidden: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            if i in hidden_layers:
                layer_hidden[i] = x  # residual stream entering layer i (HF hidden_states[i])
            x = layer(x, cache, meta)
        h = self.norm(x)
        if len(self.layers) in hidden_layers:
            layer_hidden[len(self.layers)] = h
        selected = h if logits_index is None else h[:, logits_index]
        return ModelOutput(
            logits=self.logits(selected),
            hidden=h if return_hidden else None,
            layer_hidden=layer_hidden,
        )

    def logits(self, h: torch.Tensor) -> torch.Tensor:  # [B, N, H] -> [B, N, V]
        if self.vocab_ids is None:
            return self.lm_head(h)
        sub = self.lm_head(h)  # [B, N, V_sub]
        full = sub.new_full((*sub.shape[:-1], self.config.vocab_size), float("-inf"))
        return full.index_copy_(-1, self.vocab_ids, sub)

    def restrict_lm_head(self, vocab_ids: torch.Tensor) -> None:
        """Keep only these lm_head rows (a draft's frequent tokens, FR-Spec)."""
        self.lm_head, self.vocab_ids = lm_head_rows(self.lm_head, vocab_ids)

    def prepare_kernels(self, linear_override: str | None = None) -> None:
        """Choose kernels for the current device/dtype; call after loading or `.to()`."""
        prepare_linears(self, linear_override)

    def new_cache(
        self, max_len: int, batch: int = 1, dtype: torch.dtype | None = None
    ) -> StaticKVCache:
        cfg = self.config
        param = self.embed_tokens.weight
        return StaticKVCache(
            cfg.num_layers,
            cfg.num_kv_heads,
            cfg.head_dim,
            max_len,
            batch=batch,
            device=param.device,
            dtype=dtype or param.dtype,
        )
