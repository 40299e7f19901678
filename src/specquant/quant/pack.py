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


def centered_codes(t: QTensors, spec: QuantSpec) -> torch.Tensor:
    """Integer codes minus their zero points, float32 [N, K] (exact): the weight is this times
    its group scale."""
    q = codes_of(t, spec)
    if spec.symmetric:
        return q
    n, k = q.shape
    groups = t["zeros"].shape[1]
    return (q.view(n, groups, k // groups) - t["zeros"].float()[:, :, None]).view(n, k)


def dequantize(t: QTensors, spec: QuantSpec) -> torch.Tensor:
    """Reference dequantization -> float32 [N, K]."""
    if spec.weight_type == "fp8":
        return t["qweight"].float() * t["scales"].float()
    q = centered_codes(t, spec)
    n, k = q.shape
    scales = group_scales(t, spec)  # [N, G]
    return (q.view(n, scales.shape[1], -1) * scales[:, :, None]).view(n, k)


def expected_shapes(
    spec: QuantSpec, n: int, k: int
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The canonical tensors of `spec` for an [N, K] weight: name -> (shape, dtype)."""
    if spec.weight_type == "fp8":
        return {"qweight": ((n, k), torch.float8_e4m3fn), "scales": ((n, 1), torch.float32)}
    g = spec.groups(k)
    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    if spec.weight_bits == 8:
        out["qweight"] = ((n, k), torch.int8)
    else:
        if k % 2:
            raise ValueError(f"{spec.name}: int4 weights need an even K, got K={k}")
        out["qweight"] = ((n, k // 2), torch.uint8)
    if spec.two_level:
        out["scales"] = ((n, g), torch.int8)
        out["channel_scales"] = ((n,), torch.float32)
    else:
        out["scales"] = ((n, g), torch.float32)
    if not spec.symmetric:
        out["zeros"] = ((n, g), torch.uint8)
    return out


def validate_qtensors(t: QTensors, spec: QuantSpec, n: int, k: int) -> None:
    """Raise a clear error when `t` does not hold exactly `spec`'s tensors for [N, K]."""
    want = expected_shapes(spec, n, k)
    extra = sorted(set(t) - set(want) - {"perm"})
    missing = sorted(set(want) - set(t))
    if missing or extra:
        raise ValueError(
            f"{spec.name} [N={n}, K={k}] needs tensors {sorted(want)} (+ optional perm); "
            f"missing {missing}, unexpected {extra}"
        )
    for name, (shape, dtype) in want.items():
        if tuple(t[name].shape) != shape or t[name].dtype != dtype:
            raise ValueError(
                f"{spec.name} [N={n}, K={k}]: tensor {name!r} is {t[name].dtype} "
                f"{tuple(t[name].shape)}, the format needs {dtype} {shape}"
            )
    if "perm" in t:
        perm = t["perm"]
        if perm.dtype != torch.int64 or tuple(perm.shape) != (k,):
            raise ValueError(f"perm must be int64 [{k}], got {perm.dtype} {tuple(perm.shape)}")
        if not torch.equal(perm.sort().values, torch.arange(k, device=perm.device)):
            raise ValueError("perm is not a permutation of 0..K-1")
