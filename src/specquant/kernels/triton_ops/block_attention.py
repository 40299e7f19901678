"""Attention of a block of new tokens (a verification tree or chain) over a window of cached
keys under an additive mask (the reference: kernels/builtin.attention_sdpa with that mask).

A CUDA-graphed block (engine/cuda_graph.py) attends over a window of W cache slots with a
[P, W] mask: the committed prefix, the tree among the block's tokens, nothing past the
block. torch's SDPA takes such a mask only in its memory-efficient kernel, which spreads a
block's few query rows over few programs and streams every key through each: on an H200, a
2-token block of a Llama-3-8B shape over 768 keys spent about 1 ms more than a one-token
step (bench/results/gpu_verify_cost.md).

Split-K, as decode_attention (whose online softmax step, combine kernel and split plan
this shares): program (b, kv head, split, row block) takes BR rows of the G x P (query
head, token) rows that share the kv head, streams its share of the W keys in blocks of
BLOCK_S with an online softmax under the mask, and writes (max, sum, weighted values);
the combine kernel merges the splits per row in a fixed order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from specquant.kernels.triton_ops.decode_attention import (
    BLOCK_S,
    NEG,
    _combine_kernel,
    _online_update,
    head_problem,
    partials,
    split_plan,
)

MAX_ROWS = 64  # (query head, token) rows per program


@triton.jit
def _partial_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, m_ptr, l_ptr, acc_ptr,
    HK, W, P, RP, CHUNK, scale,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sb_t,
    G: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, BR: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)  # b * HK + kv head
    split = tl.program_id(1)
    b, kh = bh // HK, bh % HK
    rows = tl.program_id(2) * BR + tl.arange(0, BR)  # row r: query head r % G, token r // G
    live_r = rows < G * P
    head, tok = kh * G + rows % G, rows // G
    dims = tl.arange(0, D)
    q = tl.load(q_ptr + b * sq_b + head[:, None] * sq_h + tok[:, None] * sq_t + dims[None, :],
                mask=live_r[:, None], other=0.0)  # fmt: skip
    lo = split * CHUNK
    hi = tl.minimum(lo + CHUNK, W)
    m = tl.full([BR], NEG, tl.float32)
    l = tl.zeros([BR], tl.float32)  # noqa: E741
    acc = tl.zeros([BR, D], tl.float32)
    k_base = k_ptr + b * sk_b + kh * sk_h
    v_base = v_ptr + b * sv_b + kh * sv_h
    for s0 in range(lo, hi, BLOCK):
        keys = s0 + tl.arange(0, BLOCK)
        live = keys < hi
        k = tl.load(k_base + keys[:, None] * sk_s + dims[None, :], mask=live[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale  # [BR, BLOCK]
        bias = tl.load(bias_ptr + tok[:, None] * sb_t + keys[None, :],
                       mask=live_r[:, None] & live[None, :], other=float("-inf"))  # fmt: skip
        s = s + bias.to(tl.float32)  # -inf where the row may not see the key
        v = tl.load(v_base + keys[:, None] * sv_s + dims[None, :], mask=live[:, None], other=0.0)
        m, l, acc = _online_update(s, v, m, l, acc)  # noqa: E741
    out = (bh * tl.num_programs(1) + split) * RP + rows
    tl.store(m_ptr + out, m)
    tl.store(l_ptr + out, l)
    tl.store(acc_ptr + out[:, None] * D + dims[None, :], acc)


def unsupported(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None
) -> str:
    """Why the kernel cannot take these shapes ("" where it can)."""
    if why := head_problem(q, k, v):
        return why
    if bias is None or bias.dim() != 2 or not bias.is_floating_point():
        return "an additive float mask [T, W] shared by the batch"
    if tuple(bias.shape) != (q.shape[2], k.shape[2]) or bias.stride(-1) != 1:
        return (f"a mask of the block's tokens by the window's keys {(q.shape[2], k.shape[2])}"
                f" with unit stride, not {tuple(bias.shape)}")  # fmt: skip
    return ""


def block_attention(
    q: torch.Tensor,  # [B, Hq, T, D]
    k: torch.Tensor,  # [B, Hkv, W, D] (a window of the cache: unit stride along D)
    v: torch.Tensor,  # [B, Hkv, W, D]
    bias: torch.Tensor,  # [T, W] additive float: 0 where a token may attend, -inf elsewhere
) -> torch.Tensor:  # [B, Hq, T, D]
    """Every row must see at least one key (a row that sees none would divide by zero)."""
    if why := unsupported(q, k, v, bias):
        raise ValueError(f"block_attention needs {why} (q {tuple(q.shape)}, k {tuple(k.shape)})")
    b, hq, t, d = q.shape
    hk, w = k.shape[1], k.shape[2]
    g = hq // hk
    rows = g * t
    br = min(MAX_ROWS, max(16, triton.next_power_of_2(rows)))
    row_blocks = triton.cdiv(rows, br)
    rp = row_blocks * br
    splits, chunk = split_plan(w)
    m, l, acc = partials(b * hk * splits * rp, d, q.device)  # noqa: E741
    _partial_kernel[(b * hk, splits, row_blocks)](
        q, k, v, bias, m, l, acc, hk, w, t, rp, chunk, d**-0.5,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), bias.stride(0),
        G=g, D=d, BLOCK=BLOCK_S, BR=br, num_warps=4,
    )  # fmt: skip
    o = torch.empty(b, hq, t, d, dtype=q.dtype, device=q.device)
    _combine_kernel[(b * hk, rows)](
        m, l, acc, o, hk, splits, rp, o.stride(0), o.stride(1), o.stride(2),
        G=g, D=d, SP=triton.next_power_of_2(splits), num_warps=4,
    )  # fmt: skip
    return o
