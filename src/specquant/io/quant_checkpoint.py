"""Quantized checkpoints: specquant's self-describing format (save and load) and the loading of
every quantized layout (ours or imported, io/quant_import.py) into a `LlamaModel`.

Our format is an HF-style directory:

    config.json          the model config + `quantization_config`:
                         {"quant_method": "specquant", "version": 1, "format": QuantSpec.to_dict(),
                          "method": "rtn" | "gptq", "rotation": bool,
                          "smoothquant_alpha": float | null, "calibration": {...} | null,
                          "base_model": str | null (what it was quantized from)}
    model*.safetensors   canonical tensors (quant/pack.py) under unfused HF names
                         (`model.layers.0.self_attn.q_proj.qweight`, `.scales`, ...), split
                         along N; embeddings, norms and lm_head dense; a rotated model adds
                         `rotation.matrix` [H, H] and `rotation.final_norm_weight` [H]
    quant_report.json    per-layer relative round-trip error of the weights

The format lives in the metadata, never in a file name. Loading fuses q/k/v and gate/up by
concatenating canonical tensors along N (they must share an input permutation, if any).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from specquant.config import ModelConfig
from specquant.io.checkpoint import (
    CheckpointError,
    TensorSource,
    check_tensors,
    expected_shapes,
    load_into,
)
from specquant.io.export import model_config_dict, save_safetensors, unfused_state_dict
from specquant.io.quant_import import (
    Get,
    Has,
    QuantLayout,
    parse_awq,
    parse_compressed_tensors,
    parse_gptq,
)
from specquant.layers.linear import QLinear
from specquant.layers.norm import RMSNorm
from specquant.models.llama import PACKED_MODULES, LlamaModel
from specquant.quant.pack import QTensors, validate_qtensors
from specquant.quant.pack import expected_shapes as qtensor_shapes
from specquant.quant.rotate import attach_rotation, get_rotation
from specquant.quant.spec import QuantSpec

QUANT_METHOD = "specquant"
FORMAT_VERSION = 1
REPORT_FILE = "quant_report.json"
ROTATION_MATRIX, ROTATION_NORM = "rotation.matrix", "rotation.final_norm_weight"


# ------------------------------------------------------------------------ our layout
@dataclass(frozen=True)
class CanonicalLayout:
    """specquant's own layout: the canonical tensors themselves."""

    spec: QuantSpec
    description: str
    rotated: bool = False

    def shapes(self, n: int, k: int) -> dict[str, tuple[int, ...]]:
        return {leaf: shape for leaf, (shape, _) in qtensor_shapes(self.spec, n, k).items()}

    def optional_shapes(self, n: int, k: int) -> dict[str, tuple[int, ...]]:
        return {"perm": (k,)}

    def read(self, get: Get, has: Has, prefix: str, n: int, k: int) -> QTensors:
        leaves = [*self.shapes(n, k), *(["perm"] if has(f"{prefix}.perm") else [])]
        tensors = {leaf: get(f"{prefix}.{leaf}") for leaf in leaves}
        try:
            validate_qtensors(tensors, self.spec, n, k)
        except ValueError as e:
            raise CheckpointError(f"{prefix}: {e}") from None
        return tensors


def parse_specquant(raw: dict[str, Any]) -> CanonicalLayout:
    version = raw.get("version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"specquant: checkpoint format version {version!r} is newer than this specquant "
            f"reads ({FORMAT_VERSION}); upgrade specquant"
        )
    fmt = raw.get("format")
    if not isinstance(fmt, dict):
        raise CheckpointError(
            f"specquant: quantization_config.format must be a QuantSpec dict, got {fmt!r}"
        )
    try:
        spec = QuantSpec.from_dict(fmt)
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"specquant: quantization_config.format {fmt} is invalid: {e}"
        ) from None
    rotated = raw.get("rotation", False)
    if not isinstance(rotated, bool):
        raise CheckpointError(
            f"specquant: quantization_config.rotation must be true/false, got {rotated!r}"
        )
    method = raw.get("method", "?")
    desc = f"specquant {spec.name} ({method}{', rotated' if rotated else ''})"
    return CanonicalLayout(spec, desc, rotated)


IMPORTERS = {
    QUANT_METHOD: parse_specquant,
    "gptq": parse_gptq,
    "awq": parse_awq,
    "compressed-tensors": parse_compressed_tensors,
}


def quantization_layout(raw_config: dict[str, Any], model_dir: Path) -> QuantLayout | None:
    """The layout that `config.json` (or AutoGPTQ's older `quantize_config.json`) declares;
    None for a dense checkpoint."""
    qcfg = raw_config.get("quantization_config")
    legacy = model_dir / "quantize_config.json"
    if qcfg is None and legacy.exists():
        try:
            qcfg = json.loads(legacy.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{legacy} is not valid JSON: {e}") from None
        if isinstance(qcfg, dict):
            qcfg = {"quant_method": "gptq"} | qcfg
    if qcfg is None:
        return None
    if not isinstance(qcfg, dict):
        raise CheckpointError(
            f"{model_dir}: quantization_config must be a JSON object, got {qcfg!r}"
        )
    method = str(qcfg.get("quant_method", "")).lower()
    if method not in IMPORTERS:
        raise CheckpointError(
            f"{model_dir}: unknown quant_method {qcfg.get('quant_method')!r}; supported: "
            f"{', '.join(IMPORTERS)}"
        )
    return IMPORTERS[method](qcfg)


# ------------------------------------------------------------------------ loading
def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """HF name of every decoder-layer linear (unfused) -> (N, K)."""
    return {
        name.removesuffix(".weight"): (shape[0], shape[1])
        for name, shape in expected_shapes(cfg).items()
        if ".layers." in name and name.endswith(".weight") and len(shape) == 2
    }


def _fuse(parts: dict[str, QTensors], fused: str) -> QTensors:
    """Concatenate canonical tensors along N; the parts must share one input permutation."""
    tensors = list(parts.values())
    if len(tensors) == 1:
        return tensors[0]
    perms = [t.get("perm") for t in tensors]
    if any(p is not None for p in perms) and not all(
        p is not None and torch.equal(p, perms[0]) for p in perms
    ):
        raise CheckpointError(
            f"{', '.join(parts)} are fused into {fused} and must share one input permutation "
            "(act-order g_idx), but theirs differ; re-quantize with static groups"
        )
    out = {
        leaf: torch.cat([t[leaf] for t in tensors], dim=0) for leaf in tensors[0] if leaf != "perm"
    }
    if perms[0] is not None:
        out["perm"] = perms[0]
    return out


def materialize_quantized(
    cfg: ModelConfig,
    source: TensorSource,
    layout: QuantLayout,
    device: torch.device,
    dtype: torch.dtype,
) -> LlamaModel:
    """Validate names and shapes, then build the model: decoder linears from `layout` (converted
    to canonical tensors and fused), everything else dense in `dtype`."""
    if cfg.shared_embeddings:
        raise CheckpointError(
            f"{source.description}: quantized drafts with shared embeddings are not supported"
        )
    linears = linear_shapes(cfg)
    want = {
        n: s for n, s in expected_shapes(cfg).items() if n.removesuffix(".weight") not in linears
    }
    optional: dict[str, tuple[int, ...]] = {}
    if cfg.tie_word_embeddings:
        optional["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    for name, (n, k) in linears.items():
        try:
            want |= {f"{name}.{leaf}": s for leaf, s in layout.shapes(n, k).items()}
            optional |= {f"{name}.{leaf}": s for leaf, s in layout.optional_shapes(n, k).items()}
        except ValueError as e:
            raise CheckpointError(f"{source.description}: {name} [N={n}, K={k}]: {e}") from None
        optional.setdefault(f"{name}.bias", (n,))  # some exporters write all-zero biases
    if layout.rotated:
        want |= {ROTATION_MATRIX: (cfg.hidden_size,) * 2, ROTATION_NORM: (cfg.hidden_size,)}
    check_tensors(source, want, optional, f"does not match its config and {layout.description}")

    with torch.device("meta"):
        model = LlamaModel(cfg)
    has = source.shapes.__contains__
    quantized: set[str] = set()  # checkpoint names consumed by quantized linears
    packed_parts = {part: fused for fused, parts in PACKED_MODULES.items() for part in parts}
    groups: dict[str, dict[str, tuple[int, int]]] = {}
    for name, nk in linears.items():
        parent, _, proj = name.rpartition(".")
        groups.setdefault(f"{parent}.{packed_parts.get(proj, proj)}", {})[name] = nk
    for fused, parts in tqdm(
        groups.items(), desc="loading quantized linears", disable=None, leave=False
    ):
        tensors = {}
        for name, (n, k) in parts.items():
            tensors[name] = layout.read(source.get, has, name, n, k)
            leaves = [*layout.shapes(n, k), *layout.optional_shapes(n, k)]
            quantized |= {f"{name}.{leaf}" for leaf in leaves}
        module = model.get_submodule(fused.removeprefix("model."))
        assert isinstance(module, QLinear)
        fused_tensors = {leaf: t.to(device) for leaf, t in _fuse(tensors, fused).items()}
        module.load_quantized_(layout.spec, fused_tensors, dtype, prepare=False)
    _allocate_meta_(model, device, dtype)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight

    dense = {}
    for name in source.shapes:
        if name in quantized or name in (ROTATION_MATRIX, ROTATION_NORM):
            continue
        ours = name.removeprefix("model.")
        if name.endswith(".bias") and name not in want and name.removesuffix(".bias") in linears:
            if source.get(name).abs().max() > 0:
                raise CheckpointError(f"{name} is non-zero, but the config declares no bias there")
            continue
        dense[name] = ours
    skip = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    load_into(model, {n: o for n, o in dense.items() if o not in skip}, source.get, dtype, skip)
    if layout.rotated:
        attach_rotation(
            model, source.get(ROTATION_MATRIX).to(device), source.get(ROTATION_NORM).to(device)
        )
    model.eval().requires_grad_(False)
    model.prepare_kernels()
    return model


def _allocate_meta_(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Real storage for the parameters still on the meta device (the dense ones)."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                module._parameters[name] = nn.Parameter(
                    torch.empty(p.shape, device=device, dtype=dtype), requires_grad=False
                )


def model_rotation(model: LlamaModel) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(matrix [H, H], final_norm_weight [H]) of a rotated model; None when not rotated."""
    rotation = get_rotation(model)
    if rotation is None:
        return None
    return rotation.matrix, rotation.final_norm_weight


# ------------------------------------------------------------------------ saving
def check_output_dir(out: Path) -> None:
    """Refuse to write into anything but a new or empty directory (nothing is overwritten)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(
            f"output {out} exists and is not an empty directory; choose a new path or remove "
            "it yourself (nothing was written)"
        )


def save_quantized(
    model: LlamaModel,
    out: Path,
    *,
    method: str,
    report: dict[str, float],
    calibration: dict[str, Any] | None = None,
    smoothquant_alpha: float | None = None,
    tokenizer: Any = None,
    dense_dtype: torch.dtype = torch.bfloat16,
    base_model: str | None = None,  # what it was quantized from (default_model.base_model_id)
) -> Path:
    """Write `model` (decoder linears quantized with one QuantSpec) as a self-describing
    checkpoint into the new directory `out`; returns `out`."""
    check_output_dir(out)
    cfg = model.config
    specs = {m.spec for m in model.layers.modules() if isinstance(m, QLinear)}
    if len(specs) != 1 or None in specs:
        names = sorted(s.name if s else "dense" for s in specs)
        raise ValueError(f"every decoder linear must be quantized with one format, found {names}")
    spec = specs.pop()
    tied = model.lm_head.weight is model.embed_tokens.weight
    rotation = model_rotation(model)
    if rotation is not None and tied:
        raise ValueError("a rotated model must have an untied lm_head")
    linears = linear_shapes(cfg)
    allowed = set(expected_shapes(cfg)) | {"lm_head.weight"}
    rotation_ptrs = {t.data_ptr() for t in rotation or ()}
    tensors, unknown = {}, []
    for name, t in unfused_state_dict(model, cfg).items():
        key = name if name.startswith("lm_head.") else f"model.{name}"
        module_path, _, leaf = key.rpartition(".")
        if name == "lm_head.weight" and tied:
            continue  # the tied head is the embedding
        if key not in allowed and module_path not in linears:
            if t.data_ptr() not in rotation_ptrs:  # rotation state is saved below
                unknown.append(name)
            continue
        dense = leaf in ("weight", "bias")  # canonical quantized tensors keep their dtypes
        tensors[key] = t.to(dense_dtype) if dense else t
    if unknown:
        raise ValueError(f"the model holds state a quantized checkpoint cannot store: {unknown}")
    if rotation is not None:
        tensors[ROTATION_MATRIX] = rotation[0].float()
        tensors[ROTATION_NORM] = rotation[1].float()
    config = model_config_dict(cfg, tie_word_embeddings=tied)
    config["torch_dtype"] = str(dense_dtype).removeprefix("torch.")
    config["quantization_config"] = {
        "quant_method": QUANT_METHOD,
        "version": FORMAT_VERSION,
        "format": spec.to_dict(),
        "method": method,
        "rotation": rotation is not None,
        "smoothquant_alpha": smoothquant_alpha,
        "calibration": calibration,
        "base_model": base_model,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write into a sibling temporary directory and rename it at the end: an interrupted save
    # leaves no half-written checkpoint at `out`.
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()  # (unlike mkdtemp's 0700, this follows the umask like any other output)
    try:
        save_safetensors(tensors, tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / REPORT_FILE).write_text(
            json.dumps(error_report(report, spec, method), indent=2) + "\n"
        )
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        check_output_dir(out)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


@torch.no_grad()
def round_dense_(model: LlamaModel, dtype: torch.dtype) -> None:
    """Round the dense tensors `save_quantized` stores in `dtype` (embeddings, norms, lm_head,
    biases) to that dtype's values, keeping their own dtype."""
    for module in model.modules():
        if isinstance(module, (nn.Embedding, RMSNorm, QLinear)):
            for p in module.parameters(recurse=False):
                p.copy_(p.to(dtype).to(p.dtype))


def error_report(report: dict[str, float], spec: QuantSpec, method: str) -> dict[str, Any]:
    """The per-layer round-trip error file (quant_report.json)."""
    worst = max(report, key=report.__getitem__) if report else None
    return {
        "format": spec.name,
        "method": method,
        "metric": "relative weight error ||W - dequant(quant(W))||_F / ||W||_F per linear",
        "mean": sum(report.values()) / max(len(report), 1),
        "max": report[worst] if worst else 0.0,
        "worst_layer": worst,
        "layers": report,
    }
