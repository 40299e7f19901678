"""W4A8 wgmma kernel, warp-specialized: `w4a8_wgmma.py`'s math (int4 codes unpacked to int8
as wgmma's register A operand, per-token int8 x in shared memory, int32 sums) with
`w4_wgmma_ws.py`'s pipeline: one producer warp copies each K tile's x codes and atoms with
TMA into an mbarrier-guarded ring, the consumer warpgroups unpack and multiply with no
CTA-wide barrier and no copies in their K loop.

Launched through `w4a8_wgmma.w4a8_wgmma_linear` with a `WsConfig` (its checks and buffers
are the synchronous kernel's). Group scales scale each tile's int32 sum in fp32, as there,
so the two kernels give the same bits. `W4A8_WS_CONFIGS` (w4a8_wgmma.py) says where layers
run it.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from specquant.kernels.triton_ops.w4_fragment import Grid
from specquant.kernels.triton_ops.w4_wgmma_ws import (
    PRODUCER_REGS,
    WsConfig,
    _atoms,
    _producer,
    _ws_program,
    check_ws_config,
    require_hopper,
)
from specquant.kernels.triton_ops.w4a8_wgmma import _finish_a8, _operand_i8, layouts

# x codes [BM, 128]: one 128-byte swizzled row per token; the atoms unswizzled, row-major
X_LAYOUT = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
W_LAYOUT = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=8, rank=3)


@gluon.jit
def _consumer_i8(acc, x_ring, w_ring, ready, empty, s_ptr, rn, n_mask, G, k_lo, tiles,
                 GROUP: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, BM: gl.constexpr,
                 STAGES: gl.constexpr, BYTES: gl.constexpr, BYTES_MMA: gl.constexpr,
                 AL: gl.constexpr):  # fmt: skip
    """The wgmma warps: per K tile wait for its slot, unpack the codes to int8 A registers,
    multiply by the x codes in shared memory, release the slot."""
    for i in range(tiles):
        slot = i % STAGES
        if GROUP > 0:  # before the wait, which then hides the load
            gs = gl.load(s_ptr + rn * G + (k_lo + i * BK) // GROUP, mask=n_mask, other=0)
        mbarrier.wait(ready.index(slot), (i // STAGES) & 1)
        a = _operand_i8(_atoms(w_ring, slot, BN, BK).load(BYTES), BN, BK, BYTES_MMA, AL)
        b = x_ring.index(slot).permute((1, 0))  # x^T [BK, BM]
        if GROUP == 0:
            acc = warpgroup_mma(a, b, acc)
        else:
            part = warpgroup_mma(a, b, gl.zeros_like(acc, dtype=gl.int32), use_acc=False)
            acc += part.to(gl.float32) * gs.to(gl.float32)[:, None]
        mbarrier.arrive(empty.index(slot), count=1)  # the synchronous wgmma read its x
    return (acc,)


@gluon.jit(do_not_specialize=["M"])
def _w4a8_wgmma_ws_kernel(
    x_desc,  # TMA over the int8 codes [M, K], box [BM, BK]
    w_desc,  # TMA over the atoms as int8 [N/16, K/32, 256], box [BN/16, BK/32, 256]
    xs_ptr, s_ptr, cs_ptr, b_ptr, out_ptr, ws_ptr, lock_ptr,  # as in _w4a8_wgmma_kernel
    M, N, K, G, K_SPLIT, stride_om,
    GROUP: gl.constexpr, HAS_BIAS: gl.constexpr, SPLIT_K: gl.constexpr, BN: gl.constexpr,
    BK: gl.constexpr, BM: gl.constexpr, WARPS: gl.constexpr, STAGES: gl.constexpr,
    BYTES: gl.constexpr, BYTES_MMA: gl.constexpr,
):  # fmt: skip
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, BM, 32]
    )
    AL: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_l, k_width=4)
    n0, m0, k_lo, tiles, x_ring, w_ring, ready, empty, rn, rm, n_mask, m_mask = _ws_program(
        x_desc, w_desc, M, N, K_SPLIT, BN, BK, BM, STAGES, acc_l
    )
    # per channel one int32 sum; with group scales each K tile's int32 sum is scaled by its
    # group's int8 scale and added in fp32, as the synchronous kernel does
    acc = gl.zeros([BN, BM], gl.float32 if GROUP > 0 else gl.int32, acc_l)
    # (the partitions' arguments inline: the JIT turns a tuple variable's layouts to tensors)
    acc = gl.warp_specialize(
        [
            (_consumer_i8, (acc, x_ring, w_ring, ready, empty, s_ptr, rn, n_mask, G, k_lo,
                            tiles, GROUP, BN, BK, BM, STAGES, BYTES, BYTES_MMA, AL)),
            (_producer, (x_desc, w_desc, x_ring, w_ring, ready, empty, n0, m0, k_lo, tiles, BK,
                         STAGES)),
        ],
        [1],
        [PRODUCER_REGS],
    )[0]  # fmt: skip
    _finish_a8(acc, rn, rm, n_mask, m_mask, xs_ptr, s_ptr, cs_ptr, b_ptr, out_ptr, ws_ptr,
               lock_ptr, M, N, stride_om, GROUP, HAS_BIAS, SPLIT_K)  # fmt: skip


def launch_ws(
    a: torch.Tensor,  # int8 [M, K] codes, rows 16-byte aligned
    xs: torch.Tensor,  # fp32 [M] per-token scales
    frag: torch.Tensor,  # int8 [N/16, K/128, 1024] (prepare_fragments_i8)
    sw: torch.Tensor,  # fp32 [N] per channel; int8 [N, G] group scales with `group`
    cs: torch.Tensor,  # fp32 [N] channel scales (two-level), else sw
    bias: torch.Tensor | None,
    out: torch.Tensor,  # [M, N]
    g: Grid,  # plan_grid's, for the config's tiles and bm token rows
    bm: int,
    cfg: WsConfig,
    group: int,
) -> None:
    """The warp-specialized launch of w4a8_wgmma_linear, once it has checked its inputs."""
    check_ws_config(cfg)
    if cfg.async_mma:
        raise ValueError(f"async_mma is a W4A16 option; the W4A8 twin runs synchronous wgmma, "
                         f"so {cfg} cannot run it")  # fmt: skip
    require_hopper(a.device, "warp-specialized W4A8")
    (m, k), n = a.shape, out.shape[1]
    lay = layouts(cfg.block_n, g.block_k, cfg.warps)
    x_desc = TensorDescriptor.from_tensor(a, [bm, g.block_k], X_LAYOUT)
    atoms = frag.view(frag.shape[0], frag.shape[1] * 4, 256)
    w_desc = TensorDescriptor.from_tensor(
        atoms, [cfg.block_n // 16, g.block_k // 32, 256], W_LAYOUT
    )
    _w4a8_wgmma_ws_kernel[(g.n_tiles, g.m_tiles, g.split_k)](
        x_desc, w_desc, xs, sw, cs, bias if bias is not None else cs, out, g.ws, g.locks,
        m, n, k, sw.shape[-1] if group else 1, g.k_split, out.stride(0),
        GROUP=group, HAS_BIAS=bias is not None, SPLIT_K=g.split_k, BN=cfg.block_n,
        BK=g.block_k, BM=bm, WARPS=cfg.warps, STAGES=cfg.stages, BYTES=lay.bytes,
        BYTES_MMA=lay.bytes_mma,
        num_warps=cfg.warps, **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}),
    )  # fmt: skip
