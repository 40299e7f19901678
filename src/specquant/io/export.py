"""Writing checkpoints: the inverse of loading.

`unfused_state_dict` splits the fused q/k/v and gate/up parameters back into their HF names
(the inverse of `checkpoint.load_into`); `save_safetensors` writes one file, or HF-style
shards with an index when the tensors exceed `MAX_SHARD_BYTES`; `llama_config_dict` holds
the config.json keys every Llama-style checkpoint we write shares.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from specquant.config import ModelConfig
from specquant.models.llama import PACKED_MODULES

MAX_SHARD_BYTES = 15 * 2**20  # keeps every file under common 16 MiB transfer limits


def _split_sizes(cfg: ModelConfig, fused: str) -> list[int]:
    if fused == "qkv_proj":
        return [cfg.q_size, cfg.kv_size, cfg.kv_size]
    return [cfg.intermediate_size, cfg.intermediate_size]


def unfused_state_dict(
    module: torch.nn.Module, cfg: ModelConfig, skip: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """`module`'s state dict with fused projections split into their HF parts; names that
    start with any of `skip` are left out."""
    out: dict[str, torch.Tensor] = {}
    for name, t in module.state_dict().items():
        if name.startswith(skip):
            continue
        module_path, _, leaf = name.rpartition(".")
        parent, _, fused = module_path.rpartition(".")
        if fused in PACKED_MODULES:
            # an input permutation (act-order `perm` [K]) applies to every part alike
            parts = len(PACKED_MODULES[fused])
            chunks = (
                [t.clone() for _ in range(parts)]
                if leaf == "perm"
                else t.split(_split_sizes(cfg, fused), dim=0)
            )
            for part, chunk in zip(PACKED_MODULES[fused], chunks, strict=True):
                out[f"{parent}.{part}.{leaf}"] = chunk
        else:
            out[name] = t
    return out


def save_safetensors(
    tensors: dict[str, torch.Tensor], out_dir: Path, dtype: torch.dtype | None = None
) -> None:
    """Contiguous CPU copies (floating tensors cast to `dtype`) into model.safetensors, or
    into shards plus model.safetensors.index.json when larger than MAX_SHARD_BYTES."""
    from safetensors.torch import save_file

    ready = {}
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        ready[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in ready.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"))
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / fname))
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in ready.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def llama_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    """config.json keys shared by every Llama-style checkpoint we write."""
    out: dict[str, Any] = {
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings,
    }
    if cfg.rope_scaling.rope_type != "default":
        out["rope_scaling"] = dataclasses.asdict(cfg.rope_scaling)
    return out


ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


def model_config_dict(cfg: ModelConfig, tie_word_embeddings: bool | None = None) -> dict[str, Any]:
    """A complete config.json for a standalone model: `ModelConfig.from_hf` reads it back to
    `cfg` (family, biases and sliding window included)."""
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURES[cfg.family]],
        "model_type": cfg.family,
        **llama_config_dict(cfg),
        "tie_word_embeddings": (
            cfg.tie_word_embeddings if tie_word_embeddings is None else tie_word_embeddings
        ),
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids),
    }
    if cfg.family == "llama":
        out["attention_bias"] = cfg.o_bias
    if cfg.sliding_window is not None:
        out["sliding_window"] = cfg.sliding_window
        if cfg.family == "qwen2":
            out["use_sliding_window"] = True
    return out


def write_config(out_dir: Path, config: dict[str, Any]) -> None:
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
