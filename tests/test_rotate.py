"""Hadamard rotation (QuaRot-style, fused offline): Hadamard constructions, unchanged logits,
rotation state in the checkpoint, quantization after rotation, and drafters (EAGLE-1/2/3
heads, shared-embedding drafts) that keep working on a rotated target."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import make_hf_model, run_logits
from specquant.config import EngineConfig, GenerationConfig, SamplingParams, SpecConfig
from specquant.engine.generator import Generator
from specquant.engine.runner import ModelRunner
from specquant.io.eagle import random_eagle3_head, random_eagle_head
from specquant.io.loader import LoadedModel, load_checkpoint
from specquant.models.eagle import Eagle3Head, EagleHead
from specquant.models.llama import LlamaModel
from specquant.quant.hadamard import hadamard, random_hadamard
from specquant.quant.model import quantize_model
from specquant.quant.rotate import (
    Rotation,
    attach_rotation,
    get_rotation,
    rotate_eagle_head_,
    rotate_model_,
    rotate_shared_draft_,
)
from specquant.quant.spec import get_format
from specquant.spec.drafters.base import DraftRequest
from specquant.spec.drafters.eagle import EagleDrafter, head_features
from specquant.spec.factory import build_generator

CPU = torch.device("cpu")
ENGINE = EngineConfig(device="cpu", dtype="float32", max_seq_len=256)
# GQA, tied embeddings, hidden 72 = 36 * 2 (Paley II x Sylvester), head_dim 12 (Paley I)
TIED_GQA = {
    "hidden_size": 72,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "head_dim": 12,
    "tie_word_embeddings": True,
}
CASES = {
    "llama-tied-gqa-72": ("llama", TIED_GQA),
    "qwen2-bias-144": (
        "qwen2",
        {"hidden_size": 144, "num_attention_heads": 4, "num_key_value_heads": 1},
    ),
    "llama-attention-bias-64": ("llama", {"attention_bias": True}),
}


def _save(tmp: Path, kind: str, seed: int = 0, **kw: Any) -> Path:
    make_hf_model(kind, seed=seed, **kw).save_pretrained(tmp)
    return tmp


def _load(path: Path) -> LoadedModel:
    return load_checkpoint(path, CPU, torch.float32, with_tokenizer=False)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ----------------------------------------------------------------------------- Hadamard
@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 24, 28, 36, 64, 72, 576])
def test_hadamard_orders(n: int) -> None:
    h = hadamard(n)
    assert h.shape == (n, n)
    assert torch.equal(h.abs(), torch.ones(n, n, dtype=torch.float64))
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))
    q = random_hadamard(n, seed=3)
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64))


def test_random_hadamard_is_seeded() -> None:
    a, b, c = random_hadamard(36, 0), random_hadamard(36, 0), random_hadamard(36, 1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, hadamard(36) / 6)  # the random signs are applied


@pytest.mark.parametrize("n", [6, 52, 92])
def test_unbuildable_orders_are_named(n: int) -> None:
    with pytest.raises(ValueError, match=f"no Hadamard matrix of order {n} can be built"):
        hadamard(n)
    with pytest.raises(ValueError, match="positive integer, got 0"):
        hadamard(0)


# ----------------------------------------------------------------------------- model
@pytest.mark.parametrize("case", list(CASES))
def test_rotation_keeps_logits(case: str, tmp_path: Path) -> None:
    kind, kw = CASES[case]
    model = _load(_save(tmp_path, kind, seed=3, **kw)).model
    tokens = torch.randint(0, 160, (24,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = run_logits(model, tokens)
        embed_before = model.embed_tokens.weight.clone()
        rot = rotate_model_(model, seed=1)
        got = run_logits(model, tokens)
    assert _rel(got, ref) < 1e-4, case
    assert get_rotation(model) is rot
    assert not torch.allclose(model.embed_tokens.weight, embed_before, atol=1e-3)
    assert model.lm_head.weight is not model.embed_tokens.weight
    assert not model.config.tie_word_embeddings
    norms = [model.norm.weight] + [
        n.weight
        for layer in model.layers
        for n in (layer.input_layernorm, layer.post_attention_layernorm)
    ]
    assert all(torch.equal(w, torch.ones_like(w)) for w in norms)


def test_rotation_state_round_trips_through_state_dict(tmp_path: Path) -> None:
    model = _load(_save(tmp_path, "llama", seed=4, **TIED_GQA)).model
    rot = rotate_model_(model, seed=2)
    state = model.state_dict()
    assert state["rotation.matrix"].shape == (72, 72)
    torch.testing.assert_close(state["rotation.final_norm_weight"], rot.final_norm_weight)
    fresh = LlamaModel(model.config)
    h = model.config.hidden_size
    attach_rotation(fresh, torch.empty(h, h), torch.empty(h))  # placeholders, as a loader would
    fresh.load_state_dict(state, strict=True)
    fresh.eval().requires_grad_(False).prepare_kernels()
    tokens = torch.arange(1, 30)
    with torch.no_grad():
        torch.testing.assert_close(run_logits(fresh, tokens), run_logits(model, tokens))
    loaded = get_rotation(fresh)
    assert loaded is not None and torch.equal(loaded.matrix, rot.matrix)


def test_rotation_errors(tmp_path: Path) -> None:
    path = _save(tmp_path, "llama", seed=5)
    model = _load(path).model
    rotate_model_(model)
    with pytest.raises(ValueError, match="already rotated"):
        rotate_model_(model)
    with pytest.raises(ValueError, match="already holds a rotation"):
        attach_rotation(model, torch.eye(64), torch.ones(64))
    quantized = _load(path).model
    quantize_model(quantized, get_format("w8a8"))
    with pytest.raises(ValueError, match=r"'layers.0.self_attn.qkv_proj' is already quantized"):
        rotate_model_(quantized)
    fresh = _load(path).model
    with pytest.raises(ValueError, match=r"rotation.matrix must be \[64, 64\], got \[64, 32\]"):
        attach_rotation(fresh, torch.eye(64)[:, :32], torch.ones(64))
    with pytest.raises(ValueError, match=r"final_norm_weight must be \[64\], got \[63\]"):
        attach_rotation(fresh, torch.eye(64), torch.ones(63))
    with pytest.raises(ValueError, match="not orthogonal"):
        Rotation(2 * torch.eye(4), torch.ones(4)).orthogonal()


def test_low_precision_rotation_is_repaired() -> None:
    q = random_hadamard(36, 0)
    rot = Rotation(q.to(torch.bfloat16), torch.ones(36))
    assert (q.to(torch.bfloat16).double() - q).abs().max() > 1e-4  # bf16 rounds Q
    torch.testing.assert_close(rot.orthogonal(), q, rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantizing_a_rotated_model(method: str, tmp_path: Path) -> None:
    model = _load(_save(tmp_path, "llama", seed=6, **TIED_GQA)).model
    tokens = torch.randint(0, 160, (32,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = run_logits(model, tokens)
        rotate_model_(model)
        calib = torch.randint(0, 160, (4, 32), generator=torch.Generator().manual_seed(2))
        report = quantize_model(model, get_format("w8a8"), method, calib_tokens=calib)
        got = run_logits(model, tokens)
    assert len(report) == 2 * 4
    assert float((got - ref).norm() / ref.norm()) < 0.05


def _outlier_model(path: Path) -> LlamaModel:
    """Two activation channels 30x larger than the rest at every linear input (the
    'massive activations' of real LLMs)."""
    model = _load(path).model
    with torch.no_grad():
        for layer in model.layers:
            layer.input_layernorm.weight[[5, 77]] *= 30
            layer.post_attention_layernorm.weight[[5, 77]] *= 30
    return model


def test_rotation_reduces_w8a8_error_with_outlier_channels(tmp_path: Path) -> None:
    path = _save(
        tmp_path, "llama", seed=5, hidden_size=144, intermediate_size=256, num_attention_heads=4
    )
    tokens = torch.randint(0, 160, (64,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = run_logits(_outlier_model(path), tokens)
        errors = {}
        for rotated in (False, True):
            model = _outlier_model(path)
            if rotated:
                rotate_model_(model)
            quantize_model(model, get_format("w8a8"))
            errors[rotated] = float((run_logits(model, tokens) - ref).norm() / ref.norm())
    assert errors[True] < 0.6 * errors[False], errors


# ----------------------------------------------------------------------------- EAGLE
def _tree(head: EagleHead | Eagle3Head, model: LlamaModel, prompt: list[int]) -> Any:
    runner = ModelRunner(model, 128, features=head_features(head, model.config.num_layers))
    runner.sync(prompt[:-1])
    drafter = EagleDrafter(head, runner, depth=4, topk=3, tree_size=12)
    req = DraftRequest(runner, prompt[-1], SamplingParams(), None, max_nodes=12)
    tree = drafter.propose(req)
    context = torch.tensor(prompt[1:])  # the head's first rows: (f_t, tok_{t+1})
    _, logp = drafter._run(
        context, runner.feats[: len(prompt) - 1], 0, torch.arange(len(prompt) - 1), None
    )
    return tree, logp


@pytest.mark.parametrize("kind", ["eagle", "eagle3"])
def test_converted_head_drafts_like_the_original(kind: str, tmp_path: Path) -> None:
    layers = 7 if kind == "eagle3" else 2  # EAGLE-3 reads layers 2, L/2, L-3
    loaded = _load(_save(tmp_path, "llama", seed=7, num_hidden_layers=layers, **TIED_GQA))
    cfg = loaded.config

    def make() -> EagleHead | Eagle3Head:
        if kind == "eagle":
            return random_eagle_head(cfg, CPU, torch.float32, std=0.1)
        return random_eagle3_head(cfg, CPU, torch.float32, std=0.1)

    head = make()
    with torch.no_grad():  # non-trivial norm weights, which the conversion must fold
        for name, p in head.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
    prompt = [5, 17, 99, 3, 42, 8, 120, 64, 2, 33]
    with torch.no_grad():
        want_tree, want = _tree(head, loaded.model, prompt)
        rotate_model_(loaded.model, seed=3)
        rotated_head = make()
        rotated_head.load_state_dict(head.state_dict())
        rotate_eagle_head_(rotated_head, get_rotation(loaded.model))
        got_tree, got = _tree(rotated_head, loaded.model, prompt)
        assert _rel(got.exp(), want.exp()) < 1e-4
        # the unconverted head on the rotated target drafts something else
        _, wrong = _tree(head, loaded.model, prompt)
    assert _rel(wrong.exp(), want.exp()) > 1e-2
    assert torch.equal(got_tree.tokens, want_tree.tokens)
    assert torch.equal(got_tree.parents, want_tree.parents)
    with pytest.raises(ValueError, match="already converted"):
        rotate_eagle_head_(rotated_head, get_rotation(loaded.model))


def test_near_zero_final_norm_weight_is_refused(tmp_path: Path) -> None:
    loaded = _load(_save(tmp_path, "llama", seed=8))
    with torch.no_grad():
        loaded.model.norm.weight[9] = 1e-5
    rot = rotate_model_(loaded.model)
    head = random_eagle_head(loaded.config, CPU, torch.float32)
    with pytest.raises(ValueError, match="final-norm weight has channel 9"):
        rotate_eagle_head_(head, rot)


def _shared_draft(target_path: Path, out: Path, lm_head_vocab: int = 0) -> Path:
    """A 1-layer draft borrowing the target's embedding and lm_head, as distill-draft saves."""
    from specquant.train.distill import init_student, save_draft

    target = _load(target_path).model
    student = init_student(target, 1)
    with torch.no_grad():
        student.norm.weight.mul_(torch.linspace(0.5, 2.0, student.config.hidden_size))
    save_draft(student, out, dtype=torch.float32)
    if lm_head_vocab:
        cfg = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**cfg, "specquant_lm_head_vocab": 40}))
        (out / "lm_head_vocab.json").write_text(json.dumps(list(range(0, 160, 4))))
    return out


@pytest.mark.parametrize("lm_head_vocab", [0, 40])
def test_shared_embedding_draft_follows_its_rotated_target(
    lm_head_vocab: int, tmp_path: Path
) -> None:
    target_path = _save(tmp_path / "t", "llama", seed=9, **TIED_GQA)
    draft_path = _shared_draft(target_path, tmp_path / "d", lm_head_vocab)
    tokens = torch.arange(3, 40)
    plain = _load(target_path)
    draft = load_checkpoint(draft_path, CPU, torch.float32, shared_with=plain.model)
    rotated = _load(target_path)
    rotate_model_(rotated.model)
    rdraft = load_checkpoint(draft_path, CPU, torch.float32, shared_with=rotated.model)
    with torch.no_grad():
        want = run_logits(draft.model, tokens)
        wrong = run_logits(rdraft.model, tokens)  # borrowed rotated tensors, unrotated layers
        rotate_shared_draft_(rdraft.model, rotated.model)
        got = run_logits(rdraft.model, tokens)
    keep = torch.isfinite(want)  # FR-Spec: tokens outside the draft's vocabulary are -inf
    assert torch.equal(keep, torch.isfinite(got))
    assert _rel(got[keep], want[keep]) < 1e-4
    assert _rel(wrong[keep], want[keep]) > 1e-2
    assert rdraft.model.embed_tokens.weight is rotated.model.embed_tokens.weight  # no copy


# ----------------------------------------------------------------------------- lossless
@pytest.mark.parametrize("quant", [None, "w4a8"])
def test_speculative_decoding_on_rotated_target_is_lossless(
    quant: str | None, tmp_path: Path
) -> None:
    target_path = _save(tmp_path / "t", "llama", seed=10, **TIED_GQA)
    draft_path = _shared_draft(target_path, tmp_path / "d")

    def rotated() -> LoadedModel:
        loaded = _load(target_path)
        rotate_model_(loaded.model, seed=4)
        if quant is not None:
            quantize_model(loaded.model, get_format(quant))
        return loaded

    gen_cfg = GenerationConfig(max_new_tokens=30, ignore_eos=True)
    prompt = [7, 3, 9, 1, 44]
    want = Generator(rotated(), ENGINE).generate(prompt, generation=gen_cfg).token_ids
    for spec in (
        SpecConfig(method="eagle2", depth=3, tree_topk=4, tree_size=10),
        SpecConfig(
            method="hierspec",
            draft=str(draft_path),
            min_draft_length=3,
            hier_depth=2,
            hier_topk=3,
            hier_tree_size=6,
        ),
    ):
        gen = build_generator(rotated(), ENGINE, spec)
        assert gen.generate(prompt, generation=gen_cfg).token_ids == want, spec.method
        drafter: Any = gen.drafter
        eagle = drafter if spec.method == "eagle2" else drafter.eagle
        assert eagle.head.base_rotation_folded  # converted automatically
        if spec.method == "hierspec":
            assert get_rotation(drafter.inter.model) is not None


def test_head_trained_on_a_rotated_target_is_not_converted_again(tmp_path: Path) -> None:
    from specquant.io.checkpoint import CheckpointError
    from specquant.io.eagle import load_eagle_head, save_eagle_head
    from specquant.quant.rotate import rotation_fingerprint
    from specquant.spec.factory import _for_base
    from specquant.train.eagle_train import train_eagle
    from specquant.train.loop import TrainConfig
    from specquant.train.make_data import Sample

    loaded = _load(_save(tmp_path / "m", "llama", seed=9, **TIED_GQA))
    rot = rotate_model_(loaded.model, seed=2)
    # train-eagle on the rotated target records its rotation in the head's config
    samples = [Sample([1, 2, 3], [4, 5, 6, 7]), Sample([8, 9], [10, 11, 12])]
    cfg = TrainConfig(steps=1, batch_size=2, max_len=16, heldout=0, warmup=1)
    train_eagle(loaded.model, samples, cfg, tmp_path / "h")
    config = json.loads((tmp_path / "h" / "config.json").read_text())
    fingerprint = rotation_fingerprint(rot)
    assert config["specquant_trained_on_rotation"] == fingerprint
    # the same rotation stored in bf16 has the same fingerprint
    half = Rotation(rot.matrix.bfloat16(), rot.final_norm_weight.bfloat16())
    assert rotation_fingerprint(half) == fingerprint

    def head() -> EagleHead:
        h = load_eagle_head(tmp_path / "h", loaded.config, CPU, torch.float32)
        assert isinstance(h, EagleHead) and h.trained_on_rotation == fingerprint
        return h

    used = _for_base(head(), loaded.model)  # already reads the rotated features
    assert used.out_map is None and not used.base_rotation_folded
    other = _load(_save(tmp_path / "m2", "llama", seed=9, **TIED_GQA))
    with pytest.raises(CheckpointError, match="but its base here is unrotated"):
        _for_base(head(), other.model)
    rotate_model_(other.model, seed=5)
    with pytest.raises(CheckpointError, match="rotated differently"):
        _for_base(head(), other.model)
    # a head converted for a rotated base at load time is not saved as if it were trained so
    converted = random_eagle_head(loaded.config, CPU, torch.float32)
    rotate_eagle_head_(converted, rot)
    with pytest.raises(ValueError, match="converted for a rotated base at load time"):
        save_eagle_head(converted, tmp_path / "c")
    assert not (tmp_path / "c").exists()  # refused before writing anything
