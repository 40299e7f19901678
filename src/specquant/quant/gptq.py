"""GPTQ (Frantar et al., 2022): quantize columns one at a time, pushing each column's error
onto the not-yet-quantized columns through the inverse Hessian of the layer's inputs.

    H = 2 X^T X / S (+ damping)        X: calibration inputs of the layer [S, K]
    for each column k (in blocks):     q_k = Q(w_k);  e = (w_k - q_k) / [H^-1]_kk
                                       w_{k+1:} -= e [H^-1]_{k, k+1:}

Options: damping (fraction of mean diag(H)), act-order (columns by decreasing diag(H)) with
static groups (group scales fixed on the original column order, so no g_idx is needed, as
SpecMQuant's Marlin path requires). Produces the same tensors as `quantize_rtn`.
"""

from __future__ import annotations

import torch

from specquant.quant.pack import QTensors, pack_int4
from specquant.quant.spec import QuantSpec

BLOCK = 128


def _group_scales(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Symmetric scales [N] for a column block w [N, g]."""
    return (w.abs().amax(1) / spec.qmax).clamp(min=1e-12)


def quantize_gptq(
    w: torch.Tensor,  # [N, K]
    inputs: torch.Tensor,  # [S, K] calibration activations of this layer
    spec: QuantSpec,
    *,
    damp: float = 0.01,
    act_order: bool = False,
) -> QTensors:
    if spec.weight_type != "int" or not spec.symmetric or spec.two_level:
        raise ValueError(
            f"GPTQ here supports symmetric integer formats with one scale level "
            f"(w8a8, w4a16, w4a16-g128, w4a8); got {spec.name!r}"
        )
    w = w.detach().double().clone()
    n, k = w.shape
    if inputs.shape[-1] != k:
        raise ValueError(f"calibration inputs have {inputs.shape[-1]} features, the layer {k}")
    groups = spec.groups(k)
    gsize = k // groups
    x = inputs.reshape(-1, k).to(w.device).double()
    h = 2 * x.T @ x / x.shape[0]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    # Static groups: scales from the original weights, in the original column order.
    scales = torch.stack(
        [_group_scales(w[:, g * gsize : (g + 1) * gsize], spec) for g in range(groups)], 1
    )
    dev = w.device
    perm = (
        torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k, device=dev)
    )
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.diag(h).mean() * torch.eye(k, dtype=h.dtype, device=dev)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros(n, k, dtype=torch.float64, device=dev)
    col_group = perm // gsize  # group of each (permuted) column
    for b0 in range(0, k, BLOCK):
        b1 = min(b0 + BLOCK, k)
        wb = w[:, b0:b1].clone()
        errs = torch.zeros_like(wb)
        hb = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = wb[:, i]
            s = scales[:, col_group[b0 + i]]
            q = (col / s).round().clamp(-spec.qmax - 1, spec.qmax)
            codes[:, b0 + i] = q
            err = (col - q * s) / hb[i, i]
            wb[:, i:] -= err[:, None] * hb[i, i:][None, :]
            errs[:, i] = err
        w[:, b1:] -= errs @ hinv[b0:b1, b1:]
    codes = codes[:, torch.argsort(perm)]  # back to the original column order
    out: QTensors = {"scales": scales.float()}
    out["qweight"] = codes.to(torch.int8) if spec.weight_bits == 8 else pack_int4(codes + 8)
    return out
