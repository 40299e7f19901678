"""Quantize a loaded model's decoder-layer linears in place (embeddings, final norm and
lm_head stay in the model's dtype, as in the paper)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm import tqdm

from specquant.layers.linear import QLinear
from specquant.models.llama import LlamaModel
from specquant.quant.rtn import quantize_rtn
from specquant.quant.spec import QuantSpec

QUANTIZERS: dict[str, Callable[..., dict[str, torch.Tensor]]] = {"rtn": quantize_rtn}
METHODS = ("rtn", "gptq")


def quantize_model(
    model: LlamaModel,
    spec: QuantSpec,
    method: str = "rtn",
    calib_tokens: torch.Tensor | None = None,  # [B, T]; GPTQ needs calibration data
    *,
    progress: bool = False,
) -> dict[str, float]:
    """Quantize every linear inside the decoder layers; returns name -> round-trip error."""
    if method not in METHODS:
        raise ValueError(f"unknown quantizer {method!r}; available: {', '.join(METHODS)}")
    if method == "gptq":
        from specquant.quant.calibrate import quantize_model_gptq

        if calib_tokens is None:
            raise ValueError("GPTQ needs calibration tokens (calib_tokens [B, T])")
        return quantize_model_gptq(model, spec, calib_tokens, progress=progress)
    report = {}
    for i, layer in enumerate(tqdm(model.layers, desc=f"rtn {spec.name}", disable=not progress)):
        for name, module in layer.named_modules():
            if isinstance(module, QLinear):
                report[f"layers.{i}.{name}"] = module.quantize_(spec, QUANTIZERS[method])
    return report
