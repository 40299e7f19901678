"""The "rope" op's Triton kernel (kernels/triton_ops/rope.py) against its reference
(layers/rope.rope_qk_reference): on the CPU under TRITON_INTERPRET=1 for small shapes (a
subprocess, since the variable is read when Triton is imported), on the GPU for Llama-3's
head layout. The kernel rounds where the reference's eager ops round, so the two agree to
within a step of the activation dtype (the compiler may fuse a product into its sum)."""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import run_interpreted


def _case(b: int, hq: int, hk: int, t: int, d: int, dtype: torch.dtype, device: str) -> str:
    """Run the kernel on q, k as the model hands them over (views of one qkv row block) and
    compare: "" when it matches, else what differs."""
    from specquant.kernels.triton_ops.rope import rope_qk
    from specquant.layers.rope import rope_qk_reference

    gen = torch.Generator(device=device).manual_seed(b * 100 + t)
    qkv = torch.randn(b, t, (hq + 2 * hk) * d, generator=gen, device=device).to(dtype)
    q, k, _ = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    q = q.view(b, t, hq, d).transpose(1, 2)
    k = k.view(b, t, hk, d).transpose(1, 2)
    angles = torch.rand(t, d // 2, generator=gen, device=device) * 6.3
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    got = rope_qk(q, k, cos, sin)
    want = rope_qk_reference(q, k, cos, sin)
    for g, w, name in zip(got, want, "qk", strict=True):
        if g.shape != w.shape or not g.is_contiguous():
            return f"{name}: shape {tuple(g.shape)} contiguous {g.is_contiguous()}"
        # The kernel rounds each product as the reference does, but the GPU compiler may
        # contract a product into the sum (one rounding less): within a step of the dtype.
        # The interpreter truncates fp32 -> bf16 (the GPU rounds to nearest): a few steps.
        tol = {torch.float32: 1e-6, torch.float16: 2**-7, torch.bfloat16: 2**-5}[dtype]
        if dtype == torch.bfloat16 and device == "cpu":
            tol = 2**-4
        same = torch.allclose(g.float(), w.float(), rtol=tol, atol=tol)
        if not same:
            return f"{name}: max |diff| {float((g.float() - w.float()).abs().max()):.3g}"
    return ""


INTERPRET_CASES = [
    (1, 4, 2, 3, 8, torch.float32),
    (2, 2, 2, 1, 16, torch.float16),
    (1, 3, 1, 2, 6, torch.bfloat16),  # D / 2 = 3: a masked block
]


def test_rope_kernel_interpreted_on_the_cpu() -> None:
    lines = run_interpreted(__file__)
    assert lines == ["ok"] * len(INTERPRET_CASES), lines


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rope_kernel_on_the_gpu(dtype: torch.dtype) -> None:
    for b, t in ((1, 1), (1, 7), (2, 64)):
        assert _case(b, 32, 8, t, 128, dtype, "cuda") == "", (b, t, dtype)


if __name__ == "__main__" and sys.argv[1:] == ["--interpret"]:
    for case in INTERPRET_CASES:
        print(_case(*case, "cpu") or "ok")
