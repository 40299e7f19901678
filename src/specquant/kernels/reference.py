"""Pure-PyTorch reference implementations of every op: the specification and the CPU path.

Faster backends (SDPA today, Triton later) are tested against these functions.
"""

from __future__ import annotations

import torch


def attention_reference(
    q: torch.Tensor,  # [B, Hq, T, D]
    k: torch.Tensor,  # [B, Hkv, S, D]   S = committed prefix + T new keys
    v: torch.Tensor,  # [B, Hkv, S, D]
    mask: torch.Tensor | None,  # [T, S] or [B, 1, T, S] bool, True = may attend; None = all
) -> torch.Tensor:  # [B, Hq, T, D]
    """Softmax attention with grouped KV heads, computed in fp32."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1).float()
    v = v.repeat_interleave(groups, dim=1).float()
    scores = q.float() @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5)  # [B, Hq, T, S]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v).to(q.dtype)


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


# ------------------------------------------------------------------------ quantized linear
def quantize_activations(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token dynamic quantization: x [M, K] -> (codes as float32 [M, K], scales [M, 1])."""
    x = x.float()
    absmax = x.abs().amax(-1, keepdim=True).clamp(min=1e-12)
    if kind == "int8":
        s = absmax / 127
        return (x / s).round().clamp(-127, 127), s
    s = absmax / 448.0  # fp8 e4m3: emulated by a round trip through float8
    return (x / s).to(torch.float8_e4m3fn).float(), s


def qlinear_reference(
    x: torch.Tensor,  # [..., K]
    t: dict[str, torch.Tensor],  # the format's tensors (quant/pack.py)
    bias: torch.Tensor | None,
    spec: object,  # QuantSpec
) -> torch.Tensor:  # [..., N]
    """Dequantize-then-matmul for weight-only formats; exact integer arithmetic (in float64,
    exact for |sums| < 2^53) for integer activations, as the hardware kernels compute it."""
    from specquant.quant.pack import codes_of, dequantize, group_scales
    from specquant.quant.spec import QuantSpec

    assert isinstance(spec, QuantSpec)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if spec.activations == "none":
        out = x2.float() @ dequantize(t, spec).T
    elif spec.activations == "fp8":
        xq, sx = quantize_activations(x2, "fp8")
        out = (xq @ t["qweight"].float().T) * sx * t["scales"].float().T
    else:
        xq, sx = quantize_activations(x2, "int8")
        q = codes_of(t, spec).double()  # [N, K] integer codes
        n, k = q.shape
        scales = group_scales(t, spec).double()  # [N, G]
        g = scales.shape[1]
        kg = k // g
        xd = xq.double()
        # per-group integer dot products (exact in float64), each times its group scale;
        # one [M, N] product per group keeps memory at O(M*N) for long prefills
        acc = torch.zeros(xd.shape[0], n, dtype=torch.float64, device=x.device)
        for j in range(g):
            acc += (xd[:, j * kg : (j + 1) * kg] @ q[:, j * kg : (j + 1) * kg].T) * scales[:, j]
        out = (acc * sx.double()).float()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).view(*shape[:-1], -1)
