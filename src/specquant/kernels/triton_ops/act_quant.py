"""Per-token activation quantization on the GPU, alone or fused with the op before it: the
RMSNorm before qkv/gate_up, or the MLP's silu(gate) * up before down_proj (both also run
unquantized, for weight-only and dense models).

One program per token row holds the whole row in registers: the pre-op (optional), absmax,
scale = absmax / 127 (int8) or / 448 (fp8 e4m3), codes = round-to-nearest-even(x / scale).
The arithmetic follows kernels/reference.py step by step (IEEE division, the norm's fp32
statistics, each eager op rounded to the activation dtype) so that the codes match the
reference's.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.language.extra.cuda import gdc_launch_dependents

from specquant.kernels.reference import ACTIVATION_KINDS, MMA_BLOCK, QuantizedActivations

# The interpreter (TRITON_INTERPRET=1, CPU tests) has no inline PTX or libdevice, and its
# numpy dot cannot multiply bf16 (stored as uint16): kernels take plain-op paths under it.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

MAX_ROW = 65536  # one row of K values lives in registers


@triton.jit
def _round_half_even(v, RINT: tl.constexpr):
    """torch.round's semantics: one instruction (rint) on the GPU. The interpreter lacks
    libdevice, so there it is built from floor (v - floor(v) is exact in fp32)."""
    if RINT:
        return libdevice.rint(v)
    f = tl.floor(v)
    d = v - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return f + tl.where(up, 1.0, 0.0)


@triton.jit
def _div_by_scale(y, s, r):
    """y / s rounded as IEEE division rounds it (torch's `x / scale`), given r = 1 / s so
    rounded: y * r, corrected once with fused multiply-adds (Markstein). Three instructions
    a value where a division takes about twenty with its slow-path check; r is divided once
    per row. For 16-bit activations it is exact wherever the quotient could have a nonzero
    code; below 2^-60 (its residual among float32's subnormals) it may miss by a step and
    the code is 0 either way (tests/test_act_quant_division.py: every bf16 and fp16 pair on
    the GPU)."""
    q = y * r
    return tl.fma(tl.fma(-q, s, y), r, q)


NONE, NORM, SILU_MUL = 0, 1, 2  # the op before the quantization (PRE)


# K is specialized (Triton notes K % 16 == 0) so that the masked row loads and stores
# vectorize: scalar 2-byte loads made the one-program row of a 14336-wide down_proj input
# instruction-bound (bench/kernel_sass.py --act-quant)
@triton.jit
def _row_kernel(
    x_ptr,  # [M, K] bf16/fp16; [M, 2K] = [gate; up] for SILU_MUL
    w_ptr,  # [K] norm weight (NORM)
    codes_ptr,  # [M, K] int8 or fp8 e4m3 codes (QUANT), else bf16/fp16 values
    scales_ptr,  # [M] fp32 (QUANT)
    K,
    stride_xm,
    stride_cm,
    eps,
    PRE: tl.constexpr,
    QUANT: tl.constexpr,
    FP8: tl.constexpr,
    MMA_ORDER: tl.constexpr,
    BLOCK: tl.constexpr,
    RINT: tl.constexpr,
    FAST_DIV: tl.constexpr,
    LAUNCH_DEPENDENTS: tl.constexpr,
):
    if LAUNCH_DEPENDENTS:
        # The kernel after this one, if launched with programmatic dependent launch (the
        # W4A16 fragment kernel with FragConfig.pdl), may start now: it copies its first
        # weight tiles while this row runs, and waits for our output before it reads x.
        gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    rk = tl.arange(0, BLOCK)
    mask = rk < K
    x = tl.load(x_ptr + row * stride_xm + rk, mask=mask, other=0.0)
    y = x.to(tl.float32)
    if PRE == 2:  # silu(gate) * up, each rounded to the activation dtype as torch's ops are
        up = tl.load(x_ptr + row * stride_xm + K + rk, mask=mask, other=0.0).to(tl.float32)
        silu = tl.math.div_rn(y, 1.0 + tl.exp(-y)).to(x.dtype).to(tl.float32)
        y = (silu * up).to(x.dtype).to(tl.float32)
    if PRE == 1:
        # tl.cast: K == 1 arrives as a constant (Triton specializes it), not a tensor
        mean_sq = tl.math.div_rn(tl.sum(y * y, axis=0), tl.cast(K, tl.float32))
        rstd = tl.math.div_rn(1.0, tl.sqrt_rn(mean_sq + eps))
        normed = (y * rstd).to(x.dtype).to(tl.float32)
        w = tl.load(w_ptr + rk, mask=mask, other=0.0).to(tl.float32)
        # weight * normed in the activation dtype, as the reference's bf16/fp16 product
        y = (w * normed).to(x.dtype).to(tl.float32)
    if QUANT:
        absmax = tl.maximum(tl.max(tl.abs(y), axis=0), 1e-12)
        s = tl.math.div_rn(absmax, 448.0 if FP8 else 127.0)
        # fp32 activations keep the division: the exhaustive check covers 16-bit ones
        quotient = _div_by_scale(y, s, tl.math.div_rn(1.0, s)) if FAST_DIV else tl.math.div_rn(y, s)
        if FP8:
            codes = quotient.to(tl.float8e4nv)
        else:
            q = _round_half_even(quotient, RINT)
            codes = tl.minimum(tl.maximum(q, -127.0), 127.0).to(tl.int8)
        tl.store(codes_ptr + row * stride_cm + rk, codes, mask=mask)
        tl.store(scales_ptr + row, s)
    elif MMA_ORDER:  # column c goes to the position of the W4A16 mma K order that reads it
        pos = (rk & ~127) | (rk & 1) | (((rk >> 1) & 15) << 3) | (((rk >> 5) & 3) << 1)
        tl.store(codes_ptr + row * stride_cm + pos, y.to(x.dtype), mask=mask)
    else:
        tl.store(codes_ptr + row * stride_cm + rk, y.to(x.dtype), mask=mask)


def row_config(k: int) -> tuple[int, int]:
    """(BLOCK, warps) of the one program per row of k values. At M = 1 one program does all
    the work: more warps shorten its chain."""
    block = triton.next_power_of_2(k)
    return block, 16 if block >= 2048 else 4


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    kind: str | None,
    pre: int,
    mma_order: bool = False,
    launch_dependents: bool = False,
) -> QuantizedActivations | torch.Tensor:
    if kind is not None and kind not in ACTIVATION_KINDS:
        raise ValueError(f"unknown activation quantization {kind!r}; supported: int8, fp8")
    width = x.shape[-1]
    if pre == SILU_MUL and width % 2:
        raise ValueError(f"silu_mul needs [gate; up] of even width, got {width}")
    k = width // 2 if pre == SILU_MUL else width
    if k > MAX_ROW:
        raise ValueError(f"rows of K={k} values exceed the kernel's limit of {MAX_ROW}")
    if weight is not None and weight.dtype != x.dtype:
        raise ValueError(f"norm weight is {weight.dtype} but activations are {x.dtype}")
    if mma_order and (kind is not None or k % MMA_BLOCK):
        raise ValueError(f"mma K order is for unquantized rows of a multiple of {MMA_BLOCK} "
                         f"values, not {kind or 'plain'} rows of {k}")  # fmt: skip
    if launch_dependents:
        from specquant.kernels.triton_ops.w4_fragment import PDL_NEEDS, pdl_missing

        if missing := "the Triton interpreter" if INTERPRET else pdl_missing(x.device):
            raise ValueError(f"launch_dependents needs {PDL_NEEDS}, not {missing}")
    x2 = x.reshape(-1, width)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    code_dtype = {None: x.dtype, "int8": torch.int8, "fp8": torch.float8_e4m3fn}[kind]
    codes = torch.empty(m, k, dtype=code_dtype, device=x.device)
    scales = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m:
        block, warps = row_config(k)
        _row_kernel[(m,)](
            x2,
            weight if weight is not None else x2,
            codes,
            scales,
            k,
            x2.stride(0),
            codes.stride(0),
            eps,
            PRE=pre,
            QUANT=kind is not None,
            FP8=kind == "fp8",
            MMA_ORDER=mma_order,
            BLOCK=block,
            RINT=not INTERPRET,
            FAST_DIV=x.element_size() == 2,
            LAUNCH_DEPENDENTS=launch_dependents,
            num_warps=warps,
        )
    lead = x.shape[:-1]
    if kind is None:
        return codes.view(*lead, k)
    return QuantizedActivations(codes.view(*lead, k), scales.view(*lead, 1), x.dtype)


def quantize_per_token(x: torch.Tensor, kind: str) -> QuantizedActivations:
    """x [..., K] -> per-token int8/fp8 codes and scales (kernels/reference.py semantics)."""
    out = _launch(x, None, 0.0, kind, NONE)
    assert isinstance(out, QuantizedActivations)
    return out


def rmsnorm_quant(
    x: torch.Tensor, weight: torch.Tensor, eps: float, kind: str
) -> QuantizedActivations:
    """quantize_per_token(rmsnorm(x) * weight) in one pass over x."""
    out = _launch(x, weight, eps, kind, NORM)
    assert isinstance(out, QuantizedActivations)
    return out


def rmsnorm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    mma_order: bool = False,
    launch_dependents: bool = False,
) -> torch.Tensor:
    """rmsnorm(x) * weight in one pass, for the layers that take plain activations: one
    launch instead of torch's cast, norm, cast and product. It rounds where the reference
    does, but sums in another order and takes a correctly rounded 1 / sqrt where torch uses
    rsqrt, so an output can differ from the reference's by one step of the activation dtype.
    `mma_order`: written in reference.to_mma_order's order (for a W4A16 wgmma layer).
    `launch_dependents` (Hopper): let a kernel launched after it with programmatic dependent
    launch start at once (an experiment: bench/kernel_perf.py's `:pdl` chains)."""
    out = _launch(x, weight, eps, None, NORM, mma_order, launch_dependents)
    assert isinstance(out, torch.Tensor)
    return out


def silu_mul(
    h: torch.Tensor, mma_order: bool = False, launch_dependents: bool = False
) -> torch.Tensor:
    """[..., 2I] = [gate; up] -> silu(gate) * up [..., I] in one pass (`mma_order` and
    `launch_dependents`: as `rmsnorm`'s)."""
    out = _launch(h, None, 0.0, None, SILU_MUL, mma_order, launch_dependents)
    assert isinstance(out, torch.Tensor)
    return out


def silu_mul_quant(h: torch.Tensor, kind: str) -> QuantizedActivations:
    """quantize_per_token(silu(gate) * up) in one pass over h = [gate; up]."""
    out = _launch(h, None, 0.0, kind, SILU_MUL)
    assert isinstance(out, QuantizedActivations)
    return out
