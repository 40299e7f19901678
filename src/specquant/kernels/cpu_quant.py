"""Quantized linears on the CPU, prepared once per layer (`KernelImpl.prepare`).

The arithmetic is qlinear_reference's, with its per-call work moved to load time: weight-only
formats keep their dequantized weight in float32, so a call is one matmul, as for a dense
layer; fp8 keeps its decoded e4m3 codes in float64, where their sums are exact; int8-activation
formats keep their signed integer codes as int8 and take the per-group integer products from
torch's int8 GEMM (`torch._int_mm`, exact in int32 for K < 2^31 / 127^2) instead of float64
matmuls. Results equal the reference's bit for bit: the same float32 products, and exact sums
scaled in the same order. Exact sums also make fp8 and int8 rows independent of the batch.

Memory: a weight-only layer holds a float32 copy of its weight (the size of the dense layer),
an fp8 layer a float64 one (twice that), next to its packed codes; layers whose copy would
exceed MAX_DECODED_BYTES are refused
(the registry then picks the reference, which decodes per call, and says why). An
int8-activation layer holds its codes as int8 (8-bit per-channel codes: no copy). The copies
are made by QLinear.prepare: call it again after changing a layer's device, dtype or tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from specquant.kernels.reference import (
    QuantizedActivations,
    activation_codes,
    finish_qlinear,
    qlinear_reference,
    quantize_per_token,
)
from specquant.kernels.registry import KernelContext, KernelImpl, register

PRIORITY = 10  # above the reference (0), below GPU kernels
# Weight-only layers keep a float32 copy of their weight and fp8 ones a float64 copy; one
# larger than this stays on the reference (which decodes per call), so a 7B 4-bit model still
# fits in CPU memory.
MAX_DECODED_BYTES = 64 << 20

PreparedFn = Callable[..., torch.Tensor]  # (x, tensors, bias, spec) -> y, as KernelImpl.fn


def _check(ctx: KernelContext) -> tuple[bool, str]:
    extra = dict(ctx.extra)
    spec = extra.get("spec")
    if spec is None:
        return False, "needs the format (KernelContext extra 'spec')"
    if ctx.device.type != "cpu":
        return False, f"runs on the CPU, not {ctx.device.type}"
    if spec.activations == "int8" and not hasattr(torch, "_int_mm"):
        return False, "this torch has no int8 GEMM (torch._int_mm)"
    if spec.activations == "int8" and spec.weight_bits == 8 and not spec.symmetric:
        return False, "8-bit codes minus zero points do not fit int8"
    if spec.activations in ("none", "fp8") and "shape" in extra:
        n, k = extra["shape"]
        kind, size = ("float64", 8) if spec.activations == "fp8" else ("float32", 4)
        if size * n * k > MAX_DECODED_BYTES:
            return False, (
                f"a {kind} copy of this [{n}, {k}] weight would take {size * n * k >> 20} MiB, "
                f"over the {MAX_DECODED_BYTES >> 20} MiB per layer it allows"
            )
    return True, (
        "weights prepared once: float32 matmul (weight-only), exact float64 sums (fp8), or "
        "torch's exact int8 GEMM"
    )


def _unprepared(*args: Any) -> torch.Tensor:
    raise RuntimeError("cpu-prepared runs per layer: QLinear.prepare builds it (prepare=...)")


def prepare_cpu(t: dict[str, torch.Tensor], spec: Any, dtype: torch.dtype) -> PreparedFn:
    """The layer's forward with its weights decoded once (see the module docstring). `dtype`
    (the activation dtype, part of KernelImpl.prepare's signature) does not matter here: the
    arithmetic is float32/float64 and the output takes the input's dtype."""
    prepared = _prepared(t, spec)

    def forward(x: Any, live: Any, bias: torch.Tensor | None, s: Any) -> torch.Tensor:
        codes = x.codes if isinstance(x, QuantizedActivations) else x
        if codes.device.type != "cpu":  # moved without QLinear.prepare: the reference, on
            return qlinear_reference(x, live, bias, s)  # the layer's tensors as they are now
        if isinstance(x, QuantizedActivations):
            x.check_for(spec)
        return prepared(x, live, bias, s)

    return forward


def _prepared(t: dict[str, torch.Tensor], spec: Any) -> PreparedFn:
    from specquant.quant.pack import centered_codes, dequantize, group_scales

    if spec.activations == "none":
        w = dequantize(t, spec)  # float32 [N, K]

        def weight_only(x: torch.Tensor, _t: Any, bias: torch.Tensor | None, _s: Any) -> Any:
            x2 = x.reshape(-1, x.shape[-1])
            return finish_qlinear(x2.float() @ w.T, bias, x.dtype, x.shape)

        return weight_only

    if spec.activations == "fp8":
        # e4m3 values in float64, where their sums are exact (qlinear_reference)
        wq, ws = t["qweight"].double(), t["scales"].float().T  # [N, K], [1, N]

        def fp8(x: Any, _t: Any, bias: torch.Tensor | None, _s: Any) -> torch.Tensor:
            xq, sx = activation_codes(x, "fp8")
            exact = xq.double() @ wq.T
            return finish_qlinear(exact.float() * sx * ws, bias, x.dtype, x.shape)

        return fp8

    scales = group_scales(t, spec).double()  # [N, G]
    n, g = scales.shape
    # 8-bit codes are symmetric (_check) and int8 already; 4-bit codes minus zero points
    # span -15..15
    q = t["qweight"] if spec.weight_bits == 8 else centered_codes(t, spec).to(torch.int8)
    kg = q.shape[1] // g
    # one contiguous int8 [N, K/G] block per group; _int_mm reads its transpose fastest
    blocks = (
        [q.contiguous()] if g == 1 else [q[:, j * kg : (j + 1) * kg].contiguous() for j in range(g)]
    )

    def int8(x: Any, _t: Any, bias: torch.Tensor | None, _s: Any) -> torch.Tensor:
        qa = x if isinstance(x, QuantizedActivations) else quantize_per_token(x, "int8")
        codes = qa.codes.reshape(-1, qa.shape[-1])
        sx = qa.scales.reshape(-1, 1)
        acc = torch.zeros(codes.shape[0], n, dtype=torch.float64)
        for j, block in enumerate(blocks):
            part = torch._int_mm(codes[:, j * kg : (j + 1) * kg].contiguous(), block.T)
            acc += part.double() * scales[:, j]
        return finish_qlinear((acc * sx.double()).float(), bias, qa.dtype, qa.shape)

    return int8


register("qlinear", KernelImpl("cpu-prepared", PRIORITY, _unprepared, _check, prepare=prepare_cpu))
