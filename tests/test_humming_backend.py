"""The opt-in humming-kernels W4A16 backend: why it is rejected where it cannot run, how a
prepared kernel reaches QLinear, and (on a GPU with humming installed) its results."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
import torch

from specquant.kernels import registry
from specquant.kernels.reference import qlinear_reference
from specquant.kernels.registry import KernelContext, KernelImpl, explain, select
from specquant.layers.linear import QLinear
from specquant.quant.rtn import quantize_rtn
from specquant.quant.spec import get_format


def _ctx(name: str, device: str = "cuda", shape: tuple[int, int] = (64, 256)) -> KernelContext:
    spec = get_format(name)
    return KernelContext(torch.device(device), torch.bfloat16, (("spec", spec), ("shape", shape)))


def test_humming_is_opt_in_and_says_why_it_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    from specquant.kernels import humming_backend as hb

    rows = {name: (ok, why) for name, ok, why in explain("qlinear", _ctx("w4a16-g128", "cpu"))}
    assert "needs a CUDA device, not cpu" in rows["humming-w4a16"][1]
    names = [i.name for i in registry.implementations("qlinear")]
    # below the reference, which accepts everything: never picked unless asked for by name
    assert names.index("reference") < names.index("humming-w4a16")
    assert "W4A16 formats only, not w8a8" in hb._check(_ctx("w8a8"))[1]
    assert "symmetric int4 only" in hb._check(_ctx("w4a16-g128-asym"))[1]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    real_find = importlib.util.find_spec
    monkeypatch.setattr(
        hb.importlib.util, "find_spec", lambda n: None if n == "humming" else real_find(n)
    )
    assert "pip install humming-kernels" in hb._check(_ctx("w4a16-g128"))[1]
    monkeypatch.setattr(hb.importlib.util, "find_spec", lambda n: object())
    assert "not N=64, K=240" in hb._check(_ctx("w4a16", shape=(64, 240)))[1]
    assert "not N=333, K=256" in hb._check(_ctx("w4a16", shape=(333, 256)))[1]
    assert hb._check(_ctx("w4a16-g128"))[0]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert "compute capability >= 8.0" in hb._check(_ctx("w4a16-g128"))[1]


def test_qlinear_calls_what_prepare_returns(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel with per-layer state is built once from the canonical tensors, and the
    layer calls the function it returns."""
    seen: list[tuple[str, torch.dtype]] = []

    def prepare(t: dict[str, torch.Tensor], spec: Any, dtype: torch.dtype) -> Any:
        seen.append((spec.name, dtype))
        doubled = {k: v.clone() for k, v in t.items()}
        return lambda x, _t, bias, s: 2 * qlinear_reference(x, doubled, bias, s)

    impl = KernelImpl("test-prepared", 10**6, qlinear_reference, lambda ctx: (True, "test"),
                      prepare=prepare)  # fmt: skip
    monkeypatch.setitem(registry._REGISTRY, "qlinear", [impl, *registry.implementations("qlinear")])
    spec = get_format("w4a16-g128")
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(0)) * 0.05
    layer = QLinear(256, 48)
    layer.load_quantized_(spec, quantize_rtn(w, spec), torch.float32)
    assert seen == [("w4a16-g128", torch.float32)]
    assert layer.kernel_name == "test-prepared:w4a16-g128"
    x = torch.randn(3, 256)
    want = 2 * qlinear_reference(x, quantize_rtn(w, spec), None, spec)
    torch.testing.assert_close(layer(x), want)
    assert select("qlinear", _ctx("w4a16-g128", "cpu")).name == "test-prepared"


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["w4a16-g128", "w4a16"])
def test_humming_matches_the_reference_on_gpu(name: str) -> None:
    pytest.importorskip("humming")
    spec = get_format(name)
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(384, 512, generator=gen) * 0.05
    t = quantize_rtn(w, spec)
    layer = QLinear(512, 384, bias=True)
    with torch.no_grad():
        layer.bias.copy_(torch.randn(384, generator=gen) * 0.1)
    layer.load_quantized_(spec, {k: v.cuda() for k, v in t.items()}, torch.bfloat16,
                          override="humming-w4a16")  # fmt: skip
    assert layer.kernel_name == f"humming-w4a16:{name}"
    bias = layer.bias.detach().to(torch.bfloat16)
    layer.bias.data = bias.cuda()
    for m in (1, 7, 64):
        x = torch.randn(m, 512, generator=gen).to(torch.bfloat16)
        want = qlinear_reference(x, t, bias, spec).float()
        got = layer(x.cuda()).float().cpu()
        # scales rounded to bf16 (humming keeps them in the activation dtype): ~2^-8 relative
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))
