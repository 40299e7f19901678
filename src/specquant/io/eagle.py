"""EAGLE-1/2 head checkpoints in the public layout (SafeAILab/EAGLE).

A head directory holds `config.json` (Llama-style: hidden_size, heads, intermediate_size, ...)
and `model.safetensors` or `pytorch_model.bin` with::

    fc.weight [H, 2H]  fc.bias [H] (optional)
    layers.0.self_attn.{q,k,v,o}_proj.weight   (+ q/k/v biases for Qwen2 bases)
    layers.0.post_attention_layernorm.weight    layers.0.mlp.{gate,up,down}_proj.weight
    embed_tokens.weight [V, H]  (optional copy of the base's; only its shape is checked)
    layers.0.input_layernorm.weight             (optional; unused by EAGLE's first layer)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from specquant.config import ConfigError, ModelConfig
from specquant.io.checkpoint import CheckpointError, expected_shapes, load_into
from specquant.models.eagle import EagleHead

OPTIONAL = ("embed_tokens.weight", "layers.0.input_layernorm.weight", "fc.bias")


def head_config(raw: dict, base: ModelConfig) -> ModelConfig:
    """The head's config: its own config.json over the base model's shape."""
    defaults = {
        "hidden_size": base.hidden_size,
        "intermediate_size": base.intermediate_size,
        "num_attention_heads": base.num_heads,
        "num_key_value_heads": base.num_kv_heads,
        "head_dim": base.head_dim,
        "vocab_size": base.vocab_size,
        "rms_norm_eps": base.rms_norm_eps,
        "max_position_embeddings": base.max_position_embeddings,
        "rope_theta": base.rope_theta,
    }
    merged = {**defaults, **raw, "num_hidden_layers": 1, "architectures": ["LlamaForCausalLM"]}
    cfg = ModelConfig.from_hf(merged)
    if cfg.hidden_size != base.hidden_size:
        raise ConfigError(
            f"EAGLE head hidden_size {cfg.hidden_size} does not match the base model's "
            f"{base.hidden_size}"
        )
    if cfg.vocab_size != base.vocab_size:
        raise ConfigError(
            f"EAGLE head vocab_size {cfg.vocab_size} does not match the base model's "
            f"{base.vocab_size}: it was trained for a different tokenizer"
        )
    # Positions must mean the same thing to head and base (rope), and the head's layer is a
    # copy of the base's layer type (bias flags); sliding windows never bind a 1-layer head.
    fields = cfg.to_dict()
    fields.update(
        rope_scaling=base.rope_scaling,
        qkv_bias=base.qkv_bias,
        o_bias=base.o_bias,
        sliding_window=None,
    )
    return ModelConfig(**fields)


def head_expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    out = {
        name.removeprefix("model."): shape
        for name, shape in expected_shapes(cfg).items()
        if name.startswith("model.layers.0.") and "input_layernorm" not in name
    }
    h = cfg.hidden_size
    out["fc.weight"] = (h, 2 * h)
    out["fc.bias"] = (h,)
    out["embed_tokens.weight"] = (cfg.vocab_size, h)
    out["layers.0.input_layernorm.weight"] = (h,)
    return out


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], Path]:
    st, binf = path / "model.safetensors", path / "pytorch_model.bin"
    try:
        if st.exists():
            from safetensors.torch import load_file

            return load_file(str(st)), st
        if binf.exists():
            return torch.load(binf, map_location="cpu", weights_only=True), binf
    except Exception as e:  # truncated or corrupt files raise many types
        raise CheckpointError(f"cannot read EAGLE head weights from {path}: {e}") from None
    raise CheckpointError(f"{path} has neither model.safetensors nor pytorch_model.bin")


def load_eagle_head(
    path: str | Path, base: ModelConfig, device: torch.device, dtype: torch.dtype
) -> EagleHead:
    path = Path(path)
    if not (path / "config.json").exists():
        raise CheckpointError(f"EAGLE head directory {path} has no config.json")
    try:
        raw = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / 'config.json'} is not valid JSON: {e}") from None
    cfg = head_config(raw, base)
    tensors, file = _read_tensors(path)
    want = head_expected_shapes(cfg)
    problems = []
    for name, shape in want.items():
        if name not in tensors:
            if name not in OPTIONAL:
                problems.append(f"missing tensor '{name}' (expected shape {list(shape)})")
        elif tuple(tensors[name].shape) != shape:
            problems.append(
                f"tensor '{name}' has shape {list(tensors[name].shape)}, expected {list(shape)}"
            )
    problems += [f"unexpected tensor '{n}'" for n in sorted(set(tensors) - set(want))]
    if problems:
        raise CheckpointError(
            f"EAGLE head {file} does not match its config and base model:\n  "
            + "\n  ".join(problems)
        )
    with torch.device("meta"):
        head = EagleHead(cfg, fc_bias="fc.bias" in tensors)
    head.to_empty(device=device)
    names = {
        n: n for n in tensors if n not in ("embed_tokens.weight",) and "input_layernorm" not in n
    }
    load_into(head, names, tensors.__getitem__, dtype)
    head.eval().requires_grad_(False)
    head.prepare_kernels()
    return head


def random_eagle_head(
    base: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0, std: float = 0.02
) -> EagleHead:
    """A randomly initialised head (every method must run with any compatible drafter)."""
    cfg = head_config({}, base)
    gen = torch.Generator().manual_seed(seed)
    head = EagleHead(cfg)
    with torch.no_grad():
        for name, p in head.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    head.to(device=device, dtype=dtype).eval().requires_grad_(False)
    head.prepare_kernels()
    return head


def save_eagle_head(head: EagleHead, path: str | Path) -> None:
    """Write config.json + model.safetensors in the public (unfused) layout."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = head.config
    tensors: dict[str, torch.Tensor] = {"fc.weight": head.fc.weight}
    if head.fc.bias is not None:
        tensors["fc.bias"] = head.fc.bias
    layer = head.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    q, k, v = attn.qkv_proj.weight.split(attn.split, dim=0)
    tensors |= {
        "layers.0.self_attn.q_proj.weight": q,
        "layers.0.self_attn.k_proj.weight": k,
        "layers.0.self_attn.v_proj.weight": v,
        "layers.0.self_attn.o_proj.weight": attn.o_proj.weight,
        "layers.0.post_attention_layernorm.weight": layer.post_attention_layernorm.weight,
    }
    if attn.qkv_proj.bias is not None:
        qb, kb, vb = attn.qkv_proj.bias.split(attn.split, dim=0)
        tensors |= {
            "layers.0.self_attn.q_proj.bias": qb,
            "layers.0.self_attn.k_proj.bias": kb,
            "layers.0.self_attn.v_proj.bias": vb,
        }
    gate, up = mlp.gate_up_proj.weight.chunk(2, dim=0)
    tensors |= {
        "layers.0.mlp.gate_proj.weight": gate,
        "layers.0.mlp.up_proj.weight": up,
        "layers.0.mlp.down_proj.weight": mlp.down_proj.weight,
    }
    save_file(
        {k: t.detach().contiguous().cpu() for k, t in tensors.items()},
        str(path / "model.safetensors"),
    )
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "num_hidden_layers": 1,
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings,
        "bias": head.fc.bias is not None,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
