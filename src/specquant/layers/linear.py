"""The one linear layer of specquant.

Today it holds dense weights; quantized weight formats plug into this same class through a
format description (issue 5) rather than through one subclass per format.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from specquant.kernels.registry import KernelContext, select

LinearFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


class QLinear(nn.Module):
    """y = x @ W^T (+ b). W is [out_features, in_features] as in `nn.Linear`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.kernel: LinearFn = F.linear
        self.kernel_name = "torch"

    def prepare(self, override: str | None = None) -> None:
        """Pick the matmul kernel for the weights' device and dtype (after loading)."""
        if self.spec is not None:
            return
        impl = select("linear", KernelContext(self.weight.device, self.weight.dtype), override)
        self.kernel, self.kernel_name = impl.fn, impl.name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec is not None:
            return self.qkernel(x, self.qtensors(), self.bias, self.spec)
        return self.kernel(x, self.weight, self.bias)

    # ------------------------------------------------------------------ quantized formats
    spec: Any = None  # a QuantSpec once quantized; dense until then

    def quantize_(self, spec: Any, quantizer: Callable[..., dict[str, torch.Tensor]]) -> float:
        """Replace the dense weight by `spec`'s tensors (as buffers); returns the relative
        round-trip error of the weight."""
        from specquant.quant.rtn import roundtrip_error

        w = self.weight.detach()
        tensors = quantizer(w, spec)
        error = roundtrip_error(w, tensors, spec)
        del self.weight
        self.qnames = tuple(tensors)
        for name, t in tensors.items():
            self.register_buffer(name, t.to(w.device))
        self.spec = spec
        impl = select("qlinear", KernelContext(w.device, w.dtype))
        self.qkernel, self.kernel_name = impl.fn, f"{impl.name}:{spec.name}"
        return error

    def qtensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.qnames}

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, "
            f"kernel={self.kernel_name}"
        )


def prepare_linears(module: nn.Module, override: str | None = None) -> None:
    """Choose the matmul kernel of every QLinear in `module` (after loading or `.to()`)."""
    for sub in module.modules():
        if isinstance(sub, QLinear):
            sub.prepare(override)


@torch.no_grad()
def init_random_(module: nn.Module, seed: int, std: float = 0.02) -> nn.Module:
    """Deterministic random weights (norms at 1): for random drafters and tests."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module
