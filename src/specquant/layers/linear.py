"""The one linear layer of specquant.

Today it holds dense weights; quantized weight formats plug into this same class through a
format description (issue 5) rather than through one subclass per format.
"""

from __future__ import annotations

from collections.abc import Callable

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
        impl = select("linear", KernelContext(self.weight.device, self.weight.dtype), override)
        self.kernel, self.kernel_name = impl.fn, impl.name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x, self.weight, self.bias)

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
