"""EAGLE-1/2 draft head: fc over [token embedding; feature] and one Llama decoder layer.

    x_t = fc([embed(tok_{t+1}); f_t])      f_t: the base model's post-norm hidden at t
    h_t = DecoderLayer(x_t)                 input RMSNorm skipped, as in EAGLE-1's layer 0
    logits_{t+1} = base.lm_head(h_t)        h_t approximates f_{t+1}

The head shares the base model's embedding and lm_head, which the drafter passes in; the
head itself owns only `fc` and `layers.0` (the public EAGLE checkpoint layout). For a rotated
base, `quant.rotate.rotate_eagle_head_` folds the rotation into `fc` and adds `out_map`, an
H x H map of the output into the base's rotated feature space.
"""

from __future__ import annotations

import torch
from torch import nn

from specquant.cache.static_kv import KVCache, StaticKVCache
from specquant.config import ModelConfig
from specquant.layers.attention import AttnMetadata
from specquant.layers.linear import QLinear, prepare_linears
from specquant.layers.norm import RMSNorm
from specquant.models.llama import DecoderLayer


def _one_layer_cache(
    cfg: ModelConfig, like: torch.Tensor, max_len: int, batch: int = 1
) -> StaticKVCache:
    return StaticKVCache(
        1,
        cfg.num_kv_heads,
        cfg.head_dim,
        max_len,
        batch=batch,
        device=like.device,
        dtype=like.dtype,
    )


class EagleHead(nn.Module):
    def __init__(self, cfg: ModelConfig, fc_bias: bool = True):
        super().__init__()
        self.config = cfg
        self.fc = QLinear(2 * cfg.hidden_size, cfg.hidden_size, bias=fc_bias)
        self.layers = nn.ModuleList([DecoderLayer(cfg, 0)])
        self.layers[0].input_layernorm = nn.Identity()
        self.out_map: QLinear | None = None  # set for a rotated base (quant/rotate.py)
        self.base_rotation_folded = False
        # fingerprint of the rotation of the base it was trained on (None: unrotated base)
        self.trained_on_rotation: str | None = None

    def forward(
        self,
        embeds: torch.Tensor,  # [B, T, H] embeddings of the *next* tokens
        feats: torch.Tensor,  # [B, T, H] base-model features at the current positions
        cache: KVCache,
        meta: AttnMetadata,
    ) -> torch.Tensor:  # [B, T, H] predicted next features
        x = self.fc(torch.cat([embeds, feats], dim=-1))
        h = self.layers[0](x, cache, meta)
        return h if self.out_map is None else self.out_map(h)

    def new_cache(self, max_len: int, batch: int = 1) -> StaticKVCache:
        return _one_layer_cache(self.config, self.fc.weight, max_len, batch)

    def prepare_kernels(self, linear_override: str | None = None) -> None:
        prepare_linears(self, linear_override)


class Eagle3Head(nn.Module):
    """EAGLE-3 draft head (Li et al. 2025).

    x_t  = fc([low_t; mid_t; high_t])      three base-model layers' residual streams (first
                                           step only; deeper steps feed back h directly)
    a_t  = attn([norm_e(embed(tok_{t+1})); norm_h(x_t)])   q/k/v read a 2H-wide input
    h_t  = x_t + a_t;  h_t += mlp(norm(h_t))                the next step's feature (pre-norm)
    logits = lm_head(norm(h_t))            over a reduced draft vocabulary; draft id d maps
                                           to target id d + d2t[d]
    """

    def __init__(self, cfg: ModelConfig, base_hidden: int, draft_vocab: int):
        super().__init__()
        self.config = cfg
        h = cfg.hidden_size
        self.fc = QLinear(3 * base_hidden, h)
        layer = DecoderLayer(cfg, 0)
        layer.self_attn.qkv_proj = QLinear(2 * h, cfg.q_size + 2 * cfg.kv_size, bias=cfg.qkv_bias)
        self.midlayer = layer
        self.hidden_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.norm = RMSNorm(h, cfg.rms_norm_eps)
        self.lm_head = QLinear(h, draft_vocab)
        self.register_buffer("d2t", torch.zeros(draft_vocab, dtype=torch.long))
        self.embed_tokens: nn.Embedding | None = None  # own embedding if hidden != base's
        self.base_rotation_folded = False  # set by quant/rotate.py for a rotated base
        self.trained_on_rotation: str | None = None  # as in EagleHead

    def forward(
        self,
        embeds: torch.Tensor,  # [B, T, H]
        feats: torch.Tensor,  # [B, T, 3*H_base] base features, or [B, T, H] fed-back h
        cache: KVCache,
        meta: AttnMetadata,
    ) -> torch.Tensor:  # [B, T, H]
        x = self.fc(feats) if feats.shape[-1] != self.config.hidden_size else feats
        layer = self.midlayer
        attn_in = torch.cat([layer.input_layernorm(embeds), self.hidden_norm(x)], dim=-1)
        h = x + layer.self_attn(attn_in, cache, meta)
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def draft_logits(self, h: torch.Tensor) -> torch.Tensor:  # [.., draft_vocab]
        return self.lm_head(self.norm(h))

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]

    def new_cache(self, max_len: int, batch: int = 1) -> StaticKVCache:
        return _one_layer_cache(self.config, self.lm_head.weight, max_len, batch)

    def prepare_kernels(self, linear_override: str | None = None) -> None:
        prepare_linears(self, linear_override)
