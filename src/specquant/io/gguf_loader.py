"""GGUF checkpoints (llama.cpp format): metadata -> ModelConfig, tensors -> HF names.

llama.cpp's converter permutes the rows of q/k projections of `llama`-architecture models so
that its interleaved rope matches HF's rotate-half rope; we undo that permutation here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from specquant.config import ModelConfig
from specquant.io.checkpoint import CheckpointError, TensorSource

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return f"<gguf:{gguf_name}>"  # reported by validation as an unexpected tensor


def _open(path: Path) -> Any:
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # gguf raises bare ValueError/IndexError on truncation
        raise CheckpointError(f"cannot read GGUF file {path}: {type(e).__name__}: {e}") from None


def read_metadata(reader: Any, *, skip_large_arrays: bool = True) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for key, fld in reader.fields.items():
        if skip_large_arrays and len(fld.data) > 1024:
            meta[key] = [None] * len(fld.data)  # only the length is needed (vocab size)
            continue
        try:
            meta[key] = fld.contents()
        except Exception:  # an exotic field type we never read
            continue
    return meta


def gguf_config(path: Path) -> tuple[ModelConfig, Any]:
    reader = _open(path)
    meta = read_metadata(reader)
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise CheckpointError(
            f"{path} carries 'rope_freqs.weight' (Llama 3.1 rope scaling in GGUF), which "
            "is not supported yet; load the HF safetensors directory instead"
        )
    return ModelConfig.from_gguf(meta, has_output_tensor="output.weight" in names), reader


def gguf_source(path: Path, cfg: ModelConfig, reader: Any) -> TensorSource:
    from specquant.io.gguf_dequant import dequantize

    tensors = {hf_name(t.name): t for t in reader.tensors}
    shapes = {
        name: (tuple(int(d) for d in reversed(t.shape.tolist())), str(path))
        for name, t in tensors.items()
    }
    permute_heads = {}
    if cfg.family in ("llama", "mistral"):
        permute_heads = {"q_proj": cfg.num_heads, "k_proj": cfg.num_kv_heads}

    def get(name: str) -> torch.Tensor:
        t = tensors[name]
        try:
            w = dequantize(np.asarray(t.data), t.tensor_type, shapes[name][0])
        except (ValueError, IndexError) as e:
            raise CheckpointError(f"cannot decode tensor '{t.name}' in {path}: {e}") from None
        proj = name.split(".")[-2]
        if proj in permute_heads:
            w = _unpermute(w, permute_heads[proj])
        return w

    return TensorSource(shapes, get, str(path))


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Invert llama.cpp's q/k row permutation (interleaved rope -> rotate-half rope)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
