"""humming-kernels (vLLM's JIT-compiled successor to Marlin) as an opt-in W4A16 backend.

Not used unless asked for (`SPECQUANT_KERNEL_QLINEAR=humming-w4a16`, or the `override`
argument of `QLinear.prepare`): it keeps its own repacked copy of each layer's weights next
to the canonical tensors (twice the 4-bit weight memory), compiles its kernels with NVRTC or
nvcc the first time a shape is seen (tens of seconds; cached on disk by humming), rounds the
fp32 group scales to the activation dtype, and adds the bias after rounding the product to
that dtype (the Triton kernels add it in fp32 before). In exchange it is the faster W4A16 GEMM
on Hopper (bench/results/kernel_perf.md). Symmetric int4 only; this module does not import
humming until a layer is prepared.

Canonical int4 bytes (low nibble = even k) read as little-endian int32 words hold eight codes
each in GPTQ's order along K; humming's weight tensor is those words, [N, K/8].
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import torch

from specquant.kernels.reference import qlinear_reference
from specquant.kernels.registry import KernelContext, KernelImpl, register

PRIORITY = -1  # below the reference (0), which accepts everything: reached only by name


def _check(ctx: KernelContext) -> tuple[bool, str]:
    extra = dict(ctx.extra)
    spec = extra.get("spec")
    if spec is None:
        return False, "needs the format (KernelContext extra 'spec')"
    if not (spec.weight_bits == 4 and spec.weight_type == "int" and spec.activations == "none"):
        return False, f"computes W4A16 formats only, not {spec.name}"
    if not spec.symmetric:
        return False, f"symmetric int4 only; {spec.name} has zero points"
    if ctx.device.type != "cuda" or not torch.cuda.is_available():
        return False, f"needs a CUDA device, not {ctx.device.type}"
    if ctx.dtype not in (torch.bfloat16, torch.float16):
        return False, f"activations must be bfloat16 or float16, not {ctx.dtype}"
    if importlib.util.find_spec("humming") is None:
        return False, "humming-kernels is not installed (pip install humming-kernels)"
    major, minor = torch.cuda.get_device_capability(ctx.device)
    if (major, minor) < (8, 0):
        return False, f"needs compute capability >= 8.0; this GPU has {major}.{minor}"
    if "shape" in extra:
        n, k = extra["shape"]
        if n % 64 or k % 32:  # humming's tiles for 16-bit activations
            return False, f"needs N a multiple of 64 and K of 32, not N={n}, K={k}"
    return True, "humming-kernels W4A16 (JIT-compiled, own weight layout)"


def _unprepared(*args: Any) -> torch.Tensor:
    raise RuntimeError("humming-w4a16 runs per layer: QLinear.prepare builds it (prepare=...)")


def prepare_humming(
    t: dict[str, torch.Tensor], spec: Any, dtype: torch.dtype
) -> Callable[..., torch.Tensor]:
    """A humming layer holding this layer's codes and scales; returns its forward."""
    from humming.layer import HummingLayer

    qweight, scales = t["qweight"], t["scales"]  # uint8 [N, K/2], fp32 [N, G]
    n, k = qweight.shape[0], qweight.shape[1] * 2
    group = 0 if spec.group_size == -1 else spec.group_size  # 0: one scale per channel
    layer = HummingLayer(
        shape_n=n,
        shape_k=k,
        weight_config={"dtype": "int4", "group_size": group},
        torch_dtype=dtype,
    ).to(qweight.device)
    layer.load_from_tensors(
        {"weight": qweight.contiguous().view(torch.int32), "weight_scale": scales.to(dtype)}
    )
    layer.transform()

    def forward(
        x: torch.Tensor, live: dict[str, torch.Tensor], bias: torch.Tensor | None, _spec: Any
    ) -> torch.Tensor:  # [..., K] -> [..., N]
        if x.device != qweight.device:  # moved without QLinear.prepare: the reference
            return qlinear_reference(x, live, bias, spec)
        if x.numel() == 0:
            return x.new_empty(*x.shape[:-1], n)
        y = layer(x.reshape(-1, k)).view(*x.shape[:-1], n)
        return y if bias is None else y + bias.to(y.dtype)

    return forward


register(
    "qlinear", KernelImpl("humming-w4a16", PRIORITY, _unprepared, _check, prepare=prepare_humming)
)
