"""`specquant quantize`: load a dense checkpoint, optionally rotate and smooth it, quantize its
decoder linears (RTN or GPTQ) and write a self-describing quantized checkpoint.

    load (fp32) -> [rotate_model_] -> [smooth_model_(calibration, alpha)] -> quantize_model
                -> round dense tensors to `dense_dtype` -> save_quantized (+ tokenizer, report)

The returned in-memory model equals what loading the checkpoint gives back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from specquant.io.quant_checkpoint import (
    check_output_dir,
    round_dense_,
    save_quantized,
)
from specquant.layers.linear import QLinear
from specquant.models.llama import LlamaModel
from specquant.quant.model import METHODS, quantize_model
from specquant.quant.rotate import rotate_model_
from specquant.quant.smooth import smooth_model_
from specquant.quant.spec import FORMATS, QuantSpec, get_format

DENSE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _doc(text: str, choices: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"help": text, "choices": choices} if choices else {"help": text}


@dataclass(frozen=True)
class QuantizeConfig:
    """What `specquant quantize` does; the CLI options are generated from these fields."""

    format: str = field(
        default="w4a16-g128",
        metadata=_doc(
            f"weight format: {', '.join(FORMATS)}; grouped formats take other group sizes "
            "too (w4a16-g64, w4a8-g32, ...)"
        ),
    )
    method: str = field(default="gptq", metadata=_doc("quantizer", METHODS))
    rotate: bool = field(default=False, metadata=_doc("rotate the residual stream first"))
    smooth_alpha: float | None = field(
        default=None, metadata=_doc("SmoothQuant migration strength alpha (off by default)")
    )
    calib_samples: int = field(default=128, metadata=_doc("calibration windows (GPTQ, smooth)"))
    calib_len: int = field(default=512, metadata=_doc("tokens per calibration window"))
    seed: int = field(default=0, metadata=_doc("seed for calibration sampling and rotation"))
    dense_dtype: str = field(
        default="bfloat16",
        metadata=_doc("dtype of embeddings, norms and lm_head", tuple(DENSE_DTYPES)),
    )

    def __post_init__(self) -> None:
        get_format(self.format)  # an unknown format fails here, before any loading
        if self.method not in METHODS:
            raise ValueError(f"unknown quantizer {self.method!r}; available: {', '.join(METHODS)}")
        if self.calib_samples < 1 or self.calib_len < 2:
            raise ValueError(
                f"need calib_samples >= 1 and calib_len >= 2, got {self.calib_samples}, "
                f"{self.calib_len}"
            )
        if self.smooth_alpha is not None and not 0.0 <= self.smooth_alpha <= 1.0:
            raise ValueError(f"smooth_alpha must be in [0, 1], got {self.smooth_alpha}")
        if self.dense_dtype not in DENSE_DTYPES:
            raise ValueError(
                f"dense_dtype must be one of {', '.join(DENSE_DTYPES)}; got {self.dense_dtype!r}"
            )

    @property
    def needs_calibration(self) -> bool:
        return self.method == "gptq" or self.smooth_alpha is not None


@dataclass
class QuantizeResult:
    model: LlamaModel  # the quantized model, identical to what loading `out` gives
    report: dict[str, float]  # linear -> relative weight round-trip error
    out: Path
    calibration: dict[str, Any] | None


def check_group_sizes(model: LlamaModel, spec: QuantSpec) -> None:
    """Fail before any work when the format's group size does not divide some layer's K."""
    ks = sorted({m.in_features for m in model.layers.modules() if isinstance(m, QLinear)})
    bad = [k for k in ks if spec.group_size != -1 and k % spec.group_size]
    if bad:
        fits = [
            n
            for n, s in FORMATS.items()
            if s.group_size == -1 or all(k % s.group_size == 0 for k in ks)
        ]
        fits += [
            spec.name.replace(f"-g{spec.group_size}", f"-g{g}")
            for g in (64, 32)
            if g < spec.group_size and all(k % g == 0 for k in ks)
        ][:1]
        raise ValueError(
            f"format {spec.name}: group size {spec.group_size} does not divide the input "
            f"dimension(s) K={bad} of this model; formats that fit: {', '.join(fits)}"
        )


def quantize_checkpoint(
    model: str | Path | None,
    out: Path,
    config: QuantizeConfig,
    *,
    device: str = "auto",
    data_dir: Path | None = None,
    calib_tokens: torch.Tensor | None = None,  # [B, T]: use these instead of the prompt data
    progress: bool = True,
) -> QuantizeResult:
    """Quantize the checkpoint `model` (HF dir, .gguf, None = embedded SmolLM2) into `out`."""
    from specquant.engine.generator import resolve_device
    from specquant.io.default_model import base_model_id
    from specquant.io.loader import load_checkpoint
    from specquant.quant.calib_data import calibration_tokens

    out = Path(out)
    check_output_dir(out)
    spec = get_format(config.format)
    loaded = load_checkpoint(model, resolve_device(device), torch.float32)
    net = loaded.model
    if loaded.quantization:
        raise ValueError(
            f"{loaded.path} is already quantized ({loaded.quantization}); quantize a dense "
            "checkpoint"
        )
    check_group_sizes(net, spec)

    calibration = None
    if config.needs_calibration and calib_tokens is None:
        if loaded.tokenizer is None:
            raise ValueError(f"{loaded.path} has no tokenizer; calibration data needs one")
        calib = calibration_tokens(
            loaded.tokenizer,
            config.calib_samples,
            config.calib_len,
            seed=config.seed,
            data_dir=data_dir,
        )
        calib_tokens, calibration = calib.tokens, calib.info
    elif config.needs_calibration:
        assert calib_tokens is not None
        b, t = calib_tokens.shape
        calibration = {"samples": b, "seq_len": t, "source": "token ids given by the caller"}

    if config.rotate:
        rotate_model_(net, seed=config.seed)
    if config.smooth_alpha is not None:
        smooth_model_(net, calib_tokens, config.smooth_alpha)
    report = quantize_model(net, spec, config.method, calib_tokens, progress=progress)
    dense_dtype = DENSE_DTYPES[config.dense_dtype]
    round_dense_(net, dense_dtype)  # so that this model equals the checkpoint written below
    save_quantized(
        net,
        out,
        method=config.method,
        report=report,
        calibration=calibration,
        smoothquant_alpha=config.smooth_alpha,
        tokenizer=loaded.tokenizer,
        dense_dtype=dense_dtype,
        base_model=base_model_id(loaded.path),
    )
    return QuantizeResult(net, report, out, calibration)
