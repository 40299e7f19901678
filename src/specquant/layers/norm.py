"""RMSNorm, optionally fused with the per-token activation quantization of the next linear."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from specquant.kernels.reference import (
    MmaOrderActivations,
    QuantizedActivations,
    rmsnorm_reference,
)
from specquant.kernels.registry import KernelContext, select
from specquant.layers.linear import wants_mma_order


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        # (device, dtype, op, quantization kind) -> the kernel the registry chose for op
        # ("rmsnorm", "rmsnorm_mma" or "rmsnorm_quant")
        self._kernels: dict[tuple[torch.device, torch.dtype, str, str | None], Any] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return rmsnorm_reference(x, self.weight, self.eps)  # fused kernels: no backward
        return self._kernel("rmsnorm", x)(x, self.weight, self.eps)

    def mma_ordered(self, x: torch.Tensor) -> MmaOrderActivations:
        """rmsnorm(x) written in the W4A16 wgmma kernel's K order (reference.to_mma_order),
        for a linear that asked for it (`QLinear.takes_mma_order`)."""
        return MmaOrderActivations(self._kernel("rmsnorm_mma", x)(x, self.weight, self.eps))

    def quantized(self, x: torch.Tensor, kind: str) -> QuantizedActivations:
        """rmsnorm(x) quantized per token to `kind` ("int8" or "fp8") in one kernel; equals
        `quantize_per_token(self(x), kind)`."""
        return self._kernel("rmsnorm_quant", x, kind)(x, self.weight, self.eps, kind)

    def _kernel(self, op: str, x: torch.Tensor, kind: str | None = None) -> Any:
        key = (x.device, x.dtype, op, kind)
        fn = self._kernels.get(key)
        if fn is None:
            extra = (("kind", kind),) if kind is not None else ()
            ctx = KernelContext(x.device, x.dtype, extra=extra)
            fn = self._kernels[key] = select(op, ctx).fn
        return fn


def norm_for(
    norm: nn.Module, x: torch.Tensor, linear: nn.Module
) -> torch.Tensor | QuantizedActivations | MmaOrderActivations:
    """`norm(x)` as `linear` wants it: quantized in the norm's kernel when `linear` takes
    int8/fp8 activations (its `act_quant`), in mma K order when its W4A16 kernel asks for
    that at this many tokens, plain otherwise (dense, or a norm that is not an RMSNorm, such
    as EAGLE's skipped first norm)."""
    if not isinstance(norm, RMSNorm):
        return norm(x)
    kind = getattr(linear, "act_quant", None)
    if kind is not None:
        return norm.quantized(x, kind)
    # the mma-order kernels have no backward
    if not torch.is_grad_enabled() and wants_mma_order(linear, x.numel() // x.shape[-1]):
        return norm.mma_ordered(x)
    return norm(x)
