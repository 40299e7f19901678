"""Build a `Generator` for a method: load or create the drafters and check compatibility."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from specquant.config import ConfigError, EngineConfig, ModelConfig, SpecConfig
from specquant.engine.generator import Generator
from specquant.engine.runner import ModelRunner
from specquant.io.checkpoint import CheckpointError, read_lm_head_vocab
from specquant.io.eagle import load_eagle_head, random_eagle3_head, random_eagle_head
from specquant.io.loader import LoadedModel, load_checkpoint
from specquant.layers.linear import init_random_
from specquant.models.eagle import Eagle3Head, EagleHead
from specquant.models.llama import LlamaModel
from specquant.quant.rotate import (
    get_rotation,
    rotate_eagle_head_,
    rotate_shared_draft_,
    rotation_fingerprint,
)
from specquant.spec.drafters.draft_model import DraftModelDrafter
from specquant.spec.drafters.eagle import EagleDrafter, head_features, validate_tree_params
from specquant.spec.drafters.hierarchical import HierSpecDrafter

RANDOM = "random"
RANDOM_EAGLE3 = "random-eagle3"
# Drafters trained for the embedded default (see each directory's README.md model card).
ASSETS = Path(__file__).resolve().parents[1] / "assets" / "smollm2"
SHIPPED = {
    "draft": ASSETS / "draft",
    "eagle": ASSETS / "eagle",
    "draft_eagle": ASSETS / "draft_eagle",
}


def shipped_drafter(role: str, target: LoadedModel, given: str | None) -> str | None:
    """The trained drafter for `role` when none was given and the target is the default, or
    `specquant quantize` made it from the default (its base_model says so)."""
    if given is not None:
        return given
    from specquant.io.default_model import EMBEDDED_BASE, base_model_id

    is_default = EMBEDDED_BASE in (base_model_id(target.path), target.base_model)
    path = SHIPPED[role]
    return str(path) if is_default and (path / "config.json").exists() else None


def _note(msg: str) -> None:
    print(f"[specquant] {msg}", file=sys.stderr)


def random_draft_model(target: ModelConfig, device: torch.device, dtype: torch.dtype) -> LlamaModel:
    """A tiny random Llama sharing the target's vocabulary (acceptance will be near zero)."""
    cfg = ModelConfig(
        family="llama",
        vocab_size=target.vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        rope_theta=target.rope_theta,
        max_position_embeddings=target.max_position_embeddings,
        tie_word_embeddings=True,
        eos_token_ids=target.eos_token_ids,
    )
    model = init_random_(LlamaModel(cfg), seed=0)
    model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    model.prepare_kernels()
    return model


def check_same_tokenizer(target: LoadedModel, draft: LoadedModel) -> None:
    if draft.config.vocab_size != target.config.vocab_size:
        raise ConfigError(
            f"draft model {draft.path} has vocab_size {draft.config.vocab_size}, the target "
            f"{target.config.vocab_size}: speculative decoding needs the same tokenizer"
        )
    if target.tokenizer is not None and draft.tokenizer is not None:
        tv, dv = target.tokenizer.get_vocab(), draft.tokenizer.get_vocab()
        if tv != dv:
            diff = sorted(set(tv.items()) ^ set(dv.items()))[:3]
            raise ConfigError(
                f"tokenizer mismatch between draft {draft.path} and target {target.path} "
                f"(e.g. {diff}); speculative decoding needs the same tokenizer"
            )


def _draft_model(spec_path: str | None, target: LoadedModel, role: str) -> LlamaModel:
    device, dtype = target.model.embed_tokens.weight.device, target.model.embed_tokens.weight.dtype
    if spec_path in (None, RANDOM):
        _note(f"{role}: using a randomly initialised model (pass --draft PATH for a trained one)")
        return random_draft_model(target.config, device, dtype)
    draft = load_checkpoint(Path(spec_path), device, dtype, shared_with=target.model)
    check_same_tokenizer(target, draft)
    if draft.config.shared_embeddings and get_rotation(target.model) is not None:
        # it borrowed the target's rotated embedding and lm_head: rotate it to match
        rotate_shared_draft_(draft.model, target.model)
    return draft.model


def _for_base(head: EagleHead | Eagle3Head, base: LlamaModel) -> EagleHead | Eagle3Head:
    """A head trained on the unrotated model gets the base's rotation folded in, if any; a
    head trained on a rotated model already reads its features, and must meet that same
    rotation."""
    rotation = get_rotation(base)
    if head.trained_on_rotation is not None:
        here = None if rotation is None else rotation_fingerprint(rotation)
        if here != head.trained_on_rotation:
            raise CheckpointError(
                f"this EAGLE head was trained on a rotated model (rotation "
                f"{head.trained_on_rotation}), but its base here is "
                f"{'unrotated' if here is None else f'rotated differently ({here})'}; use "
                "it with the model it was trained on, or train a head for this one"
            )
        return head
    if rotation is not None:
        rotate_eagle_head_(head, rotation)
    return head


def _eagle_head(
    spec_path: str | None, base: ModelConfig, device: torch.device, dtype: torch.dtype, role: str
) -> EagleHead | Eagle3Head:
    if spec_path in (None, RANDOM):
        _note(f"{role}: using a randomly initialised EAGLE head")
        return random_eagle_head(base, device, dtype)
    if spec_path == RANDOM_EAGLE3:
        _note(f"{role}: using a randomly initialised EAGLE-3 head")
        return random_eagle3_head(base, device, dtype)
    return load_eagle_head(spec_path, base, device, dtype)


def build_generator(
    loaded: LoadedModel, engine: EngineConfig | None = None, spec: SpecConfig | None = None
) -> Generator:
    spec = spec or SpecConfig()
    engine = engine or EngineConfig()
    tcfg = loaded.config
    device, dtype = loaded.model.embed_tokens.weight.device, loaded.model.embed_tokens.weight.dtype
    if spec.method == "ar":
        return Generator(loaded, engine)
    if spec.method == "sps":
        draft = _draft_model(shipped_drafter("draft", loaded, spec.draft), loaded, "sps draft")
        gen = Generator(loaded, engine)
        runner = ModelRunner(draft, gen.max_seq_len + 1, cuda_graphs=engine.cuda_graphs)
        gen.drafter = DraftModelDrafter(runner, spec.draft_length)
        return gen
    if spec.method == "eagle2":
        depth, topk, tree_size = spec.eagle_tree(device.type)
        validate_tree_params(depth, topk, tree_size, tcfg.vocab_size)
        eagle_path = shipped_drafter("eagle", loaded, spec.eagle)
        head = _for_base(_eagle_head(eagle_path, tcfg, device, dtype, "eagle2"), loaded.model)
        gen = Generator(loaded, engine, features=head_features(head, tcfg.num_layers))
        vocab = None
        reduce = spec.eagle_vocab == "reduced" or (
            spec.eagle_vocab == "auto" and device.type == "cpu"
        )
        if reduce and isinstance(head, EagleHead) and Path(str(eagle_path)).is_dir():
            vocab = read_lm_head_vocab(Path(str(eagle_path)), tcfg.vocab_size)
        if vocab is None and spec.eagle_vocab == "reduced":
            raise ConfigError(
                "eagle_vocab 'reduced' needs an EAGLE-1/2 head directory with "
                f"lm_head_vocab.json (train-eagle --lm-head-vocab N writes it); got {eagle_path}"
            )
        gen.drafter = EagleDrafter(
            head,
            gen.runner,
            depth=depth,
            topk=topk,
            tree_size=tree_size,
            vocab_ids=vocab,
            cuda_graphs=engine.cuda_graphs,
        )
        return gen
    assert spec.method == "hierspec"
    validate_tree_params(spec.hier_depth, spec.hier_topk, spec.hier_tree_size, tcfg.vocab_size)
    inter = _draft_model(
        shipped_drafter("draft", loaded, spec.draft), loaded, "hierspec intermediate"
    )
    draft_eagle = shipped_drafter("draft_eagle", loaded, spec.draft_eagle)
    head = _for_base(_eagle_head(draft_eagle, inter.config, device, dtype, "hierspec EAGLE"), inter)
    gen = Generator(loaded, engine)
    margin = spec.min_draft_length + spec.hier_depth + spec.hier_tree_size + 2
    features = head_features(head, inter.config.num_layers)
    m_runner = ModelRunner(
        inter, gen.max_seq_len + margin, features=features, cuda_graphs=engine.cuda_graphs
    )
    eagle = EagleDrafter(
        head,
        m_runner,
        depth=spec.hier_depth,
        topk=spec.hier_topk,
        tree_size=spec.hier_tree_size,
        cuda_graphs=engine.cuda_graphs,
    )
    gen.drafter = HierSpecDrafter(m_runner, eagle, spec.min_draft_length)
    return gen
