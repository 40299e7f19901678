"""Steps and speculative blocks replayed from CUDA graphs (engine/cuda_graph.py).

On the CPU a graphed step or block runs eagerly (capture=False) with the same key window,
padding and mask as a captured one; it must give the runner's own logits and features,
including past a window boundary, with a sliding window and for tree masks. On a GPU,
generation with graphs must produce the tokens of generation without them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import make_hf_model
from specquant.engine.cuda_graph import (
    MAX_BLOCK,
    MIN_WIDTH,
    GraphedDecoder,
    block_tokens,
    window_width,
)
from specquant.engine.runner import ModelRunner
from specquant.io.loader import load_checkpoint


def test_window_width_is_the_narrowest_power_of_two_window_holding_the_keys() -> None:
    assert window_width(1, 4096) == MIN_WIDTH
    assert window_width(MIN_WIDTH, 4096) == MIN_WIDTH
    assert window_width(MIN_WIDTH + 1, 4096) == 2 * MIN_WIDTH
    assert window_width(3000, 4096) == 4096
    assert window_width(600, 700) == 700  # capped at the cache length
    with pytest.raises(ValueError, match=r"1\.\.4096 keys, not 4097"):
        window_width(4097, 4096)


def _loaded(tmp_path: Path, kind: str, **overrides) -> object:
    model = make_hf_model(kind, **overrides)
    model.save_pretrained(tmp_path / kind, safe_serialization=True)
    return load_checkpoint(
        tmp_path / kind, torch.device("cpu"), torch.float32, with_tokenizer=False
    )


@pytest.mark.parametrize(
    ("kind", "overrides"), [("llama", {}), ("mistral", {"sliding_window": 16})]
)
def test_windowed_step_matches_the_runner_step(tmp_path: Path, kind: str, overrides) -> None:
    """Greedy decoding across the first window boundary: at every step the windowed step's
    logits and features equal the runner's (attention over exactly the live prefix)."""
    loaded = _loaded(tmp_path, kind, **overrides)
    max_len = MIN_WIDTH + 40
    runner = ModelRunner(loaded.model, max_len, features="final")
    graphed = GraphedDecoder(runner, capture=False)
    prompt = torch.randint(0, loaded.config.vocab_size, (MIN_WIDTH - 6,)).tolist()
    logits = runner.sync(prompt, min_recompute=1)
    token = torch.tensor([int(logits.argmax())])
    widths = set()
    for _ in range(14):
        n = runner.length
        widths.add(window_width(n + 1, max_len))
        want, want_h = runner.run(token)
        got, got_h = graphed.step(token, n)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_h, want_h, rtol=1e-5, atol=1e-5)
        runner.commit(token.tolist(), got_h)
        token = got[0].argmax()[None]
    assert widths == {MIN_WIDTH, max_len}  # both windows ran


def test_block_tokens_round_up_to_a_power_of_two() -> None:
    assert [block_tokens(t) for t in (2, 3, 5, 8, 9, 60, MAX_BLOCK)] == [2, 4, 8, 8, 16, 64,
                                                                        MAX_BLOCK]  # fmt: skip
    for bad in (1, MAX_BLOCK + 1):
        with pytest.raises(ValueError, match=f"2\\.\\.{MAX_BLOCK} tokens, not {bad}"):
            block_tokens(bad)


@pytest.mark.parametrize(
    ("kind", "overrides"), [("llama", {}), ("mistral", {"sliding_window": 16})]
)
def test_windowed_blocks_match_the_runner_blocks(tmp_path: Path, kind: str, overrides) -> None:
    """Trees (tree mask, depths) and chains of 2-9 tokens, padded to 2-16, across the first
    window boundary: logits and features equal the runner's eager block; accepting a path
    of the graphed block's K/V continues as the eager one does."""
    from specquant.spec.tree import DraftTree

    loaded = _loaded(tmp_path, kind, **overrides)
    max_len = MIN_WIDTH + 64
    vocab = loaded.config.vocab_size
    eager = ModelRunner(loaded.model, max_len, features="final")
    runner = ModelRunner(loaded.model, max_len, features="final")
    graphed = GraphedDecoder(runner, capture=False)
    prompt = torch.randint(0, vocab, (MIN_WIDTH - 12,)).tolist()
    eager.sync(prompt)
    runner.sync(prompt)
    gen = torch.Generator().manual_seed(3)
    for size in (2, 3, 5, 7, 9, 4):
        tokens = torch.randint(0, vocab, (size,), generator=gen)
        parents = torch.tensor([-1] + [int(torch.randint(0, i, (1,), generator=gen))
                                       for i in range(1, size)])  # fmt: skip
        tree = DraftTree.from_parents(tokens, parents)
        for chain in (False, True):
            mask, depth = (None, None) if chain else (tree.mask, tree.depth)
            n = runner.length
            want, want_h = eager.run(tokens, block_mask=mask, depth=depth)
            got, got_h = graphed.block(tokens, n, mask, depth)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got_h, want_h, rtol=1e-5, atol=1e-5)
            assert got.shape == (size, vocab)
        keep = torch.tensor([0, size - 1]) if tree.parents[size - 1] == 0 else torch.tensor([0])
        eager.accept(keep, tokens[keep].tolist(), want_h)
        runner.accept(keep, tokens[keep].tolist(), got_h)
    assert {w for _, w in graphed.blocks} == {MIN_WIDTH, max_len}  # both windows ran
    assert {p for p, _ in graphed.blocks} == {2, 4, 8, 16}


def test_runner_routes_blocks_through_its_graphs(tmp_path: Path) -> None:
    """ModelRunner.run sends verification blocks and short prompt chunks to the graphs,
    long chunks and blocks without room for their padding eagerly; last_only keeps the
    last row."""
    calls: list[tuple[str, int]] = []

    class Recording(GraphedDecoder):
        def step(self, token: torch.Tensor, position: int):  # type: ignore[no-untyped-def]
            calls.append(("step", 1))
            return super().step(token, position)

        def block(self, tokens, start, block_mask, depth):  # type: ignore[no-untyped-def]
            calls.append(("block", tokens.shape[0]))
            return super().block(tokens, start, block_mask, depth)

    model = _loaded(tmp_path, "llama").model
    plain, runner = ModelRunner(model, 64), ModelRunner(model, 64)
    runner.graphs = Recording(runner, capture=False)
    prompt = list(range(3, 40))
    for r in (plain, runner):
        r.sync(prompt)
    assert calls == []  # a 37-token prompt chunk ran eagerly
    want = plain.sync([*prompt, 5, 6], min_recompute=1)
    got = runner.sync([*prompt, 5, 6], min_recompute=1)
    assert calls == [("block", 2)]  # the two new tokens, as a short prompt chunk
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    tokens = torch.tensor([7, 8, 9, 10])
    n = runner.length
    got_l, _ = runner.run(tokens)
    want_l, _ = plain.run(tokens)
    torch.testing.assert_close(got_l, want_l, rtol=1e-5, atol=1e-5)
    assert calls[-1] == ("block", 4)
    runner.truncate(n)
    plain.truncate(n)
    big = torch.arange(64 - n + 1)  # padding would not fit: eagerly
    runner.run(big[: 64 - n - 2] % 50)
    assert calls[-1] == ("block", 4)


def test_capture_needs_a_cuda_device(tmp_path: Path) -> None:
    runner = ModelRunner(_loaded(tmp_path, "llama").model, 32)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device, not cpu"):
        GraphedDecoder(runner)
    # the engine's flag is ignored off CUDA: the runner steps eagerly
    assert ModelRunner(runner.model, 32, cuda_graphs=True).graphs is None


def test_runner_decodes_eagerly_when_a_capture_fails(tmp_path: Path) -> None:
    """A step that cannot be captured warns once and the runner decodes eagerly: the same
    logits as a runner without graphs, and no graphs afterwards."""
    from specquant.engine.cuda_graph import GraphCaptureError

    class Failing:
        def step(self, token: torch.Tensor, position: int) -> None:
            raise GraphCaptureError("capturing the 256-key step failed: sync during capture")

    model = _loaded(tmp_path, "llama").model
    plain, runner = ModelRunner(model, 32), ModelRunner(model, 32)
    runner.graphs = Failing()  # as a CUDA runner whose capture fails
    token = torch.tensor([5])
    want, _ = plain.run(token)
    with pytest.warns(UserWarning, match="sync during capture; decoding without CUDA graphs"):
        got, _ = runner.run(token)
    assert torch.equal(got, want) and runner.graphs is None


def test_a_block_that_fails_to_capture_leaves_the_step_graphs(tmp_path: Path) -> None:
    """A block whose capture fails warns once; blocks run eagerly from then on (the same
    logits) while one-token steps keep replaying their graphs."""
    from specquant.engine.cuda_graph import GraphCaptureError

    calls: list[str] = []

    class FailingBlocks(GraphedDecoder):
        def step(self, token: torch.Tensor, position: int):  # type: ignore[no-untyped-def]
            calls.append("step")
            return super().step(token, position)

        def block(self, tokens, start, block_mask, depth):  # type: ignore[no-untyped-def]
            calls.append("block")
            raise GraphCaptureError("capturing the 4-token block over 256 keys failed: x")

    model = _loaded(tmp_path, "llama").model
    plain, runner = ModelRunner(model, 64), ModelRunner(model, 64)
    runner.graphs = FailingBlocks(runner, capture=False)
    for r in (plain, runner):
        r.sync([3, 4, 5, 6, 7] * 5)
    tokens = torch.tensor([7, 8, 9])
    want, _ = plain.run(tokens)
    with pytest.warns(UserWarning, match="x; blocks run without CUDA graphs from here on"):
        got, _ = runner.run(tokens)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert runner.graphs is not None and not runner.graphs.blocks_enabled
    runner.run(tokens)  # eagerly, without asking the graphs
    runner.run(torch.tensor([5]))
    assert calls == ["block", "step"]


@pytest.mark.cuda
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_graphed_steps_match_eager_steps_and_generation(tmp_path: Path, dtype, tol) -> None:
    """Captured steps across a window boundary, and captured tree blocks (3-60 tokens), give
    the eager run's logits and features (bf16: within a few ulps, as the two attend over
    different key windows with different kernels); generation replays deterministically,
    and in fp32 plain decoding and a draft-model chain (SpS: graphed draft steps and
    verification blocks) give the greedy tokens of eager decoding."""
    from specquant.config import EngineConfig, GenerationConfig, SpecConfig
    from specquant.engine.generator import Generator
    from specquant.spec.factory import build_generator

    model = make_hf_model("llama")
    model.save_pretrained(tmp_path / "t", safe_serialization=True)
    loaded = load_checkpoint(tmp_path / "t", torch.device("cuda"), dtype, with_tokenizer=False)
    vocab = loaded.config.vocab_size
    prompt = [(7 * i + 3) % vocab for i in range(MIN_WIDTH - 6)]

    runner = ModelRunner(loaded.model, 1024, features="final")
    graphed = GraphedDecoder(runner)
    logits = runner.sync(prompt, min_recompute=1)
    token = logits.argmax()[None]
    for _ in range(12):
        n = runner.length
        want, want_h = runner.run(token)
        got, got_h = graphed.step(token, n)
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
        torch.testing.assert_close(got_h.float(), want_h.float(), rtol=tol, atol=tol)
        runner.commit(token.tolist(), got_h)
        token = got[0].argmax()[None]
    assert len(graphed.graphs) == 2  # both windows were captured

    from specquant.spec.tree import DraftTree

    eager = ModelRunner(loaded.model, 1024, features="final")  # the runner has no graphs
    gen = torch.Generator().manual_seed(5)
    for size in (3, 9, 60, 9):  # captured, captured, captured, replayed
        tokens = torch.randint(0, vocab, (size,), generator=gen).cuda()
        parents = torch.tensor([-1] + [int(torch.randint(0, i, (1,), generator=gen))
                                       for i in range(1, size)])  # fmt: skip
        tree = DraftTree.from_parents(tokens, parents.cuda())
        eager.sync(runner.ids)
        want, want_h = eager.run(tokens, block_mask=tree.mask, depth=tree.depth)
        got, got_h = graphed.block(tokens, runner.length, tree.mask, tree.depth)
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
        torch.testing.assert_close(got_h.float(), want_h.float(), rtol=tol, atol=tol)
        runner.accept(torch.tensor([0], device="cuda"), tokens[:1].tolist(), got_h)
    assert {p for p, _ in graphed.blocks} == {4, 16, 64}

    cfg = GenerationConfig(max_new_tokens=40, ignore_eos=True)
    runs = {}
    for graphs in (False, True):
        gen = Generator(loaded, EngineConfig(max_seq_len=1024, cuda_graphs=graphs))
        assert (gen.runner.graphs is not None) == graphs
        runs[graphs] = gen.generate(prompt, generation=cfg).token_ids
        assert gen.generate(prompt, generation=cfg).token_ids == runs[graphs]  # replays again
    if dtype == torch.float32:
        assert runs[True] == runs[False]
        spec = SpecConfig(method="sps", draft=str(tmp_path / "t"), draft_length=3)
        sps = build_generator(loaded, EngineConfig(max_seq_len=1024, cuda_graphs=True), spec)
        assert sps.drafter.runner.graphs is not None
        assert sps.generate(prompt, generation=cfg).token_ids == runs[False]
