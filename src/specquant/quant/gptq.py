"""GPTQ (Frantar et al., 2022): quantize columns one at a time, pushing each column's error
onto the not-yet-quantized columns through the inverse Hessian of the layer's inputs.

    H = 2 X^T X / S (+ damping)        X: calibration inputs of the layer [S, K]
    for each column k (in blocks):     q_k = Q(w_k);  e = (w_k - q_k) / [H^-1]_kk
                                       w_{k+1:} -= e [H^-1]_{k, k+1:}

Options: damping (fraction of mean diag(H)), act-order (columns by decreasing diag(H)) with
static groups (group scales fixed on the original column order, so no g_idx is needed, as
SpecMQuant's Marlin path requires). Every format works: the grid (scales, zero points,
two-level scales, fp8 scales) is RTN's on the original weights, and GPTQ only chooses the
codes on that grid. Produces the same tensors as `quantize_rtn`.
"""

from __future__ import annotations

import torch

from specquant.quant.pack import QTensors, group_scales, pack_int4
from specquant.quant.rtn import FP8_MAX, quantize_rtn
from specquant.quant.spec import QuantSpec

BLOCK = 128


def _round(
    col: torch.Tensor,  # [N] float64
    scale: torch.Tensor,  # [N]
    zero: torch.Tensor | None,  # [N] zero points (asymmetric formats)
    spec: QuantSpec,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, dequantized values) of one column on the format's grid."""
    if spec.weight_type == "fp8":
        codes = (col / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).double()
        return codes, codes * scale
    if zero is not None:
        codes = ((col / scale).round() + zero).clamp(0, 2**spec.weight_bits - 1)
        return codes, (codes - zero) * scale
    codes = (col / scale).round().clamp(-spec.qmax - 1, spec.qmax)
    return codes, codes * scale


def quantize_gptq(
    w: torch.Tensor,  # [N, K]
    inputs: torch.Tensor,  # [S, K] calibration activations of this layer
    spec: QuantSpec,
    *,
    damp: float = 0.01,
    act_order: bool = False,
) -> QTensors:
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
    # Static grid: RTN's scales (and zero points) from the original weights, in the original
    # column order; GPTQ picks the codes.
    grid = quantize_rtn(w, spec)
    if spec.weight_type == "fp8":
        scales = grid["scales"].double().reshape(n, 1)
    else:
        scales = group_scales(grid, spec).double().to(w.device)  # [N, G]
    zeros = grid["zeros"].double().to(w.device) if "zeros" in grid else None
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
            g = col_group[b0 + i]
            q, deq = _round(col, scales[:, g], None if zeros is None else zeros[:, g], spec)
            codes[:, b0 + i] = q
            err = (col - deq) / hb[i, i]
            wb[:, i:] -= err[:, None] * hb[i, i:][None, :]
            errs[:, i] = err
        w[:, b1:] -= errs @ hinv[b0:b1, b1:]
    codes = codes[:, torch.argsort(perm)]  # back to the original column order
    out = {name: t for name, t in grid.items() if name != "qweight"}
    if spec.weight_type == "fp8":
        out["qweight"] = codes.float().to(torch.float8_e4m3fn)  # exact: already on the grid
    elif spec.weight_bits == 8:
        out["qweight"] = codes.to(torch.int8)
    else:
        out["qweight"] = pack_int4(codes if zeros is not None else codes + 8)
    return out
