"""The gated MLP's activation silu(gate) * up, fused with down_proj's per-token activation
quantization when that layer takes int8/fp8 activations, or written in the K order of its
W4A16 wgmma kernel when it asks for that."""

from __future__ import annotations

import torch
from torch import nn

from specquant.kernels.reference import (
    MmaOrderActivations,
    QuantizedActivations,
    silu_mul_quant_reference,
    silu_mul_reference,
)
from specquant.kernels.registry import KernelMemo


class SiluMul(nn.Module):
    """h = [gate; up] [..., 2I] -> silu(gate) * up [..., I], or its per-token quantization."""

    def __init__(self) -> None:
        super().__init__()
        # the registry's picks for "silu_mul", "silu_mul_mma" and "silu_mul_quant"
        self._kernels = KernelMemo()

    def forward(
        self, h: torch.Tensor, kind: str | None = None, mma_order: bool = False
    ) -> torch.Tensor | QuantizedActivations | MmaOrderActivations:
        """`kind`: quantize per token to int8/fp8; `mma_order` (with no kind): the result in
        the W4A16 wgmma kernel's K order, for a down_proj that asked for it."""
        if h.requires_grad and torch.is_grad_enabled():  # training: fused kernels have no backward
            return silu_mul_reference(h) if kind is None else silu_mul_quant_reference(h, kind)
        op = "silu_mul_quant" if kind is not None else "silu_mul_mma" if mma_order else "silu_mul"
        fn = self._kernels(op, h.device, h.dtype, kind)
        out = fn(h) if kind is None else fn(h, kind=kind)
        return MmaOrderActivations(out) if op == "silu_mul_mma" else out
