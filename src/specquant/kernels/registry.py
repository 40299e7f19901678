"""Kernel registry: each op has implementations tried in priority order.

`select(op, ctx)` returns the first implementation whose `can_implement(ctx)` accepts,
honours an explicit override (argument, `SPECQUANT_KERNEL_<OP>` env var, or
`SPECQUANT_FORCE_REFERENCE=1`), and otherwise raises with every rejection reason.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class KernelContext:
    """What a kernel needs to know to accept or reject the work."""

    device: torch.device
    dtype: torch.dtype
    extra: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class KernelImpl:
    name: str
    priority: int  # higher is tried first
    fn: Callable[..., Any]
    can_implement: Callable[[KernelContext], tuple[bool, str]]
    is_reference: bool = False
    # For kernels with per-layer state (their own weight layout, JIT compilation): called
    # once per layer with its canonical tensors, format and activation dtype; returns the
    # function the layer then calls in place of `fn` (same signature).
    prepare: Callable[..., Callable[..., Any]] | None = None


class KernelSelectionError(RuntimeError):
    pass


_REGISTRY: dict[str, list[KernelImpl]] = {}


def register(op: str, impl: KernelImpl) -> None:
    impls = [i for i in _REGISTRY.get(op, []) if i.name != impl.name]
    impls.append(impl)
    impls.sort(key=lambda i: -i.priority)
    _REGISTRY[op] = impls


def implementations(op: str) -> list[KernelImpl]:
    _ensure_loaded()
    if op not in _REGISTRY:
        raise KernelSelectionError(f"unknown op {op!r}; known ops: {', '.join(sorted(_REGISTRY))}")
    return list(_REGISTRY[op])


def select(op: str, ctx: KernelContext, override: str | None = None) -> KernelImpl:
    """Pick the implementation for `op`; the error lists why each candidate was rejected."""
    impls = implementations(op)
    override = override or os.environ.get(f"SPECQUANT_KERNEL_{op.upper()}")
    if os.environ.get("SPECQUANT_FORCE_REFERENCE") == "1" and not override:
        impls = [i for i in impls if i.is_reference]
    if override:
        by_name = {i.name: i for i in impls}
        if override not in by_name:
            raise KernelSelectionError(
                f"kernel override {override!r} for op {op!r} is unknown; "
                f"available: {', '.join(by_name)}"
            )
        impls = [by_name[override]]
    reasons = []
    for impl in impls:
        ok, why = impl.can_implement(ctx)
        if ok:
            return impl
        reasons.append(f"  {impl.name}: {why}")
    raise KernelSelectionError(
        f"no kernel can run op {op!r} on {ctx.device} {ctx.dtype}:\n" + "\n".join(reasons)
    )


class KernelMemo:
    """A layer's kernels: the registry's pick for each (op, device, dtype, quantization
    kind) it asks for, selected on first use and kept, since a layer asks on every forward
    and selection walks every candidate."""

    def __init__(self) -> None:
        self._fns: dict[tuple[str, torch.device, torch.dtype, str | None], Callable[..., Any]] = {}

    def __call__(
        self, op: str, device: torch.device, dtype: torch.dtype, kind: str | None = None
    ) -> Callable[..., Any]:
        key = (op, device, dtype, kind)
        fn = self._fns.get(key)
        if fn is None:
            extra = (("kind", kind),) if kind is not None else ()
            fn = self._fns[key] = select(op, KernelContext(device, dtype, extra=extra)).fn
        return fn

    def __len__(self) -> int:
        return len(self._fns)


def explain(op: str, ctx: KernelContext) -> list[tuple[str, bool, str]]:
    """(name, accepted, reason) for every candidate, in priority order."""
    return [(i.name, *i.can_implement(ctx)) for i in implementations(op)]


def _ensure_loaded() -> None:
    # Implementations register themselves on import; importing lazily keeps
    # CPU-only installs free of GPU imports.
    from specquant.kernels import builtin, cpu_quant, humming_backend, triton_ops  # noqa: F401
