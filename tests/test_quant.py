"""Quantization formats: packing, RTN round trips, reference matmuls, bad specs, and
lossless speculative decoding on a quantized target."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import make_hf_model
from specquant.config import EngineConfig, GenerationConfig, SpecConfig
from specquant.engine.generator import Generator
from specquant.io.loader import load_checkpoint
from specquant.kernels.reference import qlinear_reference
from specquant.quant.model import quantize_model
from specquant.quant.pack import dequantize, pack_int4, unpack_int4
from specquant.quant.rtn import quantize_rtn, roundtrip_error
from specquant.quant.spec import FORMATS, QuantSpec, get_format
from specquant.spec.factory import build_generator

CPU = torch.device("cpu")


def test_int4_pack_round_trip() -> None:
    codes = torch.randint(0, 16, (5, 18), generator=torch.Generator().manual_seed(0))
    packed = pack_int4(codes)
    assert packed.shape == (5, 9) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed).long(), codes)
    with pytest.raises(ValueError, match="even K"):
        pack_int4(codes[:, :3])


@pytest.mark.parametrize("name", list(FORMATS))
def test_rtn_round_trip_and_reference_matmul(name: str) -> None:
    spec = get_format(name)
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(24, 256, generator=gen) * 0.05
    t = quantize_rtn(w, spec)
    err = roundtrip_error(w, t, spec)
    bound = {8: 0.02, 4: 0.2}[spec.weight_bits] if spec.weight_type == "int" else 0.06
    assert err < bound, (name, err)
    x = torch.randn(3, 256, generator=gen)
    got = qlinear_reference(x, t, None, spec)
    # independent reference: dequantized weights (and fake-quantized activations)
    xr = x
    if spec.activations == "int8":
        s = x.abs().amax(-1, keepdim=True) / 127
        xr = (x / s).round().clamp(-127, 127) * s
    elif spec.activations == "fp8":
        s = x.abs().amax(-1, keepdim=True) / 448
        xr = (x / s).to(torch.float8_e4m3fn).float() * s
    want = xr.double() @ dequantize(t, spec).double().T
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-4), name


def test_group_quantization_protects_small_groups() -> None:
    """With one large group per row, per-channel scales crush the small group; g128 doesn't."""
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(2)) * 0.02
    w[:, :128] *= 20
    errors = {}
    for name in ("w4a16", "w4a16-g128"):
        spec = get_format(name)
        deq = dequantize(quantize_rtn(w, spec), spec)
        errors[name] = float((deq[:, 128:] - w[:, 128:]).norm() / w[:, 128:].norm())
    assert errors["w4a16-g128"] < 0.2 * errors["w4a16"], errors


def test_bad_specs_are_named() -> None:
    with pytest.raises(ValueError, match="unsupported weight bit width 3; supported: 4, 8"):
        QuantSpec("w3", 3)
    with pytest.raises(
        ValueError, match="group size 128 does not divide the input dimension K=200"
    ):
        quantize_rtn(torch.randn(4, 200), get_format("w4a16-g128"))
    with pytest.raises(ValueError, match="unknown quantization format 'w2'"):
        get_format("w2")
    with pytest.raises(ValueError, match="unknown quantization format 'w8a8-g64'"):
        get_format("w8a8-g64")  # only the grouped formats take another group size
    g64 = get_format("w4a8-g64")
    assert (g64.group_size, g64.two_level, g64.activations) == (64, True, "int8")
    assert not get_format("w4a16-g32-asym").symmetric


@pytest.mark.parametrize("name", ["w8a8", "w4a16-g128", "w4a8-g128", "fp8"])
def test_speculative_decoding_on_quantized_target_is_lossless(name: str, tmp_path: Path) -> None:
    make_hf_model("llama", seed=51, hidden_size=128, intermediate_size=256).save_pretrained(
        tmp_path
    )

    def quantized():  # type: ignore[no-untyped-def]
        loaded = load_checkpoint(tmp_path, CPU, torch.float32, with_tokenizer=False)
        report = quantize_model(loaded.model, get_format(name))
        assert len(report) == 2 * 4 and all(e < 0.2 for e in report.values())
        return loaded

    engine = EngineConfig(device="cpu", dtype="float32", max_seq_len=256)
    ar = Generator(quantized(), engine)
    cfg = GenerationConfig(max_new_tokens=30, ignore_eos=True)
    want = ar.generate([7, 3, 9, 1], generation=cfg).token_ids
    for spec in (
        SpecConfig(method="eagle2", depth=3, tree_topk=4, tree_size=10),
        SpecConfig(method="sps", draft="random", draft_length=4),
        SpecConfig(
            method="hierspec", min_draft_length=3, hier_depth=2, hier_topk=3, hier_tree_size=6
        ),
    ):
        gen = build_generator(quantized(), engine, spec)
        assert gen.generate([7, 3, 9, 1], generation=cfg).token_ids == want, (name, spec.method)


@pytest.mark.parametrize(
    "name", ["w4a16", "w4a16-g128", "w4a16-g128-asym", "w8a8", "w4a8", "w4a8-g128", "fp8"]
)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_with_outlier_inputs(name: str, act_order: bool) -> None:
    """Real activations are correlated across channels (and have outlier channels); GPTQ
    uses those correlations, so its held-out output error is below RTN's."""
    from specquant.quant.gptq import quantize_gptq

    gen = torch.Generator().manual_seed(3)
    spec = get_format(name)
    w = torch.randn(64, 256, generator=gen) * 0.05
    mix = torch.randn(32, 256, generator=gen)

    def inputs(rows: int) -> torch.Tensor:
        x = torch.randn(rows, 32, generator=gen) @ mix + 0.1 * torch.randn(rows, 256, generator=gen)
        x[:, :8] *= 25  # outlier channels
        return x

    x, x_test = inputs(2048), inputs(512)

    def out_err(t: dict[str, torch.Tensor]) -> float:
        deq = dequantize(t, spec)
        return float((x_test @ (deq - w).T).norm() / (x_test @ w.T).norm())

    rtn = out_err(quantize_rtn(w, spec))
    gptq = out_err(quantize_gptq(w, x, spec, act_order=act_order))
    assert gptq < 0.8 * rtn, (name, act_order, gptq, rtn)


def test_gptq_keeps_rtns_grid() -> None:
    """GPTQ only chooses codes: scales, zero points and two-level scales are RTN's."""
    from specquant.quant.gptq import quantize_gptq

    gen = torch.Generator().manual_seed(5)
    w, x = torch.randn(16, 128, generator=gen), torch.randn(64, 128, generator=gen)
    for name in ("w4a16-g128-asym", "w4a8-g128", "fp8"):
        spec = get_format(name)
        rtn, gptq = quantize_rtn(w, spec), quantize_gptq(w, x, spec)
        assert rtn.keys() == gptq.keys(), name
        for key in rtn:
            assert rtn[key].shape == gptq[key].shape and rtn[key].dtype == gptq[key].dtype
            if key != "qweight":
                assert torch.equal(rtn[key], gptq[key]), (name, key)


def test_model_level_gptq_beats_rtn_on_held_out_tokens(tmp_path: Path) -> None:
    """Sequential GPTQ over a whole (tiny) model: 4-bit logits closer to the dense model's."""
    from conftest import run_logits

    make_hf_model(
        "llama", seed=61, hidden_size=128, intermediate_size=256, num_hidden_layers=3
    ).save_pretrained(tmp_path)

    def load():  # type: ignore[no-untyped-def]
        return load_checkpoint(tmp_path, CPU, torch.float32, with_tokenizer=False)

    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, 160, (16, 64), generator=gen)
    test = torch.randint(0, 160, (48,), generator=gen)
    with torch.no_grad():
        ref = run_logits(load().model, test)
    for name in ("w4a16", "w4a16-g128"):
        errors = {}
        for method in ("rtn", "gptq"):
            model = load().model
            report = quantize_model(model, get_format(name), method, calib_tokens=calib)
            assert len(report) == 3 * 4
            with torch.no_grad():
                errors[method] = float((run_logits(model, test) - ref).norm() / ref.norm())
        assert errors["gptq"] < 0.9 * errors["rtn"], (name, errors)
    with pytest.raises(ValueError, match="GPTQ needs calibration tokens"):
        quantize_model(load().model, get_format("w4a16"), "gptq")


def test_tensors_contradicting_the_format_are_rejected() -> None:
    from specquant.layers.linear import QLinear

    layer = QLinear(64, 8)
    t = quantize_rtn(torch.randn(8, 64), get_format("w4a16"))
    with pytest.raises(ValueError, match=r"the format needs torch\.uint8"):
        layer.load_quantized_(get_format("w4a16"), {**t, "qweight": t["qweight"][:, :16]})
    with pytest.raises(ValueError, match=r"missing \['zeros'\]"):
        sym = quantize_rtn(torch.randn(8, 256), get_format("w4a16-g128"))
        QLinear(256, 8).load_quantized_(get_format("w4a16-g128-asym"), sym)
    with pytest.raises(ValueError, match="does not divide"):
        layer.load_quantized_(get_format("w4a16-g128"), t)
    with pytest.raises(ValueError, match="not a permutation"):
        layer.load_quantized_(get_format("w4a16"), {**t, "perm": torch.zeros(64, dtype=torch.long)})


def test_permuted_input_columns() -> None:
    """A layer whose K axis is stored permuted (act-order imports) equals the unpermuted one."""
    from specquant.layers.linear import QLinear

    spec = get_format("w4a16")
    w, x = torch.randn(8, 64), torch.randn(3, 64)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    plain, permuted = QLinear(64, 8), QLinear(64, 8)
    plain.load_quantized_(spec, quantize_rtn(w, spec))
    permuted.load_quantized_(spec, {**quantize_rtn(w[:, perm], spec), "perm": perm})
    torch.testing.assert_close(plain(x), permuted(x), rtol=1e-5, atol=1e-5)
