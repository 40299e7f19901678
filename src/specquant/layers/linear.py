"""The one linear layer of specquant.

It holds either a dense weight or a quantized format's tensors (described by a `QuantSpec`,
quant/spec.py); formats plug into this one class rather than into one subclass per format.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from specquant.kernels.reference import MmaOrderActivations, QuantizedActivations
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
        # "int8"/"fp8" when the format quantizes activations per token: the norm before
        # this layer may then hand over `QuantizedActivations` (layers/norm.py `norm_for`)
        self.act_quant: str | None = None
        # whether the kernel reads x in its weights' mma K order at some token counts (set
        # when a quantized kernel is prepared; see takes_mma_order)
        self._mma_kernel = False

    def prepare(self, override: str | None = None, qlinear_override: str | None = None) -> None:
        """Pick the matmul kernel for the weights' device and dtype (after loading or `.to()`):
        `override` names a dense "linear" kernel, `qlinear_override` a quantized one (each
        applies to its kind of layer only, so one call can serve a whole model)."""
        if self.spec is not None:
            self.prepare_quantized(qlinear_override)
            return
        impl = select("linear", KernelContext(self.weight.device, self.weight.dtype), override)
        self.kernel, self.kernel_name = impl.fn, impl.name

    def forward(self, x: torch.Tensor | QuantizedActivations | MmaOrderActivations) -> torch.Tensor:
        if isinstance(x, MmaOrderActivations) and not self._mma_kernel:
            x = x.natural()  # the producer guessed wrong: still correct, one copy more
        if self.spec is not None:
            t = self.qtensors()
            if "perm" in t:  # act-order imports: groups are contiguous in permuted K order
                x = x.index_select(-1, t["perm"])
            return self.qkernel(x, t, self.bias, self.spec)
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
        self.load_quantized_(spec, tensors, w.dtype)
        return error

    def load_quantized_(
        self,
        spec: Any,
        tensors: dict[str, torch.Tensor],
        dtype: torch.dtype | None = None,
        override: str | None = None,
        prepare: bool = True,
    ) -> None:
        """Become a quantized layer holding `tensors` in the canonical layout of
        quant/pack.py (plus an optional int64 `perm` [K] applied to the input first).

        `dtype` is the activation dtype (default: the dense weight's, or float32). With
        `prepare=False` the kernel is chosen later by `prepare()` (a loader that prepares the
        whole model at the end: some kernels decode the weights when prepared)."""
        from specquant.quant.pack import validate_qtensors

        validate_qtensors(tensors, spec, self.out_features, self.in_features)
        device = next(iter(tensors.values())).device
        if dtype is None:
            dtype = self.weight.dtype if hasattr(self, "weight") else torch.float32
        if "weight" in self._parameters:
            del self.weight
        for name in getattr(self, "qnames", ()):
            delattr(self, name)
        self.qnames = tuple(tensors)
        for name, t in tensors.items():
            self.register_buffer(name, t)
        self.spec = spec
        self.qdtype = dtype
        if prepare:
            self.prepare_quantized(override, device)

    def prepare_quantized(
        self, override: str | None = None, device: torch.device | None = None
    ) -> None:
        """Pick the quantized matmul kernel for this format, device and activation dtype."""
        device = device or next(iter(self.qtensors().values())).device
        shape = (self.out_features, self.in_features)
        ctx = KernelContext(device, self.qdtype, extra=(("spec", self.spec), ("shape", shape)))
        impl = select("qlinear", ctx, override)
        fn = (
            impl.fn
            if impl.prepare is None
            else impl.prepare(self.qtensors(), self.spec, self.qdtype)
        )
        self.qkernel, self.kernel_name = fn, f"{impl.name}:{self.spec.name}"
        acts = self.spec.activations
        self.act_quant = None if acts == "none" else acts
        # a kernel that reads x in its weights' mma K order says at which token counts
        # (triton_ops/w4_fragment.py); act-order imports permute x first, so they never do
        takes = getattr(fn, "takes_mma_order", None)
        self._mma_kernel = takes is not None and "perm" not in self.qnames

    def takes_mma_order(self, tokens: int) -> bool:
        """Whether this layer's kernel reads `tokens` rows of x in the mma K order of its
        repacked W4A16 weights (reference.to_mma_order): the norm or silu(gate) * up before
        it then writes that order (`MmaOrderActivations`) and the kernel skips its gather."""
        return self._mma_kernel and bool(self.qkernel.takes_mma_order(tokens))

    def token_routes(self, most: int = 2048) -> str | None:
        """Which kernel runs each token count, for kernels that switch by it (the repacked
        W4A16 and W4A8 kernels): e.g. "1-16 canonical, 17-512 wgmma, 513+ canonical". None for
        kernels that run every count."""
        route = getattr(getattr(self, "qkernel", None), "route", None)
        if route is None:
            return None
        spans: list[list[Any]] = []  # [first, last, kernel]
        for m in range(1, most + 1):
            name = route(m)
            if spans and spans[-1][2] == name:
                spans[-1][1] = m
            else:
                spans.append([m, m, name])
        parts = [f"{a}-{b}" if a != b else f"{a}" for a, b, _ in spans]
        if route(most + 1) == spans[-1][2]:  # past the tables' last bucket: the last kernel
            parts[-1] = f"{spans[-1][0]}+"
        return ", ".join(f"{p} {name}" for p, (_, _, name) in zip(parts, spans, strict=True))

    def qtensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.qnames}

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, "
            f"kernel={self.kernel_name}"
        )


def quantizes_activations(module: nn.Module | list[QLinear]) -> bool:
    """Whether any QLinear in `module` (or in a list of them) quantizes its input per token
    (W8A8, W4A8, FP8)."""
    linears = module.modules() if isinstance(module, nn.Module) else module
    return any(
        isinstance(m, QLinear) and m.spec is not None and m.spec.activations != "none"
        for m in linears
    )


def wants_mma_order(linear: Any, tokens: int) -> bool:
    """Whether `linear` reads `tokens` rows of x in its weights' mma K order: a QLinear or a
    prepared layer kernel that asks for it; anything else (a plain nn.Linear) never does."""
    takes = getattr(linear, "takes_mma_order", None)
    return takes is not None and bool(takes(tokens))


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
