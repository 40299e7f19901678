"""specquant's self-describing quantized checkpoints: save, reload (no flags), metadata,
unfused names, rotation state, and refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from conftest import make_hf_model, run_logits
from specquant.config import ModelConfig
from specquant.io.checkpoint import CheckpointError
from specquant.io.export import model_config_dict
from specquant.io.loader import load_checkpoint
from specquant.io.quant_checkpoint import REPORT_FILE, save_quantized
from specquant.quant.model import quantize_model
from specquant.quant.rotate import attach_rotation, get_rotation, rotate_model_
from specquant.quant.rtn import quantize_rtn
from specquant.quant.spec import get_format

CPU = torch.device("cpu")
TOKENS = torch.randint(0, 160, (20,), generator=torch.Generator().manual_seed(0))


def tiny(path: Path, **overrides: Any) -> Path:
    make_hf_model(
        "llama", seed=5, hidden_size=128, intermediate_size=256, **overrides
    ).save_pretrained(path)
    return path


def load(path: Path) -> Any:
    return load_checkpoint(path, CPU, torch.float32, with_tokenizer=False)


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return run_logits(model, TOKENS)


def stored(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    out = {}
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118
                t = f.get_tensor(name)
                out[name] = (t.dtype, tuple(t.shape))
    return out


@pytest.mark.parametrize("name", ["w4a16-g128", "w4a16-g128-asym", "w8a8", "w4a8-g128", "fp8"])
def test_round_trip_gives_identical_logits(tmp_path: Path, name: str) -> None:
    model = load(tiny(tmp_path / "dense")).model
    report = quantize_model(model, get_format(name))
    out = save_quantized(
        model, tmp_path / "q", method="rtn", report=report, dense_dtype=torch.float32
    )
    reloaded = load(out)
    assert torch.equal(logits(reloaded.model), logits(model))
    assert reloaded.model.layers[1].self_attn.qkv_proj.spec == get_format(name)
    config = json.loads((out / "config.json").read_text())
    qcfg = config["quantization_config"]
    assert qcfg["quant_method"] == "specquant" and qcfg["method"] == "rtn"
    assert qcfg["format"] == get_format(name).to_dict() and qcfg["rotation"] is False
    assert ModelConfig.from_hf(config) == model.config
    # canonical tensors under public unfused names, split along N
    tensors = stored(out)
    assert not any("qkv_proj" in n or "gate_up_proj" in n for n in tensors)
    n_q, k = 128, 128  # q_proj of this tiny model: [N=128, K=128]
    want_qweight = (n_q, k // 2) if get_format(name).weight_bits == 4 else (n_q, k)
    assert tensors["model.layers.0.self_attn.q_proj.qweight"][1] == want_qweight
    assert tensors["model.layers.0.self_attn.k_proj.scales"][1][0] == 64  # N of k_proj
    assert tensors["model.layers.0.self_attn.k_proj.scales"][0] != torch.bfloat16
    saved_report = json.loads((out / REPORT_FILE).read_text())
    assert saved_report["layers"] == report and len(report) == 2 * 4


def test_tied_head_and_dense_dtype(tmp_path: Path) -> None:
    model = load(tiny(tmp_path / "dense", tie_word_embeddings=True)).model
    report = quantize_model(model, get_format("w4a16-g128"))
    out = save_quantized(model, tmp_path / "q", method="rtn", report=report)  # bf16 dense
    tensors = stored(out)
    assert "lm_head.weight" not in tensors
    assert tensors["model.embed_tokens.weight"][0] == torch.bfloat16
    assert tensors["model.layers.0.mlp.up_proj.scales"][0] == torch.float32
    reloaded = load(out).model
    assert reloaded.lm_head.weight is reloaded.embed_tokens.weight
    dense = model.embed_tokens.weight
    assert torch.equal(reloaded.embed_tokens.weight, dense.to(torch.bfloat16).float())


def test_permuted_layers_round_trip(tmp_path: Path) -> None:
    """Act-order imports carry a shared input permutation through save and reload."""
    model = load(tiny(tmp_path / "dense")).model
    quantize_model(model, get_format("w4a16-g128"))
    spec = get_format("w4a16-g128")
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(1))
    w = torch.randn(128 + 64 + 64, 128, generator=torch.Generator().manual_seed(2)) * 0.05
    model.layers[0].self_attn.qkv_proj.load_quantized_(
        spec, {**quantize_rtn(w[:, perm], spec), "perm": perm}, torch.float32
    )
    out = save_quantized(model, tmp_path / "q", method="rtn", report={}, dense_dtype=torch.float32)
    assert stored(out)["model.layers.0.self_attn.v_proj.perm"] == (torch.int64, (128,))
    reloaded = load(out).model
    assert torch.equal(reloaded.layers[0].self_attn.qkv_proj.perm, perm)
    assert torch.equal(logits(reloaded), logits(model))


def test_rotation_state_is_saved_and_restored(tmp_path: Path) -> None:
    model = load(tiny(tmp_path / "dense")).model
    rotate_model_(model, seed=3)
    report = quantize_model(model, get_format("w8a8"))
    out = save_quantized(
        model, tmp_path / "q", method="rtn", report=report, dense_dtype=torch.float32
    )
    assert json.loads((out / "config.json").read_text())["quantization_config"]["rotation"]
    assert stored(out)["rotation.matrix"] == (torch.float32, (128, 128))
    reloaded = load(out).model
    before, after = get_rotation(model), get_rotation(reloaded)
    assert before is not None and after is not None
    assert torch.equal(after.matrix, before.matrix.float())
    assert torch.equal(after.final_norm_weight, before.final_norm_weight.float())
    assert torch.equal(logits(reloaded), logits(model))


def test_rotated_model_with_tied_head_is_refused(tmp_path: Path) -> None:
    model = load(tiny(tmp_path / "dense", tie_word_embeddings=True)).model
    quantize_model(model, get_format("w8a8"))
    attach_rotation(model, torch.eye(128), torch.ones(128))  # rotate_model_ would untie it
    with pytest.raises(ValueError, match="untied lm_head"):
        save_quantized(model, tmp_path / "q", method="rtn", report={})
    assert not (tmp_path / "q").exists()


def test_existing_output_is_never_overwritten(tmp_path: Path) -> None:
    model = load(tiny(tmp_path / "dense")).model
    quantize_model(model, get_format("w8a8"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not an empty directory"):
        save_quantized(model, out, method="rtn", report={})
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    (out / "notes.txt").unlink()  # an empty directory is fine
    save_quantized(model, out, method="rtn", report={})
    assert (out / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no leftovers


def test_partially_quantized_models_are_refused(tmp_path: Path) -> None:
    model = load(tiny(tmp_path / "dense")).model
    with pytest.raises(ValueError, match=r"one format, found \['dense'\]"):
        save_quantized(model, tmp_path / "q", method="rtn", report={})


def _rewrite_qcfg(path: Path, **changes: Any) -> None:
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        config["quantization_config"][key] = value
    (path / "config.json").write_text(json.dumps(config))


def test_bad_specquant_metadata_is_named(tmp_path: Path) -> None:
    model = load(tiny(tmp_path / "dense")).model
    quantize_model(model, get_format("w4a16-g128"))
    out = save_quantized(model, tmp_path / "q", method="rtn", report={})
    fmt = get_format("w4a16-g128").to_dict()
    cases = [
        ({"format": fmt | {"group_size": 64}}, r"q_proj.scales' has shape \[128, 1\], expected"),
        ({"format": fmt | {"weight_bits": 3}}, "unsupported weight bit width 3"),
        ({"format": fmt | {"colour": "red"}}, "quantization_config.format .* is invalid"),
        ({"format": "w4a16-g128"}, "format must be a QuantSpec dict"),
        ({"version": 7}, "version 7 is newer"),
        ({"quant_method": "hqq"}, "unknown quant_method 'hqq'"),
    ]
    for changes, message in cases:
        original = (out / "config.json").read_text()
        _rewrite_qcfg(out, **changes)
        with pytest.raises(CheckpointError, match=message):
            load(out)
        (out / "config.json").write_text(original)
    load(out)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_written_config_reads_back(kind: str) -> None:
    overrides = {"sliding_window": 32} if kind == "mistral" else {}
    cfg_raw = json.loads(make_hf_model(kind, **overrides).config.to_json_string())
    cfg = ModelConfig.from_hf(cfg_raw)
    assert ModelConfig.from_hf(model_config_dict(cfg)) == cfg
