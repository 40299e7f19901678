"""SmoothQuant: exact in full precision, migrates activation outliers into the weights, and
lowers W8A8 error on a model with outlier channels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import make_hf_model, run_logits
from specquant.io.loader import load_checkpoint
from specquant.models.llama import LlamaModel
from specquant.quant.model import quantize_model
from specquant.quant.smooth import activation_absmax, smooth_model_
from specquant.quant.spec import get_format

CPU = torch.device("cpu")
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-gqa": ("llama", {}),
    "llama-gqa4-bias": (
        "llama",
        {"num_attention_heads": 8, "num_key_value_heads": 2, "attention_bias": True},
    ),
    "qwen2-bias": ("qwen2", {"num_key_value_heads": 1}),
}
CALIB = torch.randint(0, 160, (8, 32), generator=torch.Generator().manual_seed(0))
TEST = torch.randint(0, 160, (64,), generator=torch.Generator().manual_seed(1))


def _load(path: Path) -> LlamaModel:
    return load_checkpoint(path, CPU, torch.float32, with_tokenizer=False).model


@pytest.mark.parametrize("case", list(CASES))
def test_smoothing_keeps_full_precision_outputs(case: str, tmp_path: Path) -> None:
    kind, kw = CASES[case]
    make_hf_model(kind, seed=21, **kw).save_pretrained(tmp_path)
    model = _load(tmp_path)
    with torch.no_grad():
        ref = run_logits(model, TEST)
        norm_before = model.layers[0].input_layernorm.weight.clone()
        report = smooth_model_(model, CALIB, alpha=0.5)
        got = run_logits(model, TEST)
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-5, case
    assert not torch.allclose(model.layers[0].input_layernorm.weight, norm_before)
    names = ("self_attn.qkv_proj", "mlp.gate_up_proj", "self_attn.o_proj", "mlp.down_proj")
    assert sorted(report) == sorted(f"layers.{i}.{n}" for i in range(2) for n in names)


def _outlier_model(path: Path) -> LlamaModel:
    """Two input channels 30x larger than the rest in every qkv / gate_up input."""
    model = _load(path)
    with torch.no_grad():
        for layer in model.layers:
            layer.input_layernorm.weight[[5, 77]] *= 30
            layer.post_attention_layernorm.weight[[5, 77]] *= 30
    return model


def _spread(a: torch.Tensor) -> float:
    return float(a.max() / a.median())


def test_smoothing_migrates_outliers_and_lowers_w8a8_error(tmp_path: Path) -> None:
    make_hf_model("llama", seed=5, hidden_size=128, intermediate_size=256).save_pretrained(tmp_path)
    with torch.no_grad():
        ref = run_logits(_outlier_model(tmp_path), TEST)
        before = activation_absmax(_outlier_model(tmp_path), TEST[None])
        smoothed = _outlier_model(tmp_path)
        report = smooth_model_(smoothed, CALIB)
        after = activation_absmax(smoothed, TEST[None])  # held-out tokens, smoothed model
        for name in ("layers.0.self_attn.qkv_proj", "layers.1.mlp.gate_up_proj"):
            assert _spread(after[name]) < 0.3 * _spread(before[name]), name
            assert report[name] > 3.0
        errors = {}
        for smooth in (False, True):
            model = _outlier_model(tmp_path)
            if smooth:
                smooth_model_(model, CALIB)
            quantize_model(model, get_format("w8a8"))
            errors[smooth] = float((run_logits(model, TEST) - ref).norm() / ref.norm())
    assert errors[True] < 0.6 * errors[False], errors


def test_bad_smoothing_inputs_are_named(tmp_path: Path) -> None:
    make_hf_model("llama", seed=22).save_pretrained(tmp_path)
    model = _load(tmp_path)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got 1.5"):
        smooth_model_(model, CALIB, alpha=1.5)
    with pytest.raises(ValueError, match=r"non-empty \[B, T\] tensor, got \(32,\)"):
        smooth_model_(model, CALIB[0])
    with pytest.raises(ValueError, match=r"integer ids, got torch\.float32"):
        smooth_model_(model, CALIB.float())
    with pytest.raises(ValueError, match=r"in \[0, 160\), got \[0, 160\]"):
        smooth_model_(model, torch.tensor([[0, 160]]))
    quantize_model(model, get_format("w8a8"))
    with pytest.raises(ValueError, match=r"'layers\.0\.self_attn\.qkv_proj' is already quantized"):
        smooth_model_(model, CALIB)
