"""EAGLE-1/2 and EAGLE-3 heads in the public checkpoint layouts: save, load, draft, and the
greedy losslessness of EAGLE-2 trees drafted by an EAGLE-3 head."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import make_hf_model
from specquant.config import ConfigError, EngineConfig, GenerationConfig, SpecConfig
from specquant.engine.generator import Generator
from specquant.io.checkpoint import CheckpointError
from specquant.io.eagle import (
    load_eagle_head,
    random_eagle3_head,
    random_eagle_head,
    save_eagle3_head,
    save_eagle_head,
)
from specquant.io.loader import LoadedModel, load_checkpoint
from specquant.layers.attention import AttnMetadata
from specquant.models.eagle import Eagle3Head, EagleHead
from specquant.spec.factory import build_generator

CPU = torch.device("cpu")
ENGINE = EngineConfig(device="cpu", dtype="float32", max_seq_len=256)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LoadedModel]:
    path = tmp_path_factory.mktemp("eagle_target")
    make_hf_model("llama", seed=31, num_hidden_layers=8).save_pretrained(path)
    return path, load_checkpoint(path, CPU, torch.float32, with_tokenizer=False)


def _outputs(head: EagleHead | Eagle3Head, width: int) -> torch.Tensor:
    from specquant.layers.rope import RopeTable

    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(1, 5, head.config.hidden_size, generator=gen)
    feats = torch.randn(1, 5, width, generator=gen)
    cache = head.new_cache(8)
    meta = AttnMetadata.plan(RopeTable(head.config, 8, CPU, torch.float32), 0, 5)
    return head(emb, feats, cache, meta)


def test_eagle1_round_trip_safetensors_and_bin(
    target: tuple[Path, LoadedModel], tmp_path: Path
) -> None:
    _, loaded = target
    head = random_eagle_head(loaded.config, CPU, torch.float32, seed=4, std=0.1)
    save_eagle_head(head, tmp_path / "st")
    back = load_eagle_head(tmp_path / "st", loaded.config, CPU, torch.float32)
    assert isinstance(back, EagleHead)
    assert torch.allclose(_outputs(head, 64), _outputs(back, 64))
    # pytorch_model.bin with the optional tensors public checkpoints carry
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "st" / "model.safetensors"))
    tensors["embed_tokens.weight"] = torch.zeros(160, 64)
    tensors["layers.0.input_layernorm.weight"] = torch.ones(64)
    (tmp_path / "bin").mkdir()
    torch.save(tensors, tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    back = load_eagle_head(tmp_path / "bin", loaded.config, CPU, torch.float32)
    assert torch.allclose(_outputs(head, 64), _outputs(back, 64))
    # the requested dtype, whatever the file's: a bf16 target feeds its head bf16 inputs
    half = load_eagle_head(tmp_path / "st", loaded.config, CPU, torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_eagle3_round_trip(target: tuple[Path, LoadedModel], tmp_path: Path) -> None:
    _, loaded = target
    head = random_eagle3_head(loaded.config, CPU, torch.float32, draft_vocab=40, seed=5, std=0.1)
    save_eagle3_head(head, tmp_path / "e3")
    back = load_eagle_head(tmp_path / "e3", loaded.config, CPU, torch.float32)
    assert isinstance(back, Eagle3Head)
    assert torch.equal(back.d2t, head.d2t)
    half = load_eagle_head(tmp_path / "e3", loaded.config, CPU, torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert half.d2t.dtype == head.d2t.dtype
    assert torch.allclose(_outputs(head, 3 * 64), _outputs(back, 3 * 64))
    assert torch.allclose(_outputs(head, 64), _outputs(back, 64))  # fed-back features


def test_bad_heads_are_named(target: tuple[Path, LoadedModel], tmp_path: Path) -> None:
    _, loaded = target
    head = random_eagle3_head(loaded.config, CPU, torch.float32, draft_vocab=40)
    save_eagle3_head(head, tmp_path / "e3")
    from safetensors.torch import load_file, save_file

    file = tmp_path / "e3" / "model.safetensors"
    tensors = load_file(str(file))
    tensors["d2t"] = tensors["d2t"] + 1000
    save_file(tensors, str(file))
    with pytest.raises(CheckpointError, match="outside the target vocabulary"):
        load_eagle_head(tmp_path / "e3", loaded.config, CPU, torch.float32)
    del tensors["fc.weight"]
    tensors["d2t"] = tensors["d2t"] - 1000
    save_file(tensors, str(file))
    with pytest.raises(CheckpointError, match=r"missing tensor 'fc\.weight'"):
        load_eagle_head(tmp_path / "e3", loaded.config, CPU, torch.float32)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps({}))
    with pytest.raises(CheckpointError, match=r"neither model\.safetensors nor pytorch_model\.bin"):
        load_eagle_head(tmp_path / "empty", loaded.config, CPU, torch.float32)


@pytest.mark.parametrize("method", ["eagle2", "hierspec"])
def test_eagle3_head_drafts_losslessly(
    target: tuple[Path, LoadedModel], tmp_path: Path, method: str
) -> None:
    path, loaded = target
    head = random_eagle3_head(loaded.config, CPU, torch.float32, draft_vocab=60)
    save_eagle3_head(head, tmp_path / "e3")
    if method == "eagle2":
        spec = SpecConfig(
            method="eagle2", eagle=str(tmp_path / "e3"), depth=4, tree_topk=4, tree_size=14
        )
    else:
        spec = SpecConfig(
            method="hierspec",
            draft=str(path),
            draft_eagle=str(tmp_path / "e3"),
            min_draft_length=3,
            hier_depth=3,
            hier_topk=3,
            hier_tree_size=8,
        )
    gen = build_generator(loaded, ENGINE, spec)
    ar = Generator(loaded, ENGINE)
    cfg = GenerationConfig(max_new_tokens=40, ignore_eos=True)
    for prompt in ([4, 8, 15, 16, 23, 42], [99]):
        assert (
            gen.generate(prompt, generation=cfg).token_ids
            == ar.generate(prompt, generation=cfg).token_ids
        )
    assert gen.runner.features == ((2, 4, 5) if method == "eagle2" else None)


def test_eagle3_needs_seven_layers(tmp_path: Path) -> None:
    from specquant.config import ConfigError
    from specquant.engine.runner import eagle3_layers

    assert eagle3_layers(8) == (2, 4, 5)
    with pytest.raises(ConfigError, match="a model with 2 layers"):
        eagle3_layers(2)


def test_reduced_drafting_vocabulary(target: tuple[Path, LoadedModel], tmp_path: Path) -> None:
    """FR-Spec for EAGLE heads: `lm_head_vocab.json` next to a head restricts drafting to
    those tokens; output stays the target's own."""
    _, loaded = target
    head = random_eagle_head(loaded.config, CPU, torch.float32, seed=2, std=0.1)
    save_eagle_head(head, tmp_path / "h")
    vocab = list(range(0, loaded.config.vocab_size, 3))
    (tmp_path / "h" / "lm_head_vocab.json").write_text(json.dumps(vocab))
    spec = SpecConfig(
        method="eagle2", eagle=str(tmp_path / "h"), depth=4, tree_topk=4, tree_size=14
    )
    gen = build_generator(loaded, ENGINE, spec)
    assert gen.drafter.vocab_ids.tolist() == vocab
    trees = []
    propose = gen.drafter.propose
    gen.drafter.propose = lambda req: trees.append(propose(req)) or trees[-1]
    cfg = GenerationConfig(max_new_tokens=30, ignore_eos=True)
    ar = Generator(loaded, ENGINE)
    for prompt in ([4, 8, 15, 16, 23, 42], [99]):
        want = ar.generate(prompt, generation=cfg).token_ids
        assert gen.generate(prompt, generation=cfg).token_ids == want
    drafted = {t for tree in trees for t in tree.tokens[1:].tolist()}
    assert drafted and drafted <= set(vocab)
    # "auto" reduces on the CPU only; "full" ignores the file; "reduced" needs it
    full = build_generator(loaded, ENGINE, replace(spec, eagle_vocab="full"))
    assert full.drafter.vocab_ids is None
    save_eagle_head(head, tmp_path / "plain")
    plain = replace(spec, eagle=str(tmp_path / "plain"), eagle_vocab="reduced")
    with pytest.raises(ConfigError, match=r"with lm_head_vocab\.json .*; got .*plain"):
        build_generator(loaded, ENGINE, plain)
    for bad, match in (
        ("[1, 1]", "distinct"),
        ("[100000]", "outside the vocabulary"),
        ("{", "JSON"),
    ):
        (tmp_path / "h" / "lm_head_vocab.json").write_text(bad)
        with pytest.raises(CheckpointError, match=match):
            build_generator(loaded, ENGINE, spec)
