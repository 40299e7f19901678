"""Round-to-nearest quantization of a weight matrix into a `QuantSpec`'s tensors."""

from __future__ import annotations

import torch

from specquant.quant.pack import QTensors, dequantize, pack_int4
from specquant.quant.spec import QuantSpec

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def quantize_rtn(w: torch.Tensor, spec: QuantSpec) -> QTensors:
    """w [N, K] -> the format's tensors (see quant/pack.py for layouts)."""
    w = w.detach().float()
    n, k = w.shape
    if spec.weight_type == "fp8":
        s = (w.abs().amax(1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
        return {"qweight": (w / s).to(torch.float8_e4m3fn), "scales": s}
    groups = spec.groups(k)
    wg = w.view(n, groups, k // groups)
    if not spec.symmetric:
        lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
        levels = 2**spec.weight_bits - 1
        s = ((hi - lo) / levels).clamp(min=1e-12)
        z = (-lo / s).round().clamp(0, levels)
        codes = ((wg / s[..., None]).round() + z[..., None]).clamp(0, levels).view(n, k)
        return {"qweight": pack_int4(codes), "scales": s, "zeros": z.to(torch.uint8)}
    qmax = spec.qmax
    absmax = wg.abs().amax(-1).clamp(min=1e-12)  # [N, G]
    out: QTensors = {}
    if spec.two_level:
        # s1: per channel, so that the largest group scale is exactly 127 (int8)
        s1 = absmax.amax(1) / (qmax * 127)
        s2 = (absmax / (qmax * s1[:, None])).round().clamp(1, 127)
        s = s2 * s1[:, None]
        out["scales"], out["channel_scales"] = s2.to(torch.int8), s1
    else:
        s = absmax / qmax
        out["scales"] = s
    q = (wg / s[..., None]).round().clamp(-qmax - 1, qmax).view(n, k)
    out["qweight"] = q.to(torch.int8) if spec.weight_bits == 8 else pack_int4(q + 8)
    return out


def roundtrip_error(w: torch.Tensor, t: QTensors, spec: QuantSpec) -> float:
    """Relative Frobenius error ||W - deq(Q(W))|| / ||W||."""
    w = w.detach().float()
    return float((dequantize(t, spec) - w).norm() / w.norm().clamp(min=1e-12))
