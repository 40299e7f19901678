"""Generation loop, sampling and request validation on tiny random models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import make_hf_model
from specquant.config import EngineConfig, GenerationConfig, SamplingParams
from specquant.engine.generator import ContextLengthError, Generator
from specquant.engine.sampling import target_probs
from specquant.io.loader import load_checkpoint

CPU = torch.device("cpu")


def _generator(path: Path, max_seq_len: int = 128) -> Generator:
    loaded = load_checkpoint(path, CPU, torch.float32, with_tokenizer=False)
    return Generator(loaded, EngineConfig(device="cpu", dtype="float32", max_seq_len=max_seq_len))


def test_greedy_equals_transformers_generate(tmp_path: Path) -> None:
    hf = make_hf_model("qwen2", seed=7)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    gen = _generator(tmp_path)
    prompt = [5, 17, 99, 3, 42, 7]
    ref = hf.generate(
        torch.tensor([prompt]),
        max_new_tokens=30,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )[0, len(prompt) :].tolist()
    out = gen.generate(prompt, generation=GenerationConfig(max_new_tokens=30, ignore_eos=True))
    assert out.token_ids == ref
    assert out.finish_reason == "length"
    assert out.stats.new_tokens == 30 and out.stats.prompt_tokens == len(prompt)


def test_prefix_reuse_gives_same_tokens(tiny_hf_dir: Path) -> None:
    gen = _generator(tiny_hf_dir)
    fresh = _generator(tiny_hf_dir)
    cfg = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    first = gen.generate([1, 2, 3, 4, 5], generation=cfg)
    follow = [1, 2, 3, 4, 5, *first.token_ids, 9, 8]
    second = gen.generate(follow, generation=cfg)
    # the cache holds the prompt and every generated token but the last (never fed back)
    assert second.stats.reused_prefix_tokens == 5 + len(first.token_ids) - 1
    assert second.token_ids == fresh.generate(follow, generation=cfg).token_ids


def test_stop_tokens_and_streaming(tiny_hf_dir: Path) -> None:
    gen = _generator(tiny_hf_dir)
    free = gen.generate([3, 1, 4], generation=GenerationConfig(max_new_tokens=10, ignore_eos=True))
    stop = free.token_ids[4]
    streamed: list[int] = []
    out = gen.generate(
        [3, 1, 4],
        generation=GenerationConfig(max_new_tokens=10),
        stop_token_ids=[stop],
        stream=lambda tok, _delta: streamed.append(tok),
    )
    cut = free.token_ids.index(stop) + 1
    assert out.token_ids == free.token_ids[:cut]
    assert out.finish_reason == "stop"
    assert streamed == out.token_ids


def test_sampling_is_seeded_and_top_k_1_is_greedy(tiny_hf_dir: Path) -> None:
    gen = _generator(tiny_hf_dir)
    g = GenerationConfig(max_new_tokens=16, ignore_eos=True)
    a = gen.generate([1, 2], sampling=SamplingParams(temperature=1.0, seed=3), generation=g)
    b = gen.generate([1, 2], sampling=SamplingParams(temperature=1.0, seed=3), generation=g)
    c = gen.generate([1, 2], sampling=SamplingParams(temperature=1.0, seed=4), generation=g)
    assert a.token_ids == b.token_ids != c.token_ids
    greedy = gen.generate([1, 2], generation=g)
    topk1 = gen.generate([1, 2], sampling=SamplingParams(temperature=0.7, top_k=1), generation=g)
    assert topk1.token_ids == greedy.token_ids


def test_target_probs_top_k_top_p() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    p = target_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.allclose(p, torch.tensor([[5 / 7, 2 / 7, 0, 0, 0]]))
    # top_p=0.8: 0.5 and 0.2 reach 0.7 < 0.8, so 0.15 is kept too; 0.1 is dropped.
    p = target_probs(logits, SamplingParams(temperature=1.0, top_p=0.8))
    assert torch.allclose(p, torch.tensor([[0.5, 0.2, 0.15, 0, 0]]) / 0.85)
    p = target_probs(logits, SamplingParams(temperature=1.0, top_p=0.3))
    assert torch.allclose(p, torch.tensor([[1.0, 0, 0, 0, 0]]))


def test_sampling_frequencies_follow_distribution() -> None:
    from specquant.engine.sampling import sample

    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]])).repeat(20000, 1)
    params = SamplingParams(temperature=1.0, seed=0)
    rng = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample(logits, params, rng), minlength=3).float() / 20000
    assert torch.allclose(counts, torch.tensor([0.6, 0.3, 0.1]), atol=0.015)


def test_prompt_longer_than_context_fails_before_work(tiny_hf_dir: Path) -> None:
    gen = _generator(tiny_hf_dir, max_seq_len=16)
    gen.generate([1, 2, 3], generation=GenerationConfig(max_new_tokens=2, ignore_eos=True))
    state = (gen.cache.length, list(gen.runner.ids))
    with pytest.raises(ContextLengthError, match="20 tokens but the context holds 16"):
        gen.generate(list(range(20)))
    assert (gen.cache.length, gen.runner.ids) == state  # nothing the user had is lost
    out = gen.generate(list(range(12)), generation=GenerationConfig(max_new_tokens=50))
    assert out.finish_reason in ("context", "stop") and len(out.token_ids) <= 4


def test_bad_requests_name_the_value(tiny_hf_dir: Path) -> None:
    gen = _generator(tiny_hf_dir)
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 160\)"):
        gen.generate([1, 500])
    with pytest.raises(ValueError, match="empty"):
        gen.generate([])
    with pytest.raises(ValueError, match="without a tokenizer"):
        gen.generate("hello")
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(dtype="int3")
