"""The gated MLP's activation silu(gate) * up, fused with down_proj's per-token activation
quantization when that layer takes int8/fp8 activations."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from specquant.kernels.reference import (
    QuantizedActivations,
    silu_mul_quant_reference,
    silu_mul_reference,
)
from specquant.kernels.registry import KernelContext, select


class SiluMul(nn.Module):
    """h = [gate; up] [..., 2I] -> silu(gate) * up [..., I], or its per-token quantization."""

    def __init__(self) -> None:
        super().__init__()
        # (device, dtype, kind) -> the chosen "silu_mul" / "silu_mul_quant" kernel
        self._kernels: dict[tuple[torch.device, torch.dtype, str | None], Callable[..., Any]] = {}

    def forward(
        self, h: torch.Tensor, kind: str | None = None
    ) -> torch.Tensor | QuantizedActivations:
        if h.requires_grad and torch.is_grad_enabled():  # training: fused kernels have no backward
            return silu_mul_reference(h) if kind is None else silu_mul_quant_reference(h, kind)
        key = (h.device, h.dtype, kind)
        fn = self._kernels.get(key)
        if fn is None:
            if kind is None:
                fn = select("silu_mul", KernelContext(h.device, h.dtype)).fn
            else:
                ctx = KernelContext(h.device, h.dtype, extra=(("kind", kind),))
                fn = partial(select("silu_mul_quant", ctx).fn, kind=kind)
            self._kernels[key] = fn
        return fn(h)
