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
        # (device, dtype, kind or "mma") -> the chosen "silu_mul" / "silu_mul_quant" /
        # "silu_mul_mma" kernel
        self._kernels: dict[tuple[torch.device, torch.dtype, str | None], Callable[..., Any]] = {}

    def forward(
        self, h: torch.Tensor, kind: str | None = None, mma_order: bool = False
    ) -> torch.Tensor | QuantizedActivations | MmaOrderActivations:
        """`kind`: quantize per token to int8/fp8; `mma_order` (with no kind): the result in
        the W4A16 wgmma kernel's K order, for a down_proj that asked for it."""
        if h.requires_grad and torch.is_grad_enabled():  # training: fused kernels have no backward
            return silu_mul_reference(h) if kind is None else silu_mul_quant_reference(h, kind)
        if mma_order and kind is None:
            key = (h.device, h.dtype, "mma")
            fn = self._kernels.get(key)
            if fn is None:
                ctx = KernelContext(h.device, h.dtype)
                fn = self._kernels[key] = select("silu_mul_mma", ctx).fn
            return MmaOrderActivations(fn(h))
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
