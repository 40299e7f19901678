"""Triton GEMM for every quantized format: y[M, N] = x[M, K] @ W^T with W in the canonical
layout of quant/pack.py (no repacking). One kernel, specialised at compile time per format:

    W4A16  int4 codes -> bf16/fp16 in registers, tensor-core dot with fp32 accumulation;
           group scales (and zero points) applied to each group's partial sum
    W8A8   int8 x int8 -> int32 dot; per-channel weight and per-token activation scales
    W4A8   int4 codes -> int8 in registers, int8 dot; per channel, or int8 group scales
           under fp32 channel scales (two-level g128)
    FP8    e4m3 x e4m3 -> fp32 dot (compute capability >= 8.9)

Each program computes acc[BLOCK_M, BLOCK_N] = x_tile @ W_tile^T over its K range. int4
tiles are unpacked in registers into the codes of even and odd k, and the dot runs as two
half-depth dots against x's even and odd columns, so the codes are never interleaved (that
shuffle cost more than the unpacking itself). Unsigned int4 codes u = q + 8 (or u with zero
point z) become exact 16 q for the integer dot; zero points are added back once per group as
(8 - z) * sum(x).

When a launch would have too few output tiles to fill the GPU (small M and N), K is split
over SPLIT_K programs; the last program of a tile to arrive adds the partial sums in a fixed
order (so results do not depend on timing) and writes the output. Its arrival counters live
in a per-device buffer that every launch leaves zeroed: allocate it (first call) before
capturing CUDA graphs, and do not run two split-K launches concurrently on one device.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache
from typing import Any

import torch
import triton
import triton.language as tl

from specquant.kernels.reference import QuantizedActivations
from specquant.kernels.triton_ops import family_of

# under the interpreter the kernel unpacks with plain integer ops and upcasts dot inputs
from specquant.kernels.triton_ops.act_quant import INTERPRET, quantize_per_token


# ------------------------------------------------------------------------- int4 unpacking
# Each byte b holds two codes: low nibble = even k, high nibble = odd k. The PTX below turns
# 4 bytes into 8 values with 32-bit operations: a nibble OR'ed into the mantissa of 128.0
# (bf16 0x4300) or 1024.0 (fp16 0x6400) is exactly 128 + u (1024 + u), and one packed fma
# subtracts 136 (1032): u - 8 = q, exact. prmt first orders the bytes (b0 b2 b1 b3) so that
# each 16-bit half of a result register is the next element. Output i depends on input
# byte i only, so it does not matter which 4 elements Triton packs together.
def unpack_ptx(dtype: str, shifts: tuple[int, ...], prologue: str = "") -> str:
    """PTX turning the 32-bit register $N (N = len(shifts)) into bf16x2/f16x2 registers $i:
    the low nibble of each 16-bit half of (t >> shifts[i]) becomes q = u - 8, where t is $N
    after `prologue` (which may write t)."""
    one, off, base, op = {
        "bf16": ("0x3F803F80", "0xC308C308", "0x43004300", "fma.rn.bf16x2"),
        "f16": ("0x3C003C00", "0xE408E408", "0x64006400", "fma.rn.f16x2"),
    }[dtype]
    src = f"${len(shifts)}"
    lines = [".reg .b32 t, a, one, off;", f"mov.b32 one, {one};", f"mov.b32 off, {off};",
             prologue or f"mov.b32 t, {src};"]  # fmt: skip
    for i, shift in enumerate(shifts):
        if shift:
            lines.append(f"shr.b32 a, t, {shift};")
        lines.append(f"lop3.b32 a, {'a' if shift else 't'}, 0x000F000F, {base}, 0xEA;")
        lines.append(f"{op} ${i}, a, one, off;")
    return "{\n" + "\n".join(lines) + "\n}"


_UNPACK_BF16 = unpack_ptx("bf16", (0, 8, 4, 12), "prmt.b32 t, $4, 0, 0x3120;")
_UNPACK_F16 = unpack_ptx("f16", (0, 8, 4, 12), "prmt.b32 t, $4, 0, 0x3120;")
# int8 codes for the integer dot, scaled by 16 so that no offset has to be subtracted: a
# nibble u moved to the top of its byte and its top bit flipped is 16 * u - 128 = 16 * q as
# a signed byte. Three 32-bit operations per 8 codes; the dot's sums are 16x, exactly.
_UNPACK_I8X16 = """{
.reg .b32 t;
shl.b32 t, $2, 4;
lop3.b32 $0, t, 0xF0F0F0F0, 0x80808080, 0x6A;
lop3.b32 $1, $2, 0xF0F0F0F0, 0x80808080, 0x6A;
}"""


@triton.jit
def _unpack_signed(packed, DTYPE: tl.constexpr, FAST: tl.constexpr):
    """uint8 [R, C] -> (q at even k, q at odd k) as DTYPE [R, C], q = u - 8 in -8..7."""
    if FAST:
        if tl.bfloat16 == DTYPE:
            lo, hi = tl.inline_asm_elementwise(
                _UNPACK_BF16_C, "=r,=r,=r,=r,r", [packed], (tl.bfloat16, tl.bfloat16), True, 4
            )
        else:
            lo, hi = tl.inline_asm_elementwise(
                _UNPACK_F16_C, "=r,=r,=r,=r,r", [packed], (tl.float16, tl.float16), True, 4
            )
    else:
        lo = ((packed & 0xF).to(tl.int8) - 8).to(tl.float32).to(DTYPE)
        hi = ((packed >> 4).to(tl.int8) - 8).to(tl.float32).to(DTYPE)
    return lo, hi


@triton.jit
def _unpack_int8x16(packed, FAST: tl.constexpr):
    """uint8 [R, C] -> (16 q at even k, 16 q at odd k) as int8 [R, C], q = u - 8."""
    if FAST:
        lo, hi = tl.inline_asm_elementwise(
            _UNPACK_I8X16_C, "=r,=r,r", [packed], (tl.int8, tl.int8), True, 4
        )
    else:
        lo = (((packed & 0xF) << 4) ^ 0x80).to(tl.int8, bitcast=True)
        hi = ((packed & 0xF0) ^ 0x80).to(tl.int8, bitcast=True)
    return lo, hi


# Triton kernels may read globals only as constexprs.
_UNPACK_BF16_C = tl.constexpr(_UNPACK_BF16)
_UNPACK_F16_C = tl.constexpr(_UNPACK_F16)
_UNPACK_I8X16_C = tl.constexpr(_UNPACK_I8X16)


# ---------------------------------------------------------------------------------- kernel
@triton.jit
def _partial(ws_ptr, offs, mask):
    """One split's partial sums, read from L2 (another program wrote them)."""
    return tl.load(ws_ptr + offs, mask=mask, other=0, cache_modifier=".cg")


@triton.jit
def _epilogue(
    acc, rm, rn, m_mask, n_mask, s_ptr, cs_ptr, xs_ptr, b_ptr, out_ptr, stride_om,
    W4: tl.constexpr, ACT: tl.constexpr, GROUP: tl.constexpr, TWO_LEVEL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):  # fmt: skip
    """acc [BLOCK_M, BLOCK_N] -> out with the remaining scales applied, plus bias."""
    y = acc.to(tl.float32)
    if W4 and ACT == 1:
        y = y * 0.0625  # int4 codes entered the integer dot as 16 q
    if GROUP == 0:  # per-channel scales [N, 1]
        y = y * tl.load(s_ptr + rn, mask=n_mask, other=0.0)[None, :]
    elif TWO_LEVEL:  # the fp32 channel level of two-level scales
        y = y * tl.load(cs_ptr + rn, mask=n_mask, other=0.0)[None, :]
    if ACT != 0:  # per-token activation scales
        y = y * tl.load(xs_ptr + rm, mask=m_mask, other=0.0)[:, None]
    if HAS_BIAS:
        y = y + tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _dot(a, b, acc, ACT: tl.constexpr, DOT_F32: tl.constexpr, IMPRECISE: tl.constexpr):
    if DOT_F32:  # the interpreter's numpy dot cannot multiply bf16
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    elif ACT == 1:
        out = tl.dot(a, b, acc, out_dtype=tl.int32)
    elif ACT == 2:
        # Hopper adds fp8 products in reduced precision; promote each K tile to fp32
        out = tl.dot(a, b, acc, max_num_imprecise_acc=IMPRECISE)
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit(do_not_specialize=["M"])
def _qlinear_kernel(
    x_ptr,  # [M, K]: bf16/fp16 values (ACT 0), int8 codes (1) or fp8 e4m3 codes (2)
    xs_ptr,  # [M] fp32 per-token scales (ACT != 0)
    w_ptr,  # uint8 [N, K/2] int4 codes (W4), else int8 / fp8 [N, K]
    s_ptr,  # [N, G] scales: fp32, or int8 group scales (TWO_LEVEL)
    z_ptr,  # [N, G] uint8 zero points (ASYM)
    cs_ptr,  # [N] fp32 channel scales (TWO_LEVEL)
    b_ptr,  # [N] bias (HAS_BIAS)
    out_ptr,  # [M, N]
    ws_ptr,  # [SPLIT_K, M, N] partial sums (SPLIT_K > 1)
    lock_ptr,  # int32 arrival counter per output tile, zero between launches (SPLIT_K > 1)
    M, N, K, G, K_SPLIT,  # K_SPLIT: the K range of one split, a multiple of BLOCK_K
    stride_xm, stride_wn, stride_om,
    W4: tl.constexpr, ACT: tl.constexpr, GROUP: tl.constexpr, ASYM: tl.constexpr,
    TWO_LEVEL: tl.constexpr, HAS_BIAS: tl.constexpr, FAST_UNPACK: tl.constexpr,
    DOT_F32: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # M tiles vary fastest: the programs that read the same weight tile run together, so
    # only the first reads it from HBM
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm  # [BLOCK_M, 1]
    w_cols = w_ptr + rn.to(tl.int64)[None, :] * stride_wn  # [1, BLOCK_N]: W^T tiles
    # Integer sums stay exact in int32 while the scales are per channel; group scales turn
    # each group's integer sum into fp32.
    if ACT == 1 and GROUP == 0:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # int4 codes enter integer dots as 16 q (see _UNPACK_I8X16), bf16/fp16 dots as q
    W4_ONE: tl.constexpr = 16 if ACT == 1 else 1
    # per-channel zero-point corrections need sum_k x over all of K
    if ACT == 1:
        xsum = tl.zeros((BLOCK_M,), dtype=tl.int32)
    else:
        xsum = tl.zeros((BLOCK_M,), dtype=tl.float32)

    ZERO: tl.constexpr = 0.0 if ACT != 1 else 0  # masked loads: fp8 takes no int constant
    # EVEN_K: every split is whole K tiles, so loads need no K mask (which would stop them
    # from being vectorised); otherwise the last split may run past K and masks its tail.
    k_lo = tl.multiple_of(pid_k * K_SPLIT, BLOCK_K)  # keeps loads vectorised and pipelined
    for kb in range(0, K_SPLIT, BLOCK_K):
        k0 = k_lo + kb
        rk = k0 + tl.arange(0, BLOCK_K)
        x_mask = m_mask[:, None] if EVEN_K else m_mask[:, None] & (rk < K)[None, :]
        x = tl.load(x_rows + rk[None, :], mask=x_mask, other=ZERO)  # [BLOCK_M, BLOCK_K]
        if GROUP == 0:
            part = acc
        elif ACT == 1:
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        else:
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if W4:
            # Even and odd k are two half-depth dots, so the unpacked codes never need to be
            # interleaved: x splits into its even and odd columns instead.
            rkh = tl.multiple_of(k0 // 2, BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
            w_mask = n_mask[None, :] if EVEN_K else n_mask[None, :] & (rkh < K // 2)[:, None]
            packed = tl.load(w_cols + rkh[:, None], mask=w_mask, other=0)  # [BLOCK_K/2, BLOCK_N]
            if ACT == 0:
                lo, hi = _unpack_signed(packed, x_ptr.dtype.element_ty, FAST_UNPACK)
            else:
                lo, hi = _unpack_int8x16(packed, FAST_UNPACK)
            x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_K // 2, 2)))
            part = _dot(x_even, lo, part, ACT, DOT_F32, BLOCK_K // 2)
            part = _dot(x_odd, hi, part, ACT, DOT_F32, BLOCK_K // 2)
        else:
            w_mask = n_mask[None, :] if EVEN_K else n_mask[None, :] & (rk < K)[:, None]
            w = tl.load(w_cols + rk[:, None], mask=w_mask, other=ZERO)  # [BLOCK_K, BLOCK_N]
            part = _dot(x, w, part, ACT, DOT_F32, BLOCK_K)

        if GROUP == 0:
            acc = part
            if W4 and ASYM:
                xsum += tl.sum(x.to(xsum.dtype), axis=1)
        else:
            g = k0 // GROUP
            gs = tl.load(s_ptr + rn * G + g, mask=n_mask, other=0).to(tl.float32)
            if W4 and ASYM:  # the codes entered as u - 8: add back (8 - z) * sum(x)
                zp = tl.load(z_ptr + rn * G + g, mask=n_mask, other=8).to(part.dtype)
                xg = tl.sum(x.to(part.dtype), axis=1)
                part += xg[:, None] * (W4_ONE * (8 - zp))[None, :]
            acc += part.to(tl.float32) * gs[None, :]

    if GROUP == 0 and W4 and ASYM:
        zp = tl.load(z_ptr + rn, mask=n_mask, other=8).to(acc.dtype)
        acc += xsum[:, None] * (W4_ONE * (8 - zp))[None, :]

    if SPLIT_K == 1:
        _epilogue(
            acc, rm, rn, m_mask, n_mask, s_ptr, cs_ptr, xs_ptr, b_ptr, out_ptr, stride_om,
            W4, ACT, GROUP, TWO_LEVEL, HAS_BIAS,
        )  # fmt: skip
    else:
        mn_mask = m_mask[:, None] & n_mask[None, :]
        part_offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
        tl.store(ws_ptr + pid_k * M * N + part_offs, acc, mask=mn_mask)
        # every thread's partial sums are written before the counter is bumped (release)
        tl.debug_barrier()
        tile = pid_n * tl.num_programs(0) + pid_m
        arrived = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:  # last to arrive: add the splits in a fixed order
            tl.debug_barrier()
            total = tl.load(ws_ptr + part_offs, mask=mn_mask, other=0, cache_modifier=".cg")
            if BLOCK_M * BLOCK_N * (SPLIT_K - 1) <= 16384:  # unrolled: all loads in flight
                for s in tl.static_range(1, SPLIT_K):
                    total += _partial(ws_ptr, s * M * N + part_offs, mn_mask)
            else:  # unrolled, ptxas would hold every split's sums at once and spill them
                for s in range(1, SPLIT_K):
                    total += _partial(ws_ptr, s * M * N + part_offs, mn_mask)
            tl.atomic_xchg(lock_ptr + tile, 0)
            _epilogue(
                total, rm, rn, m_mask, n_mask, s_ptr, cs_ptr, xs_ptr, b_ptr, out_ptr,
                stride_om, W4, ACT, GROUP, TWO_LEVEL, HAS_BIAS,
            )  # fmt: skip


# ------------------------------------------------------------------------- configurations
@dataclass(frozen=True)
class TileConfig:
    block_n: int  # weight rows (output features) per program
    block_m: int  # tokens per program
    block_k: int
    num_warps: int
    num_stages: int
    split_waves: int = 1  # split K until the grid has this many programs per SM


ANY = 1 << 62  # a rule for every weight size
# Weight sizes (N * K) the tuner tells apart: small layers (Llama-3-8B qkv/o) are bound by
# launch, pipeline ramp and split-K fix-up and want more, smaller programs than large ones.
SIZE_CLASSES = (32 << 20, 160 << 20, ANY)

# tile_key -> [(largest M, largest N * K, config)], sorted by M bucket and, within a bucket, by
# size (smallest first): the first rule that fits wins; M beyond the
# last bucket uses the last bucket's rules. Picked on an H200 by `bench/kernel_perf.py
# --tune-only` (least total time per M bucket and size class over the Llama-3 8B and 70B
# linears; bench/results/kernel_configs.json, kernel_tune.json). BLOCK_K is capped at the
# group size.
CONFIGS: dict[str, list[tuple[int, int, TileConfig]]] = {
    "w4a16-g": [
        (16, 32 << 20, TileConfig(64, 16, 256, 4, 3, 2)),
        (16, 160 << 20, TileConfig(32, 16, 256, 2, 3, 4)),
        (16, ANY, TileConfig(32, 16, 128, 2, 4, 4)),
        (32, 32 << 20, TileConfig(64, 32, 128, 4, 4)),
        (32, 160 << 20, TileConfig(64, 32, 128, 2, 4, 2)),
        (32, ANY, TileConfig(64, 32, 128, 2, 4, 2)),
        (64, 32 << 20, TileConfig(64, 64, 128, 4, 3)),
        (64, 160 << 20, TileConfig(128, 64, 128, 4, 3)),
        (64, ANY, TileConfig(128, 64, 128, 4, 3)),
        (128, 32 << 20, TileConfig(64, 128, 128, 4, 3)),
        (128, 160 << 20, TileConfig(64, 128, 128, 4, 3)),
        (128, ANY, TileConfig(128, 128, 128, 8, 3)),
    ],
    "w4a16": [
        (16, 32 << 20, TileConfig(32, 16, 128, 2, 4, 4)),
        (16, 160 << 20, TileConfig(32, 16, 128, 2, 4, 4)),
        (16, ANY, TileConfig(64, 16, 256, 4, 3, 2)),
        (32, 32 << 20, TileConfig(64, 32, 128, 4, 4)),
        (32, 160 << 20, TileConfig(64, 32, 128, 2, 4, 2)),
        (32, ANY, TileConfig(64, 32, 128, 2, 4, 2)),
        (64, 32 << 20, TileConfig(64, 64, 128, 4, 3)),
        (64, 160 << 20, TileConfig(128, 64, 128, 4, 3)),
        (64, ANY, TileConfig(128, 64, 128, 4, 3)),
        (128, 32 << 20, TileConfig(64, 128, 128, 4, 3)),
        (128, 160 << 20, TileConfig(64, 128, 128, 4, 3)),
        (128, ANY, TileConfig(128, 128, 64, 4, 3)),
    ],
    "w4a16-asym": [
        (16, 32 << 20, TileConfig(128, 16, 128, 4, 4, 2)),
        (16, 160 << 20, TileConfig(128, 16, 256, 4, 3)),
        (16, ANY, TileConfig(128, 16, 128, 4, 4, 4)),
        (32, 32 << 20, TileConfig(128, 32, 128, 4, 4)),
        (32, 160 << 20, TileConfig(128, 32, 128, 4, 4)),
        (32, ANY, TileConfig(128, 32, 128, 4, 4)),
        (64, 32 << 20, TileConfig(128, 64, 128, 4, 3)),
        (64, 160 << 20, TileConfig(128, 64, 128, 4, 3)),
        (64, ANY, TileConfig(128, 64, 128, 4, 3)),
        (128, 32 << 20, TileConfig(64, 128, 128, 4, 3)),
        (128, 160 << 20, TileConfig(256, 128, 64, 8, 3)),
        (128, ANY, TileConfig(256, 128, 64, 8, 3)),
    ],
    "w8a8": [
        (16, 32 << 20, TileConfig(32, 16, 128, 2, 4, 2)),
        (16, 160 << 20, TileConfig(32, 16, 256, 2, 3, 4)),
        (16, ANY, TileConfig(32, 16, 256, 2, 3, 4)),
        (32, 32 << 20, TileConfig(32, 32, 128, 2, 4, 2)),
        (32, 160 << 20, TileConfig(32, 32, 128, 2, 4, 2)),
        (32, ANY, TileConfig(32, 32, 128, 2, 4, 2)),
        (64, 32 << 20, TileConfig(32, 64, 128, 2, 4)),
        (64, 160 << 20, TileConfig(64, 64, 128, 2, 4)),
        (64, ANY, TileConfig(64, 64, 128, 4, 3)),
        (128, 32 << 20, TileConfig(64, 128, 128, 4, 3)),
        (128, 160 << 20, TileConfig(64, 128, 128, 4, 3)),
        (128, ANY, TileConfig(128, 128, 128, 8, 3)),
    ],
    "w4a8": [
        (16, 32 << 20, TileConfig(32, 16, 256, 2, 3, 4)),
        (16, 160 << 20, TileConfig(32, 16, 256, 2, 3, 4)),
        (16, ANY, TileConfig(64, 16, 256, 4, 3, 2)),
        (32, 32 << 20, TileConfig(64, 32, 128, 4, 4)),
        (32, 160 << 20, TileConfig(64, 32, 128, 4, 4, 2)),
        (32, ANY, TileConfig(128, 32, 128, 8, 4)),
        (64, 32 << 20, TileConfig(64, 64, 128, 4, 3)),
        (64, 160 << 20, TileConfig(64, 64, 128, 4, 4, 2)),
        (64, ANY, TileConfig(64, 64, 128, 4, 4, 2)),
        (128, 32 << 20, TileConfig(64, 128, 128, 4, 3)),
        (128, 160 << 20, TileConfig(64, 128, 128, 4, 3)),
        (128, ANY, TileConfig(128, 128, 128, 8, 3)),
    ],
    "w4a8-g": [
        (16, 32 << 20, TileConfig(32, 16, 256, 2, 3, 4)),
        (16, 160 << 20, TileConfig(32, 16, 128, 2, 4, 4)),
        (16, ANY, TileConfig(64, 16, 128, 4, 4, 2)),
        (32, 32 << 20, TileConfig(64, 32, 128, 4, 4)),
        (32, 160 << 20, TileConfig(64, 32, 128, 2, 4, 2)),
        (32, ANY, TileConfig(64, 32, 128, 2, 4, 2)),
        (64, 32 << 20, TileConfig(64, 64, 128, 4, 3)),
        (64, 160 << 20, TileConfig(64, 64, 128, 2, 3, 2)),
        (64, ANY, TileConfig(64, 64, 128, 2, 3, 2)),
        (128, 32 << 20, TileConfig(64, 128, 128, 4, 3)),
        (128, 160 << 20, TileConfig(64, 128, 128, 4, 3)),
        (128, ANY, TileConfig(64, 128, 128, 4, 3)),
    ],
    "fp8": [  # wgmma only (BLOCK_M >= 64, 4+ warps): Hopper's mma.sync has no e4m3
        (16, 32 << 20, TileConfig(64, 64, 128, 4, 3)),
        (16, 160 << 20, TileConfig(64, 64, 128, 4, 3)),
        (16, ANY, TileConfig(128, 64, 128, 4, 3)),
        (32, 32 << 20, TileConfig(64, 64, 128, 4, 3)),
        (32, 160 << 20, TileConfig(64, 64, 128, 4, 3)),
        (32, ANY, TileConfig(64, 64, 128, 4, 3)),
        # 64 and 128 retuned with e4m3 K tiles of 256 among the candidates, and at 128 tokens
        # BLOCK_M = 64 ones (two rows of programs fill more SMs on the smaller layers;
        # bench/results/fp8_tune_c9bdb4e.md); counts past 128 take these rules too, timed
        # faster than the old ones at 256 and 1024 tokens (prefill_1024_bc7b3a6.md)
        (64, 32 << 20, TileConfig(64, 64, 256, 4, 3)),
        (64, 160 << 20, TileConfig(64, 64, 256, 4, 3)),
        (64, ANY, TileConfig(64, 64, 256, 4, 3)),
        (128, 32 << 20, TileConfig(64, 64, 256, 4, 3)),
        (128, 160 << 20, TileConfig(64, 64, 128, 4, 3)),
        (128, ANY, TileConfig(128, 128, 256, 8, 3)),
    ],
}
MAX_SPLIT_K = 16
MIN_BLOCKS_PER_SPLIT = 4  # K tiles per split: below this the fix-up costs more than it saves


def tile_key(spec: Any) -> str:
    """The tile table a format uses: its kernel family, plus "-g" for group scales and
    "-asym" for zero points (their extra per-group work favours other tiles)."""
    key = str(family_of(spec))
    if not spec.symmetric:
        return key + "-asym"
    return key + "-g" if spec.group_size != -1 else key


def config_for(key: str, m: int, weights: int = ANY) -> TileConfig:
    """The tile config for M tokens against a weight of `weights` = N * K elements, from
    the table `key` (tile_key), or its family's table when the format has none of its own."""
    rules = CONFIGS.get(key) or CONFIGS[key.split("-")[0]]
    bucket = min((max_m for max_m, _, _ in rules if m <= max_m), default=None)
    if bucket is None:  # beyond the last bucket: its rules
        bucket = max(max_m for max_m, _, _ in rules)
    in_bucket = [(max_w, cfg) for max_m, max_w, cfg in rules if max_m == bucket]
    for max_w, cfg in in_bucket:
        if weights <= max_w:
            return cfg
    return in_bucket[-1][1]  # larger than the bucket's rules cover: its largest size's


def block_k_for(cfg: TileConfig, group: int) -> int:
    """The K tile: the config's, capped at the largest power of two dividing the group size
    (each K tile lies in one group, so group scales apply per tile)."""
    return cfg.block_k if group == 0 else min(cfg.block_k, group & -group)


def ring_bytes(cfg: TileConfig, w_bytes: float, x_bytes: int) -> int:
    """Shared memory the K loop's pipeline takes, at most: `stages` tiles of weights (as
    the dot reads them: w_bytes per element after unpacking) and of x."""
    return int(cfg.num_stages * cfg.block_k * (cfg.block_n * w_bytes + cfg.block_m * x_bytes))


def fit_shared(cfg: TileConfig, w_bytes: float, x_bytes: int, limit: int) -> TileConfig:
    """The config, shrunk until its ring fits `limit` bytes: two stages first, then halved
    K tiles, then halved N tiles. The tables were tuned on Hopper (227 KB per block); Ada
    (FP8 too) allows 99 KB and Ampere 163 KB, where a table tile could otherwise not launch."""
    while ring_bytes(cfg, w_bytes, x_bytes) > limit:
        if cfg.num_stages > 2:
            cfg = replace(cfg, num_stages=2)
        elif cfg.block_k > 32:
            cfg = replace(cfg, block_k=cfg.block_k // 2)
        elif cfg.block_n > 32:
            cfg = replace(cfg, block_n=cfg.block_n // 2)
        else:
            break  # the smallest tile: let the compiler say what is missing
    return cfg


def dot_bytes(spec: Any, x_bytes: int) -> int:
    """Bytes per weight element as the dot reads it: 8-bit codes as stored, 4-bit codes
    unpacked to x's width (int8 with A8)."""
    return 1 if spec.weight_bits == 8 else x_bytes


def _shared_limit(device: torch.device) -> int:
    """Shared memory one program may take on `device` (opt-in maximum)."""
    if INTERPRET or device.type != "cuda":
        return 1 << 30
    return int(getattr(_props(device), "shared_memory_per_block_optin", 1 << 30))


def _num_sms(device: torch.device) -> int:
    if INTERPRET or device.type != "cuda":
        return 4  # small, so that the interpreter tests exercise split-K
    return _props(device).multi_processor_count


def _props(device: torch.device) -> Any:
    """The CUDA device's properties, read once per device (launches ask on every call)."""
    return _props_of(device.index if device.index is not None else torch.cuda.current_device())


@cache
def _props_of(index: int) -> Any:
    return torch.cuda.get_device_properties(index)


def choose_split_k(tiles: int, k_blocks: int, sms: int, waves: int = 1) -> int:
    """Split K until the grid covers every SM `waves` times, keeping at least
    MIN_BLOCKS_PER_SPLIT K tiles per split."""
    split = 1
    while (
        tiles * split < sms * waves
        and k_blocks // (split * 2) >= MIN_BLOCKS_PER_SPLIT
        and split * 2 <= MAX_SPLIT_K
    ):
        split *= 2
    return split


_LOCKS: dict[torch.device, torch.Tensor] = {}


def _locks(device: torch.device, n: int) -> torch.Tensor:
    buf = _LOCKS.get(device)
    if buf is None or buf.numel() < n:
        buf = _LOCKS[device] = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return buf


# -------------------------------------------------------------------------------- launcher
def qlinear(
    x: torch.Tensor | QuantizedActivations,  # [..., K]
    t: dict[str, torch.Tensor],  # canonical tensors (quant/pack.py)
    bias: torch.Tensor | None,
    spec: Any,  # QuantSpec
    config: TileConfig | None = None,  # default: CONFIGS by M
    split_k: int | None = None,  # default: choose_split_k
) -> torch.Tensor:  # [..., N] in the activation dtype
    family = family_of(spec)
    if family is None:
        raise ValueError(f"no Triton kernel computes format {spec.name}")
    w = t["qweight"]
    w4 = spec.weight_bits == 4 and spec.weight_type == "int"
    n, k = w.shape[0], w.shape[1] * (2 if w4 else 1)
    act = {"none": 0, "int8": 1, "fp8": 2}[spec.activations]
    if isinstance(x, QuantizedActivations):
        x.check_for(spec)  # also refuses quantized inputs to weight-only formats
        qa = x
    elif act:
        qa = quantize_per_token(x, spec.activations)
    else:
        qa = None
    lead = (qa.codes if qa is not None else x).shape[:-1]
    a = (qa.codes if qa is not None else x).reshape(-1, k)
    if a.stride(-1) != 1:
        a = a.contiguous()
    xs = qa.scales.reshape(-1) if qa is not None else a
    out_dtype = qa.dtype if qa is not None else a.dtype
    m = a.shape[0]
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0:
        return out.view(*lead, n)

    cfg = config or config_for(tile_key(spec), m, n * k)
    x_bytes = a.element_size()
    cfg = fit_shared(cfg, dot_bytes(spec, x_bytes), x_bytes, _shared_limit(a.device))
    group = 0 if spec.group_size == -1 else spec.group_size
    block_k = block_k_for(cfg, group)
    k_blocks = triton.cdiv(k, block_k)
    n_tiles, m_tiles = triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m)
    if split_k is None:
        split_k = choose_split_k(n_tiles * m_tiles, k_blocks, _num_sms(a.device), cfg.split_waves)
        if k % block_k == 0:
            while k_blocks % split_k:  # whole K tiles per split: no K masks (EVEN_K)
                split_k //= 2
    k_split = triton.cdiv(k_blocks, split_k) * block_k
    split_k = triton.cdiv(k, k_split)  # no empty splits
    even_k = k % block_k == 0 and (k_split // block_k) * split_k == k_blocks
    acc_dtype = torch.int32 if act == 1 and group == 0 else torch.float32
    if split_k > 1:
        ws = torch.empty(split_k, m, n, dtype=acc_dtype, device=a.device)
        locks = _locks(a.device, n_tiles * m_tiles)
    else:
        ws = locks = out
    scales = t["scales"]
    _qlinear_kernel[(m_tiles, n_tiles, split_k)](
        a,
        xs,
        w,
        scales,
        t.get("zeros", scales),
        t.get("channel_scales", scales),
        bias if bias is not None else scales,
        out,
        ws,
        locks,
        m,
        n,
        k,
        scales.shape[1],
        k_split,
        a.stride(0),
        w.stride(0),
        out.stride(0),
        W4=w4,
        ACT=act,
        GROUP=group,
        ASYM=not spec.symmetric,
        TWO_LEVEL=spec.two_level,
        HAS_BIAS=bias is not None,
        FAST_UNPACK=not INTERPRET,
        DOT_F32=INTERPRET and act == 0,
        SPLIT_K=split_k,
        EVEN_K=even_k,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=block_k,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out.view(*lead, n)
