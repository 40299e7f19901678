"""Triton kernels for CUDA GPUs: their registration and the checks that accept or reject work.

This module does not import triton, so CPU-only installs import it cleanly; the kernels live in
`qlinear.py` (the quantized GEMM of every format) and `act_quant.py` (per-token activation
quantization, alone or fused with RMSNorm or the MLP's SiLU gate) and are imported on first
use.

| registered name | op            | formats                                                    |
|-----------------|---------------|------------------------------------------------------------|
| triton-w4a16-frag | qlinear     | symmetric int4, bf16/fp16, per channel or groups of 128k:  |
|                 |               | repacked into mma fragment order, tuned M buckets (Gluon)  |
| triton-w4a8-wgmma | qlinear     | W4A8 on Hopper (per channel, two-level groups of 128k),    |
|                 |               | int8 wgmma on repacked codes, tuned M buckets (Gluon)      |
| triton-w4a16    | qlinear       | int4 weights, bf16/fp16 activations (sym/asym, any group)  |
| triton-w8a8     | qlinear       | int8 weights, int8 activations per token                   |
| triton-w4a8     | qlinear       | int4 weights, int8 activations (per channel or two-level)  |
| triton-fp8      | qlinear       | e4m3 weights and activations (compute capability >= 8.9)  |
| triton          | act_quant     | per-token int8 / fp8 quantization                          |
| triton          | rmsnorm       | RMSNorm (x * rstd, times the weight) in one kernel         |
| triton          | rmsnorm_mma   | the same, written in the W4A16 wgmma kernel's K order      |
| triton          | silu_mul_mma  | silu(gate) * up, written in that order                     |
| triton          | rmsnorm_quant | RMSNorm + per-token quantization in one kernel             |
| triton          | silu_mul      | silu(gate) * up of the gated MLP in one kernel             |
| triton          | silu_mul_quant| silu(gate) * up + per-token quantization in one kernel     |
| triton          | rope          | rotary embeddings of q and k in one kernel (`rope.py`)      |
| triton          | decode_attention | one query over a cache window, its length on the device |
| triton          | block_attention | a block's tokens over a cache window, additive mask     |
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from specquant.kernels.registry import KernelContext, KernelImpl, register

PRIORITY = 50  # above the references (0) and the CPU kernels (10)
ACT_DTYPES = (torch.bfloat16, torch.float16)


def _common_reason(ctx: KernelContext) -> str | None:
    """Why no Triton kernel can run here, or None."""
    if ctx.device.type != "cuda":
        return f"needs a CUDA device, not {ctx.device.type}"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if importlib.util.find_spec("triton") is None:
        return "triton is not importable (pip install triton)"
    if ctx.dtype not in ACT_DTYPES:
        return f"activations must be bfloat16 or float16, not {ctx.dtype}"
    return None


def _needs_triton(accepted: str) -> Callable[[KernelContext], tuple[bool, str]]:
    """The check of a kernel that needs only what every Triton kernel needs
    (_common_reason); `accepted` says what it does where it runs."""

    def can_implement(ctx: KernelContext) -> tuple[bool, str]:
        why = _common_reason(ctx)
        return (False, why) if why is not None else (True, accepted)

    return can_implement


def _fp8_reason(device: torch.device) -> str | None:
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return (
            f"fp8 e4m3 needs compute capability >= 8.9 (Ada, Hopper or newer); "
            f"this GPU has {major}.{minor}"
        )
    return None


# ------------------------------------------------------------------------------- qlinear
FAMILIES = ("w4a16", "w8a8", "w4a8", "fp8")


def family_of(spec: Any) -> str | None:
    """Which kernel family computes `spec` (a QuantSpec), or None."""
    if spec.weight_type == "fp8":
        return "fp8" if spec.activations == "fp8" else None
    if spec.weight_bits == 4 and spec.activations == "none":
        return "w4a16"
    if spec.activations == "int8":
        return "w4a8" if spec.weight_bits == 4 else "w8a8"
    return None


def _qlinear_check(family: str) -> Callable[[KernelContext], tuple[bool, str]]:
    def can_implement(ctx: KernelContext) -> tuple[bool, str]:
        extra = dict(ctx.extra)
        spec = extra.get("spec")
        if spec is None:
            return False, "needs the format (KernelContext extra 'spec')"
        if family_of(spec) != family:
            return False, f"computes {family} formats only, not {spec.name}"
        why = _common_reason(ctx)
        if why is None and family == "fp8":
            why = _fp8_reason(ctx.device)
        if why is None and spec.group_size != -1 and spec.group_size % 32:
            why = (
                f"group size must be a multiple of 32 (one K tile per group), not {spec.group_size}"
            )
        if why is None and "shape" in extra:
            n, k = extra["shape"]
            if n < 1 or k < 1:
                why = f"empty weight [N={n}, K={k}]"
        if why is not None:
            return False, why
        return True, f"Triton {family} GEMM on {torch.cuda.get_device_name(ctx.device)}"

    return can_implement


def qlinear_triton(
    x: Any,  # torch.Tensor [..., K] or QuantizedActivations
    t: dict[str, torch.Tensor],
    bias: torch.Tensor | None,
    spec: Any,
) -> torch.Tensor:
    from specquant.kernels.triton_ops.qlinear import qlinear

    return qlinear(x, t, bias, spec)


for _family in FAMILIES:
    register(
        "qlinear",
        KernelImpl(f"triton-{_family}", PRIORITY, qlinear_triton, _qlinear_check(_family)),
    )


# W4A16 with the weights repacked for few tokens: tried before the canonical-layout kernel
def _frag_check(ctx: KernelContext) -> tuple[bool, str]:
    ok, why = _qlinear_check("w4a16")(ctx)
    if not ok:
        return ok, why
    extra = dict(ctx.extra)
    spec = extra["spec"]
    if not spec.symmetric:
        return False, f"symmetric int4 only; {spec.name} has zero points"
    if spec.group_size != -1 and spec.group_size % 128:
        return False, f"needs per-channel scales or groups of 128k, not {spec.group_size}"
    if torch.cuda.get_device_capability(ctx.device) < (8, 0):
        return False, "needs mma.sync with bf16 (compute capability >= 8.0)"
    why = _fragment_reason(extra)
    if why is not None:
        return False, why
    from specquant.kernels.triton_ops.w4_fragment import max_m

    where = f"mma.sync for M <= {max_m()}"
    if _hopper(ctx.device):
        where += ", wgmma for the tuned buckets above (w4_wgmma.WGMMA_CONFIGS)"
    return True, f"Gluon W4A16 on mma fragments ({where}; other token counts: {why})"


def _fragment_reason(extra: dict[str, Any]) -> str | None:
    """Why the Gluon kernels on repacked codes cannot take this layer, or None."""
    if importlib.util.find_spec("triton.experimental.gluon") is None:
        return "needs Triton's Gluon (triton >= 3.5)"
    if "shape" in extra:
        n, k = extra["shape"]
        if n % 16 or k % 128:
            return f"needs N a multiple of 16 and K of 128, not N={n}, K={k}"
    return None


def _hopper(device: Any) -> bool:
    return torch.cuda.get_device_capability(device)[0] == 9


def _per_layer(name: str) -> Callable[..., torch.Tensor]:
    """The plain-function slot of a kernel that only runs prepared per layer."""

    def unprepared(*args: Any) -> torch.Tensor:
        raise RuntimeError(f"{name} runs per layer: QLinear.prepare repacks its weights")

    return unprepared


def prepare_frag(t: dict[str, torch.Tensor], spec: Any, dtype: torch.dtype) -> Callable[..., Any]:
    from specquant.kernels.triton_ops.w4_fragment import prepare_forward

    return prepare_forward(t, spec, wgmma=_hopper(t["qweight"].device))


register(
    "qlinear",
    KernelImpl(
        "triton-w4a16-frag",
        PRIORITY + 5,
        _per_layer("triton-w4a16-frag"),
        _frag_check,
        prepare=prepare_frag,
    ),
)


# W4A8 with int8 wgmma on repacked codes, tried before the canonical kernel on Hopper: it
# runs the token counts its table holds (w4a8_wgmma.W4A8_CONFIGS) and hands the rest over
def _w4a8_wgmma_check(ctx: KernelContext) -> tuple[bool, str]:
    ok, why = _qlinear_check("w4a8")(ctx)
    if not ok:
        return ok, why
    extra = dict(ctx.extra)
    spec = extra["spec"]
    if spec.group_size != -1 and (not spec.two_level or spec.group_size % 128):
        return False, f"per channel or two-level groups of 128k, not {spec.name}"
    if not _hopper(ctx.device):
        return False, "needs wgmma (Hopper, compute capability 9.x)"
    why = _fragment_reason(extra)
    if why is not None:
        return False, why
    return True, (
        "Gluon W4A8 int8 wgmma on repacked codes for the tuned M buckets "
        "(w4a8_wgmma.W4A8_CONFIGS; other token counts: the canonical kernel)"
    )


def prepare_w4a8_wgmma(t: dict[str, torch.Tensor], spec: Any, dtype: torch.dtype) -> Any:
    from specquant.kernels.triton_ops.w4a8_wgmma import W4A8Forward

    return W4A8Forward.prepare(t)


_W4A8_WGMMA = KernelImpl(
    "triton-w4a8-wgmma", PRIORITY + 5, _per_layer("triton-w4a8-wgmma"), _w4a8_wgmma_check,
    prepare=prepare_w4a8_wgmma,
)  # fmt: skip
register("qlinear", _W4A8_WGMMA)


# ----------------------------------------------------------------- activation quantization
def _quant_check(ctx: KernelContext) -> tuple[bool, str]:
    kind = dict(ctx.extra).get("kind")
    if kind not in ("int8", "fp8"):
        return False, f"quantizes to int8 or fp8, not {kind!r}"
    why = _common_reason(ctx)
    if why is None and kind == "fp8":
        why = _fp8_reason(ctx.device)
    if why is not None:
        return False, why
    return True, f"Triton per-token {kind} quantization"


def act_quant_triton(x: torch.Tensor, kind: str) -> Any:
    from specquant.kernels.triton_ops.act_quant import quantize_per_token

    return quantize_per_token(x, kind)


def rmsnorm_quant_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, kind: str) -> Any:
    from specquant.kernels.triton_ops.act_quant import rmsnorm_quant

    return rmsnorm_quant(x, weight, eps, kind)


register("act_quant", KernelImpl("triton", PRIORITY, act_quant_triton, _quant_check))
register("rmsnorm_quant", KernelImpl("triton", PRIORITY, rmsnorm_quant_triton, _quant_check))


_silu_check = _needs_triton("Triton fused silu(gate) * up")


_norm_check = _needs_triton("Triton RMSNorm in one kernel")


def rmsnorm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, mma_order: bool = False
) -> torch.Tensor:
    from specquant.kernels.reference import rmsnorm_mma_reference, rmsnorm_reference
    from specquant.kernels.triton_ops.act_quant import MAX_ROW, rmsnorm

    if x.shape[-1] > MAX_ROW or weight.dtype != x.dtype:  # torch's ops handle these
        return (rmsnorm_mma_reference if mma_order else rmsnorm_reference)(x, weight, eps)
    return rmsnorm(x, weight, eps, mma_order=mma_order)


def silu_mul_triton(h: torch.Tensor, mma_order: bool = False) -> torch.Tensor:
    from specquant.kernels.reference import silu_mul_mma_reference, silu_mul_reference
    from specquant.kernels.triton_ops.act_quant import MAX_ROW, silu_mul

    if h.shape[-1] // 2 > MAX_ROW:  # one row lives in registers: wider MLPs take torch's ops
        return (silu_mul_mma_reference if mma_order else silu_mul_reference)(h)
    return silu_mul(h, mma_order=mma_order)


def silu_mul_quant_triton(h: torch.Tensor, kind: str) -> Any:
    from specquant.kernels.reference import silu_mul_quant_reference
    from specquant.kernels.triton_ops.act_quant import MAX_ROW, silu_mul_quant

    if h.shape[-1] // 2 > MAX_ROW:
        return silu_mul_quant_reference(h, kind)
    return silu_mul_quant(h, kind)


register("silu_mul", KernelImpl("triton", PRIORITY, silu_mul_triton, _silu_check))
register("rmsnorm", KernelImpl("triton", PRIORITY, rmsnorm_triton, _norm_check))


# the same kernels, writing the W4A16 wgmma kernel's K order
register("rmsnorm_mma", KernelImpl("triton", PRIORITY, partial(rmsnorm_triton, mma_order=True),
                                   _norm_check))  # fmt: skip
register("silu_mul_mma", KernelImpl("triton", PRIORITY, partial(silu_mul_triton, mma_order=True),
                                    _silu_check))  # fmt: skip
register("silu_mul_quant", KernelImpl("triton", PRIORITY, silu_mul_quant_triton, _quant_check))


def rope_triton(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    from specquant.kernels.triton_ops.rope import rope_qk

    return rope_qk(q, k, cos, sin)


register("rope", KernelImpl("triton", PRIORITY, rope_triton,
                           _needs_triton("Triton: q and k rotated in one kernel")))  # fmt: skip


def decode_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: torch.Tensor, window: int | None
) -> torch.Tensor:
    from specquant.kernels.builtin import decode_attention_reference
    from specquant.kernels.triton_ops.decode_attention import decode_attention, unsupported

    if unsupported(q, k, v):  # e.g. a head size that is not a power of two: masked SDPA
        return decode_attention_reference(q, k, v, length, window)
    return decode_attention(q, k, v, length, window)


register(
    "decode_attention",
    KernelImpl(
        "triton",
        PRIORITY,
        decode_attention_triton,
        _needs_triton("Triton split-K decoding attention, the live length read on the device"),
    ),
)


def block_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    from specquant.kernels.builtin import attention_sdpa
    from specquant.kernels.triton_ops.block_attention import block_attention, unsupported

    if bias is None or unsupported(q, k, v, bias):  # e.g. an odd head size: masked SDPA
        return attention_sdpa(q, k, v, bias)
    return block_attention(q, k, v, bias)


register(
    "block_attention",
    KernelImpl(
        "triton",
        PRIORITY,
        block_attention_triton,
        _needs_triton("Triton split-K attention of a block's tokens under its mask"),
    ),
)
