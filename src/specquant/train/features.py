"""The target's features for drafter training: computed on the fly, or cached by make-data.

`make-data --cache-features` stores, next to `data.jsonl`, the post-norm features of every
record (prompt and answer, [L, H], bfloat16) in one safetensors file per window::

    data.jsonl.features/w0000000.safetensors    keys: record index ("0", "1", ...)
                                                metadata: {"target": model fingerprint}

`train-eagle --features DIR` then reads them instead of running the target at every step
(EAGLE's own recipe caches hidden states too). A cache made by another model is refused: its
fingerprint (config, final norm, lm_head and the first rows of every decoder linear as
stored, so a quantized model differs from its dense original) must match the target's.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from specquant.layers.attention import AttnMetadata
from specquant.layers.linear import QLinear
from specquant.layers.rope import RopeTable
from specquant.models.llama import LlamaModel

CACHE_DTYPE = torch.bfloat16  # what bf16 autocast training computes on CUDA anyway


def features(target: LlamaModel, tokens: torch.Tensor, rope: RopeTable) -> torch.Tensor:
    """Post-norm features [B, T, H] of a right-padded batch (no grad)."""
    b, t = tokens.shape
    with torch.no_grad():
        cache = target.new_cache(t, batch=b)
        meta = AttnMetadata.plan(rope, 0, t, sliding_window=target.config.sliding_window)
        last = torch.tensor([t - 1], device=tokens.device)
        out = target(tokens, cache, meta, logits_index=last, return_hidden=True)
    assert out.hidden is not None
    return out.hidden.float()


def model_fingerprint(model: LlamaModel) -> str:
    """A short id of a model's weights and shape: cached features belong to one model. It
    reads the first rows of every decoder linear as stored (codes and scales when quantized,
    with the format's name), so a quantized model and its dense original differ."""
    cfg = model.config
    digest = hashlib.sha256(json.dumps([cfg.hidden_size, cfg.num_layers, cfg.vocab_size]).encode())
    tensors = [model.norm.weight, model.lm_head.weight[:8]]
    for module in model.layers.modules():
        if isinstance(module, QLinear):
            if module.spec is not None:
                digest.update(module.spec.name.encode())
                tensors += [t[:2] for t in module.qtensors().values()]
            else:
                tensors.append(module.weight[:2])
    for tensor in tensors:
        raw = tensor.detach().cpu().contiguous()
        digest.update(raw.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def features_dir(data: Path) -> Path:
    """Where make-data caches the features of `data` (`data.jsonl.features/`)."""
    return data.with_name(data.name + ".features")


@torch.no_grad()
def cache_features(
    target: LlamaModel,
    records: list[tuple[int, list[int]]],  # (record index, prompt + answer ids)
    out_file: Path,
    batch_size: int = 16,
) -> None:
    """Compute the features of `records` (length-sorted batches) into one safetensors file."""
    from safetensors.torch import save_file

    param = target.embed_tokens.weight
    longest = max((len(ids) for _, ids in records), default=1)
    rope = RopeTable(target.config, longest, param.device, param.dtype)
    tensors: dict[str, torch.Tensor] = {}
    order = sorted(records, key=lambda r: len(r[1]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(ids) for _, ids in chunk)
        tokens = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, (_, ids) in enumerate(chunk):
            tokens[i, : len(ids)] = torch.tensor(ids)
        feats = features(target, tokens.to(param.device), rope)
        for i, (index, ids) in enumerate(chunk):
            tensors[str(index)] = feats[i, : len(ids)].to(CACHE_DTYPE).cpu().contiguous()
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"target": model_fingerprint(target)})
    tmp.replace(out_file)  # a window's file is complete or absent


class FeatureStore:
    """Cached features of one make-data file, read lazily: record index -> [L, H]."""

    def __init__(self, directory: Path, target: LlamaModel):
        from safetensors import safe_open

        files = sorted(Path(directory).glob("w*.safetensors"))
        if not files:
            raise FileNotFoundError(f"feature cache {directory} holds no w*.safetensors files")
        want = model_fingerprint(target)
        self.where: dict[int, Path] = {}
        for file in files:
            with safe_open(str(file), "pt") as handle:
                got = (handle.metadata() or {}).get("target")
                if got != want:
                    raise ValueError(
                        f"{file} holds features of another model (fingerprint {got}, this "
                        f"target's is {want}); cache them again with this target"
                    )
                keys = handle.keys()  # a safe_open handle is not iterable itself
                for key in keys:
                    if int(key) in self.where:
                        raise ValueError(
                            f"record {key} is cached twice ({self.where[int(key)].name} and "
                            f"{file.name}); remove the stale files from {directory}"
                        )
                    self.where[int(key)] = file
        self.hidden = target.config.hidden_size
        self._open: dict[Path, Any] = {}

    def check_covers(self, indices: list[int]) -> None:
        """Fail before training when some records have no cached features."""
        missing = [i for i in indices if i not in self.where]
        if missing:
            raise ValueError(
                f"the feature cache lacks {len(missing)} of {len(indices)} records (first: "
                f"{missing[:5]}); was it made for this data file, with --cache-features "
                "throughout?"
            )

    def get(self, index: int, length: int) -> torch.Tensor:  # [length, H]
        from safetensors import safe_open

        file = self.where.get(index)
        if file is None:
            raise KeyError(f"the feature cache has no record {index}; was it made for this data?")
        if file not in self._open:
            self._open[file] = safe_open(str(file), "pt")
        feats = self._open[file].get_tensor(str(index))
        if tuple(feats.shape) != (length, self.hidden):
            raise ValueError(
                f"{file}: record {index} has features {tuple(feats.shape)}, expected "
                f"({length}, {self.hidden}) for its {length} tokens"
            )
        return feats

    def batch(
        self, indices: list[int], lengths: list[int], width: int, device: torch.device
    ) -> torch.Tensor:  # [B, width, H] float32, zero past each sequence
        out = torch.zeros(len(indices), width, self.hidden)
        for i, (index, length) in enumerate(zip(indices, lengths, strict=True)):
            out[i, : min(length, width)] = self.get(index, length)[:width].float()
        return out.to(device)
