"""An EAGLE-2 drafter's tree expansion through CUDA graphs (spec/drafters/tree_graphs.py).

On the CPU the graphed expansion runs eagerly (capture=False) with the same fixed key window
and device-built masks as a captured one: it must draft the trees the drafter's own eager
expansion drafts, step after step as the committed prefix grows. On a GPU, EAGLE-2
generation with graphs must give the greedy tokens of autoregressive decoding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import make_hf_model
from specquant.config import GenerationConfig
from specquant.engine.runner import ModelRunner
from specquant.io.eagle import head_config, random_eagle_head
from specquant.io.loader import load_checkpoint
from specquant.spec.drafters.base import DraftRequest
from specquant.spec.drafters.eagle import EagleDrafter
from specquant.spec.drafters.tree_graphs import TreeGraphs


def _runner(tmp_path: Path) -> ModelRunner:
    make_hf_model("llama", seed=3).save_pretrained(tmp_path / "t", safe_serialization=True)
    loaded = load_checkpoint(tmp_path / "t", torch.device("cpu"), torch.float32,
                             with_tokenizer=False)  # fmt: skip
    return ModelRunner(loaded.model, 400, features="final")


def test_graphed_expansion_drafts_the_eager_trees(tmp_path: Path) -> None:
    base = _runner(tmp_path)
    head = random_eagle_head(head_config({}, base.config), torch.device("cpu"), torch.float32)
    eager = EagleDrafter(head, base, depth=4, topk=3, tree_size=10)
    graphed = EagleDrafter(head, base, depth=4, topk=3, tree_size=10)
    graphed.graphs = TreeGraphs(graphed, capture=False)
    calls = []
    tree_fn = graphed.graphs.tree
    graphed.graphs.tree = lambda *a: calls.append(a) or tree_fn(*a)  # type: ignore[method-assign]
    vocab = base.config.vocab_size
    base.sync([(7 * i + 5) % vocab for i in range(245)])  # the head's window crosses 256 keys
    cfg = GenerationConfig()
    for step in range(12):
        root = (11 * step + 7) % vocab
        want = eager.propose(DraftRequest(base, root, cfg, None, 64))  # type: ignore[arg-type]
        got = graphed.propose(DraftRequest(base, root, cfg, None, 64))  # type: ignore[arg-type]
        assert torch.equal(got.tokens, want.tokens), step
        assert torch.equal(got.parents, want.parents), step
        assert graphed.cache.length == eager.cache.length == base.length
        _, hidden = base.run(torch.tensor([root]))
        base.commit([root], hidden)
    assert len(calls) == 12
    # a tree smaller than the drafter's (the generation budget ends) expands eagerly
    small = graphed.propose(DraftRequest(base, 3, cfg, None, 5))  # type: ignore[arg-type]
    assert small.size == 5 and len(calls) == 12


def test_graphed_expansion_with_an_eagle3_head_wider_than_its_base(tmp_path: Path) -> None:
    """An EAGLE-3 head whose hidden size differs from the base's (it brings its own
    embedding, and a reduced drafting vocabulary): the graphed expansion's buffers take the
    head's sizes, and it drafts the eager trees."""
    from specquant.engine.runner import eagle3_layers
    from specquant.io.eagle import random_eagle3_head
    from specquant.models.eagle import Eagle3Head

    make_hf_model("llama", seed=6, num_hidden_layers=7).save_pretrained(
        tmp_path / "seven", safe_serialization=True
    )
    loaded = load_checkpoint(tmp_path / "seven", torch.device("cpu"), torch.float32,
                             with_tokenizer=False)  # fmt: skip
    base = ModelRunner(loaded.model, 400, features=eagle3_layers(7))
    narrow = random_eagle3_head(base.config, torch.device("cpu"), torch.float32)
    cfg = head_config({"hidden_size": 2 * base.config.hidden_size}, base.config,
                      check_hidden=False)  # fmt: skip
    head = Eagle3Head(cfg, base.config.hidden_size, narrow.d2t.numel())
    torch.manual_seed(0)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.05)
        head.d2t.copy_(narrow.d2t)
    head.embed_tokens = torch.nn.Embedding(cfg.vocab_size, cfg.hidden_size)
    head.eval().requires_grad_(False)
    head.prepare_kernels()
    eager = EagleDrafter(head, base, depth=3, topk=2, tree_size=6)
    graphed = EagleDrafter(head, base, depth=3, topk=2, tree_size=6)
    graphed.graphs = TreeGraphs(graphed, capture=False)
    base.sync([(5 * i + 2) % base.config.vocab_size for i in range(20)])
    for root in (3, 9, 4):
        req = DraftRequest(base, root, GenerationConfig(), None, 64)  # type: ignore[arg-type]
        want, got = eager.propose(req), graphed.propose(req)
        assert torch.equal(got.tokens, want.tokens) and torch.equal(got.parents, want.parents)
    assert graphed.graphs.last_h.shape == (cfg.hidden_size,)


def test_drafter_drafts_eagerly_when_a_capture_fails(tmp_path: Path) -> None:
    """A tree expansion that cannot be captured warns once; the drafter drafts the same
    tree eagerly and without graphs from then on."""
    from specquant.engine.cuda_graph import GraphCaptureError

    class Failing:
        def tree(self, *args: object) -> None:
            raise GraphCaptureError("capturing the EAGLE tree over 256 keys failed: sync")

    base = _runner(tmp_path)
    head = random_eagle_head(head_config({}, base.config), torch.device("cpu"), torch.float32)
    plain = EagleDrafter(head, base, depth=3, topk=2, tree_size=6)
    drafter = EagleDrafter(head, base, depth=3, topk=2, tree_size=6)
    drafter.graphs = Failing()  # type: ignore[assignment]
    base.sync([5, 9, 13, 2])
    req = DraftRequest(base, 3, GenerationConfig(), None, 64)  # type: ignore[arg-type]
    want = plain.propose(req)
    with pytest.warns(UserWarning, match="sync; drafting without CUDA graphs"):
        got = drafter.propose(req)
    assert torch.equal(got.tokens, want.tokens) and drafter.graphs is None


def test_graphs_need_a_cuda_device(tmp_path: Path) -> None:
    base = _runner(tmp_path)
    head = random_eagle_head(head_config({}, base.config), torch.device("cpu"), torch.float32)
    drafter = EagleDrafter(head, base, depth=3, topk=2, tree_size=6, cuda_graphs=True)
    assert drafter.graphs is None  # the flag is ignored off CUDA
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device, not cpu"):
        TreeGraphs(drafter)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graphed_eagle2_generation_on_the_gpu(tmp_path: Path, dtype: torch.dtype) -> None:
    """EAGLE-2 with a random head: with graphs the drafter drafts the trees it drafts
    without them (fp32: the same; bf16: mostly, rounding aside), and in fp32 generation
    gives the greedy tokens of autoregressive decoding."""
    from specquant.config import EngineConfig, SpecConfig
    from specquant.engine.generator import Generator
    from specquant.spec.factory import build_generator

    make_hf_model("llama", seed=3).save_pretrained(tmp_path / "t", safe_serialization=True)
    loaded = load_checkpoint(tmp_path / "t", torch.device("cuda"), dtype, with_tokenizer=False)
    prompt = [(7 * i + 3) % loaded.config.vocab_size for i in range(240)]
    cfg = GenerationConfig(max_new_tokens=48, ignore_eos=True)
    spec = SpecConfig(method="eagle2", depth=4, tree_topk=3, tree_size=10)
    runs = {}
    for graphs in (False, True):
        engine = EngineConfig(max_seq_len=1024, cuda_graphs=graphs)
        gen = build_generator(loaded, engine, spec)
        assert (gen.drafter.graphs is not None) == graphs
        runs[graphs] = gen.generate(prompt, generation=cfg).token_ids
        assert gen.generate(prompt, generation=cfg).token_ids == runs[graphs]  # replays
    if dtype == torch.float32:
        ar = Generator(loaded, EngineConfig(max_seq_len=1024, cuda_graphs=False))
        assert runs[True] == runs[False] == ar.generate(prompt, generation=cfg).token_ids


@pytest.mark.parametrize("method", ["sps", "eagle2", "hierspec"])
def test_every_method_through_the_graph_code_keeps_the_greedy_tokens(
    tmp_path: Path, method: str
) -> None:
    """On the CPU, every runner replaying its steps and blocks through GraphedDecoder and
    every EAGLE drafter expanding through TreeGraphs (capture=False: the code a CUDA graph
    captures, run eagerly) generate autoregressive decoding's greedy tokens, as the GPU
    tests check with real graphs."""
    from specquant.config import EngineConfig, SpecConfig
    from specquant.engine.cuda_graph import GraphedDecoder
    from specquant.engine.generator import Generator
    from specquant.spec.factory import build_generator

    make_hf_model("llama", seed=3).save_pretrained(tmp_path / "t", safe_serialization=True)
    make_hf_model("llama", seed=4, num_hidden_layers=1).save_pretrained(
        tmp_path / "d", safe_serialization=True
    )
    loaded = load_checkpoint(tmp_path / "t", torch.device("cpu"), torch.float32,
                             with_tokenizer=False)  # fmt: skip
    engine = EngineConfig(device="cpu", dtype="float32", max_seq_len=512)
    spec = {
        "sps": SpecConfig(method="sps", draft=str(tmp_path / "d"), draft_length=4),
        "eagle2": SpecConfig(method="eagle2", depth=4, tree_topk=3, tree_size=10),
        "hierspec": SpecConfig(method="hierspec", draft=str(tmp_path / "d"), min_draft_length=4,
                               hier_depth=3, hier_topk=2, hier_tree_size=6),
    }[method]  # fmt: skip
    gen = build_generator(loaded, engine, spec)
    drafter = gen.drafter
    runners = [gen.runner, getattr(drafter, "runner", None), getattr(drafter, "inter", None)]
    for r in runners:
        if r is not None:
            r.graphs = GraphedDecoder(r, capture=False)
    trees = []
    for d in (drafter, getattr(drafter, "eagle", None)):
        if isinstance(d, EagleDrafter):
            d.graphs = TreeGraphs(d, capture=False)
            tree_fn = d.graphs.tree
            d.graphs.tree = lambda *a, f=tree_fn: trees.append(1) or f(*a)  # type: ignore[method-assign]
    vocab = loaded.config.vocab_size
    cfg = GenerationConfig(max_new_tokens=40, ignore_eos=True)
    ar = Generator(loaded, engine)
    for prompt in ([5, 17, 99, 3, 42], [(13 * i + 1) % vocab for i in range(30)]):
        want = ar.generate(prompt, generation=cfg).token_ids
        assert gen.generate(prompt, generation=cfg).token_ids == want, (method, prompt)
    assert gen.runner.graphs.blocks  # verification ran through the graphed blocks
    assert bool(trees) == (method != "sps")  # and EAGLE's trees through TreeGraphs
