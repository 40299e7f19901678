"""EAGLE-1/2 and EAGLE-3 head checkpoints in the public layouts (SafeAILab/EAGLE).

A head directory holds `config.json` (Llama-style: hidden_size, heads, intermediate_size, ...)
and `model.safetensors` or `pytorch_model.bin` with::

    fc.weight [H, 2H]  fc.bias [H] (optional)
    layers.0.self_attn.{q,k,v,o}_proj.weight   (+ q/k/v biases for Qwen2 bases)
    layers.0.post_attention_layernorm.weight    layers.0.mlp.{gate,up,down}_proj.weight
    embed_tokens.weight [V, H]  (optional copy of the base's; only its shape is checked)
    layers.0.input_layernorm.weight             (optional; unused by EAGLE's first layer)

EAGLE-3 heads (config adds `draft_vocab_size`, optionally `target_hidden_size`)::

    fc.weight [H, 3 H_base]   norm.weight [H]   lm_head.weight [V_draft, H]
    d2t [V_draft] (draft id -> target id offset)   t2d [V] (optional, unused)
    midlayer.{input_layernorm,hidden_norm,post_attention_layernorm}.weight [H]
    midlayer.self_attn.{q,k,v}_proj.weight [., 2H]   midlayer.self_attn.o_proj.weight
    midlayer.mlp.{gate,up,down}_proj.weight   embed_tokens.weight [V, H] (needed if H != H_base)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from specquant.config import ConfigError, ModelConfig
from specquant.io.checkpoint import CheckpointError, expected_shapes, load_into
from specquant.io.export import (
    llama_config_dict,
    save_safetensors,
    unfused_state_dict,
    write_config,
)
from specquant.layers.linear import init_random_
from specquant.models.eagle import Eagle3Head, EagleHead

OPTIONAL = ("embed_tokens.weight", "layers.0.input_layernorm.weight", "fc.bias")


# config key: fingerprint of the rotated base a head was trained on (quant.rotate)
ROTATION_KEY = "specquant_trained_on_rotation"


def head_config(raw: dict, base: ModelConfig, *, check_hidden: bool = True) -> ModelConfig:
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
    raw = {k: v for k, v in raw.items() if not k.startswith("_")}
    merged = {**defaults, **raw, "num_hidden_layers": 1, "architectures": ["LlamaForCausalLM"]}
    if "head_dim" not in raw and "hidden_size" in raw and "num_attention_heads" in raw:
        merged["head_dim"] = int(raw["hidden_size"]) // int(raw["num_attention_heads"])
    cfg = ModelConfig.from_hf(merged)
    if check_hidden and cfg.hidden_size != base.hidden_size:
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


def _check(
    tensors: dict[str, torch.Tensor],
    want: dict[str, tuple[int, ...]],
    optional: tuple[str, ...],
    file: Path,
) -> None:
    problems = []
    for name, shape in want.items():
        if name not in tensors:
            if name not in optional:
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


def load_eagle_head(
    path: str | Path, base: ModelConfig, device: torch.device, dtype: torch.dtype
) -> EagleHead | Eagle3Head:
    """Load an EAGLE-1/2 or EAGLE-3 head (told apart by its tensors)."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise CheckpointError(f"EAGLE head directory {path} has no config.json")
    try:
        raw = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / 'config.json'} is not valid JSON: {e}") from None
    tensors, file = _read_tensors(path)
    if "d2t" in tensors or any(n.startswith("midlayer.") for n in tensors):
        return _load_eagle3(raw, tensors, file, base, device, dtype)
    cfg = head_config(raw, base)
    _check(tensors, head_expected_shapes(cfg), OPTIONAL, file)
    with torch.device("meta"):
        head = EagleHead(cfg, fc_bias="fc.bias" in tensors)
    head.to_empty(device=device).to(dtype)  # load_into copies into these tensors' dtype
    names = {
        n: n for n in tensors if n not in ("embed_tokens.weight",) and "input_layernorm" not in n
    }
    load_into(head, names, tensors.__getitem__, dtype)
    head.eval().requires_grad_(False)
    head.prepare_kernels()
    head.trained_on_rotation = raw.get(ROTATION_KEY)
    return head


def random_eagle_head(
    base: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0, std: float = 0.02
) -> EagleHead:
    """A randomly initialised head (every method must run with any compatible drafter)."""
    head = init_random_(EagleHead(head_config({}, base)), seed, std)
    head.to(device=device, dtype=dtype).eval().requires_grad_(False)
    head.prepare_kernels()
    return head


def save_eagle_head(head: EagleHead, path: str | Path, dtype: torch.dtype | None = None) -> None:
    """Write config.json + model.safetensors in the public (unfused) layout."""
    if head.base_rotation_folded:  # checked before anything is written
        raise ValueError(
            "this EAGLE head was converted for a rotated base at load time; save the head "
            "as trained (it is converted again whenever it is loaded for a rotated base)"
        )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_safetensors(unfused_state_dict(head, head.config), path, dtype)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    config |= llama_config_dict(head.config) | {"bias": head.fc.bias is not None}
    if head.trained_on_rotation is not None:
        config[ROTATION_KEY] = head.trained_on_rotation
    write_config(path, config)


# ---------------------------------------------------------------------------- EAGLE-3
EAGLE3_OPTIONAL = ("t2d", "embed_tokens.weight")


def eagle3_config(raw: dict, base: ModelConfig) -> tuple[ModelConfig, int]:
    """(head config, draft vocabulary size); checks the head against the base model."""
    base_hidden = int(raw.get("target_hidden_size") or raw.get("hidden_size") or base.hidden_size)
    if base_hidden != base.hidden_size:
        raise ConfigError(
            f"EAGLE-3 head reads features of width {base_hidden} but the base model's "
            f"hidden_size is {base.hidden_size}"
        )
    own = {k: v for k, v in raw.items() if k not in ("target_hidden_size", "draft_vocab_size")}
    own.setdefault("hidden_size", base.hidden_size)
    cfg = head_config(own, base, check_hidden=False)
    draft_vocab = int(raw.get("draft_vocab_size") or cfg.vocab_size)
    return cfg, draft_vocab


def eagle3_expected_shapes(
    cfg: ModelConfig, base_hidden: int, draft_vocab: int
) -> dict[str, tuple[int, ...]]:
    h, q, kv, inter = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    m = "midlayer."
    out = {
        "fc.weight": (h, 3 * base_hidden),
        "norm.weight": (h,),
        "lm_head.weight": (draft_vocab, h),
        "d2t": (draft_vocab,),
        "t2d": (cfg.vocab_size,),
        "embed_tokens.weight": (cfg.vocab_size, h),
        m + "input_layernorm.weight": (h,),
        m + "hidden_norm.weight": (h,),
        m + "post_attention_layernorm.weight": (h,),
        m + "self_attn.q_proj.weight": (q, 2 * h),
        m + "self_attn.k_proj.weight": (kv, 2 * h),
        m + "self_attn.v_proj.weight": (kv, 2 * h),
        m + "self_attn.o_proj.weight": (h, q),
        m + "mlp.gate_proj.weight": (inter, h),
        m + "mlp.up_proj.weight": (inter, h),
        m + "mlp.down_proj.weight": (h, inter),
    }
    return out


def _load_eagle3(
    raw: dict,
    tensors: dict[str, torch.Tensor],
    file: Path,
    base: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
) -> Eagle3Head:
    cfg, draft_vocab = eagle3_config(raw, base)
    optional = EAGLE3_OPTIONAL
    if cfg.hidden_size != base.hidden_size and "embed_tokens.weight" not in tensors:
        raise CheckpointError(
            f"EAGLE-3 head {file} has hidden_size {cfg.hidden_size} != the base model's "
            f"{base.hidden_size}, so it needs its own 'embed_tokens.weight'"
        )
    _check(tensors, eagle3_expected_shapes(cfg, base.hidden_size, draft_vocab), optional, file)
    d2t = tensors["d2t"].long()
    targets = torch.arange(draft_vocab) + d2t
    if int(targets.min()) < 0 or int(targets.max()) >= base.vocab_size:
        raise CheckpointError(
            f"EAGLE-3 head {file}: d2t maps draft ids outside the target vocabulary "
            f"[0, {base.vocab_size})"
        )
    with torch.device("meta"):
        head = Eagle3Head(cfg, base.hidden_size, draft_vocab)
    head.to_empty(device=device).to(dtype)
    names = {
        n: ("hidden_norm.weight" if n == "midlayer.hidden_norm.weight" else n)
        for n in tensors
        if n not in ("d2t", "t2d", "embed_tokens.weight")
    }
    load_into(head, names, tensors.__getitem__, dtype)
    head.d2t.copy_(d2t)
    if cfg.hidden_size != base.hidden_size:
        head.embed_tokens = torch.nn.Embedding(
            cfg.vocab_size, cfg.hidden_size, device=device, dtype=dtype
        )
        with torch.no_grad():
            head.embed_tokens.weight.copy_(tensors["embed_tokens.weight"])
    head.eval().requires_grad_(False)
    head.prepare_kernels()
    head.trained_on_rotation = raw.get(ROTATION_KEY)
    return head


def random_eagle3_head(
    base: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    draft_vocab: int | None = None,
    seed: int = 0,
    std: float = 0.02,
) -> Eagle3Head:
    """A random EAGLE-3 head; its reduced vocabulary maps to evenly spread target ids."""
    cfg = head_config({}, base)
    draft_vocab = draft_vocab or max(2, base.vocab_size // 4)
    head = init_random_(Eagle3Head(cfg, base.hidden_size, draft_vocab), seed, std)
    with torch.no_grad():
        target_ids = torch.linspace(0, base.vocab_size - 1, draft_vocab).long()
        head.d2t.copy_(target_ids - torch.arange(draft_vocab))
    head.to(device=device, dtype=dtype).eval().requires_grad_(False)
    head.prepare_kernels()
    return head


def save_eagle3_head(head: Eagle3Head, path: str | Path, dtype: torch.dtype | None = None) -> None:
    """Write config.json + model.safetensors in EAGLE-3's public (unfused) layout."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = unfused_state_dict(head, head.config)
    # EAGLE-3 checkpoints keep the hidden-state norm inside the mid layer
    tensors["midlayer.hidden_norm.weight"] = tensors.pop("hidden_norm.weight")
    save_safetensors(tensors, path, dtype)
    config = {"architectures": ["LlamaForCausalLMEagle3"]} | llama_config_dict(head.config)
    write_config(path, config | {"draft_vocab_size": head.lm_head.out_features})
