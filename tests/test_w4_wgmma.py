"""The wgmma W4A16 kernel (w4_wgmma.py): compiled offline for sm_90 on the CPU (no spills,
one wgmma per 64 x 16 x BM block, wgmmas not serialized), its tile table and config checks,
and on the GPU against a dequantize-and-matmul reference."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import compiled_loop
from specquant.kernels.reference import to_mma_order

pytest.importorskip("triton.experimental.gluon")


@pytest.mark.parametrize(
    ("tile", "group", "most"),
    [("128,128,64,4,3,1", 128, 4.0), ("256,128,64,8,3,0", 128, 3.7), ("64,128,16,4,3,0", 0, 4.0),
     ("128,128,64,8,4,1,1", 128, 4.7), ("128,128,64,4,4,1,1", 0, 3.3),
     ("256,128,64,16,3,1", 128, 4.0), ("128,128,64,4,3,1,0,1", 128, 3.4),
     ("256,128,64,16,3,0,0,1", 0, 3.3), ("128,128,64,8,4,1,0,0,128", 128, 4.7),
     ("128,128,64,8,3,0,0,0,128", 0, 3.7), ("64,128,64,4,4,1,0,1,128", 128, 4.2)],
)  # fmt: skip
def test_kernel_compiles_for_sm90_without_spills_or_serialized_wgmma(tile, group, most) -> None:
    """Triton's compiler and ptxas, no GPU. One wgmma per 16 k of each warpgroup's 64 rows.
    Synchronous loop: one wait for them per K tile. ptxas serializes wgmmas (a wait after
    each) when it cannot prove their register operands safe, which would show as one wait
    per wgmma. Overlapping loop (unrolled by two tiles): per tile one wait that leaves that
    tile's wgmmas running, and one wait after the loop. With x gathered into mma order, x
    is copied in 16-byte pieces. Held to 128 registers, two 8-warp programs fit an SM with
    next to no spilling in the K loop: none with x in mma order (the tables' configs) on
    Triton 3.6, the GPU image's; otherwise at most 3 local-memory accesses per K step (3.9,
    or x in feature order at 8 warps with group-major scales, where 3.6 makes 2)."""
    out = compiled_loop(["--wgmma", tile, "--group", str(group)], most)
    fields = [int(v) for v in tile.split(",")] + [3, 0, 0, 0, 0][len(tile.split(",")) - 4 :]
    bn, bk, bm, warps, _, w_ring, overlap, x_perm, maxnreg = fields
    hgmma = re.search(r"HGMMA (\d+), WARPGROUP.DEPBAR (\d+) in all, (\d+) leaving one", out)
    assert hgmma, out
    tiles = 2 if overlap else 1
    assert int(hgmma.group(1)) == tiles * (bk // 16) * (bn // (16 * warps)), out
    assert int(hgmma.group(2)) == (3 if overlap else 1), out
    assert int(hgmma.group(3)) == (2 if overlap else 0), out
    if maxnreg:
        regs = re.search(r"REG:(\d+) STACK:(\d+)", out)
        found = re.search(r"local memory: (\d+) accesses in the K loop", out)
        most = 0 if out.startswith("triton 3.6.") and x_perm else 3
        assert regs and int(regs.group(1)) <= maxnreg, out
        assert found and int(found.group(1)) <= most, out
    if x_perm:  # every copy 16 bytes: x's [BM, BK] tile, and the ring's weights
        copies = (bm * bk * 2 + (bn * bk // 2 if w_ring else 0)) // 16 // (32 * warps)
        assert re.search(rf"\bLDGSTS {copies}\b", out), out


@pytest.mark.parametrize("tile", ["64,128,64,4,4,1,0,1,128", "128,128,64,8,3,1,0,1,128"])
@pytest.mark.parametrize("split_k", [4, 8])
def test_split_k_fix_up_does_not_spill_at_64_tokens(tile, split_k) -> None:
    """The program that arrives last adds the other splits' partial sums. Unrolled, ptxas
    issued all their loads at once (32 sums per thread per split at 64 tokens) and spilled
    at 128 registers (88-96 bytes with Triton 3.6, the GPU image's; 136-152 with 3.9); the
    profile of 8B's o_proj at 64 tokens had a third of its samples there. No local-memory
    access may sit in the fix-up's loop, nor in the K loop on Triton 3.6 (the GPU image's),
    with the layers' group-major scales or row-major ones; 3.9 keeps one value of the
    64-row tile's K loop on the stack with group-major scales (3 accesses in a K step of
    about 258 instructions). With group-major scales ptxas also keeps some output index
    values on the stack across the loops (64-80 bytes on 3.6: stored once before the K
    loop, reloaded once after), which costs nothing per trip."""
    for scales in ([], ["--row-major"]):
        out = compiled_loop(["--wgmma", tile, "--split-k", str(split_k), *scales], 4.3)
        found = re.search(r"local memory: (\d+) accesses in the K loop, (\d+) in the split-K", out)
        most = 0 if out.startswith("triton 3.6.") else 3
        assert found and int(found.group(1)) <= most and found.group(2) == "0", out
        regs = re.search(r"REG:(\d+) STACK:(\d+)", out)
        assert regs and int(regs.group(1)) <= 128, out


def test_tile_table_and_bad_configs(monkeypatch) -> None:
    from specquant.kernels.triton_ops import w4_wgmma as W

    assert W.wgmma_config(16, 4096, 4096) == W.WGMMA_CONFIGS[16][0][1]
    assert W.wgmma_config(17, 2048, 4096) == W.WGMMA_CONFIGS[32][0][1]
    assert W.wgmma_config(128, 1 << 20, 1 << 20) == W.WGMMA_CONFIGS[128][-1][1]
    # prefill: one bucket for every count past 128
    assert W.wgmma_config(129, 1 << 20, 1 << 20) == W.wgmma_config(4096, 1 << 20, 1 << 20)
    assert W.wgmma_config(129, 1 << 20, 1 << 20) == W.WGMMA_CONFIGS[W.PREFILL][-1][1] is not None
    # a shape of its own in the buckets it was tuned for, its size class's config elsewhere
    # and where that class runs another kernel
    assert W.wgmma_config(64, 4096, 14336) == W.SHAPE_CONFIGS[(4096, 14336)][64]
    assert W.wgmma_config(64, 4096, 14464) == W.WGMMA_CONFIGS[64][1][1]  # same class
    assert W.wgmma_config(33, 4096, 4096) == W.SHAPE_CONFIGS[(4096, 4096)][64]
    assert W.wgmma_config(128, 4096, 14336) == W.WGMMA_CONFIGS[128][1][1]
    # None in the table: the canonical kernel, even for a shape with configs of its own
    monkeypatch.setitem(W.WGMMA_CONFIGS, 64, W._table(None, None, None, None))
    assert W.wgmma_config(64, 4096, 14336) is None
    for (n, k), rows in W.SHAPE_CONFIGS.items():
        for bucket, cfg in rows.items():
            W.check_config(cfg)
            assert bucket in W.WGMMA_CONFIGS, (n, k, bucket)
    assert [W.token_tile(m) for m in (1, 8, 9, 16, 33, 64, 65, 500)] == [8, 8, 16, 16, 64, 64,
                                                                        64, 64]  # fmt: skip
    for cfg, match in [
        (W.WgmmaConfig(128, 128, 2), "warps must be 4, 8 or 16"),
        (W.WgmmaConfig(96, 128, 8), "block_n 96 is not a multiple of 16 \\* warps \\(8\\)"),
        (W.WgmmaConfig(128, 192, 4), "block_k 192 is not a multiple of 128"),
        (W.WgmmaConfig(128, 128, 4, 1), "stages must be >= 2"),
        (W.WgmmaConfig(128, 128, 4, 2, overlap=True), "stages must be >= 3 .*async wgmma"),
        (W.WgmmaConfig(128, 128, 8, maxnreg=100), "maxnreg must be 0 .* not 100"),
        (W.WgmmaConfig(128, 128, 8, maxnreg=32), "multiple of 8 in \\[64, 255\\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            W.check_config(cfg)


# ------------------------------------------------------------------------------------ GPU
def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("n", "k", "group"), [(64, 256, 128), (48, 384, 0), (272, 1024, 256)])
def test_wgmma_linear_matches_the_reference(dtype, n, k, group) -> None:
    """N not a multiple of the tile (48, 272), tokens not a multiple of the token tile, two
    token tiles and more, split K, an odd number of K tiles (384), bias, both weight paths,
    both K loops, x gathered into mma order."""
    if not _hopper():
        pytest.skip("wgmma needs a Hopper GPU")
    from specquant.kernels.triton_ops import w4_fragment as F
    from specquant.kernels.triton_ops import w4_wgmma as W
    from specquant.quant.pack import dequantize
    from specquant.quant.spec import get_format

    gen = torch.Generator(device="cuda").manual_seed(n + k)
    g = 1 if group == 0 else k // group
    qweight = torch.randint(0, 256, (n, k // 2), device="cuda", generator=gen, dtype=torch.uint8)
    scales = torch.rand(n, g, device="cuda", generator=gen) * 0.02 + 1e-3
    frag = F.prepare_fragments(qweight)
    w = dequantize({"qweight": qweight, "scales": scales}, get_format("w4a16"))
    gm = scales.t().contiguous().t()  # the same scales in group-major memory
    for i, m in enumerate((1, 9, 17, 40, 64, 100, 200, 333)):
        x = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
        bias = torch.randn(n, device="cuda", dtype=dtype) if i % 2 else None
        want = x.float() @ w.T + (0 if bias is None else bias.float())
        for cfg in (W.WgmmaConfig(64, 128, 4, 2), W.WgmmaConfig(128, 256, 8, 4, 1, True),
                    W.WgmmaConfig(64, 128, 4, 3, overlap=True),
                    W.WgmmaConfig(128, 128, 8, 4, 1, True, overlap=True),
                    W.WgmmaConfig(256, 128, 16, 3, 1, True),
                    W.WgmmaConfig(128, 256, 8, 3, 1, True, x_perm=True),
                    W.WgmmaConfig(128, 128, 8, 4, 2, True, maxnreg=128)):  # fmt: skip
            for split in (None, 2):
                got = W.wgmma_linear(x, frag, scales, bias, group, cfg, split)
                err = float((got.float() - want).norm() / want.norm())
                assert err < 8e-3, (m, cfg, split, err)
                # scales in group-major memory: the same arithmetic, the same bits
                assert torch.equal(W.wgmma_linear(x, frag, gm, bias, group, cfg, split), got)
            if cfg.x_perm:  # x written in mma order by its producer: the same result
                given = to_mma_order(x)
                again = W.wgmma_linear(given, frag, scales, bias, group, cfg, x_in_mma_order=True)
                assert torch.equal(again, W.wgmma_linear(x, frag, scales, bias, group, cfg))
    with pytest.raises(ValueError, match="mma K order, but the config reads it in feature"):
        W.wgmma_linear(x, frag, scales, None, group, W.WgmmaConfig(64, 128, 4, 2),
                       x_in_mma_order=True)  # fmt: skip


@pytest.mark.cuda
def test_layer_takes_mma_order_where_its_wgmma_config_reads_it() -> None:
    """FragForward (the W4A16 layer kernel on Hopper) asks for mma order exactly where its
    wgmma config has x_perm, and gives the same output for mma-ordered and plain input at
    every token count (where it did not ask, it restores feature order itself); with its
    kernels reading the layer's row-major scales too (group_major_scales=False)."""
    if not _hopper():
        pytest.skip("wgmma needs a Hopper GPU")
    from specquant.kernels.reference import MmaOrderActivations
    from specquant.kernels.triton_ops import w4_fragment as F
    from specquant.kernels.triton_ops import w4_wgmma as W
    from specquant.quant.spec import get_format

    n, k = 4096, 8320  # 34M weights: past the smallest size class, so x_perm configs apply
    gen = torch.Generator(device="cuda").manual_seed(7)
    qweight = torch.randint(0, 256, (n, k // 2), device="cuda", generator=gen, dtype=torch.uint8)
    scales = torch.rand(n, k // 128, device="cuda", generator=gen) * 0.02 + 1e-3
    live = {"qweight": qweight, "scales": scales}
    layer = F.prepare_forward(live, get_format("w4a16-g128"), wgmma=True)
    rows = F.prepare_forward(live, get_format("w4a16-g128"), wgmma=True, group_major_scales=False)
    asked = []
    for m in (1, 9, 33, 64, 100, 300):
        cfg = W.wgmma_config(m, n, k) if F.frag_config(m, n * k, grouped=True) is None else None
        assert layer.takes_mma_order(m) == bool(cfg and cfg.x_perm), m
        asked.append(layer.takes_mma_order(m))
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        want = layer(x, live, None, None)
        got = layer(MmaOrderActivations(to_mma_order(x)), live, None, None)
        assert torch.equal(got, want), m
        assert torch.equal(rows(x, live, None, None), want), m  # row-major scales
    assert any(asked) and not all(asked)


@pytest.mark.cuda
def test_every_table_config_matches_the_reference_at_its_bucket() -> None:
    """Each distinct WGMMA_CONFIGS entry at one token fewer than its bucket (300 for
    prefill), both formats on group-major scales as the layers keep them, x handed over in
    mma order where the config reads it so: the tables' picks change with each probe, and
    a pick runs at token tiles the generic checks may not pair it with."""
    if not _hopper():
        pytest.skip("wgmma needs a Hopper GPU")
    from specquant.kernels.triton_ops import w4_fragment as F
    from specquant.kernels.triton_ops import w4_wgmma as W
    from specquant.quant.pack import dequantize
    from specquant.quant.spec import get_format

    n, k = 384, 2048
    gen = torch.Generator(device="cuda").manual_seed(13)
    qweight = torch.randint(0, 256, (n, k // 2), device="cuda", generator=gen, dtype=torch.uint8)
    frag = F.prepare_fragments(qweight)
    for group in (128, 0):
        g = 1 if group == 0 else k // group
        scales = torch.rand(n, g, device="cuda", generator=gen) * 0.02 + 1e-3
        w = dequantize({"qweight": qweight, "scales": scales}, get_format("w4a16"))
        gm = scales.t().contiguous().t()
        for bucket, rows in W.WGMMA_CONFIGS.items():
            m = 300 if bucket == W.PREFILL else bucket - 1
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
            want = x.float() @ w.T
            for cfg in {cfg for _, cfg in rows if cfg is not None}:
                given = to_mma_order(x) if cfg.x_perm else x
                got = W.wgmma_linear(given, frag, gm, None, group, cfg,
                                     x_in_mma_order=cfg.x_perm).float()  # fmt: skip
                err = float((got - want).norm() / want.norm())
                assert err < 8e-3, (bucket, cfg, group, err)


@pytest.mark.cuda
def test_every_shape_config_matches_the_reference_on_its_shape() -> None:
    """Each SHAPE_CONFIGS entry runs at its own layer shape and bucket (both formats, x
    handed over in mma order as the model does) and matches dequantize-and-matmul: these
    configs split K more ways and use smaller programs than the shapes' size classes."""
    if not _hopper():
        pytest.skip("wgmma needs a Hopper GPU")
    from specquant.kernels.triton_ops import w4_fragment as F
    from specquant.kernels.triton_ops import w4_wgmma as W
    from specquant.quant.pack import dequantize
    from specquant.quant.spec import get_format

    gen = torch.Generator(device="cuda").manual_seed(11)
    for (n, k), rows in W.SHAPE_CONFIGS.items():
        qweight = torch.randint(0, 256, (n, k // 2), device="cuda", generator=gen,
                                dtype=torch.uint8)  # fmt: skip
        frag = F.prepare_fragments(qweight)
        for group in (128, 0):
            g = 1 if group == 0 else k // group
            scales = torch.rand(n, g, device="cuda", generator=gen) * 0.02 + 1e-3
            w = dequantize({"qweight": qweight, "scales": scales}, get_format("w4a16"))
            for bucket, cfg in rows.items():
                x = torch.randn(bucket - 1, k, device="cuda", dtype=torch.bfloat16, generator=gen)
                assert W.wgmma_config(bucket - 1, n, k) == cfg
                got = W.wgmma_linear(to_mma_order(x), frag, scales, None, group, cfg,
                                     x_in_mma_order=True).float()  # fmt: skip
                want = x.float() @ w.T
                err = float((got - want).norm() / want.norm())
                assert err < 8e-3, (n, k, bucket, group, err)
