"""Quantize a loaded model's decoder-layer linears in place (embeddings, final norm and
lm_head stay in the model's dtype, as in the paper)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from specquant.layers.linear import QLinear
from specquant.models.llama import LlamaModel
from specquant.quant.rtn import quantize_rtn
from specquant.quant.spec import QuantSpec

QUANTIZERS: dict[str, Callable[..., dict[str, torch.Tensor]]] = {"rtn": quantize_rtn}


def quantize_model(model: LlamaModel, spec: QuantSpec, method: str = "rtn") -> dict[str, float]:
    """Quantize every linear inside the decoder layers; returns name -> round-trip error."""
    if method not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {method!r}; available: {', '.join(QUANTIZERS)}")
    report = {}
    for name, module in model.layers.named_modules():
        if isinstance(module, QLinear):
            report[f"layers.{name}"] = module.quantize_(spec, QUANTIZERS[method])
    return report
