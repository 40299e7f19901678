"""W4A16 wgmma kernel, warp-specialized: one producer warp copies with TMA, the consumer
warpgroups unpack and multiply. Layers run it where its table (WS_CONFIGS) has a config,
ahead of the fragment kernel and `w4_wgmma.py`'s synchronous loop (FragForward._route).

`w4_wgmma._loop_sync` has every warp take part in the copies and meet at one CTA barrier per
K tile; its profile's remaining stalls are that barrier, the cp.async wait and the wgmma
wait (bench/results/kernel_profile_3e1ef5e.md). Here one producer warp issues two TMA copies
per K tile (x [BM, BK] in mma K order, in boxes of 64 columns, and the tile's fragment
atoms) into a ring of
shared-memory slots, each with a `ready` mbarrier that the copies' bytes complete. The
consumer warps wait on that barrier alone, unpack, run a synchronous wgmma and release the
slot through its `empty` mbarrier: no CTA barrier and no copy instructions in the K loop,
and a slot is refilled as soon as its consumer is done with it. Group scales scale each
tile's fp32 product, as in the synchronous loop, so the two give the same bits.

x must come in mma K order (`reference.to_mma_order`; the launcher gathers it otherwise),
since TMA copies whole rows. Rows past M and atoms past N are zero-filled by TMA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from specquant.kernels.reference import to_mma_order
from specquant.kernels.triton_ops.w4_fragment import (
    ATOM_K,
    _finish,
    _out_index,
    _scale_ptrs,
    _table,
    capability_missing,
    launch_buffers,
    layouts,
    plan_grid,
    scale_strides,
    shaped_lookup,
)
from specquant.kernels.triton_ops.w4_wgmma import _operand, token_tile

# Triton 3.6 (the GPU image) names the TMA load async_copy_global_to_shared, later versions
# async_load (keeping the old name as an alias)
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
# and names the shared-memory view _reinterpret, later versions reinterpret
_NEW_REINTERPRET = gl.constexpr(hasattr(gl.shared_memory_descriptor, "reinterpret"))
PRODUCER_REGS = gl.constexpr(40)  # the copy warp's registers: scalars only


@gluon.jit
def _producer(x_desc, w_desc, x_ring, w_ring, ready, empty, n0, m0, k_lo, tiles,
              BK: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
    """The copy warp: K tile i goes to slot i % STAGES once its consumer released it. The
    atoms' descriptor views each 1024-byte atom as rows of 256 elements (2 for W4A16's
    int16 atoms, 4 for W4A8's int8 ones)."""
    rows: gl.constexpr = w_desc.block_type.shape[1] // (BK // 128)  # per atom
    for i in range(tiles):
        slot = i % STAGES
        # a fresh barrier counts as having completed the phase before 0: round 0 passes
        mbarrier.wait(empty.index(slot), ((i // STAGES) & 1) ^ 1)
        bar = ready.index(slot)
        mbarrier.expect(bar, x_desc.block_type.nbytes + w_desc.block_type.nbytes)
        k = k_lo + i * BK
        _tma_load(x_desc, [m0, k], bar, x_ring.index(slot))
        _tma_load(w_desc, [n0 // 16, (k // 128) * rows, 0], bar, w_ring.index(slot))


@gluon.jit
def _atoms(w_ring, slot, BN: gl.constexpr, BK: gl.constexpr):
    """Ring slot `slot` as the row-major atoms [BN/16, (BK/128) * atom elements] the
    consumers load from: the TMA box [BN/16, rows per atom * BK/128, 256] lands densely,
    unswizzled, so the same bytes read as the atoms' own layout."""
    cols: gl.constexpr = (BK // 128) * (8192 // w_ring.dtype.primitive_bitwidth)
    W_SMEM: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0])
    if _NEW_REINTERPRET:
        return w_ring.index(slot).reinterpret(w_ring.dtype, [BN // 16, cols], W_SMEM)
    else:
        return w_ring.index(slot)._reinterpret(w_ring.dtype, [BN // 16, cols], W_SMEM)


@gluon.jit
def _tile_operands(x_ring, w_ring, ready, i, s_ptr, n0, N, stride_sn, stride_sg, k0,
                   GROUP_A: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
                   STAGES: gl.constexpr, WORDS: gl.constexpr, WORDS_MMA: gl.constexpr,
                   AL: gl.constexpr):  # fmt: skip
    """K tile i's operands once its slot is ready: the unpacked weights (A registers; times
    the tile's group scales, rounded to x's dtype, when GROUP_A > 0) and x^T [BK, BM] in
    shared memory."""
    slot = i % STAGES
    mbarrier.wait(ready.index(slot), (i // STAGES) & 1)
    words = _atoms(w_ring, slot, BN, BK).load(WORDS)
    a = _operand(words, s_ptr, n0, N, stride_sn, stride_sg, k0, True, GROUP_A, BN, BK,
                 WORDS_MMA, AL, x_ring.dtype)  # fmt: skip
    return a, x_ring.index(slot).permute((1, 0))


@gluon.jit
def _consumer(acc, x_ring, w_ring, ready, empty, s_ptr, n0, N, rn, n_mask, k_lo, tiles,
              stride_sn, stride_sg, GROUP: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
              STAGES: gl.constexpr, WORDS: gl.constexpr, WORDS_MMA: gl.constexpr,
              AL: gl.constexpr, ASYNC: gl.constexpr):  # fmt: skip
    """The wgmma warps: per K tile wait for its slot, unpack the weights to A registers,
    multiply by the x tile in shared memory, release the slot.

    ASYNC: each wgmma runs while the warps unpack the next tile. A wgmma reads its A
    registers while it runs, and nothing may write them until it is waited for, so the loop
    takes two tiles a turn with two sets of A registers: each wait (for all but the newest
    wgmma) frees the other set and the other tile's slot. Group scales then multiply A
    (rounded to x's dtype, as Marlin and w4_wgmma's overlap path do) so that every tile
    chains into one accumulator: scaling each tile's product in fp32 reads an accumulator
    inside the wgmma pipeline, and ptxas then serializes every wgmma (its C7514)."""
    if ASYNC:
        for j in range(tiles // 2):
            i = 2 * j
            a, b = _tile_operands(x_ring, w_ring, ready, i, s_ptr, n0, N, stride_sn, stride_sg,
                                  k_lo + i * BK, GROUP, BN, BK, STAGES, WORDS, WORDS_MMA,
                                  AL)  # fmt: skip
            acc = warpgroup_mma(a, b, acc, is_async=True)
            acc = warpgroup_mma_wait(1, deps=[acc])
            if j > 0:  # tile i - 1's wgmma is done
                mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES), count=1)
            a2, b2 = _tile_operands(x_ring, w_ring, ready, i + 1, s_ptr, n0, N, stride_sn,
                                    stride_sg, k_lo + i * BK + BK, GROUP, BN, BK, STAGES,
                                    WORDS, WORDS_MMA, AL)  # fmt: skip
            acc = warpgroup_mma(a2, b2, acc, is_async=True)
            acc = warpgroup_mma_wait(1, deps=[acc])
            mbarrier.arrive(empty.index(i % STAGES), count=1)  # tile i's wgmma is done
        acc = warpgroup_mma_wait(0, deps=[acc])
        if tiles % 2:  # the last tile alone (no slot release: nothing is copied after it)
            a, b = _tile_operands(x_ring, w_ring, ready, tiles - 1, s_ptr, n0, N, stride_sn,
                                  stride_sg, k_lo + tiles * BK - BK, GROUP, BN, BK, STAGES,
                                  WORDS, WORDS_MMA, AL)  # fmt: skip
            acc = warpgroup_mma(a, b, acc)
        # an fp32 operation before the epilogue's first read: w4_wgmma._loop_overlap found
        # ptxas serializing the loop when that read was a conversion to bf16
        acc = acc + 0.0
    else:
        for i in range(tiles):
            if GROUP > 0:  # before the wait, which then hides the load
                gs = gl.load(_scale_ptrs(s_ptr, rn, stride_sn, stride_sg, k_lo + i * BK, GROUP),
                             mask=n_mask, other=0.0)  # fmt: skip
            a, b = _tile_operands(x_ring, w_ring, ready, i, s_ptr, n0, N, stride_sn, stride_sg,
                                  k_lo + i * BK, 0, BN, BK, STAGES, WORDS, WORDS_MMA,
                                  AL)  # fmt: skip
            if GROUP == 0:
                acc = warpgroup_mma(a, b, acc)
            else:
                part = warpgroup_mma(a, b, gl.zeros_like(acc), use_acc=False)
                acc += part * gs[:, None]
            # the synchronous wgmma read its x
            mbarrier.arrive(empty.index(i % STAGES), count=1)
    return (acc,)


@gluon.jit
def _ring(x_desc, w_desc, STAGES: gl.constexpr):
    """The copy ring, shared by the warp-specialized kernels: STAGES slots of x and of
    atoms shaped as the descriptors' boxes, and a fresh `ready` and `empty` mbarrier per
    slot."""
    # (the JIT reads no starred lists)
    x_shape: gl.constexpr = [STAGES] + x_desc.block_type.shape  # noqa: RUF005
    w_shape: gl.constexpr = [STAGES] + w_desc.block_type.shape  # noqa: RUF005
    x_ring = gl.allocate_shared_memory(x_desc.dtype, x_shape, x_desc.layout)
    w_ring = gl.allocate_shared_memory(w_desc.dtype, w_shape, w_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)  # the producer's expect; TMA adds the bytes
        mbarrier.init(empty.index(s), count=1)  # one arrival of the consumer warps
    return x_ring, w_ring, ready, empty


@gluon.jit
def _ws_program(x_desc, w_desc, M, N, K_SPLIT, BN: gl.constexpr, BK: gl.constexpr,
                BM: gl.constexpr, STAGES: gl.constexpr, ACC: gl.constexpr):  # fmt: skip
    """What both warp-specialized kernels start from: the program's first output row n0,
    first token m0, K range start k_lo and its count of K tiles, the copy ring (_ring), and
    its output rows and tokens in the accumulator layout ACC with their masks."""
    n0 = gl.program_id(0) * BN
    m0 = gl.program_id(1) * BM
    k_lo = gl.program_id(2) * K_SPLIT
    x_ring, w_ring, ready, empty = _ring(x_desc, w_desc, STAGES)
    rn, rm, n_mask, m_mask = _out_index(n0, m0, N, M, BN, BM, ACC)
    return n0, m0, k_lo, K_SPLIT // BK, x_ring, w_ring, ready, empty, rn, rm, n_mask, m_mask


@gluon.jit(do_not_specialize=["M"])
def _w4_wgmma_ws_kernel(
    x_desc,  # TMA over x [M, K] in mma K order, box [BM, BK]
    w_desc,  # TMA over the atoms as int16 [N/16, K/64, 256], box [BN/16, BK/64, 256]
    s_ptr, b_ptr, out_ptr, ws_ptr, lock_ptr,  # as in w4_wgmma._w4_wgmma_kernel
    M, N, K, stride_sn, stride_sg, K_SPLIT, stride_om,
    GROUP: gl.constexpr, HAS_BIAS: gl.constexpr, SPLIT_K: gl.constexpr,
    BN: gl.constexpr, BK: gl.constexpr, BM: gl.constexpr, WARPS: gl.constexpr,
    STAGES: gl.constexpr, WORDS: gl.constexpr, WORDS_MMA: gl.constexpr, ASYNC: gl.constexpr,
):  # fmt: skip
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, BM, 16]
    )
    AL: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_l, k_width=2)
    n0, m0, k_lo, tiles, x_ring, w_ring, ready, empty, rn, rm, n_mask, m_mask = _ws_program(
        x_desc, w_desc, M, N, K_SPLIT, BN, BK, BM, STAGES, acc_l
    )
    acc = gl.zeros([BN, BM], gl.float32, acc_l)
    # (the partitions' arguments inline: the JIT turns a tuple variable's layouts to tensors)
    acc = gl.warp_specialize(
        [
            (_consumer, (acc, x_ring, w_ring, ready, empty, s_ptr, n0, N, rn, n_mask, k_lo, tiles,
                         stride_sn, stride_sg, GROUP, BN, BK, STAGES, WORDS, WORDS_MMA, AL,
                         ASYNC)),
            (_producer, (x_desc, w_desc, x_ring, w_ring, ready, empty, n0, m0, k_lo, tiles, BK,
                         STAGES)),
        ],
        [1],
        [PRODUCER_REGS],
    )[0]  # fmt: skip
    _finish(acc, rn, rm, n_mask, m_mask, s_ptr, b_ptr, out_ptr, ws_ptr, lock_ptr, M, N,
            stride_om, GROUP, HAS_BIAS, SPLIT_K)  # fmt: skip


# ------------------------------------------------------------------------------ launcher
@dataclass(frozen=True)
class WsConfig:
    block_n: int  # output features per program: 64 per consumer warpgroup, or a multiple
    block_k: int  # multiple of 128
    warps: int  # consumer warps: 4 or 8 (one or two warpgroups); one producer warp more
    stages: int = 4  # ring slots (>= 2)
    split_waves: int = 1  # split K until the grid has this many programs per SM
    # registers per thread the kernel is compiled for; the producer gives most of its own
    # to the consumers (0: Triton's default)
    maxnreg: int = 0
    # asynchronous wgmma, one in flight while the next tile is unpacked; group scales then
    # multiply A in bf16/fp16 (as WgmmaConfig.overlap does), not each tile's product in fp32,
    # which lost on an H200 (bench/results/ws_probe_async_g128_333e121.md): no table uses it
    # with group scales
    async_mma: bool = False

    @property
    def x_perm(self) -> bool:
        """Reads x in mma K order, as the wgmma configs with x_perm do (TMA copies rows)."""
        return True


_S = WsConfig
# Per M bucket (its largest M) and weight-size class (w4_fragment.SIZE_CLASSES); None: the
# fragment kernel (up to 8 tokens) or the synchronous wgmma table (w4_wgmma.wgmma_config)
# serves it. Picked on an H200 over the Llama-3 8B/70B linears, W4A16-g128 on group-major
# scales and per channel together, against what the layers ran without this kernel in the
# same run (least total time per class; bench/results/ws_probe_d0192da.md for 16-128
# tokens, ws_probe_9e0ef41.md for 8). Two 8-warp CTAs per SM (128 registers) won from 16
# tokens; at 8, six-slot rings split until two CTAs share each SM, at 64 registers, in the
# two smaller classes (the fragment kernel keeps the larger ones). At 1-4 tokens no config
# won a whole class in both formats (ws_probe_small_m_5076c08.md): the per-shape tables
# below name the layers where it did. block_k 256 applies per channel only (a g128 tile
# stays inside one group, at 128).
WS_CONFIGS: dict[int, list[tuple[int, WsConfig | None]]] = {
    4: _table(None, None, None, None),
    8: _table(_S(64, 128, 4, 6, 2, 64), _S(64, 128, 4, 6, 2, 64), None, None),
    16: _table(None, None, _S(128, 128, 4, 4, 1, 128), _S(128, 128, 4, 4, 1, 128)),
    32: _table(None, None, _S(128, 128, 4, 4, 1, 128), _S(128, 128, 4, 4, 1, 128)),
    64: _table(_S(64, 256, 4, 2, 1, 128), _S(64, 128, 4, 4, 1, 128), _S(64, 128, 4, 4, 1, 128),
               _S(128, 128, 4, 4, 1, 128)),
    128: _table(_S(64, 256, 4, 2, 1, 128), _S(128, 128, 4, 3, 1, 128),
                _S(128, 128, 4, 3, 1, 128), _S(64, 128, 4, 3, 2, 80)),
}  # fmt: skip

# Per layer shape (N, K), the buckets where another config beat its class's entry on that
# layer by 5% or more in the same run (both formats summed). Bucket 4 (1-4 tokens,
# ws_probe_small_m_5076c08.md): the 8B layers, where a config beat the fragment kernel in
# both formats at one and four tokens (8B g128 57.4 -> 55.3 us at one token, per channel
# 55.2 -> 50.3); on 70B g128 the fragment kernel stays faster.
WS_SHAPE_CONFIGS: dict[tuple[int, int], dict[int, WsConfig]] = {
    (6144, 4096): {4: _S(64, 128, 4, 4, 2, 80)},  # Llama-3-8B qkv
    (4096, 4096): {4: _S(64, 128, 4, 6, 2, 64)},  # Llama-3-8B o
    (28672, 4096): {4: _S(128, 128, 4, 4, 1, 128), 16: _S(128, 128, 4, 4, 1, 128),
                    32: _S(128, 128, 4, 4, 1, 128),
                    64: _S(128, 128, 4, 3, 1, 128)},  # Llama-3-8B gate_up
    (4096, 14336): {4: _S(128, 128, 4, 4, 1, 128),
                    128: _S(64, 256, 4, 2, 1, 128)},  # Llama-3-8B down
    (10240, 8192): {16: _S(64, 128, 4, 4, 2, 80), 32: _S(64, 128, 4, 3, 2, 80),
                    64: _S(64, 128, 4, 3, 2, 80), 128: _S(64, 128, 4, 3, 2, 80)},  # 70B qkv
    (8192, 8192): {128: _S(64, 128, 4, 4, 1, 128)},  # Llama-3-70B o
}  # fmt: skip


# Per channel only, ahead of the tables above: where the asynchronous consumer (async_mma)
# beat every synchronous config on a layer by 5% or more in the same run
# (bench/results/ws_probe_async_605d441.md, per channel at 32-128 tokens; elsewhere it came
# within 0.97-1.17 of the best synchronous one); and at 1-4 tokens the 70B layers where a
# config beat the fragment kernel by 4% or more at one and four tokens
# (ws_probe_small_m_5076c08.md; g128 there loses 3-14%, and gate_up per channel gained 1.5%).
WS_CHANNEL_SHAPE_CONFIGS: dict[tuple[int, int], dict[int, WsConfig]] = {
    (10240, 8192): {4: _S(64, 128, 4, 4, 2, 80)},  # Llama-3-70B qkv
    (8192, 8192): {4: _S(128, 128, 4, 4, 1, 128)},  # Llama-3-70B o
    (8192, 28672): {4: _S(128, 128, 4, 4, 1, 128),
                    64: _S(64, 128, 4, 4, 1, 128, async_mma=True)},  # Llama-3-70B down
}  # fmt: skip


def ws_config(m: int, n: int, k: int, group: int = 0) -> WsConfig | None:
    """The warp-specialized config for `m` tokens and an [N, K] weight with `group` scales
    (0: per channel, which asks WS_CHANNEL_SHAPE_CONFIGS first; then WS_SHAPE_CONFIGS, else
    the size class's in WS_CONFIGS), or None: another kernel."""
    shapes = (WS_CHANNEL_SHAPE_CONFIGS, WS_SHAPE_CONFIGS) if group == 0 else (WS_SHAPE_CONFIGS,)
    return shaped_lookup(WS_CONFIGS, m, n, k, *shapes)


# the x tile's shared layout: 128-byte swizzle, as wgmma's B operand wants it (TMA fills it
# in boxes of 64 bf16 columns); the atoms' unswizzled, so that they land row-major
X_LAYOUT = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
W_LAYOUT = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=3)
MIN_REGS = 64  # below this ptxas spills the consumer's unpacked operand


def check_ws_config(cfg: WsConfig, group: int = 0) -> None:
    if cfg.warps not in (4, 8):
        raise ValueError(f"warps must be 4 or 8 (one or two consumer warpgroups), not {cfg.warps}")
    if cfg.block_n % (16 * cfg.warps) or cfg.block_n > 256:
        raise ValueError(f"block_n {cfg.block_n} must be a multiple of 16 * warps "
                         f"({16 * cfg.warps}) and at most 256")  # fmt: skip
    if cfg.block_k % ATOM_K:
        raise ValueError(f"block_k {cfg.block_k} is not a multiple of {ATOM_K}")
    if cfg.stages < 2:
        raise ValueError(f"stages must be >= 2 (one slot filling while one is read), not "
                         f"{cfg.stages}")  # fmt: skip
    if cfg.async_mma and cfg.block_n != 16 * cfg.warps:
        # two sets of A registers and a taller accumulator do not fit: ptxas then waits
        # after every wgmma
        raise ValueError(f"async_mma needs block_n == 16 * warps (64 rows per warpgroup), "
                         f"not block_n {cfg.block_n} with {cfg.warps} warps")  # fmt: skip
    if cfg.maxnreg and not (MIN_REGS <= cfg.maxnreg <= 255 and cfg.maxnreg % 8 == 0):
        raise ValueError(f"maxnreg must be 0 (Triton decides) or a multiple of 8 in "
                         f"[{MIN_REGS}, 255], not {cfg.maxnreg}")  # fmt: skip


def require_hopper(device: torch.device, kernel: str) -> None:
    """Raise, naming what `device` is, unless it can run `kernel` (TMA and wgmma: compute
    capability 9.x)."""
    if missing := capability_missing(device, lambda cap: cap[0] == 9):
        raise ValueError(f"the {kernel} kernel needs a Hopper GPU (compute capability 9.x: "
                         f"TMA and wgmma), not {missing}")  # fmt: skip


def wgmma_ws_linear(
    x: torch.Tensor,  # [..., K] bf16 / fp16
    frag: torch.Tensor,  # int16 [N/16, K/128, 512] (prepare_fragments)
    scales: torch.Tensor,  # fp32 [N, G] (any strides scale_strides takes)
    bias: torch.Tensor | None,
    group: int,  # 0: per channel
    config: WsConfig,
    split_k: int | None = None,  # default: choose_split_k; lowered to divide the K tiles
    x_in_mma_order: bool = False,  # x already in to_mma_order's order
) -> torch.Tensor:  # [..., N]
    check_ws_config(config, group)
    a, out, lead = launch_buffers(x, frag)
    (m, k), n = a.shape, out.shape[1]
    if m == 0:
        return out.view(*lead, n)
    require_hopper(a.device, "warp-specialized W4A16")
    if not x_in_mma_order:
        a = to_mma_order(a)
    if a.data_ptr() % 16:  # TMA also needs an aligned base (as_rows aligned the rows)
        a = a.clone(memory_format=torch.contiguous_format)
    bm = token_tile(m)
    g = plan_grid(out, k, group, config.block_n, config.block_k, bm, config.split_waves, split_k)
    lay = layouts(config.block_n, g.block_k, bm, config.warps)
    x_desc = TensorDescriptor.from_tensor(a, [bm, g.block_k], X_LAYOUT)
    atoms = frag.view(frag.shape[0], frag.shape[1] * 2, 256)
    w_desc = TensorDescriptor.from_tensor(
        atoms, [config.block_n // 16, g.block_k // 64, 256], W_LAYOUT
    )
    _w4_wgmma_ws_kernel[(g.n_tiles, g.m_tiles, g.split_k)](
        x_desc, w_desc, scales, bias if bias is not None else scales, out, g.ws, g.locks,
        m, n, k, *scale_strides(scales, group), g.k_split, out.stride(0),
        GROUP=group, HAS_BIAS=bias is not None, SPLIT_K=g.split_k,
        BN=config.block_n, BK=g.block_k, BM=bm, WARPS=config.warps, STAGES=config.stages,
        WORDS=lay.words, WORDS_MMA=lay.words_mma, ASYNC=config.async_mma,
        num_warps=config.warps, **({"maxnreg": config.maxnreg} if config.maxnreg else {}),
    )  # fmt: skip
    return out.view(*lead, n)
