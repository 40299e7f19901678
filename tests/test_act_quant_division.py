"""act_quant's division by the per-row scale: y * (1 / s) corrected with two fused
multiply-adds (`_div_by_scale`) must round as IEEE division does, since the codes must be
the reference's (torch's `x / scale`). 16-bit activations only: that is where the kernel
uses it.

Below TINY the correction can miss by a step (its residual falls among float32's subnormal
numbers: bf16 values under 1e-30 or so); such quotients give code 0 either way, which is
all that is asserted there. On the CPU the two fmas are emulated exactly over every
positive bf16 (or fp16) value against the scales of every absmax mantissa at a few
exponents; on a GPU the kernel helper itself runs over every pair of 16-bit values.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

F32, F64 = np.float32, np.float64
TINY = 2.0**-60  # far below a quotient with a nonzero int8 (0.5) or fp8 (2^-10) code


def _positives(dtype: torch.dtype) -> np.ndarray:
    """Every positive finite value of a 16-bit float type, as float32."""
    bits = torch.arange(1, 0x7C00 if dtype == torch.float16 else 0x7F80, dtype=torch.int32)
    return bits.to(torch.int16).view(dtype).float().numpy()


def _round_f32(v: Fraction) -> np.float32:
    """v rounded to the nearest float32, ties to even (exact: no double rounding)."""
    c = F32(float(v))
    best = min((c, np.nextafter(c, F32(np.inf)), np.nextafter(c, F32(-np.inf))),
               key=lambda u: (abs(Fraction(float(u)) - v), int(u.view(np.int32)) & 1))  # fmt: skip
    return best


def _fma_path(y: np.ndarray, s: np.float32, r: np.float32) -> np.ndarray:
    """q = RN(y * r); e = fma(-q, s, y); RN(e * r + q), with each fma rounded once. q * s and
    e * r are exact in float64 (24-bit factors) and so is y - q * s (it cancels); only the
    last sum can round twice, which the exact recheck of any disagreement settles."""
    q = y * r
    e = (y.astype(F64) - q.astype(F64) * F64(s)).astype(F32)
    return (e.astype(F64) * F64(r) + q.astype(F64)).astype(F32), q, e


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("qmax", [127.0, 448.0])
def test_the_corrected_product_rounds_as_division_on_the_cpu(dtype, qmax) -> None:
    values = _positives(dtype)
    mantissas = 128 if dtype == torch.bfloat16 else 1024
    one = int(torch.tensor(1.0, dtype=dtype).view(torch.int16))
    # every mantissa of absmax at 1, 2^-14 and 2^10, and the extremes (the 1e-12 floor)
    lows = [one + i for i in range(mantissas)]
    span = 14 * mantissas
    bits = lows + [b - span for b in lows] + [b + (10 * mantissas) for b in lows] + [1, 0x7BFF]
    absmaxes = torch.tensor(bits, dtype=torch.int32).to(torch.int16).view(dtype).float()
    checked = 0
    for a in absmaxes.tolist():
        s = F32(F32(max(a, 1e-12)) / F32(qmax))
        r = F32(1.0) / s
        y = values[values <= a]
        got, q, e = _fma_path(y, s, r)
        want = y / s  # IEEE division, as torch's on the CPU
        for i in np.flatnonzero(got != want):  # emulation's double rounding, or a real miss
            if want[i] < TINY:
                assert got[i] < 2 * TINY, (a, float(y[i]), float(got[i]))  # code 0 as well
                continue
            exact = _round_f32(Fraction(float(e[i])) * Fraction(float(r)) + Fraction(float(q[i])))
            assert exact == want[i], (a, float(y[i]), float(exact), float(want[i]))
        checked += y.size
    assert checked > 10**6


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_kernel_helper_rounds_as_division_for_every_16_bit_pair(dtype) -> None:
    """Every 16-bit absmax (its scale for int8 and for fp8) against every 16-bit |y| at or
    below it, both signs: about 10^9 pairs a type, compared with div.rn on the GPU (and
    compiled as the row kernel is, so with its denormal handling)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import triton
    import triton.language as tl

    from specquant.kernels.triton_ops.act_quant import _div_by_scale

    @triton.jit
    def mismatches(vals, n, out, QMAX: tl.constexpr, TINY_: tl.constexpr, BLOCK: tl.constexpr):
        a = tl.load(vals + tl.program_id(0))
        s = tl.math.div_rn(tl.maximum(a, 1e-12), QMAX)
        r = tl.math.div_rn(1.0, s)
        bad = tl.zeros([BLOCK], dtype=tl.int32)
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            y = tl.load(vals + offs, mask=offs < n, other=0.0)
            live = (offs < n) & (y <= a)
            for sign in tl.static_range(2):
                v = -y if sign else y
                fast, want = _div_by_scale(v, s, r), tl.math.div_rn(v, s)
                tiny = (tl.abs(want) < TINY_) & (tl.abs(fast) < 2 * TINY_)  # code 0 both
                bad += (live & (fast != want) & ~tiny).to(tl.int32)
        tl.store(out + tl.program_id(0), tl.sum(bad, axis=0))

    vals = torch.from_numpy(_positives(dtype)).cuda()
    for qmax in (127.0, 448.0):
        out = torch.empty(vals.numel(), dtype=torch.int32, device="cuda")
        mismatches[(vals.numel(),)](vals, vals.numel(), out, QMAX=qmax, TINY_=TINY, BLOCK=1024)
        assert int(out.sum()) == 0, (dtype, qmax, int(out.sum()), out.nonzero()[:4].tolist())
