"""Checkpoint reading: HF safetensors directories, name/shape validation, and weight placement.

Every loader produces a `TensorSource`: a table of HF-style tensor names -> (shape, file) that
is validated against what the config expects *before* any tensor data is read, and a `get`
that materialises one tensor. `materialize` then builds the model and copies weights in,
fusing q/k/v and gate/up as `models.llama.PACKED_MODULES` declares.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from specquant.config import ModelConfig
from specquant.models.llama import PACKED_MODULES, LlamaModel

# Tensors some exporters write that carry no weights.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names tensor, shapes and file."""


@dataclass
class TensorSource:
    shapes: dict[str, tuple[tuple[int, ...], str]]  # HF name -> (shape, file it lives in)
    get: Callable[[str], torch.Tensor]
    description: str


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor names and shapes a checkpoint for `cfg` must contain."""
    h, kv, q, inter = cfg.hidden_size, cfg.kv_size, cfg.q_size, cfg.intermediate_size
    out: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (cfg.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, h)
    if cfg.shared_embeddings:  # borrowed from the target at load time
        out.pop("model.embed_tokens.weight")
        out.pop("lm_head.weight", None)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "post_attention_layernorm.weight"] = (h,)
        out[p + "self_attn.q_proj.weight"] = (q, h)
        out[p + "self_attn.k_proj.weight"] = (kv, h)
        out[p + "self_attn.v_proj.weight"] = (kv, h)
        out[p + "self_attn.o_proj.weight"] = (h, q)
        if cfg.o_bias:
            out[p + "self_attn.o_proj.bias"] = (h,)
        if cfg.qkv_bias:
            out[p + "self_attn.q_proj.bias"] = (q,)
            out[p + "self_attn.k_proj.bias"] = (kv,)
            out[p + "self_attn.v_proj.bias"] = (kv,)
        out[p + "mlp.gate_proj.weight"] = (inter, h)
        out[p + "mlp.up_proj.weight"] = (inter, h)
        out[p + "mlp.down_proj.weight"] = (h, inter)
    return out


def validate(cfg: ModelConfig, source: TensorSource) -> None:
    """Fail on missing, unexpected or mis-shaped tensors, listing every problem."""
    optional = {}
    if cfg.tie_word_embeddings:
        # Some exporters write the tied head anyway; accept it if it has the right shape.
        optional["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    check_tensors(source, expected_shapes(cfg), optional, "does not match its config")


def check_tensors(
    source: TensorSource,
    want: dict[str, tuple[int, ...]],
    optional: dict[str, tuple[int, ...]] | None = None,
    what: str = "does not match its config",
) -> None:
    """Every name of `want` present with its shape, names of `optional` allowed (with their
    shape), nothing else; raises one `CheckpointError` listing every problem."""
    optional = optional or {}
    have = {n: v for n, v in source.shapes.items() if not n.endswith(IGNORED_SUFFIXES)}
    problems = []
    for name, shape in want.items():
        if name not in have:
            problems.append(f"missing tensor '{name}' (expected shape {list(shape)})")
    for name in sorted(have):
        shape = want.get(name, optional.get(name))
        if shape is None:
            problems.append(
                f"unexpected tensor '{name}' {list(have[name][0])} (in {have[name][1]})"
            )
        elif tuple(have[name][0]) != tuple(shape):
            problems.append(
                f"tensor '{name}' has shape {list(have[name][0])}, expected {list(shape)} "
                f"(in {have[name][1]})"
            )
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise CheckpointError(
            f"checkpoint {source.description} {what} ({len(problems)} problem(s)):\n  {shown}{more}"
        )


def materialize(
    cfg: ModelConfig,
    source: TensorSource,
    device: torch.device,
    dtype: torch.dtype,
    shared_with: LlamaModel | None = None,
) -> LlamaModel:
    """Validate, then build the model on `device` and copy the weights in. A draft saved
    with `shared_embeddings` takes embedding and lm_head from `shared_with`, its target."""
    if cfg.shared_embeddings:
        if shared_with is None:
            raise CheckpointError(
                f"{source.description} is a draft model that shares its target's embeddings; "
                "load it as a drafter of that target (--draft PATH)"
            )
        tcfg = shared_with.config
        if (tcfg.vocab_size, tcfg.hidden_size) != (cfg.vocab_size, cfg.hidden_size):
            raise CheckpointError(
                f"{source.description} shares embeddings of shape "
                f"[{cfg.vocab_size}, {cfg.hidden_size}] but the target's are "
                f"[{tcfg.vocab_size}, {tcfg.hidden_size}]"
            )
    validate(cfg, source)
    with torch.device("meta"):
        model = LlamaModel(cfg)
    model.to_empty(device=device).to(dtype)  # load_into copies into these tensors' dtype
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight  # to_empty unties shared params

    skip = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    if cfg.shared_embeddings:
        assert shared_with is not None
        model.embed_tokens.weight = shared_with.embed_tokens.weight
        model.lm_head.weight = shared_with.lm_head.weight
        skip |= {"lm_head.weight", "embed_tokens.weight"}
    names = [n for n in source.shapes if not n.endswith(IGNORED_SUFFIXES) and n not in skip]
    load_into(model, {n: n.removeprefix("model.") for n in names}, source.get, dtype, skip)
    model.eval().requires_grad_(False)
    model.prepare_kernels()
    return model


LM_HEAD_VOCAB_FILE = "lm_head_vocab.json"


def read_lm_head_vocab(
    model_dir: Path, vocab_size: int, size: int | None = None
) -> torch.Tensor | None:
    """The FR-Spec token ids saved next to a checkpoint (`lm_head_vocab.json`: a draft
    model's or an EAGLE head's), or None when there is no such file; `size`, when given, is
    the count the checkpoint's config declares."""
    path = Path(model_dir) / LM_HEAD_VOCAB_FILE
    if not path.exists():
        return None
    try:
        ids = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    valid = isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    if not valid or not ids or len(set(ids)) != len(ids):
        raise CheckpointError(f"{path} must be a non-empty list of distinct token ids")
    if size is not None and len(ids) != size:
        raise CheckpointError(
            f"{path} must hold {size} token ids (its config says so), not {len(ids)}"
        )
    if not all(0 <= i < vocab_size for i in ids):
        raise CheckpointError(f"{path} holds token ids outside the vocabulary [0, {vocab_size})")
    return torch.tensor(ids, dtype=torch.long)


def apply_lm_head_vocab(model: LlamaModel, model_dir: Path) -> None:
    """Restrict a draft's lm_head to the token ids saved next to its checkpoint (FR-Spec)."""
    cfg = model.config
    if not cfg.lm_head_vocab:
        return
    ids = read_lm_head_vocab(model_dir, cfg.vocab_size, cfg.lm_head_vocab)
    if ids is None:
        raise CheckpointError(
            f"{model_dir} declares a reduced lm_head but has no {LM_HEAD_VOCAB_FILE}"
        )
    model.restrict_lm_head(ids)


def load_into(
    module: torch.nn.Module,
    names: dict[str, str],  # checkpoint name -> our (unfused) parameter name
    get: Callable[[str], torch.Tensor],
    dtype: torch.dtype,
    allowed_missing: Collection[str] = (),
) -> None:
    """Copy checkpoint tensors into `module`, stacking q/k/v and gate/up into the fused
    parameters that `PACKED_MODULES` declares."""
    params = dict(module.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()

    def put(ours: str, tensor: torch.Tensor) -> None:
        with torch.no_grad():
            params[ours].copy_(tensor.to(dtype))
        loaded.add(ours)

    packed_parts = {part: fused for fused, parts in PACKED_MODULES.items() for part in parts}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, ours in names.items():
        module_path, _, leaf = ours.rpartition(".")
        parent, _, proj = module_path.rpartition(".")
        if proj in packed_parts:
            fused = f"{parent}.{packed_parts[proj]}.{leaf}"
            group = pending.setdefault(fused, {})
            group[proj] = get(name)
            parts = PACKED_MODULES[packed_parts[proj]]
            if len(group) == len(parts):
                put(fused, torch.cat([group[p] for p in parts], dim=0))
                del pending[fused]
        else:
            put(ours, get(name))
    missing = set(params) - loaded - set(allowed_missing)
    assert not pending and not missing, f"loader bug: unfilled {sorted(pending) + sorted(missing)}"


# ------------------------------------------------------------------------ HF safetensors
def read_hf_config(model_dir: Path) -> ModelConfig:
    return ModelConfig.from_hf(read_config_json(model_dir))


def read_config_json(model_dir: Path) -> dict[str, Any]:
    """The raw config.json of an HF directory (a JSON object)."""
    path = model_dir / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{model_dir} has no config.json") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    return raw


def safetensors_source(model_dir: Path) -> TensorSource:
    """Single-file or sharded (`model.safetensors.index.json`) safetensors checkpoint."""
    from safetensors import SafetensorError, safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e!r}") from None
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
        if not files:
            bins = sorted(p.name for p in model_dir.glob("*.bin"))
            hint = f" (found {', '.join(bins)}; convert them to safetensors)" if bins else ""
            raise CheckpointError(f"no *.safetensors files in {model_dir}{hint}")
    handles = {}
    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    for fname in files:
        path = model_dir / fname
        if not path.exists():
            raise CheckpointError(
                f"shard {fname} listed in {index.name} is missing from {model_dir}"
            )
        try:
            handle = safe_open(str(path), framework="pt")
            for name in handle.keys():  # noqa: SIM118  (safe_open is not a Mapping)
                shapes[name] = (tuple(handle.get_slice(name).get_shape()), str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read safetensors file {path}: {e}") from None
        handles[str(path)] = handle
        _check_safetensors_size(path, handle)

    def get(name: str) -> torch.Tensor:
        file = shapes[name][1]
        try:
            return handles[file].get_tensor(name)
        except Exception as e:  # the file can change or be truncated under us
            raise CheckpointError(f"cannot read tensor '{name}' from {file}: {e}") from None

    return TensorSource(shapes, get, str(model_dir))


def _check_safetensors_size(path: Path, handle: object) -> None:
    """A truncated file still has a readable header; compare its data size with the file's."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    actual = path.stat().st_size - 8 - header_len
    if actual < end:
        raise CheckpointError(
            f"safetensors file {path} is truncated: header describes {end} data bytes, "
            f"file holds {actual}"
        )
