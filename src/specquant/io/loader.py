"""Load a model (weights + config + tokenizer) from an HF directory or a GGUF file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from specquant.config import ModelConfig
from specquant.io.checkpoint import (
    CheckpointError,
    apply_lm_head_vocab,
    materialize,
    read_config_json,
    safetensors_source,
)
from specquant.io.default_model import default_model_path
from specquant.io.gguf_loader import gguf_config, gguf_source
from specquant.io.tokenizer import load_tokenizer
from specquant.models.llama import LlamaModel


@dataclass
class LoadedModel:
    model: LlamaModel
    config: ModelConfig
    tokenizer: Any  # a transformers PreTrainedTokenizer(Fast)
    path: Path
    quantization: str | None = None  # the quantized format it was loaded from, if any
    base_model: str | None = None  # what a specquant-quantized checkpoint was made from


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def has_tokenizer_files(model_dir: Path) -> bool:
    """Bare weight directories (tests, exported drafters) load without a tokenizer."""
    return any((model_dir / name).exists() for name in TOKENIZER_FILES)


def resolve_path(model: str | Path | None) -> Path:
    if model is None:
        return default_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise CheckpointError(f"model path {path} does not exist")
    return path


def load_checkpoint(
    model: str | Path | None,
    device: torch.device,
    dtype: torch.dtype,
    *,
    with_tokenizer: bool = True,
    shared_with: LlamaModel | None = None,
) -> LoadedModel:
    path = resolve_path(model)
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            path = ggufs[0]
        else:
            found = ", ".join(p.name for p in ggufs) or "no config.json and no .gguf"
            raise CheckpointError(f"cannot tell which model to load in {path}: found {found}")
    quantization = base_model = None
    if path.is_dir():
        from specquant.io.quant_checkpoint import materialize_quantized, quantization_layout

        raw = read_config_json(path)
        cfg = ModelConfig.from_hf(raw)
        source = safetensors_source(path)
        layout = quantization_layout(raw, path)
        if layout is None:
            net = materialize(cfg, source, device, dtype, shared_with)
        else:
            net = materialize_quantized(cfg, source, layout, device, dtype)
            quantization = layout.description
            base_model = quantized_from(raw, path)
        apply_lm_head_vocab(net, path)
        tok = load_tokenizer(path) if with_tokenizer and has_tokenizer_files(path) else None
    elif path.suffix == ".gguf":
        cfg, reader = gguf_config(path)
        net = materialize(cfg, gguf_source(path, cfg, reader), device, dtype)
        tok = load_tokenizer(path.parent, gguf_file=path) if with_tokenizer else None
    else:
        raise CheckpointError(
            f"unsupported model file {path}: expected an HF directory (config.json + "
            "*.safetensors) or a .gguf file"
        )
    return LoadedModel(net, cfg, tok, path, quantization, base_model)


def quantized_from(raw: dict[str, Any], path: Path) -> str | None:
    """quantization_config.base_model of a specquant checkpoint (None for imports and for
    checkpoints written before it was recorded)."""
    qcfg = raw.get("quantization_config")
    base = qcfg.get("base_model") if isinstance(qcfg, dict) else None
    if base is not None and not isinstance(base, str):
        raise CheckpointError(
            f"{path}: quantization_config.base_model must be a string or null, got {base!r}"
        )
    return base
