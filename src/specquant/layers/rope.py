"""Rotary position embeddings (HF `rotate_half` convention) with Llama 3.1 / linear scaling."""

from __future__ import annotations

import math

import torch

from specquant.config import ModelConfig


def inv_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Per-pair inverse frequencies [head_dim // 2], float64 for exact tables."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    rs = cfg.rope_scaling
    if rs.rope_type == "linear":
        inv = inv / rs.factor
    elif rs.rope_type == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, and the band
        # in between is interpolated smoothly (Meta's reference `apply_scaling`).
        old_len = rs.original_max_position_embeddings
        low_wavelen = old_len / rs.low_freq_factor
        high_wavelen = old_len / rs.high_freq_factor
        wavelen = 2 * math.pi / inv
        smooth = (old_len / wavelen - rs.low_freq_factor) / (
            rs.high_freq_factor - rs.low_freq_factor
        )
        mid = (1 - smooth) * inv / rs.factor + smooth * inv
        inv = torch.where(wavelen > low_wavelen, inv / rs.factor, inv)
        is_mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        inv = torch.where(is_mid, mid, inv)
    return inv


class RopeTable:
    """Precomputed cos/sin for positions [0, max_len); gathered once per step."""

    def __init__(self, cfg: ModelConfig, max_len: int, device: torch.device, dtype: torch.dtype):
        pos = torch.arange(max_len, dtype=torch.float64)
        freqs = torch.outer(pos, inv_frequencies(cfg))  # [max_len, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [max_len, D]
        self.cos = emb.cos().to(device=device, dtype=dtype)
        self.sin = emb.sin().to(device=device, dtype=dtype)
        self.max_len = max_len

    def gather(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> (cos, sin), each [T, D]."""
        return self.cos[positions], self.sin[positions]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos/sin [T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def rope_qk_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, Hq, T, D] and k [B, Hkv, T, D] rotated (apply_rope): the "rope" op's reference
    and CPU path."""
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)
