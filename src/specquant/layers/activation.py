"""The gated MLP's activation silu(gate) * up, fused with down_proj's per-token activation
quantization when that layer takes int8/fp8 activations, or written in the K order of its
W4A16 wgmma kernel when it asks for that."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from specquant.kernels.reference import (
    MmaOrderActivations,
    QuantizedActivations,
    silu_mul_quant_reference,
    silu_mul_reference,
)
from specquant.kernels.registry import KernelContext, select


class SiluMul(nn.Module):
    """h = [gate; up] [..., 2I] -> silu(gate) * up [..., I], or its per-token quantization."""

    def __init__(self) -> None:
        super().__init__()
        # (device, dtype, op, kind) -> the kernel the registry chose for op ("silu_mul",
        # "silu_mul_mma" or "silu_mul_quant", the last bound to its kind)
        self._kernels: dict[
            tuple[torch.device, torch.dtype, str, str | None], Callable[..., Any]
        ] = {}

    def forward(
        self, h: torch.Tensor, kind: str | None = None, mma_order: bool = False
    ) -> torch.Tensor | QuantizedActivations | MmaOrderActivations:
        """`kind`: quantize per token to int8/fp8; `mma_order` (with no kind): the result in
        the W4A16 wgmma kernel's K order, for a down_proj that asked for it."""
        if h.requires_grad and torch.is_grad_enabled():  # training: fused kernels have no backward
            return silu_mul_reference(h) if kind is None else silu_mul_quant_reference(h, kind)
        op = "silu_mul_quant" if kind is not None else "silu_mul_mma" if mma_order else "silu_mul"
        key = (h.device, h.dtype, op, kind)
        fn = self._kernels.get(key)
        if fn is None:
            extra = (("kind", kind),) if kind is not None else ()
            fn = select(op, KernelContext(h.device, h.dtype, extra=extra)).fn
            fn = self._kernels[key] = partial(fn, kind=kind) if kind is not None else fn
        out = fn(h)
        return MmaOrderActivations(out) if op == "silu_mul_mma" else out
