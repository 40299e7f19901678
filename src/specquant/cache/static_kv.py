"""Preallocated KV cache, owned by the engine and passed into `forward`.

Layout (one tensor for K and one for V, all layers stacked)::

    k, v: [num_layers, batch, num_kv_heads, max_len, head_dim]
           slot:  0 .. length-1   | length .. length+T-1   | free
                  committed prefix| block being verified   |

The model writes the new block at slots [meta.cache_len, meta.cache_len + T). Nothing is
committed until the engine says so: `commit(n)` after plain decoding, `compact(keep)` after
speculative verification (keep the accepted tree nodes, in order), `truncate(n)` to roll back.
"""

from __future__ import annotations

from typing import Protocol

import torch

from specquant.kernels.reference import kv_compact_reference


class KVCache(Protocol):
    """What model code needs from a cache: write a block, read a prefix."""

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None: ...

    def view(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]: ...


class StaticKVCache:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        *,
        batch: int = 1,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        shape = (num_layers, batch, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0  # committed tokens

    @property
    def free(self) -> int:
        return self.max_len - self.length

    # ---------------------------------------------------------------- used by the model
    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [B, Hkv, T, D] -> slots [start, start + T) of `layer`."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(
                f"KV cache overflow: writing up to slot {end} > max_len {self.max_len}"
            )
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v

    def write_at(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Scatter k, v [B, Hkv, T, D] to arbitrary slots [T] of `layer`."""
        self.k[layer, :, :, slots] = k
        self.v[layer, :, :, slots] = v

    def view(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots [0, end) of `layer`: ([B, Hkv, end, D], [B, Hkv, end, D])."""
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    # ---------------------------------------------------------------- used by the engine
    def commit(self, n: int) -> None:
        """Accept the first n slots of the block written after the committed prefix."""
        if self.length + n > self.max_len:
            raise ValueError(f"cannot commit {n} tokens: {self.free} free of {self.max_len}")
        self.length += n

    def truncate(self, length: int) -> None:
        """Drop everything from slot `length` on (the data stays; it is simply overwritten)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"truncate({length}) outside [0, {self.length}]")
        self.length = length

    def compact(self, keep: torch.Tensor) -> None:
        """Keep block entries `keep` [n] (indices after the committed prefix, ascending),
        move them to slots [length, length + n) and commit them."""
        keep = keep.to(device=self.k.device, dtype=torch.long)
        kv_compact_reference(self.k, self.length, keep)
        kv_compact_reference(self.v, self.length, keep)
        self.length += keep.numel()

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only batch rows `rows` [B'] (in that order): batched generation drops the
        sequences that have finished."""
        rows = rows.to(device=self.k.device, dtype=torch.long)
        self.k = self.k.index_select(1, rows)
        self.v = self.v.index_select(1, rows)

    def reset(self) -> None:
        self.length = 0


class BlockKV:
    """Holds one block's K/V per layer without a preallocated buffer: for training, where
    each forward sees a whole sequence from position 0 and autograd must see separate
    tensors per layer (in-place writes into one shared buffer would break backward)."""

    def __init__(self) -> None:
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        assert start == 0, "BlockKV holds a single block written from position 0"
        self.k[layer], self.v[layer] = k, v

    def view(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]
