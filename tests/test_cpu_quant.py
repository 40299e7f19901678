"""The CPU's prepared quantized linears equal qlinear_reference bit for bit, for every
format, with and without pre-quantized activations, bias, and odd or empty shapes."""

from __future__ import annotations

import pytest
import torch

from specquant.kernels.cpu_quant import prepare_cpu
from specquant.kernels.reference import qlinear_reference, quantize_per_token
from specquant.kernels.registry import KernelContext, select
from specquant.layers.linear import QLinear
from specquant.quant.rtn import quantize_rtn
from specquant.quant.spec import FORMATS, QuantSpec, get_format

ASYM_W4A8 = QuantSpec("w4a8-g64-asym", 4, group_size=64, symmetric=False, activations="int8")
SPECS = {
    **FORMATS,
    "w4a16-asym": QuantSpec("w4a16-asym", 4, symmetric=False),
    "w4a8-g64-asym": ASYM_W4A8,
}


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepared_equals_reference(name: str, dtype: torch.dtype) -> None:
    spec = SPECS[name]
    gen = torch.Generator().manual_seed(len(name))
    for n, k in [(40, 256), (33, 384)]:
        if spec.group_size != -1 and k % spec.group_size:
            continue
        w = torch.randn(n, k, generator=gen) * 0.05
        w[:, :8] *= 6  # outlier columns, so group scales differ
        t = quantize_rtn(w, spec)
        fn = prepare_cpu(t, spec, dtype)
        bias = (torch.randn(n, generator=gen) * 0.1).to(dtype)
        for m in (0, 1, 5):
            x = (torch.randn(2, m, k, generator=gen) * 2).to(dtype)
            for b in (None, bias):
                want = qlinear_reference(x, t, b, spec)
                got = fn(x, t, b, spec)
                assert got.dtype == want.dtype and got.shape == want.shape
                assert torch.equal(got, want), (name, n, k, m)
            if spec.activations != "none":
                qa = quantize_per_token(x, spec.activations)
                assert torch.equal(fn(qa, t, None, spec), qlinear_reference(qa, t, None, spec))


def test_cpu_layers_use_the_prepared_kernel_unless_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = get_format("w8a8")
    ctx = KernelContext(torch.device("cpu"), torch.float32, (("spec", spec),))
    assert select("qlinear", ctx).name == "cpu-prepared"
    layer = QLinear(64, 16)
    layer.load_quantized_(spec, quantize_rtn(torch.randn(16, 64), spec))
    assert layer.kernel_name == "cpu-prepared:w8a8"
    layer.prepare(qlinear_override="reference")  # an explicit choice for quantized layers
    assert layer.kernel_name == "reference:w8a8"
    layer.prepare(override="torch")  # a dense kernel's name leaves quantized layers alone
    assert layer.kernel_name == "cpu-prepared:w8a8"
    layer.prepare()
    assert layer.kernel_name == "cpu-prepared:w8a8"
    monkeypatch.setenv("SPECQUANT_FORCE_REFERENCE", "1")
    layer.prepare()
    assert layer.kernel_name == "reference:w8a8"


def test_a_layer_moved_without_prepare_falls_back_to_the_reference() -> None:
    """The prepared weights live on the CPU; a layer moved elsewhere without QLinear.prepare
    (e.g. `.to(...)` by hand) runs the reference on its current tensors instead of failing."""
    spec = get_format("w8a8")  # (a float32 matmul would return a meta tensor anyway)
    layer = QLinear(256, 16)
    layer.load_quantized_(spec, quantize_rtn(torch.randn(16, 256), spec))
    assert layer.kernel_name == "cpu-prepared:w8a8"
    layer.to("meta")
    out = layer(torch.randn(3, 256, device="meta"))
    assert out.device.type == "meta" and out.shape == (3, 16)


@pytest.mark.parametrize("name", ["w4a16-g128", "fp8", "w8a8"])
def test_layers_too_large_to_decode_stay_on_the_reference(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Weight-only layers whose float32 copy, and fp8 layers whose float64 copy, would
    exceed MAX_DECODED_BYTES are refused with the reason, so the registry picks the
    reference (which decodes per call); int8 codes take one byte per weight and are always
    kept."""
    from specquant.kernels import cpu_quant

    spec = get_format(name)
    copy = 8 if spec.activations == "fp8" else 4  # bytes per weight of the kept copy
    monkeypatch.setattr(cpu_quant, "MAX_DECODED_BYTES", 32 * 256 * copy - 1)
    ctx = KernelContext(torch.device("cpu"), torch.float32, (("spec", spec), ("shape", (32, 256))))
    ok, why = cpu_quant._check(ctx)
    assert ok == (name == "w8a8"), why
    if not ok:
        kind = "float64" if copy == 8 else "float32"
        assert f"a {kind} copy of this [32, 256] weight would take 0 MiB, over the 0 MiB" in why
    if copy == 8:  # the float32 size fits: only counting 8 bytes refuses it
        monkeypatch.setattr(cpu_quant, "MAX_DECODED_BYTES", 32 * 256 * 4)
        assert not cpu_quant._check(ctx)[0]
    layer = QLinear(256, 32)
    layer.load_quantized_(spec, quantize_rtn(torch.randn(32, 256), spec))
    want = "cpu-prepared" if name == "w8a8" else "reference"
    assert layer.kernel_name == f"{want}:{name}"


def test_activations_of_the_wrong_kind_are_refused() -> None:
    spec = get_format("w8a8")
    t = quantize_rtn(torch.randn(16, 64), spec)
    fn = prepare_cpu(t, spec, torch.float32)
    with pytest.raises(ValueError, match="w8a8 takes int8 activations, got fp8"):
        fn(quantize_per_token(torch.randn(2, 64), "fp8"), t, None, spec)
