"""W4A16 GEMM for few tokens with the weights repacked into tensor-core fragment order (Gluon).

The canonical-layout kernel (qlinear.py) spends ~3 instructions per weight at M <= 16: its
int4 bytes interleave even and odd k, so x is split into even and odd columns in registers,
and Triton assembles the mma operands with moves. Here each layer's codes are repacked once
(`prepare_fragments`) so that one thread's 16-byte load is exactly the codes its mma.sync
fragments need, and x is read in the same K order. The kernel computes y^T = W x^T: the
weights are mma's A operand (16 output features x 16 k per instruction, so half as many
instructions as with W as the B operand) and the tokens its N side (8 or 16).

Order along K inside each 128-wide block. An mma.sync m16n8k16 operand fragment gives lane
(4 g + t) the k values 2t + {0, 1} + 8 {0, 1} of each k16 step; over 128 k a thread holds
k = k1 + 2 (t) + 8 k8 + 16 k16 + 32 k32 + 64 k64 for its bits (k1, k8, ..., k64). x column
c = pi(k) puts those 32 values of one thread next to each other (c bits: k1 k8 k16 k32 k64
then t), so x loads as 16-byte vectors; the weights are permuted the same way, so the
products pair the same columns and the sum over K is unchanged.

Weight words. An int16 holds the four codes of k + 8 j (j = 0..3: the k8 and k16 bits);
two int16 side by side are k and k + 1, so one 32-bit register unpacks (4 lop3, 3 shifts, 4
packed fma: the PTX of qlinear.py) straight into four bf16x2 operand registers. Atoms of 16
output features x 128 k (512 int16, 1 KiB): two halves (k64), each lane-major with 8 int16
per lane in the order (k1, n8, k32) of the fragment's registers, so a lane reads its atom
with two 16-byte loads and each load of a warp is 512 contiguous bytes (whole sectors, and
no shared-memory bank conflicts). `fragment_codes` undoes the packing (tests).

Pipelining (STAGES > 1): the weight tiles stream through a ring of shared-memory buffers
with cp.async, STAGES - 1 tiles ahead of the mma. Each thread reads back exactly the bytes
it copied (same layout for copy and load), so the ring needs no CTA barrier.

The layouts are Triton linear layouts built here in Python; the kernel reshapes the loaded
tensors into the mma operand layouts with `convert_layout(assert_trivial=True)`, so a
layout that would need data movement fails to compile instead of running slowly.

Split-K uses the fixed-order fix-up of qlinear.py (results do not depend on timing).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache
from typing import Any

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy

from specquant.kernels.reference import MmaOrderActivations
from specquant.kernels.triton_ops.qlinear import _locks, _num_sms, choose_split_k, unpack_ptx
from specquant.quant.pack import pack_int4, unpack_int4

ATOM_N, ATOM_K = 16, 128  # one repacked atom: 16 output features x 128 k

# x column of mma position k inside a 128 block: (bit of k) -> (bit of c)
_PI_BITS = {0: 0, 3: 1, 4: 2, 5: 3, 6: 4, 1: 5, 2: 6}


def pi(k: int) -> int:
    """The x column (within its 128-block) whose value sits at mma K position `k`."""
    return sum(1 << _PI_BITS[b] for b in range(7) if k >> b & 1)


# ----------------------------------------------------------------------------- packing
def _column_order(device: torch.device) -> torch.Tensor:
    """[128]: the x column of each mma K position (pi as a tensor)."""
    return torch.tensor([pi(i) for i in range(ATOM_K)], device=device)


def prepare_fragments(qweight: torch.Tensor) -> torch.Tensor:
    """Canonical uint8 [N, K/2] -> int16 [N/16, K/128, 512] atoms (N % 16 == K % 128 == 0)."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    if n % ATOM_N or k % ATOM_K:
        raise ValueError(f"fragment layout needs N % {ATOM_N} == K % {ATOM_K} == 0, not {n}, {k}")
    codes = unpack_int4(qweight).to(torch.int32)  # u = q + 8, [N, K]
    u = codes.view(n, k // ATOM_K, ATOM_K)[:, :, _column_order(qweight.device)]  # mma K order
    # n = 16 nb + 8 n8 + g; k = 64 k64 + 32 k32 + 16 j1 + 8 j0 + 2 t + k1
    u = u.reshape(n // 16, 2, 8, k // 128, 2, 2, 2, 2, 4, 2)
    # -> [nb, kb, k64, lane = 4 g + t, reg = 4 k32 + 2 n8 + k1, j = 2 j1 + j0]
    u = u.permute(0, 3, 4, 2, 8, 5, 1, 9, 6, 7).reshape(n // 16, k // 128, 512, 4)
    words = (u << torch.tensor([0, 4, 8, 12], device=u.device, dtype=torch.int32)).sum(-1)
    return words.to(torch.int32).sub(words.ge(1 << 15).to(torch.int32) << 16).to(torch.int16)


def fragment_codes(frag: torch.Tensor) -> torch.Tensor:
    """Inverse of prepare_fragments: int16 atoms -> canonical uint8 [N, K/2]."""
    nb, kb = frag.shape[0], frag.shape[1]
    w = frag.to(torch.int32) & 0xFFFF
    u = torch.stack([(w >> (4 * j)) & 0xF for j in range(4)], dim=-1)  # [nb, kb, 512, 4]
    u = u.reshape(nb, kb, 2, 8, 4, 2, 2, 2, 2, 2)  # nb kb k64 g t k32 n8 k1 j1 j0
    u = u.permute(0, 6, 3, 1, 2, 5, 8, 9, 4, 7).reshape(nb * 16, kb, ATOM_K)
    u = u[:, :, torch.argsort(_column_order(frag.device))]  # back to column order
    return pack_int4(u.reshape(nb * 16, kb * ATOM_K))


# ----------------------------------------------------------------------------- layouts
def _bits(n: int) -> list[int]:
    return [1 << i for i in range((n - 1).bit_length())]


@dataclass(frozen=True)
class Layouts:
    words: Any  # int16 [BN/16, (BK/128) * 512] as loaded (memory order)
    words32: Any  # the same registers as int32 [BN/16, (BK/128) * 256] (two int16 each)
    words_mma: Any  # int16 [BN, BK/4] in mma order (the A operand minus the k8, k16 bits)
    x: Any  # x^T [BK, BM] by physical column, as loaded


@cache
def layouts(bn: int, bk: int, bm: int, warps: int, warps_m: int = 1) -> Layouts:
    """The linear layouts of the loaded weight words and x tiles for one tile config.

    mma.sync's A operand over [BN, BK] (`warps` along N): registers k1, n8, k8, k16, k32, k64,
    then the N repeats above the warps; lanes k2, k4, n1, n2, n4; warps n16, n32, ... Its B
    operand over [BK, BM]: registers k1, k8, ..., k64, then the token blocks of 8 above the
    warps; lanes k2, k4, m1, m2, m4. With `warps_m` > 1 the blocks of 8 tokens are dealt out
    over warps too (the mma layout's warp order is M first, at 8-token granularity): those
    warps load and unpack the same weights, and each holds 1 / warps_m of x in registers.
    """
    if bm % (8 * warps_m):
        raise ValueError(f"BLOCK_M {bm} gives fewer than 8 tokens to each of {warps_m} warps")
    warp_n = [16 * w for w in _bits(warps)]
    warp_m = [8 * w for w in _bits(warps_m)]
    rep_n = [n for n in _bits(bn) if n >= 16 * warps]
    k_hi = [k for k in _bits(bk) if k >= 32]  # k32, k64, then 128-blocks

    def kh(k: int) -> int:  # mma k -> word index (the k8 and k16 bits live in the word)
        return (k & 7) | ((k >> 5) << 3)

    words_mma = gl.DistributedLinearLayout(
        reg_bases=[[0, kh(1)], [8, 0]] + [[0, kh(k)] for k in k_hi] + [[n, 0] for n in rep_n],
        lane_bases=[[0, kh(2)], [0, kh(4)], [1, 0], [2, 0], [4, 0]],
        warp_bases=[[0, 0] for _ in warp_m] + [[n, 0] for n in warp_n],
        block_bases=[],
        shape=[bn, bk // 4],
    )

    def col(n: int, k: int) -> list[int]:  # (n, mma k) basis -> (atom row, column) in memory
        if n:
            return [n >> 4, 0] if n >= 16 else [0, {1: 32, 2: 64, 4: 128, 8: 2}[n]]
        if k >= 128:
            return [0, 512 * (k // 128)]
        return [0, {1: 1, 2: 8, 4: 16, 32: 4, 64: 256}[k]]

    regs = [col(8, 0)] + [col(0, k) for k in k_hi] + [col(n, 0) for n in rep_n]
    lanes = [col(0, 2), col(0, 4), col(1, 0), col(2, 0), col(4, 0)]
    warps_nm = [[0, 0] for _ in warp_m] + [col(n, 0) for n in warp_n]
    words = gl.DistributedLinearLayout(
        reg_bases=[col(0, 1), *regs],
        lane_bases=lanes,
        warp_bases=warps_nm,
        block_bases=[],
        shape=[bn // 16, (bk // 128) * 512],
    )
    # col(0, 1) is the neighbouring int16 (k + 1): as int32, every other column is halved
    words32 = gl.DistributedLinearLayout(
        reg_bases=[[r, c // 2] for r, c in regs],
        lane_bases=[[r, c // 2] for r, c in lanes],
        warp_bases=[[r, c // 2] for r, c in warps_nm],
        block_bases=[],
        shape=[bn // 16, (bk // 128) * 256],
    )
    x_regs = [[pi(k) if k < 128 else k, 0] for k in [1, 8, 16, *k_hi]]
    x = gl.DistributedLinearLayout(
        reg_bases=x_regs + [[0, m] for m in _bits(bm) if m >= 8 * warps_m],
        lane_bases=[[pi(2), 0], [pi(4), 0], [0, 1], [0, 2], [0, 4]],
        warp_bases=[[0, m] for m in warp_m] + [[0, 0] for _ in warp_n],
        block_bases=[],
        shape=[bk, bm],
    )
    return Layouts(words, words32, words_mma, x)


# ------------------------------------------------------------------------------ kernel
# four codes per 16-bit half, at bits 0, 4, 8, 12: no byte shuffle needed first
_UNPACK_BF16 = unpack_ptx("bf16", (0, 4, 8, 12))
_UNPACK_F16 = unpack_ptx("f16", (0, 4, 8, 12))
# Triton 3.6 (the GPU image) names the CTA barrier thread_barrier; later versions barrier
_cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
# and names cp.async global -> shared async_copy_global_to_shared; later versions async_load
_async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
_UNPACK_BF16_C = gl.constexpr(_UNPACK_BF16)
_UNPACK_F16_C = gl.constexpr(_UNPACK_F16)


@gluon.jit
def _words(loaded, BN: gl.constexpr, BK: gl.constexpr, WORDS_MMA: gl.constexpr):
    """int16 [BN/16, BK/128 * 512] as loaded -> [BN, BK/4] in mma order (no data moves)."""
    t = gl.reshape(loaded, [BN // 16, BK // 128, 2, 8, 4, 2, 2, 2])  # nb kb k64 g t k32 n8 k1
    t = gl.permute(t, [0, 6, 3, 1, 2, 5, 4, 7])  # n: nb n8 g | word: kb k64 k32 t k1
    return gl.convert_layout(gl.reshape(t, [BN, BK // 4]), WORDS_MMA, assert_trivial=True)


@gluon.jit
def _halves(w32, WORDS: gl.constexpr):
    """int32 [R, C/2] in layout words32 -> its int16 [R, C] (low half first) in WORDS: the
    same registers, so no data moves. Values carried from one loop turn to the next stay
    int32: carried as int16, each was repacked with a PRMT per turn."""
    t = gl.join(w32.to(gl.int16), (w32 >> 16).to(gl.int16))
    return gl.convert_layout(gl.reshape(t, [w32.shape[0], 2 * w32.shape[1]]), WORDS,
                             assert_trivial=True)  # fmt: skip


@gluon.jit
def _unpack(words, DTYPE: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, AL: gl.constexpr):
    """int16 [BN, BK/4] (codes of k + 8 j, j = 0..3) -> DTYPE [BN, BK] in layout AL."""
    if gl.bfloat16 == DTYPE:
        bf = gl.bfloat16
        o0, o1, o2, o3 = gl.inline_asm_elementwise(
            _UNPACK_BF16_C, "=r,=r,=r,=r,r", [words], (bf, bf, bf, bf), True, 2
        )
    else:
        hf = gl.float16
        o0, o1, o2, o3 = gl.inline_asm_elementwise(
            _UNPACK_F16_C, "=r,=r,=r,=r,r", [words], (hf, hf, hf, hf), True, 2
        )
    j = gl.join(gl.join(o0, o1), gl.join(o2, o3))  # [BN, BK/4, 2 (k8), 2 (k16)]
    j = gl.reshape(j, [BN, BK // 32, 8, 2, 2])
    j = gl.permute(j, [0, 1, 4, 3, 2])  # k: blocks above 32, k16, k8, k1..k4
    return gl.convert_layout(gl.reshape(j, [BN, BK]), AL, assert_trivial=True)


@gluon.jit
def _x_operand(x, BK: gl.constexpr, BM: gl.constexpr, BL: gl.constexpr):
    """x^T [BK, BM] by physical column c -> mma K order (c bits: k1 k8 k16 k32 k64 k2 k4)."""
    t = gl.reshape(x, [BK // 128, 2, 2, 2, 2, 2, 2, 2, BM])  # c: blk k4 k2 k64 k32 k16 k8 k1
    t = gl.permute(t, [0, 3, 4, 5, 6, 1, 2, 7, 8])
    return gl.convert_layout(gl.reshape(t, [BK, BM]), BL, assert_trivial=True)


@gluon.jit
def _weight_ptrs(w_ptr, n0, N, K, BN: gl.constexpr, BK: gl.constexpr, WORDS: gl.constexpr):
    """Pointers [BN/16, BK/128 * A] to the fragment atoms of output rows n0.. in the first
    K tile (add (k // 128) * A for the tile at k), and the mask of atom rows inside N. An
    atom is 1024 bytes: A = 512 int16 words (W4A16) or 1024 int8 bytes (W4A8)."""
    A: gl.constexpr = 8192 // w_ptr.dtype.element_ty.primitive_bitwidth
    rows = gl.arange(0, BN // 16, layout=gl.SliceLayout(1, WORDS))
    cols = gl.arange(0, (BK // 128) * A, layout=gl.SliceLayout(0, WORDS))
    row_off = ((n0 // 16 + rows).to(gl.int64) * (K // 128) * A)[:, None]
    return w_ptr + row_off + cols[None, :], (n0 // 16 + rows < N // 16)[:, None]


@gluon.jit
def _out_index(n0, m0, N, M, BN: gl.constexpr, BM: gl.constexpr, LAYOUT: gl.constexpr):
    """The output rows rn [BN] and tokens rm [BM] of a program's y^T tile in the
    accumulator's layout, with their masks."""
    rn = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, LAYOUT))
    rm = m0 + gl.arange(0, BM, layout=gl.SliceLayout(0, LAYOUT))
    return rn, rm, rn < N, rm < M


@gluon.jit
def _gdc_wait():
    """griddepcontrol.wait: under programmatic dependent launch, block until the kernel
    before has finished and its writes are visible (a no-op without it)."""
    gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32,
                              is_pure=False, pack=1)  # fmt: skip


@gluon.jit
def _gdc_launch_dependents():
    """griddepcontrol.launch_dependents: the next kernel, if launched with programmatic
    dependent launch, may start now (it waits in _gdc_wait before it reads our output)."""
    gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [],
                              dtype=gl.int32, is_pure=False, pack=1)  # fmt: skip


@gluon.jit
def _copy_tile(w_dst, x_dst, w_ptrs, w_mask, x_ptrs, x_mask, k_lo, kb, K_SPLIT):
    """cp.async of the K tile at k_lo + kb (nothing past K_SPLIT) into one ring slot."""
    A: gl.constexpr = 8192 // w_ptrs.dtype.element_ty.primitive_bitwidth  # per 1024-byte atom
    live = kb < K_SPLIT
    k0 = k_lo + kb
    _async_load(w_dst, w_ptrs + (k0 // 128) * A, mask=w_mask & live)
    _async_load(x_dst, x_ptrs + k0, mask=x_mask & live)
    async_copy.commit_group()


@gluon.jit
def _x_ptrs(x_ptr, m0, M, stride_xm, BK: gl.constexpr, BM: gl.constexpr, XL: gl.constexpr):
    """Pointers to x^T [BK, BM] of tokens m0.. in the first K tile (add k for the tile at
    k), in layout XL, and the mask of tokens inside M."""
    rc = gl.arange(0, BK, layout=gl.SliceLayout(1, XL))
    rmx = m0 + gl.arange(0, BM, layout=gl.SliceLayout(0, XL))
    return x_ptr + rmx.to(gl.int64)[None, :] * stride_xm + rc[:, None], (rmx < M)[None, :]


@gluon.jit
def _rings(DTYPE: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, BM: gl.constexpr,
           STAGES: gl.constexpr):  # fmt: skip
    """The shared-memory rings of STAGES weight tiles and x tiles. Each thread reads back
    exactly what it copied, so no swizzle (the 16-byte runs of a warp are contiguous) and
    no barrier."""
    W_RING: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0])
    X_RING: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0, 1])
    w_ring = gl.allocate_shared_memory(gl.int16, [STAGES, BN // 16, (BK // 128) * 512], W_RING)
    x_ring = gl.allocate_shared_memory(DTYPE, [STAGES, BK, BM], X_RING)
    return w_ring, x_ring


@gluon.jit
def _ring_step(w_ring, x_ring, w_ptrs, w_mask, x_ptrs, x_mask, k_lo, kb, K_SPLIT,
               BK: gl.constexpr, STAGES: gl.constexpr, WORDS: gl.constexpr,
               XL: gl.constexpr):  # fmt: skip
    """One turn of the ring at K offset kb of the split: copy the tile STAGES - 1 ahead
    into the free slot, wait for this thread's copies of tile kb, and return its weight
    words (layout WORDS) and x^T (layout XL)."""
    i = kb // BK
    nxt = (i + STAGES - 1) % STAGES
    _copy_tile(w_ring.index(nxt), x_ring.index(nxt), w_ptrs, w_mask, x_ptrs, x_mask,
               k_lo, kb + (STAGES - 1) * BK, K_SPLIT)  # fmt: skip
    async_copy.wait_group(STAGES - 1)  # this thread's copies of tile i have landed
    return w_ring.index(i % STAGES).load(WORDS), x_ring.index(i % STAGES).load(XL)


@gluon.jit
def _tile_scales(s_ptr, rn, n_mask, stride_sn, stride_sg, k0, live, GROUP: gl.constexpr):
    """fp32 [BN]: the g128 scales of rows rn in the K tile at k0 (zeros where not `live`);
    per channel zeros, which nothing reads (the epilogue scales) and the compiler drops."""
    if GROUP > 0:
        gs = gl.load(_scale_ptrs(s_ptr, rn, stride_sn, stride_sg, k0, GROUP),
                     mask=n_mask & live, other=0.0)  # fmt: skip
    else:
        gs = gl.zeros_like(rn).to(gl.float32)
    return gs


@gluon.jit
def _direct_tile(w32_ptrs, w_mask, x_ptrs, x_mask, s_ptr, rn, n_mask, stride_sn, stride_sg,
                 k_lo, kb, K_SPLIT, GROUP: gl.constexpr):  # fmt: skip
    """Plain loads (no shared memory) of the K tile at k_lo + kb into registers: its weight
    words as int32 (layout words32), x^T and its g128 scales; nothing past K_SPLIT. Issued
    a tile before their use (FragConfig.prefetch), they stay in flight while the tile
    before is multiplied: a load stalls a thread only at its first use."""
    live = kb < K_SPLIT
    k0 = k_lo + kb
    w = gl.load(w32_ptrs + (k0 // 128) * 256, mask=w_mask & live, other=0)
    xt = gl.load(x_ptrs + k0, mask=x_mask & live, other=0.0)
    return w, xt, _tile_scales(s_ptr, rn, n_mask, stride_sn, stride_sg, k0, live, GROUP)


@gluon.jit
def _tile_mma(acc, loaded, xt, gs, s_ptrs, n_mask, mma: gl.constexpr, DTYPE: gl.constexpr,
              GROUP: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, BM: gl.constexpr,
              WORDS_MMA: gl.constexpr):  # fmt: skip
    """acc [BN, BM] += one K tile's W x^T: `loaded` int16 words (layout WORDS), x^T [BK, BM]
    (layout XL) and, for group formats, the tile's scales: gs [BN] if loaded already (else
    None), else loaded here from s_ptrs after the mma is issued."""
    AL: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    BL: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    a = _unpack(_words(loaded, BN, BK, WORDS_MMA), DTYPE, BN, BK, AL)
    b = _x_operand(xt, BK, BM, BL)
    if GROUP == 0:
        acc = gl.nvidia.ampere.mma_v2(a, b, acc)
    else:
        part = gl.nvidia.ampere.mma_v2(a, b, gl.zeros([BN, BM], gl.float32, mma))
        if gs is None:
            gs = gl.load(s_ptrs, mask=n_mask, other=0.0)
        acc += part * gs[:, None]
    return acc


@gluon.jit
def _epilogue(acc, rn, rm, n_mask, m_mask, s_ptr, b_ptr, out_ptr, stride_om,
              GROUP: gl.constexpr, HAS_BIAS: gl.constexpr):  # fmt: skip
    """acc [BN, BM] = y^T -> out[m, n] with per-channel scales and bias applied."""
    y = acc
    if GROUP == 0:
        y = y * gl.load(s_ptr + rn, mask=n_mask, other=0.0)[:, None]
    if HAS_BIAS:
        y = y + gl.load(b_ptr + rn, mask=n_mask, other=0.0).to(gl.float32)[:, None]
    out = out_ptr + rm.to(gl.int64)[None, :] * stride_om + rn[:, None]
    gl.store(out, y.to(out_ptr.dtype.element_ty), mask=n_mask[:, None] & m_mask[None, :])


@gluon.jit
def _scale_ptrs(s_ptr, rows, stride_sn, stride_sg, k, GROUP: gl.constexpr):
    """Pointers to the scales of `rows` in the group holding k: fp32 [N, G] through its
    strides (row-major, or a view of group-major memory; scale_strides)."""
    return s_ptr + rows * stride_sn + (k // GROUP) * stride_sg


@gluon.jit
def _partial(ws_ptr, offs, mask):
    """One split's partial sums, read from L2 (another program wrote them)."""
    return gl.load(ws_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")


@gluon.jit
def _finish(acc, rn, rm, n_mask, m_mask, s_ptr, b_ptr, out_ptr, ws_ptr, lock_ptr, M, N,
            stride_om, GROUP: gl.constexpr, HAS_BIAS: gl.constexpr,
            SPLIT_K: gl.constexpr):  # fmt: skip
    """Write acc [BN, BM] = y^T, or with split-K its partial sums; the last split of a tile
    to arrive adds them in a fixed order (the result does not depend on timing)."""
    if SPLIT_K == 1:
        _epilogue(acc, rn, rm, n_mask, m_mask, s_ptr, b_ptr, out_ptr, stride_om, GROUP, HAS_BIAS)
    else:
        pid_k = gl.program_id(2)
        mn_mask = n_mask[:, None] & m_mask[None, :]
        offs = rm.to(gl.int64)[None, :] * N + rn[:, None]
        gl.store(ws_ptr + pid_k * M * N + offs, acc, mask=mn_mask)
        _cta_barrier()  # every thread's partial sums are written before the arrival
        tile = gl.program_id(0) * gl.num_programs(1) + gl.program_id(1)
        arrived = gl.atomic_add(lock_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:  # last to arrive: add the splits in a fixed order
            _cta_barrier()
            total = gl.load(ws_ptr + offs, mask=mn_mask, other=0.0, cache_modifier=".cg")
            # Each split is an L2 round trip: load CHUNK splits at once (about 32 more
            # registers per thread), then add them in order. One split per iteration left
            # the fix-up of a 16-way split 15 round trips long; unrolling all of them made
            # ptxas hold every split's sums at once and spill them.
            per_thread: gl.constexpr = acc.shape[0] * acc.shape[1] // (32 * gl.num_warps())
            CHUNK: gl.constexpr = 1 + 31 // per_thread
            for s0 in range(1, SPLIT_K, CHUNK):
                for u in gl.static_range(CHUNK):  # past the last split: masked, adds +0.0
                    total += _partial(ws_ptr, (s0 + u) * M * N + offs,
                                      mn_mask & (s0 + u < SPLIT_K))  # fmt: skip
            gl.atomic_xchg(lock_ptr + tile, 0)
            _epilogue(
                total, rn, rm, n_mask, m_mask, s_ptr, b_ptr, out_ptr, stride_om, GROUP, HAS_BIAS
            )


@gluon.jit(do_not_specialize=["M"])
def _w4_fragment_kernel(
    x_ptr,  # [M, K] bf16 / fp16
    w_ptr,  # int16 [N/16, K/128, 512] fragment atoms
    s_ptr,  # fp32 [N, G] scales, strides (stride_sn, stride_sg)
    b_ptr,  # [N] bias (HAS_BIAS)
    out_ptr,  # [M, N]
    ws_ptr,  # fp32 [SPLIT_K, M, N] partial sums (SPLIT_K > 1)
    lock_ptr,  # int32 arrival counter per output tile, zero between launches
    M, N, K, stride_sn, stride_sg, K_SPLIT, stride_xm, stride_om,
    GROUP: gl.constexpr, HAS_BIAS: gl.constexpr, SPLIT_K: gl.constexpr,
    BN: gl.constexpr, BK: gl.constexpr, BM: gl.constexpr, WARPS: gl.constexpr,
    WARPS_M: gl.constexpr, STAGES: gl.constexpr,
    WORDS: gl.constexpr, WORDS_MMA: gl.constexpr, XL: gl.constexpr, PDL: gl.constexpr,
    PREFETCH: gl.constexpr, WORDS32: gl.constexpr,
):  # fmt: skip
    if PDL:  # the next layer's kernel may launch and fetch its weights while this one runs
        _gdc_launch_dependents()
    mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[2, 0], warps_per_cta=[WARPS, WARPS_M], instr_shape=[16, 8]
    )
    DTYPE: gl.constexpr = x_ptr.dtype.element_ty
    pid_n = gl.program_id(0)
    pid_m = gl.program_id(1)
    pid_k = gl.program_id(2)
    n0 = pid_n * BN
    m0 = pid_m * BM

    w_ptrs, w_mask = _weight_ptrs(w_ptr, n0, N, K, BN, BK, WORDS)
    x_ptrs, x_mask = _x_ptrs(x_ptr, m0, M, stride_xm, BK, BM, XL)  # x^T [BK, BM]

    rn, rm, n_mask, m_mask = _out_index(n0, m0, N, M, BN, BM, mma)
    acc = gl.zeros([BN, BM], gl.float32, mma)
    k_lo = pid_k * K_SPLIT
    if STAGES > 1:  # rings of weight and x tiles in shared memory, STAGES - 1 tiles ahead
        w_ring, x_ring = _rings(DTYPE, BN, BK, BM, STAGES)
        if PDL:
            # Launched before the kernel that writes x has finished: copy the first tiles'
            # weights (read-only) meanwhile, wait, then x. Tile 0's commit group holds those
            # weights too, so the loop's waits still cover them.
            for s in gl.static_range(STAGES - 1):
                _async_load(w_ring.index(s), w_ptrs + ((k_lo + s * BK) // 128) * 512,
                            mask=w_mask & (s * BK < K_SPLIT))  # fmt: skip
            _gdc_wait()
            for s in gl.static_range(STAGES - 1):
                _async_load(x_ring.index(s), x_ptrs + k_lo + s * BK,
                            mask=x_mask & (s * BK < K_SPLIT))  # fmt: skip
                async_copy.commit_group()
        else:
            for s in gl.static_range(STAGES - 1):
                _copy_tile(w_ring.index(s), x_ring.index(s), w_ptrs, w_mask, x_ptrs, x_mask,
                           k_lo, s * BK, K_SPLIT)  # fmt: skip
    elif PDL:
        _gdc_wait()  # nothing is read or written before the kernel before has finished
    if PREFETCH:
        # Two register buffers, a and b, and two K tiles per turn: b's loads go out before
        # a's math, the next a's after it, so one tile is always in flight. Unrolled, no
        # buffer is copied into another at the end of a turn. A split of an odd number of
        # tiles multiplies a last, zero tile (its loads are masked off).
        w32_ptrs, w32_mask = _weight_ptrs(w_ptr.to(gl.pointer_type(gl.int32)), n0, N, K, BN,
                                          BK, WORDS32)  # fmt: skip
        tile = (w32_ptrs, w32_mask, x_ptrs, x_mask, s_ptr, rn, n_mask, stride_sn, stride_sg)
        wa, xa, sa = _direct_tile(*tile, k_lo, 0, K_SPLIT, GROUP)
        for kb in range(0, K_SPLIT, 2 * BK):
            wb, xb, sb = _direct_tile(*tile, k_lo, kb + BK, K_SPLIT, GROUP)
            acc = _tile_mma(acc, _halves(wa, WORDS), xa, sa, None, n_mask, mma, DTYPE, GROUP,
                            BN, BK, BM, WORDS_MMA)  # fmt: skip
            wa, xa, sa = _direct_tile(*tile, k_lo, kb + 2 * BK, K_SPLIT, GROUP)
            acc = _tile_mma(acc, _halves(wb, WORDS), xb, sb, None, n_mask, mma, DTYPE, GROUP,
                            BN, BK, BM, WORDS_MMA)  # fmt: skip
    else:
        for kb in range(0, K_SPLIT, BK):
            k0 = k_lo + kb
            if STAGES > 1:
                loaded, xt = _ring_step(w_ring, x_ring, w_ptrs, w_mask, x_ptrs, x_mask, k_lo,
                                        kb, K_SPLIT, BK, STAGES, WORDS, XL)  # fmt: skip
            else:
                loaded = gl.load(w_ptrs + (k0 // 128) * 512, mask=w_mask, other=0)
                xt = gl.load(x_ptrs + k0, mask=x_mask, other=0.0)
            s_ptrs = _scale_ptrs(s_ptr, rn, stride_sn, stride_sg, k0, max(GROUP, 1))
            acc = _tile_mma(acc, loaded, xt, None, s_ptrs, n_mask, mma, DTYPE, GROUP, BN, BK, BM,
                            WORDS_MMA)  # fmt: skip

    if STAGES > 1:
        # the ring's last STAGES - 1 copies are masked off past K_SPLIT, and a masked cp.async
        # still writes zeros: let them land before _finish reuses the shared memory (the
        # split-K arrival count passes through it)
        async_copy.wait_group(0)
    _finish(acc, rn, rm, n_mask, m_mask, s_ptr, b_ptr, out_ptr, ws_ptr, lock_ptr, M, N,
            stride_om, GROUP, HAS_BIAS, SPLIT_K)  # fmt: skip


# ------------------------------------------------------------------------------ launcher
@dataclass(frozen=True)
class FragConfig:
    block_n: int  # output features per program (multiple of 16 * warps)
    block_k: int  # multiple of 128
    warps: int  # along N
    split_waves: int = 1  # split K until the grid has this many programs per SM
    warps_m: int = 1  # along the tokens (each such warp holds BLOCK_M / warps_m of them)
    stages: int = 1  # > 1: cp.async ring of this many K tiles in shared memory
    # programmatic dependent launch (Hopper): the kernel may start while the one before it
    # runs; with a ring (stages > 1) it copies its first weight tiles meanwhile, then waits
    # for x. The weights must not be written by the kernel before (they never are in a
    # model: they are read-only once prepared). An experiment; no table picks it yet.
    pdl: bool = False
    # without a ring: the next K tile's plain loads (weights, x, g128 scales) go out into
    # registers before a tile's math, so that they are in flight while it runs; without
    # it, each tile's loads are waited for where they are issued
    prefetch: bool = False

    def __post_init__(self) -> None:
        if self.prefetch and self.stages > 1:
            raise ValueError(f"FragConfig: prefetch loads into registers, a ring (stages="
                             f"{self.stages}) into shared memory; pick one")  # fmt: skip


BLOCK_M_MAX = 64  # more tokens run as several token tiles
DEFAULT_CONFIG = FragConfig(128, 128, 4, 2)

# Weight-size classes (largest N * K) that the tile tables distinguish.
SIZE_CLASSES = [("32M", 32 << 20), ("160M", 160 << 20), ("256M", 256 << 20), ("any", 1 << 62)]


def _table(*configs: Any) -> list[tuple[int, Any]]:
    """One config (or None) per size class, as the tile tables hold them (fragment, wgmma
    and W4A8 wgmma configs alike)."""
    return [(bound, cfg) for (_, bound), cfg in zip(SIZE_CLASSES, configs, strict=True)]


# Per M bucket (its largest M), one config per size class; None means the canonical-layout
# kernel is faster. Picked on an H200 over the Llama-3 8B/70B linears by `bench/frag_probe.py`
# (least total time per class, programmatic dependent launch left out: timed back to back,
# one launch overlaps the one before, which a model's norm or attention kernel never lets
# it). Buckets 16, 32 and 64 were tuned too and lost to the canonical kernel (its wgmma
# tiles), so more than 8 tokens take another kernel: on Hopper the wgmma one (w4_wgmma.py),
# elsewhere the canonical one. Per channel: frag_tune_a281c4d.json; the register prefetch
# (plain loads one K tile ahead, no ring) won every class, timed in one run with the
# earlier picks (frag_tune_prefetch_f38d181.md: 2-9% per class).
FRAG_CONFIGS: dict[int, list[tuple[int, FragConfig | None]]] = {
    8: _table(  # timed at M = 1
        FragConfig(128, 128, 8, 4, prefetch=True),
        FragConfig(128, 256, 4, 2, prefetch=True),
        FragConfig(128, 256, 4, 2, prefetch=True),
        FragConfig(128, 256, 4, 4, prefetch=True),
    ),
}
# Group formats, on the group-major scales the layers keep (prepare_forward): the register
# prefetch in the three smaller classes (2-6% over the rings there), a ring of three tiles
# for the largest (70B gate_up: 70.6 us against 74.8 for the best prefetch;
# frag_tune_prefetch_f38d181.md). Row-major scales had wanted no ring in the mid classes
# (frag_tune_group_major_9765d40.json, both layouts in one run).
FRAG_CONFIGS_GROUPED: dict[int, list[tuple[int, FragConfig | None]]] = {
    8: _table(  # timed at M = 1
        FragConfig(128, 128, 8, 4, prefetch=True),
        FragConfig(64, 128, 2, 4, prefetch=True),
        FragConfig(64, 128, 2, 4, prefetch=True),
        FragConfig(128, 128, 4, 4, stages=3),
    ),
}


# A tile table's bucket for every token count past its others (prompts: prefill). Any bound
# above a prompt would do; 2^31 is past every M a launch can take (the wgmma kernels' grid
# holds at most 65535 token tiles of 64).
PREFILL = 1 << 31


def bucket_of(table: dict[int, Any], m: int) -> int | None:
    """A tile table's M bucket for `m` tokens: the smallest holding m; None past the last."""
    return min((b for b in table if m <= b), default=None)


def lookup(table: dict[int, list[tuple[int, Any]]], m: int, weights: int) -> Any:
    """The entry of a tile table for `m` tokens (bucket_of) and an N * K weight (the first
    size class holding it); None past the last bucket."""
    bucket = bucket_of(table, m)
    if bucket is None:
        return None
    return next((cfg for max_w, cfg in table[bucket] if weights <= max_w), None)


def shaped_lookup(
    table: dict[int, list[tuple[int, Any]]],
    m: int,
    n: int,
    k: int,
    *shapes: dict[tuple[int, int], dict[int, Any]],
) -> Any:
    """The entry for `m` tokens and an [N, K] weight: the first of the per-shape tables
    `shapes` holding (N, K) at m's bucket of `table`, else lookup(table, m, N * K); None past
    `table`'s last bucket."""
    bucket = bucket_of(table, m)
    if bucket is None:
        return None
    per_shape = (s[(n, k)][bucket] for s in shapes if bucket in s.get((n, k), {}))
    return next(per_shape, None) or lookup(table, m, n * k)


def frag_config(m: int, weights: int, grouped: bool = False) -> FragConfig | None:
    """The tile config for `m` tokens and an N * K weight (`grouped`: a group format), or
    None: another kernel."""
    return lookup(FRAG_CONFIGS_GROUPED if grouped else FRAG_CONFIGS, m, weights)


def max_m() -> int:
    """The most tokens any layer runs on fragments by default (more: another kernel)."""
    return max((b for table in (FRAG_CONFIGS, FRAG_CONFIGS_GROUPED)
                for b, rows in table.items() if any(c for _, c in rows)), default=0)  # fmt: skip


def block_m(m: int) -> int:
    """Tokens per program: the next power of two from 8 (the mma's N) to BLOCK_M_MAX."""
    return min(BLOCK_M_MAX, max(8, triton.next_power_of_2(m)))


def as_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """[..., K] -> [M, K] with unit column stride and rows aligned to 16 bytes."""
    a = x.reshape(-1, k)
    if a.stride(-1) != 1 or a.stride(0) % 8:
        a = a.contiguous()
    return a


def launch_buffers(
    x: torch.Tensor,  # [..., K]
    frag: torch.Tensor,  # [N/16, K/128, atom] fragment atoms
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """What every fragment-order launcher starts from: x as rows [M, K] (as_rows), the
    output [M, N] in x's dtype, and x's leading shape (the result is out.view(*lead, N))."""
    n, k = frag.shape[0] * ATOM_N, frag.shape[1] * ATOM_K
    a = as_rows(x, k)
    return a, torch.empty(a.shape[0], n, dtype=a.dtype, device=a.device), tuple(x.shape[:-1])


@dataclass(frozen=True)
class Grid:
    """One launch of a fragment-order kernel: its tiles and the split-K workspace."""

    block_k: int  # the config's, or ATOM_K where that would straddle a group
    k_split: int  # K per split (whole K tiles, all splits alike)
    split_k: int
    n_tiles: int
    m_tiles: int
    ws: torch.Tensor  # fp32 [split_k, M, N] partial sums (the output when split_k == 1)
    locks: torch.Tensor  # arrival counters (the output when split_k == 1)


def plan_grid(
    out: torch.Tensor,  # [M, N]
    k: int,
    group: int,
    block_n: int,
    block_k: int,
    bm: int,
    split_waves: int,
    split_k: int | None,  # None: choose_split_k; lowered to divide the K tiles
) -> Grid:
    m, n = out.shape
    fits = k % block_k == 0 and (not group or group % block_k == 0)
    block_k = block_k if fits else ATOM_K  # a K tile lies in one group
    k_blocks = k // block_k
    n_tiles, m_tiles = triton.cdiv(n, block_n), triton.cdiv(m, bm)
    if split_k is None:
        split_k = choose_split_k(n_tiles * m_tiles, k_blocks, _num_sms(out.device), split_waves)
    while k_blocks % split_k:  # whole K tiles per split, all splits alike
        split_k -= 1
    if split_k > 1:
        ws = torch.empty(split_k, m, n, dtype=torch.float32, device=out.device)
        locks = _locks(out.device, n_tiles * m_tiles)
    else:
        ws = locks = out
    return Grid(block_k, (k_blocks // split_k) * block_k, split_k, n_tiles, m_tiles, ws, locks)


PDL_NEEDS = "programmatic dependent launch: a CUDA GPU of compute capability >= 9.0 (Hopper)"


def capability_missing(device: torch.device, fits: Callable[[tuple[int, int]], bool]) -> str:
    """Why `device` lacks a feature whose compute capabilities `fits` accepts (its type or
    its capability, for an error message), or "" where it has it."""
    if device.type != "cuda":
        return f"a {device.type} device"
    cap = torch.cuda.get_device_capability(device)
    return "" if fits(cap) else f"compute capability {cap[0]}.{cap[1]}"


def pdl_missing(device: torch.device) -> str:
    """Why `device` cannot launch with programmatic dependent launch ("" where it can)."""
    return capability_missing(device, lambda cap: cap >= (9, 0))


def group_major(scales: torch.Tensor) -> torch.Tensor:
    """The same [N, G] scales as a view of group-major [G, N] memory (strides (1, N)), the
    layout prepare_forward keeps for the kernels."""
    return scales.t().contiguous().t()


def scale_strides(scales: torch.Tensor, group: int) -> tuple[int, int]:
    """(stride along N, stride along the groups) of fp32 [N, G] scales as the W4A16 kernels
    read them: row-major [N, G] or a view of group-major [G, N] memory (Marlin's order,
    where a K tile's scales are contiguous). Per channel, the epilogue reads them as [N]."""
    if group == 0 and scales.shape[0] > 1 and scales.stride(0) != 1:
        raise ValueError(f"per-channel scales [N, 1] must be contiguous along N, not strides "
                         f"{tuple(scales.stride())}")  # fmt: skip
    return scales.stride(0), scales.stride(1)


def fragment_linear(
    x: torch.Tensor,  # [..., K] bf16 / fp16
    frag: torch.Tensor,  # int16 [N/16, K/128, 512] (prepare_fragments)
    scales: torch.Tensor,  # fp32 [N, G] (any strides scale_strides takes)
    bias: torch.Tensor | None,
    group: int,  # 0: per channel
    config: FragConfig | None = None,
    split_k: int | None = None,  # default: choose_split_k; lowered to divide the K tiles
) -> torch.Tensor:  # [..., N]
    a, out, lead = launch_buffers(x, frag)
    (m, k), n = a.shape, out.shape[1]
    if m == 0:
        return out.view(*lead, n)
    cfg = config or frag_config(m, n * k, group > 0) or DEFAULT_CONFIG
    if cfg.pdl and (missing := pdl_missing(a.device)):
        if config is None:  # a table's pick: run it without, as GPUs before Hopper must
            cfg = replace(cfg, pdl=False)
        else:
            raise ValueError(f"FragConfig(pdl=True) needs {PDL_NEEDS}, not {missing}")
    bm = block_m(m)
    warps_m = min(cfg.warps_m, bm // 8)
    g = plan_grid(out, k, group, cfg.block_n, cfg.block_k, bm, cfg.split_waves, split_k)
    lay = layouts(cfg.block_n, g.block_k, bm, cfg.warps, warps_m)
    _w4_fragment_kernel[(g.n_tiles, g.m_tiles, g.split_k)](
        a, frag, scales, bias if bias is not None else scales, out, g.ws, g.locks,
        m, n, k, *scale_strides(scales, group), g.k_split, a.stride(0), out.stride(0),
        GROUP=group, HAS_BIAS=bias is not None, SPLIT_K=g.split_k,
        BN=cfg.block_n, BK=g.block_k, BM=bm, WARPS=cfg.warps, WARPS_M=warps_m,
        STAGES=cfg.stages if g.k_split > g.block_k else 1,
        WORDS=lay.words, WORDS_MMA=lay.words_mma, XL=lay.x, PDL=cfg.pdl,
        PREFETCH=cfg.prefetch and g.k_split > g.block_k, WORDS32=lay.words32,
        num_warps=cfg.warps * warps_m, launch_pdl=cfg.pdl,
    )  # fmt: skip
    return out.view(*lead, n)


def prepare_forward(
    t: dict[str, torch.Tensor],
    spec: Any,
    wgmma: bool = False,
    group_major_scales: bool = True,
    pdl: bool = False,
) -> FragForward:
    """One layer's forward: its codes repacked once (see FragForward), and for group formats
    a copy of its scales in group-major memory ([G, N], Marlin's order) for the fragment and
    wgmma kernels, unless `group_major_scales` is False. Each K tile's scales are then one
    contiguous run instead of one 32-byte sector per output row: at one token that took
    70B's down_proj from 49.4 to 39.5 us (per channel: 36.0), and every Llama-3 linear
    gained (bench/results/frag_tune_group_major_9765d40.md). The copy costs 1/16 of the
    4-bit codes' bytes; the canonical kernel keeps reading the layer's own tensors.
    `pdl`: its fragment configs launch with programmatic dependent launch (Hopper; see
    FragForward)."""
    scales = None
    if group_major_scales and spec.group_size != -1:
        scales = group_major(t["scales"])
    return FragForward(prepare_fragments(t["qweight"]), spec, wgmma, scales, pdl)


class FragForward:
    """A W4A16 layer on fragment-order weights. Per token count it runs the first kernel
    whose table has a config for it: with `wgmma` (Hopper) the warp-specialized kernel
    (w4_wgmma_ws.WS_CONFIGS), then the fragment kernel (FRAG_CONFIGS; FRAG_CONFIGS_GROUPED
    for group formats), then with `wgmma` the synchronous wgmma kernel
    (w4_wgmma.WGMMA_CONFIGS), all on the same fragments; else the canonical-layout kernel
    on the layer's own tensors. It takes activations in mma K order (MmaOrderActivations)
    where its wgmma config reads them so (`takes_mma_order`). With `pdl` (Hopper) its
    fragment configs launch with programmatic dependent launch: after a kernel that lets
    them start early (act_quant's rmsnorm / silu_mul with launch_dependents), they copy
    their first weight tiles while it runs. An experiment (bench/kernel_perf.py's `:pdl`
    chains), not a default."""

    def __init__(
        self,
        frag: torch.Tensor,
        spec: Any,
        wgmma: bool,
        scales: torch.Tensor | None = None,
        pdl: bool = False,
    ):
        if pdl and (missing := pdl_missing(frag.device)):
            raise ValueError(f"pdl needs {PDL_NEEDS}, not {missing}")
        self.frag, self.spec, self.wgmma, self.pdl = frag, spec, wgmma, pdl
        self.scales = scales  # the fragment and wgmma kernels' own copy, if any
        self.group = 0 if spec.group_size == -1 else spec.group_size
        self.n, self.k = frag.shape[0] * ATOM_N, frag.shape[1] * ATOM_K
        self.weights = self.n * self.k

    def _route(self, m: int) -> tuple[FragConfig | None, Any]:
        """(fragment config, wgmma config) for m tokens: at most one is set; neither means
        the canonical-layout kernel."""
        from specquant.kernels.triton_ops.w4_wgmma import wgmma_config
        from specquant.kernels.triton_ops.w4_wgmma_ws import ws_config

        ws = ws_config(m, self.n, self.k, self.group) if self.wgmma else None
        if ws is not None:  # where its tables have a config (some layers from one token)
            return None, ws
        cfg = frag_config(m, self.weights, self.group > 0)
        if cfg is not None and self.pdl:
            cfg = replace(cfg, pdl=True)
        if cfg is not None or not self.wgmma:
            return cfg, None
        return None, wgmma_config(m, self.n, self.k)

    def route(self, m: int) -> str:
        """Which kernel runs m tokens: fragment, wgmma-ws, wgmma or canonical."""
        from specquant.kernels.triton_ops.w4_wgmma_ws import WsConfig

        cfg, wcfg = self._route(m)
        if cfg is not None:
            return "fragment"
        if wcfg is None:
            return "canonical"
        return "wgmma-ws" if isinstance(wcfg, WsConfig) else "wgmma"

    def takes_mma_order(self, m: int) -> bool:
        wcfg = self._route(m)[1]
        return wcfg is not None and wcfg.x_perm

    def __call__(
        self,
        x: torch.Tensor | MmaOrderActivations,  # [..., K]
        live: dict[str, torch.Tensor],
        bias: torch.Tensor | None,
        _spec: Any,
    ) -> torch.Tensor:  # [..., N]
        from specquant.kernels.reference import qlinear_reference
        from specquant.kernels.triton_ops.qlinear import qlinear
        from specquant.kernels.triton_ops.w4_wgmma import wgmma_linear
        from specquant.kernels.triton_ops.w4_wgmma_ws import WsConfig, wgmma_ws_linear

        values = x.values if isinstance(x, MmaOrderActivations) else x

        def plain() -> torch.Tensor:  # every path but a wgmma config reading mma order
            return x.natural() if isinstance(x, MmaOrderActivations) else x

        if values.device != self.frag.device:  # moved without QLinear.prepare: the reference
            return qlinear_reference(plain(), live, bias, self.spec)
        cfg, wcfg = self._route(values.numel() // values.shape[-1])
        scales = live["scales"] if self.scales is None else self.scales
        if cfg is not None:
            return fragment_linear(plain(), self.frag, scales, bias, self.group, config=cfg)
        if wcfg is None:
            return qlinear(plain(), live, bias, self.spec)
        ordered = isinstance(x, MmaOrderActivations)
        if isinstance(wcfg, WsConfig):  # gathers plain x into mma order itself
            return wgmma_ws_linear(values if ordered else x, self.frag, scales, bias, self.group,
                                   wcfg, x_in_mma_order=ordered)  # fmt: skip
        if wcfg.x_perm and isinstance(x, MmaOrderActivations):  # as the producer wrote it
            return wgmma_linear(values, self.frag, scales, bias, self.group, config=wcfg,
                                x_in_mma_order=True)  # fmt: skip
        return wgmma_linear(plain(), self.frag, scales, bias, self.group, config=wcfg)
