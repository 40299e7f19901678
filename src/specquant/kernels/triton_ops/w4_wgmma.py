"""W4A16 GEMM from 9 tokens on Hopper: fragment-order weights as wgmma's register operand.

The fragment kernel (w4_fragment.py) feeds mma.sync, whose token operand lives in registers:
every warp holds its share of x for each K step and the unpacking repeats per token-warp,
so it loses to the canonical kernel from 16 tokens on. wgmma takes its A operand from
registers in the same per-warp layout as mma.sync's A, and its B operand from shared memory
with up to 256 tokens. Here each warpgroup unpacks its 64 x BK weights once, straight from
the fragment atoms (same packing, `prepare_fragments`, no second copy), into wgmma's A
registers, and x^T [BK, BM] streams through a cp.async ring of shared-memory tiles that all
warps read.

x's columns inside each 128 block are stored in mma K order (the fragment packing permutes
K, see `w4_fragment.pi`): column pi(k) goes to position k. pi keeps k and k + 1 next to each
other, so x is copied as 4-byte pairs; with the config's `x_perm` the launcher gathers x into
that order first (one small kernel per call) and the programs copy 16-byte pieces, a quarter
of the copy instructions.

Two K loops. `_loop_sync` (per tile: wait for this thread's copies, fence them to the async
proxy, one CTA barrier, the copy STAGES - 1 tiles ahead, the weights one tile ahead into
registers or through the ring with `w_ring`, unpack, synchronous wgmma) leaves the tensor
cores idle while a tile unpacks; with group scales each tile's product is scaled in fp32.
`_loop_overlap` (config `overlap`) issues each tile's wgmma asynchronously and unpacks the
next tile meanwhile into a second set of A registers; group scales then multiply A. An
earlier asynchronous chain (commit 4311014) gave wrong results
(bench/results/wgmma_probe_async_4311014.md); `_loop_overlap` differs in keeping A among
the wait's dependencies, fencing on the copying side, and its copy lead, and is checked
against the reference on the GPU like the synchronous loop. Measured on an H200 it loses
to the synchronous loop wherever two programs share an SM (they already overlap each
other's wgmma and unpacking), and beats its synchronous twin only with one 16-warp program
per SM (bench/results/wgmma_probe_overlap_8476c43.md, wgmma_probe_2149e61.md); the tile
table does not pick it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from specquant.kernels.reference import to_mma_order
from specquant.kernels.triton_ops.w4_fragment import (
    ATOM_K,
    PREFILL,
    _async_load,
    _copy_tile,
    _cta_barrier,
    _finish,
    _out_index,
    _scale_ptrs,
    _table,
    _unpack,
    _weight_ptrs,
    _words,
    bucket_of,
    launch_buffers,
    layouts,
    lookup,
    plan_grid,
    scale_strides,
)


@gluon.jit
def _x_columns(BK: gl.constexpr, LAYOUT: gl.constexpr):
    """[BK]: the x column at each mma K position of a tile (pi inside each 128 block)."""
    k = gl.arange(0, BK, layout=LAYOUT)
    q = k % 128
    c = (k - q) + (q & 1) + ((q >> 3) & 1) * 2 + ((q >> 4) & 1) * 4 + ((q >> 5) & 1) * 8
    c += ((q >> 6) & 1) * 16 + ((q >> 1) & 1) * 32 + ((q >> 2) & 1) * 64
    return gl.max_contiguous(gl.multiple_of(c, 2), 2)  # k, k + 1 are adjacent columns


@gluon.jit
def _x_tile(x_ptr, m0, M, stride_xm, xc, BM: gl.constexpr, XC: gl.constexpr):
    """Pointers [BM, BK] to the token rows m0.. at columns xc (SliceLayout(0, XC)) of x, and
    the mask of the rows that exist: the copies' source in the wgmma kernels."""
    rmx = m0 + gl.arange(0, BM, layout=gl.SliceLayout(1, XC))
    return x_ptr + rmx.to(gl.int64)[:, None] * stride_xm + xc[None, :], (rmx < M)[:, None]


@gluon.jit
def _copy(x_ring, w_ring, w_ptrs, w_mask, x_ptrs, x_mask, k_lo, kb, K_SPLIT, BK: gl.constexpr,
          STAGES: gl.constexpr, W_RING: gl.constexpr):  # fmt: skip
    """cp.async of the K tile at k_lo + kb into its ring slot, as one commit group; past
    K_SPLIT nothing is read and the slot is zero-filled."""
    slot = (kb // BK) % STAGES
    if W_RING:
        _copy_tile(w_ring.index(slot), x_ring.index(slot), w_ptrs, w_mask, x_ptrs, x_mask,
                   k_lo, kb, K_SPLIT)  # fmt: skip
    else:
        _async_load(x_ring.index(slot), x_ptrs + k_lo + kb, mask=x_mask & (kb < K_SPLIT))
        async_copy.commit_group()


@gluon.jit
def _ring_step(x_ring, w_ring, w_ptrs, w_mask, x_ptrs, x_mask, k_lo, kb, K_SPLIT,
               BK: gl.constexpr, STAGES: gl.constexpr, W_RING: gl.constexpr):  # fmt: skip
    """Before a synchronous wgmma on the K tile at k_lo + kb: wait until the tile is in its
    ring slot for every warp and visible to wgmma, then start copying the tile STAGES - 1
    ahead into the slot the tile before freed."""
    async_copy.wait_group(STAGES - 2)  # this thread's copies of this tile have landed
    fence_async_shared()  # and are visible to wgmma (the async proxy)
    # everyone's are, and every warp is done with the tile before (its slot is next)
    _cta_barrier()
    _copy(x_ring, w_ring, w_ptrs, w_mask, x_ptrs, x_mask, k_lo, kb + (STAGES - 1) * BK,
          K_SPLIT, BK, STAGES, W_RING)  # fmt: skip


@gluon.jit
def _loop_sync(acc, x_ring, w_ring, w_ptrs, w_mask, x_ptrs, x_mask, s_ptr, rn, n_mask, k_lo,
               K_SPLIT, stride_sn, stride_sg, GROUP: gl.constexpr, BN: gl.constexpr,
               BK: gl.constexpr, STAGES: gl.constexpr, W_RING: gl.constexpr,
               WORDS: gl.constexpr, WORDS_MMA: gl.constexpr, AL: gl.constexpr):  # fmt: skip
    """The K loop with a synchronous wgmma per tile: one set of A registers."""
    DTYPE: gl.constexpr = x_ring.dtype
    if not W_RING:  # weights go to registers one tile ahead
        words = gl.load(w_ptrs + (k_lo // 128) * 512, mask=w_mask, other=0)
    for kb in range(0, K_SPLIT, BK):
        k0 = k_lo + kb
        slot = (kb // BK) % STAGES
        if GROUP > 0:
            # first, so that the tile's wait, unpacking and wgmma hide the load: group-major
            # scales (the layers' own, prepare_forward) meet a new sector every tile, which
            # L1 does not hold; row-major ones hit L1 for GROUP-wide runs of tiles
            gs = gl.load(_scale_ptrs(s_ptr, rn, stride_sn, stride_sg, k0, GROUP), mask=n_mask,
                         other=0.0)  # fmt: skip
        _ring_step(x_ring, w_ring, w_ptrs, w_mask, x_ptrs, x_mask, k_lo, kb, K_SPLIT, BK, STAGES,
                   W_RING)  # fmt: skip
        if W_RING:
            words = w_ring.index(slot).load(WORDS)
        else:
            following = gl.load(w_ptrs + ((k0 + BK) // 128) * 512,
                                mask=w_mask & (kb + BK < K_SPLIT), other=0)  # fmt: skip
        a = _unpack(_words(words, BN, BK, WORDS_MMA), DTYPE, BN, BK, AL)
        b = x_ring.index(slot).permute((1, 0))  # x^T [BK, BM]
        if GROUP == 0:
            acc = warpgroup_mma(a, b, acc)
        else:
            part = warpgroup_mma(a, b, gl.zeros_like(acc), use_acc=False)
            acc += part * gs[:, None]
        if not W_RING:
            words = following
    return acc


@gluon.jit
def _operand(words, s_ptr, n0, N, stride_sn, stride_sg, k0, live, GROUP: gl.constexpr,
             BN: gl.constexpr, BK: gl.constexpr, WORDS_MMA: gl.constexpr, AL: gl.constexpr,
             DTYPE: gl.constexpr):  # fmt: skip
    """The A operand of the K tile at k0: codes unpacked to q, times the tile's group scales
    (rounded to DTYPE, as Marlin does) when GROUP > 0; no scales are read unless `live`."""
    a = _unpack(_words(words, BN, BK, WORDS_MMA), DTYPE, BN, BK, AL)
    if GROUP > 0:
        rows = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, AL))
        gs = gl.load(_scale_ptrs(s_ptr, rows, stride_sn, stride_sg, k0, GROUP),
                     mask=(rows < N) & live, other=0.0).to(DTYPE)  # fmt: skip
        gs = gl.broadcast(gs[:, None], a)[0]
        if gl.bfloat16 == DTYPE:
            a = gl.inline_asm_elementwise("mul.rn.bf16x2 $0, $1, $2;", "=r,r,r", [a, gs],
                                          gl.bfloat16, True, 2)  # fmt: skip
        else:
            a = gl.inline_asm_elementwise("mul.rn.f16x2 $0, $1, $2;", "=r,r,r", [a, gs],
                                          gl.float16, True, 2)  # fmt: skip
    return a


@gluon.jit
def _tile(acc, a, words, x_ring, w_ring, w_ptrs, w_mask, x_ptrs, x_mask, s_ptr, n0, N, k_lo, kb,
          K_SPLIT, stride_sn, stride_sg, GROUP: gl.constexpr, BN: gl.constexpr,
          BK: gl.constexpr, STAGES: gl.constexpr, W_RING: gl.constexpr, WORDS: gl.constexpr,
          WORDS_MMA: gl.constexpr, AL: gl.constexpr):  # fmt: skip
    """One K tile of `_loop_overlap`: issue its wgmma on `a`, wait for the tile before's,
    unpack the next tile. Returns (acc, the next tile's A, the weight words after it)."""
    DTYPE: gl.constexpr = x_ring.dtype
    k0 = k_lo + kb
    slot = (kb // BK) % STAGES
    fence_async_shared()  # this thread's landed copies of this tile, to the async proxy
    # everyone's are visible, and the wgmma two tiles back is done (its slot is next)
    _cta_barrier()
    _copy(x_ring, w_ring, w_ptrs, w_mask, x_ptrs, x_mask, k_lo, kb + (STAGES - 2) * BK,
          K_SPLIT, BK, STAGES, W_RING)  # fmt: skip
    acc = warpgroup_mma(a, x_ring.index(slot).permute((1, 0)), acc, is_async=True)
    acc, a = warpgroup_mma_wait(1, deps=[acc, a])  # the tile before's wgmma is done
    async_copy.wait_group(STAGES - 3)  # this thread's copies of the next tile
    if W_RING:  # past the last tile this reads a stale slot, unpacked and never used
        words = w_ring.index((slot + 1) % STAGES).load(WORDS)
    a_next = _operand(words, s_ptr, n0, N, stride_sn, stride_sg, k0 + BK, kb + BK < K_SPLIT,
                      GROUP, BN, BK, WORDS_MMA, AL, DTYPE)  # fmt: skip
    if not W_RING:
        words = gl.load(w_ptrs + ((k0 + 2 * BK) // 128) * 512,
                        mask=w_mask & (kb + 2 * BK < K_SPLIT), other=0)  # fmt: skip
    return acc, a_next, words


@gluon.jit
def _loop_overlap(acc, x_ring, w_ring, w_ptrs, w_mask, x_ptrs, x_mask, s_ptr, n0, N, k_lo,
                  K_SPLIT, stride_sn, stride_sg, GROUP: gl.constexpr, BN: gl.constexpr,
                  BK: gl.constexpr, STAGES: gl.constexpr, W_RING: gl.constexpr,
                  WORDS: gl.constexpr, WORDS_MMA: gl.constexpr, AL: gl.constexpr):  # fmt: skip
    """The K loop with asynchronous wgmmas: tile t's wgmma runs while tile t + 1's weights
    are unpacked, and is waited for after tile t + 1's wgmma is issued.

    Tile t's A registers stay in use until that wait, so the next tile unpacks into a
    second set. The loop is unrolled by two so that the two sets alternate in place (one
    loop-carried set cost a copy of it per tile); an odd tile count runs one tile past
    K_SPLIT, whose x tile the masked copy zero-fills, so it adds nothing. A wgmma reads its
    x slot until the same wait, so the copies run STAGES - 2 tiles ahead: a slot is refilled
    two tiles after its wgmma. Group scales multiply the A operand (each tile lies in one
    group), so that all tiles chain into one accumulator: scaling a separate product per
    tile in fp32 reads an accumulator inside the wgmma pipeline, and ptxas then serializes
    every wgmma."""
    DTYPE: gl.constexpr = x_ring.dtype
    async_copy.wait_group(STAGES - 3)  # this thread's copies of tile 0
    if W_RING:
        words = w_ring.index(0).load(WORDS)
    else:
        words = gl.load(w_ptrs + (k_lo // 128) * 512, mask=w_mask, other=0)
    a = _operand(words, s_ptr, n0, N, stride_sn, stride_sg, k_lo, True, GROUP, BN, BK, WORDS_MMA,
                 AL, DTYPE)  # fmt: skip
    if not W_RING:
        words = gl.load(w_ptrs + ((k_lo + BK) // 128) * 512, mask=w_mask & (BK < K_SPLIT),
                        other=0)  # fmt: skip
    for kb in range(0, K_SPLIT, 2 * BK):
        acc, b, words = _tile(acc, a, words, x_ring, w_ring, w_ptrs, w_mask, x_ptrs, x_mask,
                              s_ptr, n0, N, k_lo, kb, K_SPLIT, stride_sn, stride_sg, GROUP, BN,
                              BK, STAGES, W_RING, WORDS, WORDS_MMA, AL)  # fmt: skip
        acc, a, words = _tile(acc, b, words, x_ring, w_ring, w_ptrs, w_mask, x_ptrs, x_mask,
                              s_ptr, n0, N, k_lo, kb + BK, K_SPLIT, stride_sn, stride_sg, GROUP,
                              BN, BK, STAGES, W_RING, WORDS, WORDS_MMA, AL)  # fmt: skip
    acc = warpgroup_mma_wait(0, deps=[acc])
    # An fp32 operation on acc before the epilogue: when the first reader of the accumulator
    # is the conversion to bf16 (group scales, no bias), ptxas serializes every wgmma of the
    # loop (its C7514 "non wgmma instructions reading accumulator registers").
    return acc + 0.0


@gluon.jit(do_not_specialize=["M"])
def _w4_wgmma_kernel(
    x_ptr,  # [M, K] bf16 / fp16; with X_PERM each 128 block in mma K order (pi)
    w_ptr,  # int16 [N/16, K/128, 512] fragment atoms
    s_ptr,  # fp32 [N, G] scales, strides (stride_sn, stride_sg)
    b_ptr,  # [N] bias (HAS_BIAS)
    out_ptr,  # [M, N]
    ws_ptr,  # fp32 [SPLIT_K, M, N] partial sums (SPLIT_K > 1)
    lock_ptr,  # int32 arrival counter per output tile, zero between launches
    M, N, K, stride_sn, stride_sg, K_SPLIT, stride_xm, stride_om,
    GROUP: gl.constexpr, HAS_BIAS: gl.constexpr, SPLIT_K: gl.constexpr,
    BN: gl.constexpr, BK: gl.constexpr, BM: gl.constexpr, WARPS: gl.constexpr,
    STAGES: gl.constexpr, W_RING: gl.constexpr, OVERLAP: gl.constexpr, X_PERM: gl.constexpr,
    WORDS: gl.constexpr, WORDS_MMA: gl.constexpr,
):  # fmt: skip
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, BM, 16]
    )
    AL: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_l, k_width=2)
    if X_PERM:  # x arrives in mma K order: 16-byte copies
        XC: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [WARPS, 1], [1, 0])
    else:  # 4-byte copies, each a pair of columns k, k + 1 of pi
        XC: gl.constexpr = gl.BlockedLayout([1, 2], [1, 32], [WARPS, 1], [1, 0])
    DTYPE: gl.constexpr = x_ptr.dtype.element_ty
    X_SMEM: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    # each thread reads back the weights it copied: no swizzle
    W_SMEM: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0])
    n0 = gl.program_id(0) * BN
    m0 = gl.program_id(1) * BM

    w_ptrs, w_mask = _weight_ptrs(w_ptr, n0, N, K, BN, BK, WORDS)
    if X_PERM:
        xc = gl.max_contiguous(gl.multiple_of(gl.arange(0, BK, layout=gl.SliceLayout(0, XC)), 8), 8)
    else:
        xc = _x_columns(BK, gl.SliceLayout(0, XC))
    x_ptrs, x_mask = _x_tile(x_ptr, m0, M, stride_xm, xc, BM, XC)  # [BM, BK], mma order

    rn, rm, n_mask, m_mask = _out_index(n0, m0, N, M, BN, BM, acc_l)
    acc = gl.zeros([BN, BM], gl.float32, acc_l)
    k_lo = gl.program_id(2) * K_SPLIT
    x_ring = gl.allocate_shared_memory(DTYPE, [STAGES, BM, BK], X_SMEM)
    if W_RING:  # weights stream through the ring too
        w_ring = gl.allocate_shared_memory(gl.int16, [STAGES, BN // 16, (BK // 128) * 512],
                                           W_SMEM)  # fmt: skip
    else:  # they load to registers a tile ahead; the loops never touch w_ring
        w_ring = x_ring
    # copies run STAGES - 1 tiles ahead of a synchronous wgmma, STAGES - 2 of an async one
    LEAD: gl.constexpr = STAGES - 2 if OVERLAP else STAGES - 1
    for s in gl.static_range(LEAD):
        _copy(x_ring, w_ring, w_ptrs, w_mask, x_ptrs, x_mask, k_lo, s * BK, K_SPLIT, BK, STAGES,
              W_RING)  # fmt: skip
    if OVERLAP:
        acc = _loop_overlap(acc, x_ring, w_ring, w_ptrs, w_mask, x_ptrs, x_mask, s_ptr, n0, N,
                            k_lo, K_SPLIT, stride_sn, stride_sg, GROUP, BN, BK, STAGES, W_RING,
                            WORDS, WORDS_MMA, AL)  # fmt: skip
    else:
        acc = _loop_sync(acc, x_ring, w_ring, w_ptrs, w_mask, x_ptrs, x_mask, s_ptr, rn, n_mask,
                         k_lo, K_SPLIT, stride_sn, stride_sg, GROUP, BN, BK, STAGES, W_RING,
                         WORDS, WORDS_MMA, AL)  # fmt: skip
    async_copy.wait_group(0)  # no copy may land in shared memory after the program ends
    _finish(acc, rn, rm, n_mask, m_mask, s_ptr, b_ptr, out_ptr, ws_ptr, lock_ptr, M, N,
            stride_om, GROUP, HAS_BIAS, SPLIT_K)  # fmt: skip


# ------------------------------------------------------------------------------ launcher
@dataclass(frozen=True)
class WgmmaConfig:
    block_n: int  # output features per program: 64 per warpgroup, or a multiple
    block_k: int  # multiple of 128
    warps: int  # 4, 8 or 16: one, two or four warpgroups of 64 output rows each
    stages: int = 3  # slots of the cp.async ring of x tiles (>= 2, >= 3 with overlap)
    split_waves: int = 1  # split K until the grid has this many programs per SM
    w_ring: bool = False  # weights through the ring too (else loaded one tile ahead)
    # asynchronous wgmma, the next tile unpacked meanwhile into a second set of A registers;
    # group scales then multiply A in bf16/fp16 instead of each tile's product in fp32
    overlap: bool = False
    # x in mma K order, so that the program copies it in 16-byte pieces instead of 4-byte
    # column pairs: the model's norm / silu / head merge write it so, else the launcher gathers
    x_perm: bool = False
    # registers per thread (0: ptxas decides). 128 at 8 warps fits two programs on an SM,
    # so one program's copies, unpacking and wgmma hide another's waits
    maxnreg: int = 0


DEFAULT_WGMMA = WgmmaConfig(128, 128, 4, 3, 1, True)
_W = WgmmaConfig

# Per M bucket (its largest M, timed there), one config per weight-size class
# (w4_fragment.SIZE_CLASSES); None: the canonical kernel is faster. Picked on an H200 over
# the Llama-3 8B/70B linears, both W4A16 formats together, by bench/wgmma_probe.py (least
# total time per class; bench/results/wgmma_probe_a25c6e9.json: 14 configs, x_perm timed on
# x the model hands over already in mma order). With no gather to pay, x_perm wins every
# bucket from 16 tokens; two programs per SM (128 registers) win at 32 tokens in the
# smallest and largest classes and from 64 tokens in all; the 16-warp configs and the
# overlapping loop lost. Bucket 32 is wgmma_probe_a281c4d's (W4A16-g128 alone, 18 configs):
# one warpgroup per program, K split until two programs share each SM, in three classes.
# PREFILL, every count past 128, was timed at 256 and 512 tokens (wgmma_probe_prefill_0d42077
# .json; per size class 0.56-0.71 of the canonical kernel's time over both formats) and on
# 70B at 1024, the runner's prefill chunk (prefill_1024_bc7b3a6.md: 0.73 over both formats).
# Per channel alone it is level there (0.98; gate_up 1.05): its token tiles stop at 64, so
# every 64 tokens unpack the weights again. The one table serves both formats, and g128
# (0.51-0.63 at 1024) decides it. Buckets 16 and 32 were probed again once the layers read
# group-major scales (wgmma_probe_group_major_9765d40.md: g128 on those scales and per
# channel, both models): at 16 tokens one warpgroup per program with K split until two
# share an SM won three classes, and beat the canonical kernel in the smallest one too
# (37.0 against 38.0 us); 8-warp programs at 128 registers won the 256M class at 16 and 32.
# At 64 and 128 tokens the picks stayed within 1.3% of each class's best.
# Up to 8 tokens the fragment kernel runs (FRAG_CONFIGS). Where the warp-specialized
# kernel's table has a config (w4_wgmma_ws.WS_CONFIGS), that kernel runs instead of both.
_TWO = dict(w_ring=True, x_perm=True, maxnreg=128)
WGMMA_CONFIGS: dict[int, list[tuple[int, WgmmaConfig | None]]] = {
    16: _table(_W(64, 128, 4, 3, 2, **_TWO), _W(64, 128, 4, 3, 2, **_TWO),
               _W(128, 128, 8, 3, **_TWO), _W(64, 128, 4, 3, 2, **_TWO)),
    32: _table(_W(64, 128, 4, 3, 2, **_TWO), _W(64, 128, 4, 3, 2, **_TWO),
               _W(128, 128, 8, 4, **_TWO), _W(64, 128, 4, 3, 2, **_TWO)),
    64: _table(_W(64, 128, 4, 4, **_TWO), _W(128, 128, 8, 3, **_TWO), _W(128, 128, 8, 4, **_TWO),
               _W(128, 128, 8, 3, **_TWO)),
    128: _table(_W(64, 128, 4, 4, **_TWO), _W(128, 128, 8, 3, **_TWO), _W(128, 128, 8, 4, **_TWO),
                _W(128, 128, 8, 4, **_TWO)),
    PREFILL: _table(_W(128, 128, 8, 3, **_TWO), _W(128, 128, 8, 4, **_TWO),
                    _W(128, 128, 8, 4, **_TWO), _W(128, 128, 8, 3, **_TWO)),
}  # fmt: skip

# Per layer shape (N, K), the buckets where one config beat its size class's pick on that
# layer by 5% or more (wgmma_probe_a281c4d: W4A16-g128 at 32 and 64 tokens on an H200).
# The layers with few output tiles (8B qkv, o, down; 70B qkv) want smaller
# or more programs than the larger layers of their size class; other shapes take the table.
SHAPE_CONFIGS: dict[tuple[int, int], dict[int, WgmmaConfig]] = {
    (6144, 4096): {64: _W(64, 128, 4, 3, 2, **_TWO)},  # Llama-3-8B qkv
    (4096, 4096): {32: _W(64, 128, 4, 4, **_TWO),  # Llama-3-8B o
                   64: _W(64, 128, 4, 3, x_perm=True, maxnreg=128)},
    (4096, 14336): {64: _W(64, 128, 4, 4, **_TWO)},  # Llama-3-8B down
    (10240, 8192): {32: _W(64, 128, 4, 3, 4, **_TWO),  # Llama-3-70B qkv
                    64: _W(64, 128, 4, 3, 2, **_TWO)},
}  # fmt: skip


def wgmma_config(m: int, n: int, k: int) -> WgmmaConfig | None:
    """The tile config for `m` tokens and an [N, K] weight (SHAPE_CONFIGS, else the size
    class's in WGMMA_CONFIGS), or None: another kernel."""
    cfg = lookup(WGMMA_CONFIGS, m, n * k)
    if cfg is None:
        return None
    return SHAPE_CONFIGS.get((n, k), {}).get(bucket_of(WGMMA_CONFIGS, m), cfg)


MIN_REGS = 64
TOKEN_TILES = (8, 16, 32, 64)  # wgmma's N; more tokens run as several tiles of 64


def token_tile(m: int) -> int:
    return next((t for t in TOKEN_TILES if m <= t), TOKEN_TILES[-1])


def check_config(cfg: WgmmaConfig) -> None:
    if cfg.warps not in (4, 8, 16):
        raise ValueError(f"warps must be 4, 8 or 16 (1, 2 or 4 warpgroups), not {cfg.warps}")
    if cfg.block_n % (16 * cfg.warps):
        raise ValueError(f"block_n {cfg.block_n} is not a multiple of 16 * warps ({cfg.warps})")
    if cfg.block_k % ATOM_K:
        raise ValueError(f"block_k {cfg.block_k} is not a multiple of {ATOM_K}")
    least = 3 if cfg.overlap else 2
    if cfg.stages < least:
        why = "the copy ring" + (", two tiles of it under the async wgmma" if cfg.overlap else "")
        raise ValueError(f"stages must be >= {least} ({why}), not {cfg.stages}")
    if cfg.maxnreg and not (MIN_REGS <= cfg.maxnreg <= 255 and cfg.maxnreg % 8 == 0):
        raise ValueError(f"maxnreg must be 0 (ptxas decides) or a multiple of 8 in "
                         f"[{MIN_REGS}, 255] (wgmma's accumulator lives in registers), "
                         f"not {cfg.maxnreg}")  # fmt: skip


def wgmma_linear(
    x: torch.Tensor,  # [..., K] bf16 / fp16
    frag: torch.Tensor,  # int16 [N/16, K/128, 512] (prepare_fragments)
    scales: torch.Tensor,  # fp32 [N, G] (any strides scale_strides takes)
    bias: torch.Tensor | None,
    group: int,  # 0: per channel
    config: WgmmaConfig | None = None,
    split_k: int | None = None,  # default: choose_split_k; lowered to divide the K tiles
    x_in_mma_order: bool = False,  # x already in to_mma_order's order (needs cfg.x_perm)
) -> torch.Tensor:  # [..., N]
    cfg = config or DEFAULT_WGMMA
    check_config(cfg)
    if x_in_mma_order and not cfg.x_perm:
        raise ValueError("x comes in mma K order, but the config reads it in feature order "
                         "(x_perm=False)")  # fmt: skip
    a, out, lead = launch_buffers(x, frag)
    (m, k), n = a.shape, out.shape[1]
    if m == 0:
        return out.view(*lead, n)
    if cfg.x_perm and not x_in_mma_order:  # each 128-column block in mma K order, as the
        a = to_mma_order(a)  # weights are packed (one strided copy)
    bm = token_tile(m)
    g = plan_grid(out, k, group, cfg.block_n, cfg.block_k, bm, cfg.split_waves, split_k)
    lay = layouts(cfg.block_n, g.block_k, bm, cfg.warps)
    _w4_wgmma_kernel[(g.n_tiles, g.m_tiles, g.split_k)](
        a, frag, scales, bias if bias is not None else scales, out, g.ws, g.locks,
        m, n, k, *scale_strides(scales, group), g.k_split, a.stride(0), out.stride(0),
        GROUP=group, HAS_BIAS=bias is not None, SPLIT_K=g.split_k,
        BN=cfg.block_n, BK=g.block_k, BM=bm, WARPS=cfg.warps, STAGES=cfg.stages,
        W_RING=cfg.w_ring, OVERLAP=cfg.overlap, X_PERM=cfg.x_perm, WORDS=lay.words,
        WORDS_MMA=lay.words_mma,
        num_warps=cfg.warps, **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}),
    )  # fmt: skip
    return out.view(*lead, n)
