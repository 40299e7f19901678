"""Rotary embeddings of q and k in one launch (the reference: layers/rope.rope_qk_reference).

Eagerly, `apply_rope` on q and k is ten small launches per layer (two products, a negation,
a concatenation and a sum, each for q and for k): 0.9 of the 4.2 ms of a graphed Llama-3-8B
W4A16 decoding step on an H200 (bench/results/gpu_step_profile_3f56a8f.md). Here one program
rotates one (token, head) row of q or k and writes it contiguous, [B, H, T, D].

The arithmetic is the reference's: x * cos and rotate_half(x) * sin, each rounded to the
activation dtype, then their sum. The GPU compiler may fuse a product into the sum (one
rounding less), so a value can differ from the reference's by a step of the dtype
(tests/test_rope_kernel.py). Every row is computed alone, so a token's rotation does not
depend on how many tokens run together (decoding and verification agree).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr,
    HQ, HK, T,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t,
    HALF: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # program: (b, t, head) with heads 0..HQ-1 of q, then HQ..HQ+HK-1 of k
    pid = tl.program_id(0)
    heads = HQ + HK
    h = pid % heads
    t = (pid // heads) % T
    b = pid // (heads * T)
    is_q = h < HQ
    hk = h - HQ
    src = tl.where(is_q, b * sq_b + h * sq_h + t * sq_t, b * sk_b + hk * sk_h + t * sk_t).to(
        tl.int64
    )
    dst = tl.where(is_q, (b * HQ + h) * T + t, (b * HK + hk) * T + t).to(tl.int64) * (2 * HALF)
    offs = tl.arange(0, BLOCK)
    m = offs < HALF
    q_row = (offs * 0 + h) < HQ  # is_q as a tensor: masks must be tensors (interpreter)
    q_m, k_m = m & q_row, m & (~q_row)
    x1 = tl.where(
        q_row,
        tl.load(q_ptr + src + offs, mask=q_m, other=0.0),
        tl.load(k_ptr + src + offs, mask=k_m, other=0.0),
    )
    x2 = tl.where(
        q_row,
        tl.load(q_ptr + src + HALF + offs, mask=q_m, other=0.0),
        tl.load(k_ptr + src + HALF + offs, mask=k_m, other=0.0),
    )
    row = t.to(tl.int64) * (2 * HALF)
    c1 = tl.load(cos_ptr + row + offs, mask=m, other=0.0)
    c2 = tl.load(cos_ptr + row + HALF + offs, mask=m, other=0.0)
    s1 = tl.load(sin_ptr + row + offs, mask=m, other=0.0)
    s2 = tl.load(sin_ptr + row + HALF + offs, mask=m, other=0.0)
    dt = x1.dtype
    # out = x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1], each product rounded
    # to the activation dtype as the reference's eager ops round it (products in fp32: exact
    # for 16-bit operands, and the interpreter cannot multiply bf16)
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    c1, c2, s1, s2 = c1.to(tl.float32), c2.to(tl.float32), s1.to(tl.float32), s2.to(tl.float32)
    o1 = (x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)
    o2 = (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)
    tl.store(qo_ptr + dst + offs, o1.to(dt), mask=q_m)
    tl.store(qo_ptr + dst + HALF + offs, o2.to(dt), mask=q_m)
    tl.store(ko_ptr + dst + offs, o1.to(dt), mask=k_m)
    tl.store(ko_ptr + dst + HALF + offs, o2.to(dt), mask=k_m)


def rope_qk(
    q: torch.Tensor,  # [B, Hq, T, D], any strides with unit stride along D
    k: torch.Tensor,  # [B, Hkv, T, D]
    cos: torch.Tensor,  # [T, D]
    sin: torch.Tensor,  # [T, D]
) -> tuple[torch.Tensor, torch.Tensor]:  # rotated q, k: contiguous [B, H, T, D]
    b, hq, t, d = q.shape
    hk = k.shape[1]
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        q, k = q.contiguous(), k.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    qo = torch.empty(b, hq, t, d, dtype=q.dtype, device=q.device)
    ko = torch.empty(b, hk, t, d, dtype=k.dtype, device=k.device)
    if q.numel() == 0:
        return qo, ko
    _rope_kernel[(b * t * (hq + hk),)](
        q, k, qo, ko, cos, sin, hq, hk, t,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        HALF=d // 2, BLOCK=triton.next_power_of_2(d // 2), num_warps=1,
    )  # fmt: skip
    return qo, ko
