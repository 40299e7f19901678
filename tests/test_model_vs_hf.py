"""Logits parity with transformers on tiny random models, through the production loader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import make_hf_model, run_logits
from specquant.io.loader import load_checkpoint

CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama3.1-rope": (
        "llama",
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
            "rope_theta": 500000.0,
        },
    ),
    "llama-linear-rope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "llama-attn-bias": ("llama", {"attention_bias": True}),
    "qwen2": ("qwen2", {"tie_word_embeddings": True}),
    "mistral": ("mistral", {"sliding_window": None}),
    "mistral-window": ("mistral", {"sliding_window": 16}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case: str, tmp_path: Path) -> None:
    kind, overrides = CASES[case]
    hf = make_hf_model(kind, seed=1, **overrides)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_checkpoint(tmp_path, torch.device("cpu"), torch.float32, with_tokenizer=False)
    tokens = torch.randint(
        0, hf.config.vocab_size, (40,), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        ref = hf(tokens[None]).logits[0]
        got = run_logits(ours.model, tokens)
    diff = (got - ref).abs().max().item()
    print(f"{case}: max |logits - transformers| = {diff:.2e}")
    assert diff < 1e-4


def test_hidden_states_match_transformers(tmp_path: Path) -> None:
    """Post-norm features and per-layer residual streams (EAGLE heads read these)."""
    hf = make_hf_model("llama", seed=2)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_checkpoint(tmp_path, torch.device("cpu"), torch.float32, with_tokenizer=False)
    tokens = torch.randint(0, 160, (12,), generator=torch.Generator().manual_seed(1))
    from specquant.layers.attention import AttnMetadata
    from specquant.layers.rope import RopeTable

    cache = ours.model.new_cache(16)
    meta = AttnMetadata.plan(RopeTable(ours.config, 16, torch.device("cpu"), torch.float32), 0, 12)
    with torch.no_grad():
        ref = hf(tokens[None], output_hidden_states=True).hidden_states
        out = ours.model(tokens[None], cache, meta, return_hidden=True, hidden_layers=(0, 1, 2))
    assert out.hidden is not None
    assert (out.hidden - ref[-1]).abs().max() < 1e-5
    for i in (0, 1):
        assert (out.layer_hidden[i] - ref[i]).abs().max() < 1e-5
    assert (out.layer_hidden[2] - ref[2]).abs().max() < 1e-5
