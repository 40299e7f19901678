"""Pure-PyTorch reference implementations of every op: the specification and the CPU path.

Faster backends (SDPA today, Triton later) are tested against these functions.
"""

from __future__ import annotations

import torch


def attention_reference(
    q: torch.Tensor,  # [B, Hq, T, D]
    k: torch.Tensor,  # [B, Hkv, S, D]   S = committed prefix + T new keys
    v: torch.Tensor,  # [B, Hkv, S, D]
    mask: torch.Tensor | None,  # [T, S] or [B, 1, T, S] bool, True = may attend; None = all
) -> torch.Tensor:  # [B, Hq, T, D]
    """Softmax attention with grouped KV heads, computed in fp32."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1).float()
    v = v.repeat_interleave(groups, dim=1).float()
    scores = q.float() @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5)  # [B, Hq, T, S]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v).to(q.dtype)


def kv_compact_reference(
    cache: torch.Tensor,  # [L, B, H, Tmax, D]
    start: int,
    keep: torch.Tensor,  # [n] int64 indices relative to `start`, ascending
) -> None:
    """In place: cache[..., start + i, :] = cache[..., start + keep[i], :] for i < n."""
    # index_select materialises the kept rows before writing, so overlapping source and
    # destination ranges are safe.
    rows = cache.index_select(3, keep + start)
    cache[:, :, :, start : start + keep.numel()] = rows
