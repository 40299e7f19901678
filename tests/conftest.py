"""Shared fixtures: tiny random HF checkpoints, the embedded SmolLM2 generator, cuda marker."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from specquant.layers.attention import AttnMetadata
from specquant.layers.rope import RopeTable


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


TINY = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 160,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
}


def make_hf_model(kind: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A tiny random transformers model of family `kind` (llama / qwen2 / mistral)."""
    import transformers

    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }
    config_cls, model_cls = classes[kind]
    torch.manual_seed(seed)
    cfg = config_cls(**{**TINY, **overrides})
    model = model_cls(cfg).eval()
    # Random init leaves norms at 1 and biases at 0: perturb them so parity tests see them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture
def tiny_hf_dir(tmp_path: Path) -> Path:
    model = make_hf_model("llama")
    model.save_pretrained(tmp_path / "tiny", safe_serialization=True)
    return tmp_path / "tiny"


def run_logits(loaded_model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """Full-sequence logits [T, V] through our model with a fresh cache."""
    cfg = loaded_model.config
    t = tokens.shape[0]
    cache = loaded_model.new_cache(t + 8)
    rope = RopeTable(cfg, t + 8, tokens.device, cache.k.dtype)
    meta = AttnMetadata.plan(rope, 0, t, sliding_window=cfg.sliding_window)
    out = loaded_model(tokens[None], cache, meta)
    return out.logits[0]


@pytest.fixture(scope="session")
def smollm2() -> Any:
    """The embedded default model, loaded once per test session (fp32, CPU)."""
    import specquant

    return specquant.load(device="cpu", dtype="float32", max_seq_len=1024)


# Gluon kernel tests: bench/kernel_sass.py's report of one offline compile
REPO_ROOT = Path(__file__).resolve().parents[1]


def compiled_loop(args: list[str], most: float) -> str:
    """kernel_sass.py's output for `args` (Triton's compiler and ptxas, no GPU), after
    checking that the K loop stays under `most` instructions per weight and nothing spills
    to local memory; skips where Triton ships no ptxas."""
    out = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "kernel_sass.py"), *args],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")},
    )  # fmt: skip
    if out.returncode and "ptxas" in out.stderr and "not found" in out.stderr:
        pytest.skip("Triton's ptxas is not available")
    match = re.search(r"([0-9.]+) instructions per weight", out.stdout)
    assert match, out.stdout + out.stderr[-3000:]
    assert float(match.group(1)) < most, out.stdout
    assert "LOCAL:0" in out.stdout, out.stdout
    return out.stdout


def run_interpreted(script: str) -> list[str]:
    """Run `script` (a test file's `--interpret` entry point) with TRITON_INTERPRET=1 in a
    subprocess, since Triton reads the variable when it is imported: its output lines."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT / "src"), str(REPO_ROOT / "tests")])
    proc = subprocess.run(
        [sys.executable, script, "--interpret"],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()
