"""W4A8 GEMM on Hopper: int4 weights unpacked to int8 as wgmma's register A operand,
per-token int8 activations streamed through shared memory, int32 sums. Per channel, or with
two-level scales (int8 per group of 128k, fp32 per channel: each group's int32 sum is scaled
and added in fp32, as the canonical kernel does).

The W4A8 format runs the canonical Triton kernel (tl.dot on int8) elsewhere. That kernel
unpacks each weight tile again for every token tile and loses to the W4A16 wgmma kernel
from 32 tokens on (bench/results/kernel_perf.md). This kernel is the W4A8 twin of
w4_wgmma.py: each warpgroup unpacks its 64 x BK weights once into int8 A registers, and x
(already int8, half of bf16's bytes) streams through a cp.async ring that all warps read.

Packing (`prepare_fragments_i8`). wgmma's int8 A operand gives each thread, per warp's 16
rows and 32 k, four registers of four consecutive k: rows g and g + 8 (lane = 4 g + t),
k = 4 t .. 4 t + 3 and 16 + 4 t .. 16 + 4 t + 3. One 32-bit word here holds the 8 codes of
row g or g + 8 at those k: byte b carries k = 4 t + b in its low nibble and k + 16 in its
high one, as two's-complement int4. Two instructions turn a word into both registers,
each code times 16: (word << 4) & 0xF0F0F0F0 and word & 0xF0F0F0F0. The epilogue divides
the int32 sums by 16 (exact: |16 * 8 * 127 * K| < 2^31 for K < 132,000).

An atom is 16 rows x 128 k = 1024 bytes: [k64 half, lane, 16 bytes], each lane's 16 bytes
the 4 words of (k32 within the half, row g / g + 8). A lane copies 16 contiguous bytes and
the 32 lanes of a warp 512 contiguous bytes. Features stay in their natural K order, so x
is copied as it is.

Registered as `triton-w4a8-wgmma` above the canonical kernel on Hopper: `W4A8Forward`
runs it for the token counts and weight sizes of `W4A8_CONFIGS` (picked on an H200 by
bench/w4a8_probe.py: 17-512 tokens everywhere, from one token on all but the smallest
layers) and hands the rest to the canonical kernel. Where `W4A8_WS_CONFIGS` holds a
config (16-128 tokens), the warp-specialized twin (w4a8_wgmma_ws.py) runs instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma

from specquant.kernels.triton_ops.w4_fragment import (
    ATOM_K,
    ATOM_N,
    _bits,
    _finish,
    _out_index,
    _table,
    _weight_ptrs,
    lookup,
    plan_grid,
    shaped_lookup,
)
from specquant.kernels.triton_ops.w4_wgmma import _copy, _ring_step, _x_tile, token_tile
from specquant.kernels.triton_ops.w4_wgmma_ws import WsConfig
from specquant.quant.pack import pack_int4, unpack_int4

ATOM_BYTES = ATOM_N * ATOM_K // 2  # 1024
# _finish's GROUP for sums already scaled (no per-channel scale left to apply)
SCALED = gl.constexpr(1)


# ----------------------------------------------------------------------------- packing
def prepare_fragments_i8(qweight: torch.Tensor) -> torch.Tensor:
    """Canonical uint8 [N, K/2] (codes q + 8) -> int8 [N/16, K/128, 1024] atoms."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    if n % ATOM_N or k % ATOM_K:
        raise ValueError(f"fragment layout needs N % {ATOM_N} == K % {ATOM_K} == 0, not {n}, {k}")
    c = unpack_int4(qweight).to(torch.int32) ^ 8  # two's-complement nibbles of q
    # n = 16 nb + 8 n8 + g; k = 128 kb + 64 h + 32 s + 16 hi + 4 t + b
    c = c.reshape(n // 16, 2, 8, k // 128, 2, 2, 2, 4, 4)  # nb n8 g kb h s hi t b
    # -> [nb, kb, h, lane = 4 g + t, word = 2 s + n8, byte b, nibble hi]
    c = c.permute(0, 3, 4, 2, 7, 5, 1, 8, 6).reshape(n // 16, k // 128, ATOM_BYTES, 2)
    byte = c[..., 0] | (c[..., 1] << 4)
    return (byte - (byte >= 128).to(torch.int32) * 256).to(torch.int8)


def fragment_codes_i8(frag: torch.Tensor) -> torch.Tensor:
    """Inverse of prepare_fragments_i8: int8 atoms -> canonical uint8 [N, K/2]."""
    nb, kb = frag.shape[0], frag.shape[1]
    byte = frag.to(torch.int32) & 0xFF
    c = torch.stack([byte & 0xF, byte >> 4], dim=-1)  # [nb, kb, 1024, 2]
    c = c.reshape(nb, kb, 2, 8, 4, 2, 2, 4, 2)  # nb kb h g t s n8 b hi
    c = c.permute(0, 6, 3, 1, 2, 5, 8, 4, 7).reshape(nb * 16, kb * ATOM_K)
    return pack_int4(c ^ 8)


# ----------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class Layouts:
    bytes: Any  # int8 [BN/16, (BK/128) * 1024] as loaded (memory order)
    bytes_mma: Any  # int8 [BN, BK/2]: column = k without its k16 bit (k16: the nibble)


@cache
def layouts(bn: int, bk: int, warps: int) -> Layouts:
    """The loaded weight bytes' layouts for one tile config (wgmma's A over [BN, BK], `warps`
    along N in warpgroups of four: registers byte (k1, k2), n8, k32, k64, then 128-blocks and
    the N repeats above the warps; lanes k4, k8, n1, n2, n4; warps n16, n32, ...)."""
    warp_n = [16 * w for w in _bits(warps)]
    rep_n = [n for n in _bits(bn) if n >= 16 * warps]
    blocks = [k for k in _bits(bk) if k >= 128]

    def col(n: int, k: int) -> list[int]:  # an (n, k) basis -> (atom row, byte) in memory
        if n >= 16:
            return [n >> 4, 0]
        if n:
            return [0, 4 if n == 8 else 64 * n]  # n8: word bit 0; g: lane bits 2-4
        return [0, {1: 1, 2: 2, 4: 16, 8: 32, 32: 8, 64: 512}.get(k, 1024 * (k // 128))]

    def half(k: int) -> int:  # k -> its column in [BN, BK/2] (the k16 bit is the nibble)
        return (k & 15) | ((k >> 5) << 4)

    regs = [(0, 1), (0, 2), (8, 0), (0, 32), (0, 64), *[(0, k) for k in blocks]]
    regs += [(n, 0) for n in rep_n]
    lanes = [(0, 4), (0, 8), (1, 0), (2, 0), (4, 0)]
    mma = gl.DistributedLinearLayout(
        reg_bases=[[n, half(k)] for n, k in regs],
        lane_bases=[[n, half(k)] for n, k in lanes],
        warp_bases=[[n, 0] for n in warp_n],
        block_bases=[],
        shape=[bn, bk // 2],
    )
    memory = gl.DistributedLinearLayout(
        reg_bases=[col(n, k) for n, k in regs],
        lane_bases=[col(n, k) for n, k in lanes],
        warp_bases=[col(n, 0) for n in warp_n],
        block_bases=[],
        shape=[bn // 16, (bk // 128) * ATOM_BYTES],
    )
    return Layouts(memory, mma)


# ------------------------------------------------------------------------------ kernel
# The index plan from loaded bytes to wgmma's A, shared by the kernel and its CPU model
# (`operand_i8_reference`), so that a test of the model tests the kernel's indexing:
# bytes [BN/16, BK/128 * 1024] -> [nb, kb, h, g, t, s, n8, b] (memory order) -> permuted to
# [nb, n8, g | kb, h, s, t, b] = [BN, BK/2] (a byte's column: its k without the k16 bit)
_ATOM_DIMS = gl.constexpr([2, 8, 4, 2, 2, 4])  # h g t s n8 b, after nb and kb
_TO_ROWS_COLS = gl.constexpr([0, 6, 3, 1, 2, 5, 4, 7])
# after unpacking, join(lo, hi) = [BN, BK/2, 2] -> [BN, BK/32, 16 (k1..k8), 2 (k16)] -> k order
_TO_K = gl.constexpr([0, 1, 3, 2])
# a word of 8 two's-complement codes -> the low and the high nibbles as 4 int8 each, x 16
_UNPACK_I8 = gl.constexpr(
    "{ .reg .b32 t; shl.b32 t, $2, 4; and.b32 $0, t, 0xF0F0F0F0; and.b32 $1, $2, 0xF0F0F0F0; }"
)


@gluon.jit
def _operand_i8(loaded, BN: gl.constexpr, BK: gl.constexpr, BYTES_MMA: gl.constexpr,
                AL: gl.constexpr):  # fmt: skip
    """int8 [BN/16, BK/128 * 1024] as loaded -> wgmma's int8 A [BN, BK] (codes x 16)."""
    d: gl.constexpr = _ATOM_DIMS
    t = gl.reshape(loaded, [BN // 16, BK // 128, d[0], d[1], d[2], d[3], d[4], d[5]])
    p: gl.constexpr = _TO_ROWS_COLS
    t = gl.permute(t, [p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]])
    t = gl.convert_layout(gl.reshape(t, [BN, BK // 2]), BYTES_MMA, assert_trivial=True)
    lo, hi = gl.inline_asm_elementwise(_UNPACK_I8, "=r,=r,r", [t], (gl.int8, gl.int8), True, 4)
    q: gl.constexpr = _TO_K
    j = gl.permute(gl.reshape(gl.join(lo, hi), [BN, BK // 32, 16, 2]), [q[0], q[1], q[2], q[3]])
    return gl.convert_layout(gl.reshape(j, [BN, BK]), AL, assert_trivial=True)


def operand_i8_reference(loaded: torch.Tensor) -> torch.Tensor:
    """CPU model of _operand_i8 with the same index plan: int8 [BN/16, BK/128 * 1024] bytes
    -> int32 [BN, BK] (codes x 16)."""
    bn, bk = loaded.shape[0] * 16, loaded.shape[1] // 1024 * 128
    t = loaded.reshape(bn // 16, bk // 128, *_ATOM_DIMS.value).permute(*_TO_ROWS_COLS.value)
    byte = t.reshape(bn, bk // 2).to(torch.int32) & 0xFF
    lo = (((byte << 4) & 0xF0) ^ 0x80) - 0x80  # the unpack's two masks, read as int8
    hi = ((byte & 0xF0) ^ 0x80) - 0x80
    j = torch.stack([lo, hi], dim=-1).reshape(bn, bk // 32, 16, 2).permute(*_TO_K.value)
    return j.reshape(bn, bk)


@gluon.jit(do_not_specialize=["M"])
def _w4a8_wgmma_kernel(
    x_ptr,  # int8 [M, K] activation codes
    xs_ptr,  # fp32 [M] per-token scales
    w_ptr,  # int8 [N/16, K/128, 1024] atoms (prepare_fragments_i8)
    s_ptr,  # fp32 [N] per-channel scales; with GROUP, int8 [N, G] group scales
    cs_ptr,  # fp32 [N] channel scales of two-level scales (GROUP > 0)
    b_ptr,  # [N] bias (HAS_BIAS)
    out_ptr,  # [M, N] bf16 / fp16
    ws_ptr,  # fp32 [SPLIT_K, M, N] partial sums (SPLIT_K > 1)
    lock_ptr,  # int32 arrival counter per output tile, zero between launches
    M, N, K, G, K_SPLIT, stride_xm, stride_om,
    GROUP: gl.constexpr, HAS_BIAS: gl.constexpr, SPLIT_K: gl.constexpr, BN: gl.constexpr,
    BK: gl.constexpr,
    BM: gl.constexpr, WARPS: gl.constexpr, STAGES: gl.constexpr,
    BYTES: gl.constexpr, BYTES_MMA: gl.constexpr,
):  # fmt: skip
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, BM, 32]
    )
    AL: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_l, k_width=4)
    XC: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [WARPS, 1], [1, 0])  # 16-byte copies
    X_SMEM: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
    # each thread reads back the weights it copied: no swizzle
    W_SMEM: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0])
    n0 = gl.program_id(0) * BN
    m0 = gl.program_id(1) * BM

    w_ptrs, w_mask = _weight_ptrs(w_ptr, n0, N, K, BN, BK, BYTES)
    xc = gl.arange(0, BK, layout=gl.SliceLayout(0, XC))
    x_ptrs, x_mask = _x_tile(x_ptr, m0, M, stride_xm, xc, BM, XC)  # [BM, BK]

    rn, rm, n_mask, m_mask = _out_index(n0, m0, N, M, BN, BM, acc_l)
    # per channel one int32 sum; with group scales each K tile's (one group) int32 sum is
    # scaled by its group's int8 scale and added in fp32, as the canonical kernel does
    acc = gl.zeros([BN, BM], gl.float32 if GROUP > 0 else gl.int32, acc_l)
    k_lo = gl.program_id(2) * K_SPLIT
    x_ring = gl.allocate_shared_memory(gl.int8, [STAGES, BM, BK], X_SMEM)
    w_ring = gl.allocate_shared_memory(gl.int8, [STAGES, BN // 16, (BK // 128) * 1024], W_SMEM)
    for s in gl.static_range(STAGES - 1):
        _copy(x_ring, w_ring, w_ptrs, w_mask, x_ptrs, x_mask, k_lo, s * BK, K_SPLIT, BK, STAGES,
              True)  # fmt: skip
    for kb in range(0, K_SPLIT, BK):
        slot = (kb // BK) % STAGES
        _ring_step(x_ring, w_ring, w_ptrs, w_mask, x_ptrs, x_mask, k_lo, kb, K_SPLIT, BK, STAGES,
                   True)  # fmt: skip
        a = _operand_i8(w_ring.index(slot).load(BYTES), BN, BK, BYTES_MMA, AL)
        b = x_ring.index(slot).permute((1, 0))  # x^T [BK, BM]
        if GROUP == 0:
            acc = warpgroup_mma(a, b, acc)
        else:
            part = warpgroup_mma(a, b, gl.zeros([BN, BM], gl.int32, acc_l), use_acc=False)
            gs = gl.load(s_ptr + rn * G + (k_lo + kb) // GROUP, mask=n_mask, other=0)
            acc += part.to(gl.float32) * gs.to(gl.float32)[:, None]
    async_copy.wait_group(0)  # no copy may land in shared memory after the loop
    _finish_a8(acc, rn, rm, n_mask, m_mask, xs_ptr, s_ptr, cs_ptr, b_ptr, out_ptr, ws_ptr,
               lock_ptr, M, N, stride_om, GROUP, HAS_BIAS, SPLIT_K)  # fmt: skip


@gluon.jit
def _finish_a8(acc, rn, rm, n_mask, m_mask, xs_ptr, s_ptr, cs_ptr, b_ptr, out_ptr, ws_ptr,
               lock_ptr, M, N, stride_om, GROUP: gl.constexpr, HAS_BIAS: gl.constexpr,
               SPLIT_K: gl.constexpr):  # fmt: skip
    """The int32 (or, with group scales, fp32) sums [BN, BM] times the per-channel and the
    per-token scales, then written (split K: added up) as _finish does."""
    c_ptr = cs_ptr if GROUP > 0 else s_ptr  # the per-channel level
    sw = gl.load(c_ptr + rn, mask=n_mask, other=0.0) * (1.0 / 16.0)  # the codes were x 16
    sx = gl.load(xs_ptr + rm, mask=m_mask, other=0.0)
    y = acc.to(gl.float32) * sw[:, None] * sx[None, :]
    _finish(y, rn, rm, n_mask, m_mask, s_ptr, b_ptr, out_ptr, ws_ptr, lock_ptr, M, N,
            stride_om, SCALED, HAS_BIAS, SPLIT_K)  # fmt: skip


# ------------------------------------------------------------------------------ launcher
@dataclass(frozen=True)
class W4A8WgmmaConfig:
    block_n: int = 128  # output features per program: 64 per warpgroup, or a multiple
    block_k: int = 128  # multiple of 128
    warps: int = 8  # 4, 8 or 16: one, two or four warpgroups
    stages: int = 3  # slots of the cp.async ring (>= 2)
    split_waves: int = 1  # split K until the grid has this many programs per SM


def check_config(cfg: W4A8WgmmaConfig) -> None:
    if cfg.warps not in (4, 8, 16) or cfg.block_n % (16 * cfg.warps) or cfg.block_k % ATOM_K:
        raise ValueError(f"bad config {cfg}: warps 4, 8 or 16, block_n a multiple of 16 * "
                         f"warps, block_k of {ATOM_K}")  # fmt: skip
    if cfg.stages < 2:
        raise ValueError(f"stages must be >= 2 (the copy ring), not {cfg.stages}")


_C = W4A8WgmmaConfig


# Per M bucket (its largest M), one config per weight-size class (w4_fragment.SIZE_CLASSES);
# None: the canonical kernel is faster. Picked on an H200 over the Llama-3 8B/70B linears,
# per channel and two-level g128 together, by bench/w4a8_probe.py (least total time per
# class; bench/results/w4a8_probe_cfe1ed3.json; bucket 16 timed at M = 1 and 16). Per
# format, the picks take 0.55-1.00 of the canonical kernel's time from 32 tokens and
# 0.60-1.03 up to 16 tokens in the three larger classes (1.03: per channel, 8B gate_up and
# down with 70B qkv and o; one table for both formats costs that 3%). The smallest class
# (8B qkv and o) keeps the canonical kernel up to 16 tokens (1.06 for the best config).
# Bucket 512 (129-512 tokens) was timed at 256 and 512 tokens (w4a8_probe_81ac8ba.json): its
# picks take 0.65-0.76 of the canonical kernel's time per size class (0.62-0.88 per format
# and model). At 1024 tokens (the runner's prefill chunk; prefill_1024_bc7b3a6.md, 70B) they
# take 0.98-1.10: this kernel's token tiles stop at 64, so every 64 tokens unpack the
# weights again, while the canonical kernel's 128-token tiles unpack half as often. Past
# 512 tokens the canonical kernel runs.
W4A8_CONFIGS: dict[int, list[tuple[int, W4A8WgmmaConfig | None]]] = {
    16: _table(None, _C(128, 128, 8, 4), _C(128, 128, 8, 4), _C(128, 128, 4, 3)),
    32: _table(_C(64, 128, 4, 4), _C(64, 128, 4, 4), _C(128, 128, 8, 4), _C(128, 128, 4, 3)),
    64: _table(_C(64, 128, 4, 4), _C(64, 128, 4, 4), _C(128, 128, 4, 3), _C(64, 128, 4, 4)),
    128: _table(_C(64, 128, 4, 4), _C(64, 128, 4, 4), _C(128, 128, 4, 3), _C(128, 256, 8, 3)),
    512: _table(_C(64, 128, 4, 4), _C(128, 128, 8, 3), _C(128, 256, 8, 3), _C(128, 256, 8, 3)),
}  # fmt: skip


# The warp-specialized twin's picks (w4a8_wgmma_ws.py, w4_wgmma_ws.WsConfig), in the same
# form, asked before W4A8_CONFIGS; None hands the class over to W4A8_CONFIGS. Picked on an
# H200 by `bench/w4a8_probe.py --ws` (bench/results/w4a8_probe_ws_0c513f0.json: least total
# time per class over both formats, against W4A8_CONFIGS' own picks in the same run; a pick
# had to save 2% and lose at most 1% in either format). The picks take 0.89-0.97 of the
# synchronous picks' time; where the twin is left out, its best came to 0.99-1.06 of them.
# Up to 8 tokens and past 128 it was not timed.
_S = WsConfig
W4A8_WS_CONFIGS: dict[int, list[tuple[int, WsConfig | None]]] = {
    8: _table(None, None, None, None),
    16: _table(None, _S(128, 128, 4, 4, 1, 128), _S(128, 128, 4, 4, 1, 128), None),
    32: _table(_S(64, 128, 4, 4, 1, 128), _S(64, 128, 4, 4, 1, 128), None, None),
    64: _table(None, _S(64, 256, 4, 3, 1, 128), _S(64, 256, 4, 3, 1, 128),
               _S(128, 256, 4, 3, 1, 128)),
    128: _table(_S(64, 256, 4, 3, 1, 128), None, _S(64, 256, 4, 3, 1, 128),
                _S(64, 128, 4, 4, 2, 80)),
}  # fmt: skip

# Per layer shape (N, K), the buckets where another twin config beat the tables' pick on that
# layer by 5% or more in the same run (both formats summed; w4a8_probe_ws_0c513f0.json).
W4A8_WS_SHAPE_CONFIGS: dict[tuple[int, int], dict[int, WsConfig]] = {
    (28672, 4096): {32: _S(128, 128, 4, 4, 1, 128), 64: _S(128, 256, 4, 3, 1, 128)},  # 8B gate_up
    (4096, 14336): {16: _S(64, 128, 4, 4, 1, 128), 128: _S(64, 256, 4, 3, 1, 128)},  # 8B down
    (10240, 8192): {16: _S(64, 128, 4, 4, 2, 80), 32: _S(64, 128, 4, 4, 2, 80),
                    128: _S(64, 128, 4, 4, 2, 80)},  # Llama-3-70B qkv
    (8192, 8192): {128: _S(64, 256, 4, 3, 1, 128)},  # Llama-3-70B o
}  # fmt: skip


def w4a8_config(m: int, n: int, k: int) -> W4A8WgmmaConfig | WsConfig | None:
    """The tile config for `m` tokens and an [N, K] weight: a warp-specialized one (its
    shape's in W4A8_WS_SHAPE_CONFIGS, else its size class's in W4A8_WS_CONFIGS), else a
    W4A8WgmmaConfig (W4A8_CONFIGS), or None: the canonical kernel."""
    ws = shaped_lookup(W4A8_WS_CONFIGS, m, n, k, W4A8_WS_SHAPE_CONFIGS)
    return ws or lookup(W4A8_CONFIGS, m, n * k)


def w4a8_wgmma_linear(
    codes: torch.Tensor,  # int8 [..., K] per-token activation codes
    act_scales: torch.Tensor,  # fp32 [..., 1] or [...]
    frag: torch.Tensor,  # int8 [N/16, K/128, 1024] (prepare_fragments_i8)
    scales: torch.Tensor,  # fp32 [N] or [N, 1] per channel; int8 [N, K/group] with `group`
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    config: W4A8WgmmaConfig | WsConfig | None = None,  # WsConfig: the warp-specialized twin
    split_k: int | None = None,  # default: choose_split_k; lowered to divide the K tiles
    group: int = 0,  # > 0: two-level scales (int8 per group of `group` k, fp32 per channel)
    channel_scales: torch.Tensor | None = None,  # fp32 [N], with `group`
) -> torch.Tensor:  # [..., N] out_dtype
    cfg = config or W4A8WgmmaConfig()
    if isinstance(cfg, W4A8WgmmaConfig):  # a warp-specialized one is checked where it launches
        check_config(cfg)
    if codes.dtype != torch.int8:
        raise ValueError(f"activation codes must be int8, not {codes.dtype}")
    if frag.dtype != torch.int8 or frag.dim() != 3 or frag.shape[2] != ATOM_BYTES:
        raise ValueError(f"frag must be prepare_fragments_i8's int8 [N/16, K/128, {ATOM_BYTES}] "
                         f"(W4A16's int16 fragments are another order), not {frag.dtype} "
                         f"{tuple(frag.shape)}")  # fmt: skip
    n, k = frag.shape[0] * ATOM_N, frag.shape[1] * ATOM_K
    if codes.shape[-1] != k:
        raise ValueError(f"activations have {codes.shape[-1]} features, the weights K={k}")
    if group == 0 and scales.numel() != n:
        raise ValueError(f"per-channel scales: {n} expected ([N] or [N, 1]), got shape "
                         f"{tuple(scales.shape)}")  # fmt: skip
    if group:
        if group % ATOM_K or k % group:
            raise ValueError(f"group size must be a multiple of {ATOM_K} that divides K={k}, "
                             f"not {group}")  # fmt: skip
        if scales.dtype != torch.int8 or tuple(scales.shape) != (n, k // group):
            raise ValueError(f"two-level group scales: int8 [{n}, {k // group}] expected, got "
                             f"{scales.dtype} {tuple(scales.shape)}")  # fmt: skip
        if channel_scales is None or channel_scales.numel() != n:
            raise ValueError(f"two-level scales need channel_scales with {n} entries")
    lead = codes.shape[:-1]
    a = codes.reshape(-1, k)
    # rows 16-byte aligned for the copies
    if a.stride(-1) != 1 or a.stride(0) % 16 or a.data_ptr() % 16:
        a = a.clone(memory_format=torch.contiguous_format)
    m = a.shape[0]
    xs = act_scales.reshape(m).float().contiguous()
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0:
        return out.view(*lead, n)
    bm = token_tile(m)
    g = plan_grid(out, k, group, cfg.block_n, cfg.block_k, bm, cfg.split_waves, split_k)
    if group:
        sw, cs = scales.contiguous(), channel_scales.reshape(n).float().contiguous()
    else:
        sw = cs = scales.reshape(n).float().contiguous()
    if isinstance(cfg, WsConfig):
        from specquant.kernels.triton_ops.w4a8_wgmma_ws import launch_ws

        launch_ws(a, xs, frag, sw, cs, bias, out, g, bm, cfg, group)
        return out.view(*lead, n)
    lay = layouts(cfg.block_n, g.block_k, cfg.warps)
    _w4a8_wgmma_kernel[(g.n_tiles, g.m_tiles, g.split_k)](
        a, xs, frag, sw, cs, bias if bias is not None else cs, out, g.ws, g.locks,
        m, n, k, sw.shape[-1] if group else 1, g.k_split, a.stride(0), out.stride(0),
        GROUP=group, HAS_BIAS=bias is not None, SPLIT_K=g.split_k, BN=cfg.block_n,
        BK=g.block_k, BM=bm,
        WARPS=cfg.warps, STAGES=cfg.stages, BYTES=lay.bytes, BYTES_MMA=lay.bytes_mma,
        num_warps=cfg.warps,
    )  # fmt: skip
    return out.view(*lead, n)


class W4A8Forward:
    """A W4A8 layer (per channel, or two-level groups) on int8 fragments: QLinear's kernel
    when the registry's `triton-w4a8-wgmma` is chosen. Token counts with a config in
    W4A8_CONFIGS run this kernel (or its warp-specialized twin, where w4a8_config says), the
    rest the canonical one on the layer's own tensors. It takes the per-token codes the
    RMSNorm before it hands over, or quantizes x itself."""

    def __init__(self, frag: torch.Tensor):
        self.frag = frag
        self.n, self.k = frag.shape[0] * ATOM_N, frag.shape[1] * ATOM_K

    @classmethod
    def prepare(cls, t: dict[str, torch.Tensor]) -> W4A8Forward:
        return cls(prepare_fragments_i8(t["qweight"]))

    def config(self, m: int) -> W4A8WgmmaConfig | WsConfig | None:
        return w4a8_config(m, self.n, self.k)

    def route(self, m: int) -> str:
        """Which kernel runs m tokens: wgmma-ws, wgmma or canonical."""
        cfg = self.config(m)
        if cfg is None:
            return "canonical"
        return "wgmma" if isinstance(cfg, W4A8WgmmaConfig) else "wgmma-ws"

    def __call__(
        self,
        x: Any,  # torch.Tensor [..., K] or QuantizedActivations (int8)
        live: dict[str, torch.Tensor],
        bias: torch.Tensor | None,
        spec: Any,
    ) -> torch.Tensor:  # [..., N]
        from specquant.kernels.reference import QuantizedActivations, qlinear_reference
        from specquant.kernels.triton_ops.act_quant import quantize_per_token
        from specquant.kernels.triton_ops.qlinear import qlinear

        values = x.codes if isinstance(x, QuantizedActivations) else x
        if values.device != self.frag.device:  # moved without QLinear.prepare: the reference
            return qlinear_reference(x, live, bias, spec)
        cfg = self.config(values.numel() // values.shape[-1])
        if cfg is None:
            return qlinear(x, live, bias, spec)
        if not isinstance(x, QuantizedActivations):
            x = quantize_per_token(x, "int8")
        x.check_for(spec)
        group = 0 if spec.group_size == -1 else spec.group_size
        cs = live.get("channel_scales")
        return w4a8_wgmma_linear(x.codes, x.scales, self.frag, live["scales"], bias, x.dtype,
                                 cfg, group=group, channel_scales=cs)  # fmt: skip
