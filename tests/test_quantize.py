"""`specquant quantize`: calibration data, the quantize pipeline end to end (save, reload,
identical logits, lossless speculation on the reloaded target), refusals and the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import make_hf_model, run_logits
from specquant.cli import main
from specquant.config import EngineConfig, GenerationConfig, SpecConfig
from specquant.engine.generator import Generator
from specquant.io.loader import load_checkpoint
from specquant.quant.calib_data import CALIBRATION_SOURCES, PERPLEXITY_HELDOUT, calibration_tokens
from specquant.quant.pipeline import QuantizeConfig, quantize_checkpoint
from specquant.quant.rotate import get_rotation
from specquant.spec.factory import build_generator

CPU = torch.device("cpu")
CALIB = torch.randint(0, 160, (4, 32), generator=torch.Generator().manual_seed(0))


class ByteTokenizer:
    """A stand-in tokenizer: one id per UTF-8 byte, EOS = 0."""

    eos_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [1 + b % 159 for b in text.encode()]}


def tiny(path: Path, **overrides: Any) -> Path:
    shape = {"hidden_size": 128, "intermediate_size": 256} | overrides
    model = make_hf_model("llama", seed=7, **shape)
    model.save_pretrained(path)
    return path


def load(path: Path) -> Any:
    return load_checkpoint(path, CPU, torch.float32, with_tokenizer=False)


def logits(model: Any) -> torch.Tensor:
    tokens = torch.randint(0, 160, (24,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return run_logits(model, tokens)


def quantize(src: Path, out: Path, **cfg: Any) -> Any:
    config = QuantizeConfig(**cfg)
    return quantize_checkpoint(src, out, config, device="cpu", calib_tokens=CALIB, progress=False)


# ------------------------------------------------------------------ calibration data
def test_calibration_windows_from_prompt_files(tmp_path: Path) -> None:
    (tmp_path / "nl2bash").mkdir()
    lines = [f"list the files of directory number {i} sorted by size" for i in range(40)]
    (tmp_path / "nl2bash" / "all.nl").write_text("\n".join(lines))
    tok = ByteTokenizer()
    calib = calibration_tokens(tok, 4, 50, seed=1, data_dir=tmp_path, sources=("nl2bash",))
    assert calib.tokens.shape == (4, 50)
    assert (calib.tokens == 0).sum() >= 3  # prompts are separated by EOS
    assert calib.info["prompts"]["nl2bash"]["count"] >= 4
    again = calibration_tokens(tok, 4, 50, seed=1, data_dir=tmp_path, sources=("nl2bash",))
    other = calibration_tokens(tok, 4, 50, seed=2, data_dir=tmp_path, sources=("nl2bash",))
    assert torch.equal(calib.tokens, again.tokens) and not torch.equal(calib.tokens, other.tokens)
    with pytest.raises(ValueError, match="fewer than the 100 x 50 requested"):
        calibration_tokens(tok, 100, 50, data_dir=tmp_path, sources=("nl2bash",))
    with pytest.raises(ValueError, match=r"\['t0_train_50k'\] are held out"):
        calibration_tokens(tok, 4, 50, data_dir=tmp_path, sources=("nl2bash", "t0_train_50k"))


def test_default_calibration_sources_leave_the_perplexity_text_alone() -> None:
    from specquant.train.prompts import SOURCES, default_data_dir

    assert not set(CALIBRATION_SOURCES) & set(PERPLEXITY_HELDOUT)
    assert all(SOURCES[name].permissive for name in CALIBRATION_SOURCES)
    try:
        data_dir = default_data_dir()
    except FileNotFoundError as exc:
        pytest.skip(f"shared training data not available: {exc}")
    calib = calibration_tokens(ByteTokenizer(), 16, 256, data_dir=data_dir)
    assert calib.tokens.shape == (16, 256)
    assert set(calib.info["prompts"]) <= set(CALIBRATION_SOURCES)


# ------------------------------------------------------------------ the pipeline
def test_quantized_checkpoint_reloads_identically_and_decodes_losslessly(tmp_path: Path) -> None:
    src = tiny(tmp_path / "dense")
    for method in ("rtn", "gptq"):
        result = quantize(src, tmp_path / method, format="w4a16-g128", method=method)
        reloaded = load(result.out)
        assert torch.equal(logits(reloaded.model), logits(result.model)), method
        qcfg = json.loads((result.out / "config.json").read_text())["quantization_config"]
        assert qcfg["method"] == method and qcfg["format"]["name"] == "w4a16-g128"
        want_calib = {"samples": 4, "seq_len": 32} if method == "gptq" else None
        got_calib = qcfg["calibration"] and {k: qcfg["calibration"][k] for k in want_calib or {}}
        assert got_calib == want_calib
        report = json.loads((result.out / "quant_report.json").read_text())
        assert report["layers"] == result.report and len(report["layers"]) == 2 * 4

    # greedy speculative decoding on the reloaded quantized target equals autoregressive
    engine = EngineConfig(device="cpu", dtype="float32", max_seq_len=256)
    cfg = GenerationConfig(max_new_tokens=24, ignore_eos=True)
    want = Generator(load(tmp_path / "gptq"), engine).generate([7, 3, 9, 1], generation=cfg)
    for spec in (
        SpecConfig(method="eagle2", depth=3, tree_topk=4, tree_size=10),
        SpecConfig(method="sps", draft="random", draft_length=4),
    ):
        gen = build_generator(load(tmp_path / "gptq"), engine, spec)
        got = gen.generate([7, 3, 9, 1], generation=cfg)
        assert got.token_ids == want.token_ids, spec.method


def test_bad_requests_fail_before_any_work(tmp_path: Path) -> None:
    src = tiny(tmp_path / "dense")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not an empty directory"):
        quantize(tmp_path / "no-such-model", busy, method="rtn")
    assert (busy / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="unknown quantizer 'awq'; available: rtn, gptq"):
        QuantizeConfig(format="w4a16-g128-asym", method="awq")
    with pytest.raises(ValueError, match="unknown quantization format 'w3a16'"):
        QuantizeConfig(format="w3a16")
    with pytest.raises(ValueError, match=r"smooth_alpha must be in \[0, 1\]"):
        QuantizeConfig(smooth_alpha=2.0)
    small = tiny(tmp_path / "small", hidden_size=64, intermediate_size=96)
    with pytest.raises(
        ValueError,
        match=r"K=\[64, 96\] of this model; formats that fit: w8a8.*"
        r"fp8, w4a16-g32$",
    ):
        quantize(small, tmp_path / "q1", format="w4a16-g128", method="rtn")
    quantize(src, tmp_path / "q2", format="w8a8", method="rtn")
    with pytest.raises(ValueError, match="is already quantized"):
        quantize(tmp_path / "q2", tmp_path / "q3", format="w8a8", method="rtn")
    with pytest.raises(ValueError, match="has no tokenizer"):
        quantize_checkpoint(src, tmp_path / "q4", QuantizeConfig(format="w8a8"), device="cpu")
    assert not any((tmp_path / name).exists() for name in ("q1", "q3", "q4"))


def test_rotated_and_smoothed_checkpoint(tmp_path: Path) -> None:
    """--rotate and --smooth-alpha: the rotation state survives the round trip, the reloaded
    model equals the in-memory one, and greedy speculative decoding on it stays lossless."""
    src = tiny(tmp_path / "dense")
    result = quantize(
        src, tmp_path / "qs", format="w8a8", method="rtn", rotate=True, seed=3, smooth_alpha=0.5
    )
    qcfg = json.loads((result.out / "config.json").read_text())["quantization_config"]
    assert qcfg["rotation"] and qcfg["smoothquant_alpha"] == 0.5 and qcfg["calibration"]
    reloaded = load(result.out)
    rotation = get_rotation(reloaded.model)
    assert rotation is not None and rotation.matrix.shape == (128, 128)
    assert torch.equal(logits(reloaded.model), logits(result.model))
    # a random EAGLE head built for the unrotated model is converted for the rotated target
    engine = EngineConfig(device="cpu", dtype="float32", max_seq_len=256)
    gen_cfg = GenerationConfig(max_new_tokens=24, ignore_eos=True)
    prompt = [5, 9, 17, 33]
    ar = build_generator(reloaded, engine, SpecConfig()).generate(prompt, generation=gen_cfg)
    spec = SpecConfig(method="eagle2", eagle="random", depth=3, tree_topk=4, tree_size=12)
    out = build_generator(reloaded, engine, spec).generate(prompt, generation=gen_cfg)
    assert out.token_ids == ar.token_ids


# ------------------------------------------------------------------ CLI
def test_cli_refuses_a_busy_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    assert main(["quantize", str(tmp_path), "-o", str(tmp_path / "out")]) == 2
    assert "exists and is not an empty directory" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_quantizes_smollm2_and_generates_from_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "smollm2-w8a8"
    args = ["quantize", "--format", "w8a8", "--method", "rtn", "--device", "cpu", "-o", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "layers.29.mlp.down_proj" in printed and "mean " in printed
    assert (out / "tokenizer.json").exists() and (out / "quant_report.json").exists()
    prompt = ["--prompt", "Name a colour.", "--max-new-tokens", "6", "--ignore-eos"]
    assert main(["generate", "--model", str(out), *prompt, "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(result["token_ids"]) == 6 and result["text"]
    # made from the embedded default, it gets the drafters shipped for it, and speculation
    # on it keeps its autoregressive tokens
    prompt = ["--prompt", "Explain what a hash table is.", "--max-new-tokens", "24"]
    args = ["compare", "--model", str(out), "--device", "cpu", "--json", *prompt,
            "--methods", "ar", "eagle2"]  # fmt: skip
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "randomly initialised" not in captured.err
    rows = {r["method"]: r for r in json.loads(captured.out.strip().splitlines()[-1])["rows"]}
    assert rows["eagle2"]["same_as_first"] and rows["eagle2"]["mean_accept_length"] > 1.5


def test_shipped_drafters_follow_the_recorded_base_model(tmp_path: Path) -> None:
    from specquant.io.checkpoint import CheckpointError
    from specquant.io.default_model import EMBEDDED_BASE
    from specquant.spec.factory import SHIPPED, shipped_drafter

    result = quantize(tiny(tmp_path / "dense"), tmp_path / "q", format="w8a8", method="rtn")
    config = json.loads((result.out / "config.json").read_text())
    assert config["quantization_config"]["base_model"] == str(tmp_path / "dense")
    assert shipped_drafter("eagle", load(result.out), None) is None  # not the default's
    config["quantization_config"]["base_model"] = EMBEDDED_BASE
    (result.out / "config.json").write_text(json.dumps(config))
    loaded = load(result.out)
    assert loaded.base_model == EMBEDDED_BASE
    assert shipped_drafter("eagle", loaded, None) == str(SHIPPED["eagle"])
    assert shipped_drafter("eagle", loaded, "random") == "random"  # asked for: kept
    config["quantization_config"]["base_model"] = 7
    (result.out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="base_model must be a string or null, got 7"):
        load(result.out)


def test_info_reports_the_quantized_kernels(tmp_path: Path) -> None:
    from specquant.cli import kernel_report

    result = quantize(tiny(tmp_path / "dense"), tmp_path / "q", format="w8a8", method="rtn")
    report = kernel_report(load(result.out).model, CPU, torch.float32)
    qlinear = {row["name"]: row for row in report["kernels"]["qlinear"]}
    assert qlinear["cpu-prepared"]["ok"] and qlinear["reference"]["ok"]
    assert "needs a CUDA device" in qlinear["triton-w8a8"]["reason"]
    attention = {row["name"]: row["ok"] for row in report["kernels"]["attention"]}
    assert attention["float64"]  # activations quantized: exact attention (kernels/builtin)
    for op in ("rmsnorm", "silu_mul", "rope", "decode_attention", "block_attention"):
        found = {row["name"]: row for row in report["kernels"][op]}
        assert found["reference"]["ok"], op
        if "triton" in found:  # Triton installed: named, and why it does not run here
            assert "needs a CUDA device" in found["triton"]["reason"], op
    in_use = report["linear_kernels_in_use"]
    assert in_use["cpu-prepared:w8a8"] == 2 * 4  # qkv, o, gate_up, down of 2 layers
    assert set(in_use) == {"cpu-prepared:w8a8", "torch"}  # the dense lm_head
