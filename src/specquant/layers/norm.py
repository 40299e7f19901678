"""RMSNorm, optionally fused with the per-token activation quantization of the next linear."""

from __future__ import annotations

import torch
from torch import nn

from specquant.kernels.reference import (
    MmaOrderActivations,
    QuantizedActivations,
    rmsnorm_reference,
)
from specquant.kernels.registry import KernelMemo
from specquant.layers.linear import wants_mma_order


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        # the registry's picks for "rmsnorm", "rmsnorm_mma" and "rmsnorm_quant"
        self._kernels = KernelMemo()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return rmsnorm_reference(x, self.weight, self.eps)  # fused kernels: no backward
        return self._kernels("rmsnorm", x.device, x.dtype)(x, self.weight, self.eps)

    def mma_ordered(self, x: torch.Tensor) -> MmaOrderActivations:
        """rmsnorm(x) written in the W4A16 wgmma kernel's K order (reference.to_mma_order),
        for a linear that asked for it (`QLinear.takes_mma_order`)."""
        fn = self._kernels("rmsnorm_mma", x.device, x.dtype)
        return MmaOrderActivations(fn(x, self.weight, self.eps))

    def quantized(self, x: torch.Tensor, kind: str) -> QuantizedActivations:
        """rmsnorm(x) quantized per token to `kind` ("int8" or "fp8") in one kernel; equals
        `quantize_per_token(self(x), kind)`."""
        fn = self._kernels("rmsnorm_quant", x.device, x.dtype, kind)
        return fn(x, self.weight, self.eps, kind)


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
