"""Attention of one new token over a fixed window of cached keys, the live length read from
the device (the reference: kernels/builtin.decode_attention_reference).

A CUDA-graphed decoding step (engine/cuda_graph.py) attends over a window of W cache slots
of which only the first `length` hold keys; `length` changes every step but lives in a
device tensor, so the graph replays unchanged. torch's SDPA needs a boolean mask for that,
which sends it to its memory-efficient kernel and adds mask launches: 0.48 of the 3.6 ms of
a graphed Llama-3-8B W4A16 step on an H200 (bench/results/gpu_step_profile_6921360.md).

Split-K flash decoding: program (b, kv head, split) takes the G query heads that share the
kv head (GQA) as the rows of its dot products, streams its share of the first `length`
slots in blocks of BLOCK_S keys with an online softmax, and writes (max, sum, weighted
values); a second kernel combines the splits per query head in a fixed order. The online
softmax step, the combine and the split plan are shared with block_attention.py, whose
rows are a block's tokens times those G heads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_S = 32  # keys per block
MAX_SPLITS = 32  # splits of the window per kv head
NEG = tl.constexpr(-1.0e30)  # finite "minus infinity": a split with no live key stays NaN-free


@triton.jit
def _partial_kernel(
    q_ptr, k_ptr, v_ptr, len_ptr, m_ptr, l_ptr, acc_ptr,
    HK, W, CHUNK, WINDOW, scale,
    sq_b, sq_h, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)  # b * HK + kv head
    split = tl.program_id(1)
    b, kh = bh // HK, bh % HK
    length = tl.load(len_ptr).to(tl.int32)  # keys 0 .. length - 1 are live
    lo = split * CHUNK
    hi = tl.minimum(lo + CHUNK, tl.minimum(length, W))
    rows = tl.arange(0, GP)
    dims = tl.arange(0, D)
    q = tl.load(q_ptr + b * sq_b + (kh * G + rows)[:, None] * sq_h + dims[None, :],
                mask=(rows < G)[:, None], other=0.0)  # fmt: skip
    m = tl.full([GP], NEG, tl.float32)
    l = tl.zeros([GP], tl.float32)  # noqa: E741
    acc = tl.zeros([GP, D], tl.float32)
    k_base = k_ptr + b * sk_b + kh * sk_h
    v_base = v_ptr + b * sv_b + kh * sv_h
    for s0 in range(lo, hi, BLOCK):
        keys = s0 + tl.arange(0, BLOCK)
        live = keys < hi
        if HAS_WINDOW:  # sliding window: the query at length - 1 sees keys > it - WINDOW
            live = live & (keys > length - 1 - WINDOW)
        k = tl.load(k_base + keys[:, None] * sk_s + dims[None, :], mask=live[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale  # [GP, BLOCK]
        s = tl.where(live[None, :], s, float("-inf"))
        v = tl.load(v_base + keys[:, None] * sv_s + dims[None, :], mask=live[:, None], other=0.0)
        m, l, acc = _online_update(s, v, m, l, acc)  # noqa: E741
    out = (bh * tl.num_programs(1) + split) * GP + rows
    tl.store(m_ptr + out, m)
    tl.store(l_ptr + out, l)
    tl.store(acc_ptr + out[:, None] * D + dims[None, :], acc)


@triton.jit
def _online_update(s, v, m, l, acc):  # noqa: E741
    """One block of keys into a running softmax: scores s [R, BLOCK] (-inf where a row may
    not see the key) and values v [BLOCK, D] into the rows' max m, sum l and weighted
    values acc."""
    m_new = tl.maximum(m, tl.max(s, axis=1))
    p = tl.exp(s - m_new[:, None])
    alpha = tl.exp(m - m_new)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
    l = l * alpha + tl.sum(p, axis=1)  # noqa: E741
    return m_new, l, acc


@triton.jit
def _combine_kernel(
    m_ptr, l_ptr, acc_ptr, o_ptr, HK, SPLITS, RP, so_b, so_h, so_t,
    G: tl.constexpr, D: tl.constexpr, SP: tl.constexpr,
):  # fmt: skip
    """Program (b * HK + kv head, row): the row's splits (RP rows apart in the partial
    buffers) combined in order into o[b, kv head * G + row % G, row // G]."""
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


def head_problem(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """Why the split-K attention kernels cannot take these heads ("" where they can)."""
    d = q.shape[-1]
    if q.shape[1] % k.shape[1]:
        return f"query heads ({q.shape[1]}) a multiple of the kv heads ({k.shape[1]})"
    if d & (d - 1) or d < 16:
        return f"a power-of-two head size of at least 16, not {d}"
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        return "K/V rows with unit stride"
    return ""


def split_plan(w: int) -> tuple[int, int]:
    """(splits, keys per split) of a W-key window: up to MAX_SPLITS splits of whole BLOCK_S
    blocks."""
    splits = min(MAX_SPLITS, triton.cdiv(w, BLOCK_S))
    chunk = triton.cdiv(triton.cdiv(w, splits), BLOCK_S) * BLOCK_S
    return triton.cdiv(w, chunk), chunk


def partials(n: int, d: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The splits' running max and sum [n] and weighted values [n, d] for n rows."""
    f32 = dict(dtype=torch.float32, device=device)
    return torch.empty(n, **f32), torch.empty(n, **f32), torch.empty(n, d, **f32)


def unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """Why the kernel cannot take these shapes ("" where it can)."""
    if q.shape[2] != 1:
        return f"one query token, not {q.shape[2]}"
    return head_problem(q, k, v)


def decode_attention(
    q: torch.Tensor,  # [B, Hq, 1, D]
    k: torch.Tensor,  # [B, Hkv, W, D] (a window of the cache: unit stride along D)
    v: torch.Tensor,  # [B, Hkv, W, D]
    length: torch.Tensor,  # [1] int64 on the device: keys 0 .. length - 1 are live
    window: int | None = None,  # sliding window of the model, if any
) -> torch.Tensor:  # [B, Hq, 1, D]
    b, hq, _, d = q.shape
    hk, w = k.shape[1], k.shape[2]
    if why := unsupported(q, k, v):
        raise ValueError(f"decode_attention needs {why} (q {tuple(q.shape)}, k {tuple(k.shape)})")
    q = q.contiguous()
    g = hq // hk
    gp = max(16, triton.next_power_of_2(g))
    splits, chunk = split_plan(w)
    m, l, acc = partials(b * hk * splits * gp, d, q.device)  # noqa: E741
    _partial_kernel[(b * hk, splits)](
        q, k, v, length, m, l, acc, hk, w, chunk, window or 0, d**-0.5,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        G=g, GP=gp, D=d, BLOCK=BLOCK_S, HAS_WINDOW=window is not None, num_warps=4,
    )  # fmt: skip
    o = torch.empty(b, hq, 1, d, dtype=q.dtype, device=q.device)
    _combine_kernel[(b * hk, g)](
        m, l, acc, o, hk, splits, gp, o.stride(0), o.stride(1), o.stride(2),
        G=g, D=d, SP=triton.next_power_of_2(splits), num_warps=4,
    )  # fmt: skip
    return o
