"""Sampling keeps the target's distribution: chi-square tests of the first speculative token
and of two-token continuations, for chains (SpS), trees (EAGLE-2) and HierSpec."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import make_hf_model
from specquant.config import EngineConfig, GenerationConfig, SamplingParams, SpecConfig
from specquant.engine.runner import ModelRunner
from specquant.engine.sampling import target_probs
from specquant.io.loader import load_checkpoint
from specquant.spec.factory import build_generator

V = 8
N = 1500
PROMPT = [1, 5, 2]
ENGINE = EngineConfig(device="cpu", dtype="float32", max_seq_len=64)


def _peaked_model(path: Path, seed: int) -> Path:
    model = make_hf_model("llama", seed=seed, vocab_size=V)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # far from uniform, so mistakes show
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sampling")
    return _peaked_model(root / "target", 21), _peaked_model(root / "draft", 22)


def exact_distributions(target: Path, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """p(x1, x2) [V, V] and p(x2, x3) [V, V] of the target under `params`."""
    loaded = load_checkpoint(target, torch.device("cpu"), torch.float32, with_tokenizer=False)
    runner = ModelRunner(loaded.model, 16)

    def next_probs(ids: list[int]) -> torch.Tensor:
        runner.reset()
        logits = runner.sync(ids, min_recompute=1)
        assert logits is not None
        return target_probs(logits[None], params)[0].double()

    p1 = next_probs(PROMPT)
    joint3 = torch.zeros(V, V, V, dtype=torch.float64)
    for a in range(V):
        p2 = next_probs([*PROMPT, a])
        for b in range(V):
            joint3[a, b] = p1[a] * p2[b] * next_probs([*PROMPT, a, b])
    return joint3.sum(2), joint3.sum(0)


def chi_square_pvalue(counts: torch.Tensor, expected_p: torch.Tensor) -> float:
    counts, expected = counts.flatten().double(), expected_p.flatten() * counts.sum()
    small = expected < 5  # pool sparse cells, as the test requires
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = obs.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), stat / 2.0))


METHODS = {
    "sps": lambda d: SpecConfig(method="sps", draft=str(d), draft_length=3),
    "eagle2": lambda d: SpecConfig(method="eagle2", depth=3, tree_topk=3, tree_size=8),
    "hierspec": lambda d: SpecConfig(
        method="hierspec",
        draft=str(d),
        min_draft_length=2,
        hier_depth=2,
        hier_topk=2,
        hier_tree_size=4,
    ),
}


CASES = [
    ("sps", SamplingParams(temperature=1.0)),
    ("eagle2", SamplingParams(temperature=1.0)),
    ("hierspec", SamplingParams(temperature=1.0)),
    # top-k/top-p must shape the distribution that verification preserves
    ("eagle2", SamplingParams(temperature=0.8, top_k=5, top_p=0.9)),
    ("hierspec", SamplingParams(temperature=0.8, top_k=5, top_p=0.9)),
]


@pytest.mark.parametrize(
    ("method", "params"), CASES, ids=[f"{m}-{p.temperature}" for m, p in CASES]
)
def test_speculative_sampling_matches_target(
    method: str, params: SamplingParams, dirs: tuple[Path, Path]
) -> None:
    target, draft = dirs
    pair12, pair23 = exact_distributions(target, params)
    loaded = load_checkpoint(target, torch.device("cpu"), torch.float32, with_tokenizer=False)
    gen = build_generator(loaded, ENGINE, METHODS[method](draft))
    c12 = torch.zeros(V, V)
    c23 = torch.zeros(V, V)
    cfg = GenerationConfig(max_new_tokens=3, ignore_eos=True)
    accepted = 0
    for i in range(N):
        p = SamplingParams(params.temperature, params.top_k, params.top_p, seed=i)
        out = gen.generate(PROMPT, sampling=p, generation=cfg)
        a, b, c = out.token_ids
        c12[a, b] += 1
        c23[b, c] += 1
        accepted += out.stats.accept_lengths[0] > 1
    p12, p23 = chi_square_pvalue(c12, pair12), chi_square_pvalue(c23, pair23)
    print(f"{method}: p(x1,x2)={p12:.3f} p(x2,x3)={p23:.3f}, drafts accepted in {accepted}/{N}")
    assert p12 > 1e-3 and p23 > 1e-3
    assert accepted > N // 20  # the acceptance path itself was exercised


def test_chi_square_detects_a_biased_sampler(dirs: tuple[Path, Path]) -> None:
    """The test above can fail: a sampler that ignores top-k/top-p is rejected."""
    target, _ = dirs
    right, _ = exact_distributions(target, SamplingParams(temperature=0.8, top_k=5, top_p=0.9))
    wrong, _ = exact_distributions(target, SamplingParams(temperature=0.8))
    gen = torch.Generator().manual_seed(0)
    draws = torch.multinomial(wrong.flatten().float(), N, replacement=True, generator=gen)
    counts = torch.bincount(draws, minlength=V * V).float()
    assert chi_square_pvalue(counts, right) < 1e-3
