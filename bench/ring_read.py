"""The one-token fragment kernel's data path without its math, for bench/read_floor.py.

`ring_read` launches the grid of `w4_fragment.fragment_linear` for a FragConfig (same tiles,
same K split) and streams the layer's fragment atoms and x through the same cp.async ring
(w4_fragment's `_rings`, `_copy_tile` and `_ring_step`), then folds what it loaded into one
integer per program instead of unpacking and multiplying it, and skips the split-K fix-up.
If it takes about as long as the fragment kernel, the data path sets the kernel's time; if
it takes about as long as a plain read of the same bytes, the math and its latency do.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from specquant.kernels.triton_ops import w4_fragment as F


@gluon.jit
def _ring_read_kernel(
    x_ptr,  # [M, K] bf16 / fp16
    w_ptr,  # int16 [N/16, K/128, 512] fragment atoms
    out_ptr,  # int32 [programs]: the folded words, so that no load can be dropped
    M, N, K, K_SPLIT, stride_xm,
    BN: gl.constexpr, BK: gl.constexpr, BM: gl.constexpr, STAGES: gl.constexpr,
    WORDS: gl.constexpr, XL: gl.constexpr,
):  # fmt: skip
    pid_k = gl.program_id(2)
    w_ptrs, w_mask = F._weight_ptrs(w_ptr, gl.program_id(0) * BN, N, K, BN, BK, WORDS)
    x_ptrs, x_mask = F._x_ptrs(x_ptr, 0, M, stride_xm, BK, BM, XL)  # x^T [BK, BM]
    k_lo = pid_k * K_SPLIT
    w_ring, x_ring = F._rings(x_ptr.dtype.element_ty, BN, BK, BM, STAGES)
    for s in gl.static_range(STAGES - 1):
        F._copy_tile(w_ring.index(s), x_ring.index(s), w_ptrs, w_mask, x_ptrs, x_mask, k_lo,
                     s * BK, K_SPLIT)  # fmt: skip
    # folded in the loaded types, so that the fold holds no more registers than the tiles
    acc = gl.zeros([BN // 16, (BK // 128) * 512], gl.int16, WORDS)
    xacc = gl.zeros([BK, BM], x_ptr.dtype.element_ty, XL)
    for kb in range(0, K_SPLIT, BK):
        loaded, xt = F._ring_step(w_ring, x_ring, w_ptrs, w_mask, x_ptrs, x_mask, k_lo, kb,
                                  K_SPLIT, BK, STAGES, WORDS, XL)  # fmt: skip
        acc = acc ^ loaded
        xacc = xacc + xt
    F.async_copy.wait_group(0)
    folded = gl.sum(gl.sum(acc.to(gl.int32), axis=1), axis=0)
    total = folded + gl.sum(gl.sum(xacc.to(gl.float32), axis=1), axis=0).to(gl.int32)
    gl.store(out_ptr + gl.program_id(0) * gl.num_programs(2) + pid_k, total)


def ring_read(x: torch.Tensor, frag: torch.Tensor, config: F.FragConfig) -> torch.Tensor:
    """Stream `frag` (and x) as fragment_linear(x, frag, ..., config) would for x's tokens,
    per channel (a g128 layer splits K alike when block_k is 128); returns the folded int32
    per program."""
    if config.stages < 2:
        raise ValueError(f"ring_read times the cp.async ring: stages must be >= 2, not "
                         f"{config.stages}")  # fmt: skip
    a, out, _ = F.launch_buffers(x, frag)
    (m, k), n = a.shape, out.shape[1]
    bm = F.block_m(m)
    g = F.plan_grid(out, k, 0, config.block_n, config.block_k, bm, config.split_waves, None)
    lay = F.layouts(config.block_n, g.block_k, bm, config.warps)
    folded = torch.empty(g.n_tiles * g.split_k, dtype=torch.int32, device=a.device)
    _ring_read_kernel[(g.n_tiles, 1, g.split_k)](
        a, frag, folded, m, n, k, g.k_split, a.stride(0),
        BN=config.block_n, BK=g.block_k, BM=bm, STAGES=config.stages,
        WORDS=lay.words, XL=lay.x, num_warps=config.warps,
    )  # fmt: skip
    return folded
