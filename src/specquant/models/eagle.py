"""EAGLE-1/2 draft head: fc over [token embedding; feature] and one Llama decoder layer.

    x_t = fc([embed(tok_{t+1}); f_t])      f_t: the base model's post-norm hidden at t
    h_t = DecoderLayer(x_t)                 input RMSNorm skipped, as in EAGLE-1's layer 0
    logits_{t+1} = base.lm_head(h_t)        h_t approximates f_{t+1}

The head shares the base model's embedding and lm_head, which the drafter passes in; the
head itself owns only `fc` and `layers.0` (the public EAGLE checkpoint layout).
"""

from __future__ import annotations

import torch
from torch import nn

from specquant.cache.static_kv import StaticKVCache
from specquant.config import ModelConfig
from specquant.layers.attention import AttnMetadata
from specquant.layers.linear import QLinear
from specquant.models.llama import DecoderLayer


class EagleHead(nn.Module):
    def __init__(self, cfg: ModelConfig, fc_bias: bool = True):
        super().__init__()
        self.config = cfg
        self.fc = QLinear(2 * cfg.hidden_size, cfg.hidden_size, bias=fc_bias)
        self.layers = nn.ModuleList([DecoderLayer(cfg, 0)])
        self.layers[0].input_layernorm = nn.Identity()

    def forward(
        self,
        embeds: torch.Tensor,  # [B, T, H] embeddings of the *next* tokens
        feats: torch.Tensor,  # [B, T, H] base-model features at the current positions
        cache: StaticKVCache,
        meta: AttnMetadata,
    ) -> torch.Tensor:  # [B, T, H] predicted next features
        x = self.fc(torch.cat([embeds, feats], dim=-1))
        return self.layers[0](x, cache, meta)

    def new_cache(self, max_len: int) -> StaticKVCache:
        cfg = self.config
        w = self.fc.weight
        return StaticKVCache(
            1, cfg.num_kv_heads, cfg.head_dim, max_len, device=w.device, dtype=w.dtype
        )

    def prepare_kernels(self, linear_override: str | None = None) -> None:
        for module in self.modules():
            if isinstance(module, QLinear):
                module.prepare(linear_override)
