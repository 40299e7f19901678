"""Attention of a block of new tokens (a verification tree or chain) over a window of cached
keys under an additive mask (the reference: kernels/builtin.attention_sdpa with that mask).

A CUDA-graphed block (engine/cuda_graph.py) attends over a window of W cache slots with a
[P, W] mask: the committed prefix, the tree among the block's tokens, nothing past the
block. torch's SDPA takes such a mask only in its memory-efficient kernel, which spreads a
block's few query rows over few programs and streams every key through each: on an H200, a
2-token block of a Llama-3-8B shape over 768 keys spent about 1 ms more than a one-token
step (bench/results/gpu_verify_cost.md).

Split-K, as decode_attention: program (b, kv head, split, row block) takes BR rows of the
G x P (query head, token) rows that share the kv head, streams its share of the W keys in
blocks of BLOCK_S with an online softmax under the mask, and writes (max, sum, weighted
values); a second kernel combines the splits per row in a fixed order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_S = 32  # keys per block
MAX_ROWS = 64  # (query head, token) rows per program
MAX_SPLITS = 32  # splits of the window per kv head and row block
NEG = tl.constexpr(-1.0e30)  # finite "minus infinity": a split with no live key stays NaN-free


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
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        v = tl.load(v_base + keys[:, None] * sv_s + dims[None, :], mask=live[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        l = l * alpha + tl.sum(p, axis=1)  # noqa: E741
        m = m_new
    out = (bh * tl.num_programs(1) + split) * RP + rows
    tl.store(m_ptr + out, m)
    tl.store(l_ptr + out, l)
    tl.store(acc_ptr + out[:, None] * D + dims[None, :], acc)


@triton.jit
def _combine_kernel(
    m_ptr, l_ptr, acc_ptr, o_ptr, HK, SPLITS, RP, so_b, so_h, so_t,
    G: tl.constexpr, D: tl.constexpr, SP: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    row = tl.program_id(1)
    b, kh = bh // HK, bh % HK
    splits = tl.arange(0, SP)
    live = splits < SPLITS
    idx = (bh * SPLITS + splits) * RP + row
    m = tl.load(m_ptr + idx, mask=live, other=NEG)
    l = tl.load(l_ptr + idx, mask=live, other=0.0)  # noqa: E741
    top = tl.max(m, axis=0)
    w = tl.where(live, tl.exp(m - top), 0.0)
    dims = tl.arange(0, D)
    acc = tl.load(acc_ptr + idx[:, None] * D + dims[None, :], mask=live[:, None], other=0.0)
    o = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    dst = o_ptr + b * so_b + (kh * G + row % G) * so_h + (row // G) * so_t + dims
    tl.store(dst, o.to(o_ptr.dtype.element_ty))


def unsupported(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None
) -> str:
    """Why the kernel cannot take these shapes ("" where it can)."""
    d = q.shape[-1]
    if q.shape[1] % k.shape[1]:
        return f"query heads ({q.shape[1]}) a multiple of the kv heads ({k.shape[1]})"
    if d & (d - 1) or d < 16:
        return f"a power-of-two head size of at least 16, not {d}"
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        return "K/V rows with unit stride"
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
    splits = min(MAX_SPLITS, triton.cdiv(w, BLOCK_S))
    chunk = triton.cdiv(triton.cdiv(w, splits), BLOCK_S) * BLOCK_S
    splits = triton.cdiv(w, chunk)
    f32 = dict(dtype=torch.float32, device=q.device)
    m = torch.empty(b * hk * splits * rp, **f32)
    l = torch.empty(b * hk * splits * rp, **f32)  # noqa: E741
    acc = torch.empty(b * hk * splits * rp, d, **f32)
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
