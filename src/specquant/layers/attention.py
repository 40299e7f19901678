"""Attention over the committed prefix plus a block of new tokens.

`AttnMetadata` is planned once per step (positions, rope, the mask among new tokens) and
reused by every layer, FlashInfer style. The tree mask for speculative verification is just
`block_mask`; the model never stores it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from specquant.kernels.reference import MMA_BLOCK, MmaOrderActivations, to_mma_order
from specquant.kernels.registry import KernelContext, select
from specquant.layers.linear import wants_mma_order
from specquant.layers.rope import RopeTable

AttentionFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor
]


@dataclass
class AttnMetadata:
    cache_len: int  # committed prefix; new K/V land at slots [cache_len, cache_len + T)
    positions: torch.Tensor  # [T] int64 rope positions of the new tokens
    cos: torch.Tensor  # [T, D]
    sin: torch.Tensor  # [T, D]
    mask: torch.Tensor | None  # [T, cache_len + T] bool, True = may attend; None = all
    attn_fn: AttentionFn
    sliding_window: int | None = None  # must equal the model's (checked in forward)

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    @classmethod
    def plan(
        cls,
        rope: RopeTable,
        cache_len: int,
        num_tokens: int,
        *,
        positions: torch.Tensor | None = None,  # [T]; default cache_len + arange(T)
        block_mask: torch.Tensor | None = None,  # [T, W>=T] bool over the last W keys; causal
        sliding_window: int | None = None,
        attn_fn: AttentionFn | None = None,
    ) -> AttnMetadata:
        device = rope.cos.device
        if positions is None:
            positions = torch.arange(cache_len, cache_len + num_tokens, device=device)
        if positions.shape != (num_tokens,):
            raise ValueError(f"positions must be [{num_tokens}], got {tuple(positions.shape)}")
        if int(positions.max()) >= rope.max_len:
            raise ValueError(
                f"position {int(positions.max())} exceeds the rope table ({rope.max_len})"
            )
        mask = block_keys_mask(cache_len, positions, block_mask, sliding_window)
        cos, sin = rope.gather(positions)
        if attn_fn is None:
            attn_fn = select_attention(device, rope.cos.dtype)
        return cls(cache_len, positions, cos, sin, mask, attn_fn, sliding_window)


def block_keys_mask(
    cache_len: int,
    positions: torch.Tensor,  # [T] int64 rope positions of the new tokens
    block_mask: torch.Tensor | None,  # [T, W>=T] bool over the last W keys; None = causal
    sliding_window: int | None = None,
) -> torch.Tensor | None:  # [T, cache_len + T] bool, True = may attend; None = all
    """What each of T new tokens after a committed prefix of `cache_len` may attend to: the
    whole prefix, `block_mask` over the last W keys (a tree drafted over several forward
    passes keeps its earlier levels there), and only keys inside the sliding window. None
    where one token sees every key."""
    num_tokens = int(positions.shape[0])
    device = positions.device
    total = cache_len + num_tokens
    mask: torch.Tensor | None
    if block_mask is None and num_tokens == 1:
        mask = None  # one query sees the whole prefix
    else:
        if block_mask is None:
            block_mask = torch.ones(num_tokens, num_tokens, dtype=torch.bool, device=device)
            block_mask = block_mask.tril()
        width = block_mask.shape[-1]
        if block_mask.dim() != 2 or block_mask.shape[0] != num_tokens or width < num_tokens:
            raise ValueError(
                f"block_mask must be [{num_tokens}, W] with {num_tokens} <= W <= {total}, "
                f"got {tuple(block_mask.shape)}"
            )
        if width > total:
            raise ValueError(f"block_mask covers {width} keys but only {total} exist")
        prefix = torch.ones(num_tokens, total - width, dtype=torch.bool, device=device)
        mask = torch.cat([prefix, block_mask.to(device=device, dtype=torch.bool)], dim=1)
    if sliding_window is not None and total > sliding_window:
        key_pos = torch.cat([torch.arange(cache_len, device=device), positions])
        in_window = (positions[:, None] - key_pos[None, :]) < sliding_window
        mask = in_window if mask is None else mask & in_window
    return mask


def select_attention(
    device: torch.device, dtype: torch.dtype, override: str | None = None, *, exact: bool = False
) -> AttentionFn:
    """The attention kernel; `exact` asks for one whose rows do not depend on how many
    queries run together or how they are masked (a target that quantizes activations, whose
    verification must reproduce its decoding steps: kernels/builtin.attention_float64)."""
    return select("attention", KernelContext(device, dtype, (("exact", exact),)), override).fn


def merge_heads_for(
    o: torch.Tensor, linear: torch.nn.Module
) -> torch.Tensor | MmaOrderActivations:  # [B, H, T, D] -> [B, T, H * D]
    """Attention's heads side by side as `linear` (o_proj) wants them: in the mma K order
    of its W4A16 kernel when it asks for that at this many tokens and each head is whole
    128-feature blocks (Llama-3's D = 128), so the copy that merges the heads also orders
    them; plain otherwise."""
    b, _, t, d = o.shape
    heads = o.transpose(1, 2)  # [B, T, H, D], strided
    if d % MMA_BLOCK == 0 and wants_mma_order(linear, b * t):
        return MmaOrderActivations(to_mma_order(heads).view(b, t, -1))
    return heads.reshape(b, t, -1)
