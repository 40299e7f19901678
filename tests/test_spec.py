"""Speculative decoding is lossless: greedy output equals autoregressive output, token for
token, for every method and drafter quality; caches stay consistent."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import make_hf_model
from specquant.config import ConfigError, EngineConfig, GenerationConfig, SpecConfig
from specquant.engine.generator import Generator
from specquant.engine.runner import ModelRunner
from specquant.io.eagle import head_config, random_eagle_head, save_eagle_head
from specquant.io.loader import LoadedModel, load_checkpoint
from specquant.spec.drafters.base import DraftRequest, DraftStats
from specquant.spec.factory import build_generator
from specquant.spec.tree import DraftTree

CPU = torch.device("cpu")
ENGINE = EngineConfig(device="cpu", dtype="float32", max_seq_len=512)
SMALL = {
    "sps": SpecConfig(method="sps", draft_length=4),
    "eagle2": SpecConfig(method="eagle2", depth=4, tree_topk=4, tree_size=12),
    "hierspec": SpecConfig(
        method="hierspec", min_draft_length=4, hier_depth=2, hier_topk=3, hier_tree_size=6
    ),
}
PROMPTS = [[5, 17, 99, 3, 42], [1, 2, 3, 4, 5, 6, 7, 8, 9], [150]]


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("target")
    make_hf_model("llama", seed=11).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("draft")
    make_hf_model("llama", seed=12, num_hidden_layers=1).save_pretrained(
        path, safe_serialization=True
    )
    return path


def _load(path: Path) -> LoadedModel:
    return load_checkpoint(path, CPU, torch.float32, with_tokenizer=False)


def _ar(target_dir: Path, prompt: list[int], n: int) -> list[int]:
    gen = Generator(_load(target_dir), ENGINE)
    return gen.generate(
        prompt, generation=GenerationConfig(max_new_tokens=n, ignore_eos=True)
    ).token_ids


def _spec(target_dir: Path, spec: SpecConfig) -> Generator:
    return build_generator(_load(target_dir), ENGINE, spec)


@pytest.mark.parametrize("method", list(SMALL))
@pytest.mark.parametrize("drafter", ["random", "trained-ish"])
def test_greedy_equals_autoregressive(
    method: str, drafter: str, target_dir: Path, draft_dir: Path
) -> None:
    spec = SMALL[method]
    if drafter == "trained-ish":
        # a real (different) model as SpS draft / HierSpec intermediate
        spec = SpecConfig(**{**spec.__dict__, "draft": str(draft_dir)})
    gen = _spec(target_dir, spec)
    cfg = GenerationConfig(max_new_tokens=40, ignore_eos=True)
    for prompt in PROMPTS:
        out = gen.generate(prompt, generation=cfg)
        assert out.token_ids == _ar(target_dir, prompt, 40), (method, prompt)
        assert out.stats.method == method
        assert sum(out.stats.accept_lengths) >= 39  # every emitted token came from a step
        assert all(a >= 1 for a in out.stats.accept_lengths)


def test_multi_turn_prefix_reuse_stays_lossless(target_dir: Path) -> None:
    for method, spec in SMALL.items():
        gen = _spec(target_dir, spec)
        ar = Generator(_load(target_dir), ENGINE)
        cfg = GenerationConfig(max_new_tokens=20, ignore_eos=True)
        history = [3, 1, 4, 1, 5]
        for turn in range(3):
            got = gen.generate(history, generation=cfg).token_ids
            want = ar.generate(history, generation=cfg).token_ids
            assert got == want, (method, turn)
            history = [*history, *got, 7 + turn, 9]


class ScriptedDrafter:
    """Proposes from a known continuation: `mode='oracle'` the true tokens (plus a wrong
    sibling at every level, so the tree is a real tree), `mode='wrong'` only wrong ones."""

    name = "scripted"

    def __init__(self, reference: list[int], prompt_len: int, depth: int, mode: str, vocab: int):
        self.reference, self.prompt_len = reference, prompt_len
        self.depth, self.mode, self.vocab = depth, mode, vocab
        self.stats = DraftStats()

    def reset(self) -> None:
        pass

    def propose(self, req: DraftRequest) -> DraftTree:
        # the root sits at output index `done`; the truth after it is reference[done+1:]
        done = req.target.length - self.prompt_len
        truth = self.reference[done + 1 : done + 1 + self.depth]
        tokens, parents = [req.root], [-1]
        on_path = 0
        for tok in truth:
            wrong = (tok + 1) % self.vocab
            if self.mode == "oracle":
                tokens += [wrong, tok]  # sibling first: the verifier must pick the right one
                parents += [on_path, on_path]
                on_path = len(tokens) - 1
            else:
                tokens.append(wrong)
                parents.append(len(tokens) - 2 if len(tokens) > 1 else 0)
        t = torch.tensor(tokens)
        return DraftTree.from_parents(t, torch.tensor(parents))


@pytest.mark.parametrize("mode", ["oracle", "wrong"])
def test_oracle_and_always_wrong_drafters(mode: str, target_dir: Path) -> None:
    prompt, n, depth = PROMPTS[0], 45, 5
    ref = _ar(target_dir, prompt, n + depth + 2)
    gen = Generator(_load(target_dir), ENGINE)
    gen.drafter = ScriptedDrafter(ref, len(prompt), depth, mode, 160)
    out = gen.generate(prompt, generation=GenerationConfig(max_new_tokens=n, ignore_eos=True))
    assert out.token_ids == ref[:n]
    if mode == "oracle":
        assert out.stats.accept_lengths[:-1] == [depth + 1] * (len(out.stats.accept_lengths) - 1)
    else:
        assert set(out.stats.accept_lengths) == {1}


def test_sps_with_target_as_draft_accepts_everything(target_dir: Path) -> None:
    """The draft model is the target itself: every step accepts k drafts + the bonus."""
    spec = SpecConfig(method="sps", draft=str(target_dir), draft_length=5)
    gen = _spec(target_dir, spec)
    out = gen.generate(PROMPTS[1], generation=GenerationConfig(max_new_tokens=37, ignore_eos=True))
    assert out.token_ids == _ar(target_dir, PROMPTS[1], 37)
    assert out.stats.accept_lengths[:-1] == [6] * (len(out.stats.accept_lengths) - 1)


def test_hierspec_with_target_as_intermediate(target_dir: Path) -> None:
    """Intermediate == target: the target accepts the whole sequence every step."""
    spec = SpecConfig(**{**SMALL["hierspec"].__dict__, "draft": str(target_dir)})
    gen = _spec(target_dir, spec)
    out = gen.generate(PROMPTS[0], generation=GenerationConfig(max_new_tokens=40, ignore_eos=True))
    assert out.token_ids == _ar(target_dir, PROMPTS[0], 40)
    steps = out.stats.accept_lengths[:-1]
    assert min(steps) >= 5  # min_draft_length 4, all accepted, + bonus
    assert out.stats.intermediate_accept_lengths  # per EAGLE round at the inner level


def _recompute_cache(runner: ModelRunner) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    fresh = ModelRunner(runner.model, runner.max_seq_len, features="final")
    fresh.sync(runner.ids)
    n = runner.length
    assert fresh.feats is not None
    return fresh.cache.k[:, :, :, :n], fresh.cache.v[:, :, :, :n], fresh.feats[:n]


@pytest.mark.parametrize("method", list(SMALL))
def test_caches_consistent_after_200_steps(method: str, target_dir: Path, draft_dir: Path) -> None:
    spec = SpecConfig(**{**SMALL[method].__dict__, "draft": str(draft_dir)})
    gen = _spec(target_dir, spec)
    out = gen.generate(PROMPTS[0], generation=GenerationConfig(max_new_tokens=420, ignore_eos=True))
    assert len(out.stats.accept_lengths) >= 200 or len(out.token_ids) == 420
    runners = [gen.runner]
    drafter = gen.drafter
    inner = getattr(drafter, "inter", None) or getattr(drafter, "runner", None)
    if inner is not None:
        runners.append(inner)
    for runner in runners:
        k, v, feats = _recompute_cache(runner)
        n = runner.length
        assert (runner.cache.k[:, :, :, :n] - k).abs().max() < 1e-4
        assert (runner.cache.v[:, :, :, :n] - v).abs().max() < 1e-4
        if runner.feats is not None:
            assert (runner.feats[:n] - feats).abs().max() < 1e-4
    eagle = getattr(drafter, "eagle", None) or (drafter if method == "eagle2" else None)
    if eagle is not None:
        # EAGLE rows: recompute (f_t, tok_{t+1}) for every committed row from scratch
        rows = eagle.cache.length
        base = eagle.base
        assert base.feats is not None
        ctx = eagle.context
        toks = torch.tensor(ctx[1 : rows + 1])
        fresh = eagle.head.new_cache(rows + 1)
        from specquant.layers.attention import AttnMetadata

        meta = AttnMetadata.plan(eagle.rope, 0, rows)
        eagle.head(base.model.embed_tokens(toks)[None], base.feats[:rows][None], fresh, meta)
        assert (fresh.k[:, :, :, :rows] - eagle.cache.k[:, :, :, :rows]).abs().max() < 1e-4


# ----------------------------------------------------------------------------- bad input
def test_bad_drafters_fail_at_load(target_dir: Path, tmp_path: Path) -> None:
    other_vocab = tmp_path / "other_vocab"
    make_hf_model("llama", seed=3, vocab_size=96).save_pretrained(other_vocab)
    with pytest.raises(ConfigError, match=r"vocab_size 96.*same tokenizer"):
        _spec(target_dir, SpecConfig(method="sps", draft=str(other_vocab)))

    target = _load(target_dir)
    head = random_eagle_head(head_config({}, target.config), CPU, torch.float32)
    save_eagle_head(head, tmp_path / "head")
    import json

    cfg_path = tmp_path / "head" / "config.json"
    raw = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**raw, "hidden_size": 32}))
    with pytest.raises(ConfigError, match="hidden_size 32 does not match the base model's 64"):
        _spec(target_dir, SpecConfig(method="eagle2", eagle=str(tmp_path / "head")))
    cfg_path.write_text(json.dumps({**raw, "vocab_size": 100}))
    with pytest.raises(ConfigError, match="vocab_size 100 does not match"):
        _spec(target_dir, SpecConfig(method="eagle2", eagle=str(tmp_path / "head")))

    with pytest.raises(ValueError, match="tree size 1000 is not supported"):
        _spec(target_dir, SpecConfig(method="eagle2", tree_size=1000))
    with pytest.raises(ValueError, match=r"top-k must be in \[1, vocabulary size 160\], got 500"):
        _spec(target_dir, SpecConfig(method="eagle2", tree_topk=500))
    with pytest.raises(ValueError, match="min_draft_length must be >= 1, got 0"):
        SpecConfig(method="hierspec", min_draft_length=0)
    with pytest.raises(ValueError, match="method must be one of"):
        SpecConfig(method="medusa")


def test_eagle_tree_defaults_depend_on_the_device() -> None:
    """The paper's tree on a GPU, a smaller one on the CPU (verification is compute-bound
    there) when no tree value is given; given values complete the paper's tree on both, and
    bad ones are refused."""
    from specquant.config import EAGLE_TREE_CPU, EAGLE_TREE_PAPER

    spec = SpecConfig(method="eagle2")
    assert spec.eagle_tree("cuda") == EAGLE_TREE_PAPER == (6, 10, 60)
    assert spec.eagle_tree("cpu") == EAGLE_TREE_CPU
    assert EAGLE_TREE_CPU[2] < EAGLE_TREE_PAPER[2]
    given = SpecConfig(method="eagle2", tree_size=40, depth=7)  # the rest: the paper's
    assert given.eagle_tree("cpu") == given.eagle_tree("cuda") == (7, 10, 40)
    assert SpecConfig(method="eagle2", depth=2).eagle_tree("cpu") == (2, 10, 60)
    with pytest.raises(ValueError, match="tree_topk must be >= 1, got 0"):
        SpecConfig(method="eagle2", tree_topk=0)
