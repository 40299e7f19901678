"""The "block_attention" op's Triton kernel (kernels/triton_ops/block_attention.py) against
its reference (SDPA under the same additive mask): on the CPU under TRITON_INTERPRET=1 for
small shapes (a subprocess), on the GPU for Llama-3's head layout. Masks as a graphed block
makes them: the committed prefix, a tree among the block's tokens, padding rows that see
only their own key, nothing past the block; blocks of two to 128 tokens, windows of one to
several splits and row blocks."""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import run_interpreted


def _bias(t: int, prefix: int, w: int, device: str, pad: int = 0) -> torch.Tensor:
    """[t, w] additive mask: keys [0, prefix) for every row, a random tree (each token sees
    itself and a random earlier subset) over [prefix, prefix + t - pad), nothing after; the
    last `pad` rows are padding that sees only its own key, as a graphed block pads."""
    allowed = torch.zeros(t, w, dtype=torch.bool)
    real = t - pad
    allowed[:real, :prefix] = True
    tree = torch.rand(real, real, generator=torch.Generator().manual_seed(t + w)) > 0.5
    allowed[:real, prefix : prefix + real] = tree.tril(-1) | torch.eye(real, dtype=torch.bool)
    rows = torch.arange(real, t)
    allowed[rows, prefix + rows] = True
    bias = torch.zeros(t, w).masked_fill(~allowed, float("-inf"))
    return bias.to(device)


def _case(hq: int, hk: int, t: int, prefix: int, w: int, d: int, dtype: torch.dtype,
          device: str, tol: float, pad: int = 0) -> str:  # fmt: skip
    """ "" when the kernel matches the reference within `tol`, else the largest difference.
    K/V are a window of a longer cache, as the graphed block hands them over."""
    from specquant.kernels.builtin import attention_sdpa
    from specquant.kernels.triton_ops.block_attention import block_attention

    gen = torch.Generator(device=device).manual_seed(w + t)
    q = torch.randn(1, hq, t, d, generator=gen, device=device).to(dtype)
    cache = torch.randn(2, 1, hk, w + 16, d, generator=gen, device=device).to(dtype)
    k, v = cache[0, :, :, :w], cache[1, :, :, :w]
    bias = _bias(t, prefix, w, device, pad).to(dtype)
    got = block_attention(q, k, v, bias).float()
    want = attention_sdpa(q.float(), k.float(), v.float(), bias.float())
    err = float((got - want).abs().max())
    return "" if err <= tol else f"max |diff| {err:.3g} (hq {hq} hk {hk} t {t} w {w})"


INTERPRET_CASES = [
    (4, 2, 2, 5, 40, 16, torch.float32, 1e-5, 0),
    (4, 2, 9, 30, 40, 16, torch.float32, 1e-5, 0),  # rows past one row block
    (2, 2, 3, 60, 100, 16, torch.float16, 2e-3, 0),
    (8, 2, 5, 0, 70, 16, torch.float32, 1e-5, 0),  # no prefix: the tree alone
    (4, 2, 8, 20, 40, 16, torch.float32, 1e-5, 3),  # 5 tokens padded to 8
]


def test_block_attention_interpreted_on_the_cpu() -> None:
    lines = run_interpreted(__file__)
    assert lines == ["ok"] * len(INTERPRET_CASES), lines


def test_shapes_the_kernel_cannot_take_are_named() -> None:
    """The launcher names what it cannot take (the registered op then runs SDPA)."""
    from specquant.kernels.triton_ops.block_attention import block_attention, unsupported

    q, k = torch.zeros(1, 4, 2, 64), torch.zeros(1, 2, 8, 64)
    assert unsupported(q, k, k, torch.zeros(2, 8)) == ""
    assert "power-of-two head size" in unsupported(torch.zeros(1, 4, 2, 80),
                                                   torch.zeros(1, 2, 8, 80),
                                                   torch.zeros(1, 2, 8, 80),
                                                   torch.zeros(2, 8))  # fmt: skip
    assert "additive float mask" in unsupported(q, k, k, torch.ones(2, 8, dtype=torch.bool))
    assert "additive float mask" in unsupported(q, k, k, None)
    with pytest.raises(ValueError, match=r"keys \(2, 8\) with unit stride, not \(2, 9\)"):
        block_attention(q, k, k, torch.zeros(2, 9))


@pytest.mark.cuda
@pytest.mark.parametrize(("dtype", "tol"), [(torch.bfloat16, 1.6e-2), (torch.float16, 2e-3)])
def test_block_attention_on_the_gpu(dtype: torch.dtype, tol: float) -> None:
    for t, prefix, w, pad in ((2, 200, 256, 0), (16, 700, 768, 0), (64, 900, 1024, 4),
                              (5, 3000, 4096, 0), (128, 100, 256, 68)):  # fmt: skip
        assert _case(32, 8, t, prefix, w, 128, dtype, "cuda", tol, pad) == ""


if __name__ == "__main__" and sys.argv[1:] == ["--interpret"]:
    for case in INTERPRET_CASES:
        print(_case(*case[:6], case[6], "cpu", case[7], case[8]) or "ok")
