"""One-token steps replayed from CUDA graphs (engine/cuda_graph.py).

On the CPU the graphed step runs eagerly (capture=False) with the same key window and mask
as a captured one; it must give the runner's own step's logits and features, including past
a window boundary and with a sliding window. On a GPU, generation with graphs must produce
the tokens of generation without them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import make_hf_model
from specquant.engine.cuda_graph import MIN_WIDTH, GraphedDecoder, window_width
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


@pytest.mark.cuda
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_graphed_steps_match_eager_steps_and_generation(tmp_path: Path, dtype, tol) -> None:
    """Captured steps across a window boundary give the eager step's logits and features
    (bf16: within a few ulps, as the two attend over different key windows with different
    kernels); generation replays deterministically, and in fp32 plain decoding and a
    draft-model chain (SpS, whose drafts also run one-token steps) give the greedy tokens of
    eager decoding."""
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
