"""Registers the built-in implementations (references, torch SDPA, OpenBLAS linear)."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from specquant.kernels.reference import (
    attention_reference,
    masked_scores,
    qlinear_reference,
    quantize_per_token,
    rmsnorm_mma_reference,
    rmsnorm_quant_reference,
    rmsnorm_reference,
    silu_mul_mma_reference,
    silu_mul_quant_reference,
    silu_mul_reference,
)
from specquant.kernels.registry import KernelContext, KernelImpl, register
from specquant.layers.rope import rope_qk_reference


def _always(ctx: KernelContext) -> tuple[bool, str]:
    return True, "pure PyTorch runs everywhere"


# NOTE: torch's cuDNN SDPA backend builds a plan per new key length: with the cache growing
# by one token per step that cost 1.5 ms of CPU time per call (bf16 SmolLM2 decoded 4x slower
# than it does without it on an H100). It is switched off process-wide on first CUDA use (so
# for other models in the same process too; README says so): a `sdpa_kernel` context per
# call costs ~0.15 ms itself.
_cudnn_sdp_off = False


def attention_sdpa(
    q: torch.Tensor,  # [B, Hq, T, D]
    k: torch.Tensor,  # [B, Hkv, S, D]
    v: torch.Tensor,  # [B, Hkv, S, D]
    # [T, S] or per-sequence [B, 1, T, S], bool or additive float (0 / -inf), or None
    mask: torch.Tensor | None,
) -> torch.Tensor:
    global _cudnn_sdp_off
    if q.is_cuda and not _cudnn_sdp_off:
        torch.backends.cuda.enable_cudnn_sdp(False)
        _cudnn_sdp_off = True
    return _sdpa(q, k, v, mask)


def _fold_groups(
    q: torch.Tensor, hkv: int, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:  # q [B, Hkv, G*T, D], the mask's rows G times
    """GQA without copying K/V: query heads kv*G .. kv*G+G-1 share KV head kv, so fold them
    into the query-length axis and tile the mask's query rows G times (per-sequence masks of
    padded batches too: copying K/V per step would dominate batched decoding)."""
    b, hq, t, d = q.shape
    groups = hq // hkv
    if mask is not None and groups > 1:
        mask = mask.repeat(groups, 1) if mask.dim() == 2 else mask.repeat(1, 1, groups, 1)
    return q.reshape(b, hkv, groups * t, d), mask


def _sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    if q.shape[1] > k.shape[1]:
        folded, mask = _fold_groups(q, k.shape[1], mask)
        out = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask)
        return out.reshape(q.shape)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def decode_attention_reference(
    q: torch.Tensor,  # [B, Hq, 1, D]
    k: torch.Tensor,  # [B, Hkv, W, D]
    v: torch.Tensor,  # [B, Hkv, W, D]
    length: torch.Tensor,  # [1] on the device: keys 0 .. length - 1 are live
    window: int | None = None,  # sliding window, if any
) -> torch.Tensor:  # [B, Hq, 1, D]
    """One query token over a window of W cache slots whose live length is a device tensor
    (a CUDA-graphed decoding step): SDPA with the mask that length makes."""
    keys = torch.arange(k.shape[2], device=k.device)
    mask = keys < length
    if window is not None:
        mask = mask & (keys > length - 1 - window)
    return attention_sdpa(q, k, v, mask[None, :])


def _sdpa_ok(ctx: KernelContext) -> tuple[bool, str]:
    return True, "torch SDPA handles every device and dtype"


def attention_float64(
    q: torch.Tensor,  # [B, Hq, T, D]
    k: torch.Tensor,  # [B, Hkv, S, D]
    v: torch.Tensor,  # [B, Hkv, S, D]
    mask: torch.Tensor | None,  # [T, S] or [B, 1, T, S] bool or additive float, or None
) -> torch.Tensor:  # [B, Hq, T, D] in q's dtype
    """Softmax attention computed in float64 and rounded to q's dtype once.

    Why: float32 SDPA over one query (a decoding step) and over a block of queries with a
    tree mask (verification) sums the same products in different orders, so a row's output
    can differ in its last bit. A model that quantizes activations per token turns such a
    bit, now and then, into a different int8 / fp8 code and a visibly different token, and
    greedy speculation would leave the autoregressive output (embedded SmolLM2 in W8A8:
    from the 40th token of one prompt). In float64 the order differences are about 1e-16
    relative, far below float32's rounding: a row rounds to the same float32 values however
    it was batched or masked unless one lands within that distance of a float32 rounding
    boundary (about 1e-9 per value; none in the tests' or benchmarks' runs), and such a value
    would still have to move an activation code to change anything."""
    folded, mask = _fold_groups(q, k.shape[1], mask)
    scores = torch.matmul(folded.double(), k.double().transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    scores = masked_scores(scores, mask)
    out = torch.matmul(scores.softmax(-1), v.double())
    return out.to(q.dtype).reshape(q.shape)


def _float64_ok(ctx: KernelContext) -> tuple[bool, str]:
    if ctx.device.type != "cpu":
        return False, f"float64 math is for the CPU, not {ctx.device.type}"
    if os.environ.get("SPECQUANT_KERNEL_ATTENTION") == "float64":
        return True, "named by SPECQUANT_KERNEL_ATTENTION"
    if not dict(ctx.extra).get("exact"):
        return False, (
            "only for a model that quantizes activations per token (asked with exact=True), "
            "where attention's last bits decide codes"
        )
    return True, "exact=True on the CPU: rows round the same however they are batched"


register(
    "attention",
    KernelImpl("reference", 0, attention_reference, _always, is_reference=True),
)
register("attention", KernelImpl("sdpa", 10, attention_sdpa, _sdpa_ok))
register("attention", KernelImpl("float64", 20, attention_float64, _float64_ok))
register(
    "decode_attention",
    KernelImpl("reference", 0, decode_attention_reference, _always, is_reference=True),
)
# a graphed block's tokens over a cache window under an additive [T, W] mask (engine/
# cuda_graph.py): on CUDA a split-K Triton kernel, here SDPA with that mask
register(
    "block_attention",
    KernelImpl("reference", 0, attention_sdpa, _always, is_reference=True),
)


# ------------------------------------------------------------------------------- linear
def linear_torch(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, w, b)


def linear_openblas(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x [1, K] @ w[N, K]^T through numpy's OpenBLAS sgemv (other shapes: torch).

    NOTE: an option for CPUs where torch's sgemv streams weights slowly (one earlier CI
    machine: 8 GB/s against OpenBLAS's 13); on the current ones torch with its spinning
    OpenMP threads is as fast at one row and faster at several, so this kernel runs only
    under OMP_WAIT_POLICY=PASSIVE. For several rows OpenBLAS's sgemm is up to 4x slower than
    torch's at 2-8 rows, so only one-row products take this path.
    """
    k = x.shape[-1]
    if x.requires_grad or w.requires_grad or not x.is_contiguous() or x.numel() != k:
        return F.linear(x, w, b)
    import numpy as np

    out = torch.from_numpy(np.matmul(x.reshape(-1, k).numpy(), w.numpy().T))
    out = out.view(*x.shape[:-1], w.shape[0])
    if b is not None:
        out += b
    return out


def _openblas_ok(ctx: KernelContext) -> tuple[bool, str]:
    if ctx.device.type != "cpu":
        return False, f"runs on the CPU only, not {ctx.device.type}"
    if ctx.dtype != torch.float32:
        return False, f"OpenBLAS sgemm needs float32, not {ctx.dtype}"
    try:
        import numpy  # noqa: F401
    except ImportError:
        return False, "numpy is not installed"
    import specquant

    if specquant.OMP_SPINNING:
        return False, (
            "needs OMP_WAIT_POLICY=PASSIVE set before torch starts (torch's spinning OpenMP "
            "threads would starve OpenBLAS); torch's matmul is faster with them anyway"
        )
    return True, "float32 on the CPU"


register("linear", KernelImpl("torch", 0, linear_torch, _always, is_reference=True))
register("linear", KernelImpl("cpu-openblas", 10, linear_openblas, _openblas_ok))

register("qlinear", KernelImpl("reference", 0, qlinear_reference, _always, is_reference=True))
register("act_quant", KernelImpl("reference", 0, quantize_per_token, _always, is_reference=True))
register(
    "rmsnorm_quant",
    KernelImpl("reference", 0, rmsnorm_quant_reference, _always, is_reference=True),
)
register("silu_mul", KernelImpl("reference", 0, silu_mul_reference, _always, is_reference=True))
register("rmsnorm", KernelImpl("reference", 0, rmsnorm_reference, _always, is_reference=True))
register("rope", KernelImpl("reference", 0, rope_qk_reference, _always, is_reference=True))
register(
    "rmsnorm_mma", KernelImpl("reference", 0, rmsnorm_mma_reference, _always, is_reference=True)
)
register(
    "silu_mul_mma", KernelImpl("reference", 0, silu_mul_mma_reference, _always, is_reference=True)
)
register(
    "silu_mul_quant",
    KernelImpl("reference", 0, silu_mul_quant_reference, _always, is_reference=True),
)
