"""Packing and the reference dequantization (pure torch; the spec for every kernel).

Canonical layouts (all row-major, N = out_features, K = in_features, G = K / group):

    int8 weights  qweight int8  [N, K]
    int4 weights  qweight uint8 [N, K/2]; byte j holds k = 2j (low nibble) and 2j+1 (high),
                  each stored as an unsigned code: q + 8 when symmetric, q itself (0..15)
                  with `zeros` [N, G] when asymmetric
    fp8 weights   qweight float8_e4m3fn [N, K]
    scales        float32 [N, G]  (w = s * q, or s * (q - z) when asymmetric)
    two-level     scales int8 [N, G] and channel_scales float32 [N]: w = s1[n] * s2[n, g] * q
"""

from __future__ import annotations

import torch

from specquant.quant.spec import QuantSpec

QTensors = dict[str, torch.Tensor]


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K] in 0..15 (any int dtype) -> uint8 [N, K/2]."""
    if codes.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even K, got {codes.shape[-1]}")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> codes uint8 [N, K] in 0..15."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).flatten(-2)


def codes_of(t: QTensors, spec: QuantSpec) -> torch.Tensor:
    """Integer weight codes as float32 [N, K] (signed when symmetric)."""
    if spec.weight_bits == 8:
        return t["qweight"].float()
    codes = unpack_int4(t["qweight"]).float()
    return codes - 8 if spec.symmetric else codes


def group_scales(t: QTensors, spec: QuantSpec) -> torch.Tensor:
    """Effective per-group scales float32 [N, G]."""
    if spec.two_level:
        return t["scales"].float() * t["channel_scales"].float()[:, None]
    return t["scales"].float()


def dequantize(t: QTensors, spec: QuantSpec) -> torch.Tensor:
    """Reference dequantization -> float32 [N, K]."""
    if spec.weight_type == "fp8":
        return t["qweight"].float() * t["scales"].float()
    q = codes_of(t, spec)
    n, k = q.shape
    groups = group_scales(t, spec).shape[1]
    q = q.view(n, groups, k // groups)
    if not spec.symmetric:
        q = q - t["zeros"].float()[:, :, None]
    return (q * group_scales(t, spec)[:, :, None]).view(n, k)
