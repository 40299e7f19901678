"""The "decode_attention" op's Triton kernel (kernels/triton_ops/decode_attention.py) against
its reference (kernels/builtin.decode_attention_reference, masked SDPA): on the CPU under
TRITON_INTERPRET=1 for small shapes (a subprocess), on the GPU for Llama-3's head layout.
Both read the live length from a device tensor; lengths cover one key, a partial block,
several splits, the whole window, and a sliding window."""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import run_interpreted


def _case(hq: int, hk: int, w: int, d: int, length: int, window: int | None, dtype: torch.dtype,
          device: str, tol: float) -> str:  # fmt: skip
    """ "" when the kernel matches the reference within `tol`, else the largest difference.
    K/V are a window of a longer cache, as the graphed step hands them over."""
    from specquant.kernels.builtin import decode_attention_reference
    from specquant.kernels.triton_ops.decode_attention import decode_attention

    gen = torch.Generator(device=device).manual_seed(w + length)
    q = torch.randn(1, hq, 1, d, generator=gen, device=device).to(dtype)
    cache = torch.randn(2, 1, hk, w + 16, d, generator=gen, device=device).to(dtype)
    k, v = cache[0, :, :, :w], cache[1, :, :, :w]
    n = torch.tensor([length], device=device)
    got = decode_attention(q, k, v, n, window).float()
    want = decode_attention_reference(q, k, v, n, window).float()
    err = float((got - want).abs().max())
    return "" if err <= tol else f"max |diff| {err:.3g} (hq {hq} hk {hk} w {w} length {length})"


INTERPRET_CASES = [
    (4, 2, 40, 16, 1, None, torch.float32, 1e-5),
    (4, 2, 40, 16, 37, None, torch.float32, 1e-5),
    (2, 2, 100, 16, 100, None, torch.float16, 2e-3),
    (8, 2, 70, 16, 65, 20, torch.float32, 1e-5),  # sliding window
]


def test_decode_attention_interpreted_on_the_cpu() -> None:
    lines = run_interpreted(__file__)
    assert lines == ["ok"] * len(INTERPRET_CASES), lines


def test_shapes_the_kernel_cannot_take_are_named() -> None:
    """The launcher names what it cannot take (the registered op then runs the reference)."""
    from specquant.kernels.triton_ops.decode_attention import decode_attention, unsupported

    k = torch.zeros(1, 2, 64, 80)
    assert unsupported(torch.zeros(1, 4, 1, 80), k, k) == (
        "a power-of-two head size of at least 16, not 80"
    )
    k = torch.zeros(1, 3, 64, 64)
    assert "query heads (4) a multiple of the kv heads (3)" in unsupported(
        torch.zeros(1, 4, 1, 64), k, k
    )
    assert unsupported(torch.zeros(1, 3, 2, 64), k, k) == "one query token, not 2"
    with pytest.raises(ValueError, match="one query token, not 2"):
        decode_attention(torch.zeros(1, 3, 2, 64), k, k, torch.tensor([3]))


@pytest.mark.cuda
@pytest.mark.parametrize(("dtype", "tol"), [(torch.bfloat16, 1.6e-2), (torch.float16, 2e-3)])
def test_decode_attention_on_the_gpu(dtype: torch.dtype, tol: float) -> None:
    for w, length, window in ((256, 1, None), (256, 200, None), (1024, 1024, None),
                              (4096, 3001, None), (512, 400, 64)):  # fmt: skip
        assert _case(32, 8, w, 128, length, window, dtype, "cuda", tol) == ""


if __name__ == "__main__" and sys.argv[1:] == ["--interpret"]:
    for case in INTERPRET_CASES:
        print(_case(*case[:6], case[6], "cpu", case[7]) or "ok")
