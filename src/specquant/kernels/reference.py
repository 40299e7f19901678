"""Pure-PyTorch reference implementations of every op: the specification and the CPU path.

Faster backends (SDPA, the Triton kernels in kernels/triton_ops/) are tested against these
functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # annotations only: the functions import quant/ where they use it
    from specquant.quant.spec import QuantSpec


def attention_reference(
    q: torch.Tensor,  # [B, Hq, T, D]
    k: torch.Tensor,  # [B, Hkv, S, D]   S = committed prefix + T new keys
    v: torch.Tensor,  # [B, Hkv, S, D]
    # [T, S] or [B, 1, T, S]: bool, True = may attend, or additive float (0 / -inf); None = all
    mask: torch.Tensor | None,
) -> torch.Tensor:  # [B, Hq, T, D]
    """Softmax attention with grouped KV heads, computed in fp32."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1).float()
    v = v.repeat_interleave(groups, dim=1).float()
    scores = q.float() @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5)  # [B, Hq, T, S]
    scores = masked_scores(scores, mask)
    return (scores.softmax(-1) @ v).to(q.dtype)


def masked_scores(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention scores with `mask` applied: a bool mask (True = may attend) or an additive
    float one (0 where allowed, -inf elsewhere: a graphed block converts its mask once
    instead of every layer's SDPA converting it again)."""
    if mask is None:
        return scores
    if mask.is_floating_point():
        return scores + mask.to(scores.dtype)
    return scores.masked_fill(~mask, float("-inf"))


def kv_compact_reference(
    cache: torch.Tensor,  # [L, B, H, Tmax, D]
    start: int,
    keep: torch.Tensor,  # [n] int64 indices relative to `start`, ascending
) -> None:
    """In place: cache[..., start + i, :] = cache[..., start + keep[i], :] for i < n."""
    # index_select materialises the kept rows before writing, so overlapping source and
    # destination ranges are safe.
    rows = cache.index_select(3, keep + start)
    cache[:, :, :, start : start + keep.numel()] = rows


# ------------------------------------------------------------- W4A16 fragment (mma) K order
MMA_BLOCK = 128  # the permutation acts inside each block of 128 input features


def _mma_rows(x: torch.Tensor) -> tuple[torch.Size, int]:
    k = x.shape[-1]
    if k % MMA_BLOCK:
        raise ValueError(f"mma K order needs K a multiple of {MMA_BLOCK}, not {k}")
    return x.shape[:-1], k


def to_mma_order(x: torch.Tensor) -> torch.Tensor:  # [..., K] -> [..., K]
    """x with each block of 128 columns in the mma K order of the repacked W4A16 weights
    (triton_ops/w4_fragment.py `pi`). pi keeps bit 0 of the position, sends bits 3-6 to bits
    1-4 of the column and bits 1, 2 to bits 5, 6: the block viewed as [c6, c5, c4..c1, c0] is
    read as [c4..c1, c6, c5, c0]. Only the last dim is split, so x may be strided in the
    others (attention's heads, transposed): one copy either way."""
    lead, k = _mma_rows(x)
    t = x.reshape(*lead, k // MMA_BLOCK, 2, 2, 16, 2)  # splits the last dim only: a view
    n = t.dim()
    return t.permute(*range(n - 4), n - 2, n - 4, n - 3, n - 1).reshape(*lead, k)


def from_mma_order(x: torch.Tensor) -> torch.Tensor:  # [..., K] -> [..., K]
    """The inverse of `to_mma_order`."""
    lead, k = _mma_rows(x)
    t = x.reshape(*lead, k // MMA_BLOCK, 16, 2, 2, 2)
    n = t.dim()
    return t.permute(*range(n - 4), n - 3, n - 2, n - 4, n - 1).reshape(*lead, k)


@dataclass(frozen=True)
class MmaOrderActivations:
    """Activations whose blocks of 128 features are already in the mma K order of the W4A16
    fragment kernels (`to_mma_order`), handed from a norm or silu(gate) * up to a linear
    that asked for them (`QLinear.takes_mma_order`): its wgmma kernel then copies x in
    16-byte pieces without gathering it first."""

    values: torch.Tensor  # [..., K]

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def natural(self) -> torch.Tensor:
        """The activations in feature order (for a kernel that did not ask for mma order)."""
        return from_mma_order(self.values)


# ------------------------------------------------------------------------ quantized linear
@dataclass(frozen=True)
class QuantizedActivations:
    """Activations quantized per token, handed from a fused RMSNorm to the linears after it.

    x[t, :] ~= codes[t, :] * scales[t]; `dtype` is the activation dtype that the linear's
    output takes (the dtype the activations had before quantization).
    """

    codes: torch.Tensor  # [..., K] int8, or float8_e4m3fn
    scales: torch.Tensor  # [..., 1] float32
    dtype: torch.dtype

    @property
    def kind(self) -> str:
        return "int8" if self.codes.dtype == torch.int8 else "fp8"

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def check_for(self, spec: QuantSpec) -> None:
        """Refuse to feed a format that takes another kind of activations."""
        if self.kind != spec.activations:
            raise ValueError(f"{spec.name} takes {spec.activations} activations, got {self.kind}")

    def index_select(self, dim: int, index: torch.Tensor) -> QuantizedActivations:
        """Permute K (as `Tensor.index_select(-1, perm)`); per-token scales do not depend on
        the order of K."""
        assert dim in (-1, self.codes.dim() - 1), (
            f"only the last dim (K) can be permuted, not {dim}"
        )
        return QuantizedActivations(self.codes.index_select(-1, index), self.scales, self.dtype)


ACTIVATION_KINDS = ("int8", "fp8")
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def quantize_per_token(x: torch.Tensor, kind: str) -> QuantizedActivations:
    """Per-token dynamic quantization: scale = absmax / 127 (int8) or / 448 (fp8 e4m3),
    codes = round-to-nearest-even(x / scale)."""
    if kind not in ACTIVATION_KINDS:
        raise ValueError(f"unknown activation quantization {kind!r}; supported: int8, fp8")
    xf = x.float()
    absmax = xf.abs().amax(-1, keepdim=True).clamp(min=1e-12)
    # divided by a tensor on x's device: on CUDA torch divides by a Python number through
    # its reciprocal, which can round a scale one step away from the true quotient (the
    # CPU's and the Triton kernel's)
    qmax = absmax.new_tensor(127.0 if kind == "int8" else FP8_MAX)
    s = absmax / qmax
    if kind == "int8":
        codes = (xf / s).round().clamp(-127, 127).to(torch.int8)
    else:
        codes = (xf / s).to(torch.float8_e4m3fn)
    return QuantizedActivations(codes, s, x.dtype)


def activation_codes(
    x: torch.Tensor | QuantizedActivations, kind: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] (already quantized or not) -> (codes as float32 [M, K], scales [M, 1])."""
    if isinstance(x, QuantizedActivations):
        return x.codes.reshape(-1, x.shape[-1]).float(), x.scales.reshape(-1, 1)
    return quantize_activations(x.reshape(-1, x.shape[-1]), kind)


def quantize_activations(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (codes as float32 [M, K], scales [M, 1]); see `quantize_per_token`."""
    q = quantize_per_token(x, kind)
    return q.codes.float(), q.scales


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in fp32 as HF does (so bf16 runs match its numerics), then scale in the
    # input dtype; F.rms_norm does the normalisation in one fused op.
    normed = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    return weight * normed.to(x.dtype)


def rmsnorm_mma_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rmsnorm_reference in mma K order (`to_mma_order`), for a W4A16 wgmma layer."""
    return to_mma_order(rmsnorm_reference(x, weight, eps))


def rmsnorm_quant_reference(
    x: torch.Tensor,  # [..., K]
    weight: torch.Tensor,  # [K]
    eps: float,
    kind: str,
) -> QuantizedActivations:
    """RMSNorm then per-token quantization: exactly `quantize_per_token(rmsnorm(x))`."""
    return quantize_per_token(rmsnorm_reference(x, weight, eps), kind)


def silu_mul_reference(h: torch.Tensor) -> torch.Tensor:  # [..., 2I] -> [..., I]
    """The gated MLP's activation: silu(gate) * up, with h = [gate; up] along the last dim
    (each op rounded to h's dtype, as torch's eager ops do)."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_mul_mma_reference(h: torch.Tensor) -> torch.Tensor:  # [..., 2I] -> [..., I]
    """silu_mul_reference in mma K order (`to_mma_order`), for a W4A16 wgmma down_proj."""
    return to_mma_order(silu_mul_reference(h))


def silu_mul_quant_reference(h: torch.Tensor, kind: str) -> QuantizedActivations:
    """silu_mul then per-token quantization: exactly `quantize_per_token(silu_mul(h))`."""
    return quantize_per_token(silu_mul_reference(h), kind)


def qlinear_reference(
    x: torch.Tensor | QuantizedActivations,  # [..., K], or already quantized per token
    t: dict[str, torch.Tensor],  # the format's tensors (quant/pack.py)
    bias: torch.Tensor | None,
    spec: object,  # QuantSpec
) -> torch.Tensor:  # [..., N]
    """Dequantize-then-matmul for weight-only formats; exact integer arithmetic (in float64,
    exact for |sums| < 2^53) for integer activations, as the hardware kernels compute it;
    on the CPU, exact e4m3 sums for fp8 (in float64: every e4m3 product is a multiple of
    2^-18 below 2^18, so sums over K <= 2^17 need at most 53 bits). Exact sums make a row's
    output independent of how many rows are computed together, which lossless speculation
    needs where the next layer quantizes that output again. (On a GPU without FP8 the fp8
    fallback sums in float32: float64 is slow there, and the GPU paths promise no batch
    invariance.)"""
    from specquant.quant.pack import centered_codes, dequantize, group_scales
    from specquant.quant.spec import QuantSpec

    assert isinstance(spec, QuantSpec)
    if isinstance(x, QuantizedActivations):
        x.check_for(spec)
    shape, out_dtype = x.shape, x.dtype
    if spec.activations == "none":
        assert isinstance(x, torch.Tensor)
        return finish_qlinear(
            x.reshape(-1, shape[-1]).float() @ dequantize(t, spec).T, bias, out_dtype, shape
        )
    xq, sx = activation_codes(x, spec.activations)
    if spec.activations == "fp8":
        wide = torch.float64 if xq.device.type == "cpu" else torch.float32
        sums = xq.to(wide) @ t["qweight"].to(wide).T
        out = sums.float() * sx * t["scales"].float().T
    else:
        q = centered_codes(t, spec).double()  # [N, K] integer codes minus zero points
        n, k = q.shape
        scales = group_scales(t, spec).double()  # [N, G]
        g = scales.shape[1]
        kg = k // g
        xd = xq.double()
        # per-group integer dot products (exact in float64), each times its group scale;
        # one [M, N] product per group keeps memory at O(M*N) for long prefills
        acc = torch.zeros(xd.shape[0], n, dtype=torch.float64, device=xd.device)
        for j in range(g):
            acc += (xd[:, j * kg : (j + 1) * kg] @ q[:, j * kg : (j + 1) * kg].T) * scales[:, j]
        out = (acc * sx.double()).float()
    return finish_qlinear(out, bias, out_dtype, shape)


def finish_qlinear(
    out: torch.Tensor,  # [M, N] float32
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    shape: torch.Size,  # the input's shape [..., K]
) -> torch.Tensor:  # [..., N] in out_dtype
    """A quantized linear's last steps, shared by every CPU implementation: bias in float32,
    then rounding to the activation dtype."""
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype).view(*shape[:-1], out.shape[-1])
