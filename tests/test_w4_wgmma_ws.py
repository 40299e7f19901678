"""The warp-specialized wgmma W4A16 kernel (w4_wgmma_ws.py): compiled offline for sm_90 on
the CPU (a lean consumer loop with no CTA-wide barrier and no spills, TMA copies in the
producer), its tile table and config checks, and on the GPU against a dequantize-and-matmul
reference and, bit for bit, against the synchronous wgmma kernel with the same tiles."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import compiled_loop
from specquant.kernels.reference import to_mma_order

pytest.importorskip("triton.experimental.gluon")


@pytest.mark.parametrize(
    ("tile", "group"),
    [("64,128,64,4,4,128", 128), ("128,128,64,4,3,128", 0), ("64,256,64,4,2,128", 0),
     ("128,128,16,4,4,128", 128), ("64,128,64,4,3,80", 128), ("64,128,8,4,6,64", 128)],
)  # fmt: skip
def test_kernel_compiles_for_sm90_with_a_lean_consumer_loop(tile, group) -> None:
    """Triton's compiler and ptxas, no GPU. The consumer's K loop: one wgmma per 16 k of
    each 64 rows and one wait for them, no CTA-wide barrier (the consumer warps meet at a
    named barrier of their own before releasing a slot), no local memory, under three
    instructions per weight (the synchronous loop takes about four: it copies too). The
    producer issues the TMA copies: one for the weights, one or two for x (a 128-byte
    swizzle holds 64 columns of bf16 per copy)."""
    out = compiled_loop(["--ws", tile, "--group", str(group)], 3.0)
    bn, bk, _, warps, _, maxnreg = (int(v) for v in tile.split(","))
    loop = re.search(r"wgmma (\d+), WARPGROUP.DEPBAR (\d+) \(\d+ leaving one running\), "
                     r"CTA-wide BAR.SYNC (\d+), local memory (\d+)", out)  # fmt: skip
    assert loop, out
    assert int(loop.group(1)) == (bk // 16) * (bn // (16 * warps)), out
    assert loop.group(2) == "1", out  # one wait per K tile: the wgmmas run synchronously
    assert loop.group(3) == "0" and loop.group(4) == "0", out
    assert "(0 leaving one running)" in out, out
    copies = re.search(r"producer loop: UTMALDG (\d+)", out)
    assert copies and int(copies.group(1)) == 1 + bk // 64, out
    regs = re.search(r"REG:(\d+)", out)
    assert regs and int(regs.group(1)) <= maxnreg, out


@pytest.mark.parametrize("group", [0, 128])
def test_async_mma_compiles_to_two_tiles_a_turn_with_one_wgmma_left_running(group) -> None:
    """async_mma offline: the loop takes two K tiles, each with its own A registers, and
    both waits let the newest wgmma run on (ptxas serializes none of them, group scales
    included: they scale A, so no accumulator is read inside the pipeline); no spills."""
    out = compiled_loop(["--ws", "64,128,64,4,4,128,1", "--group", str(group)], 3.0)
    loop = re.search(r"wgmma (\d+), WARPGROUP.DEPBAR (\d+) \((\d+) leaving one running\), "
                     r"CTA-wide BAR.SYNC (\d+), local memory (\d+)", out)  # fmt: skip
    assert loop, out
    assert loop.groups() == ("16", "2", "2", "0", "0"), out
    regs = re.search(r"REG:(\d+)", out)
    assert regs and int(regs.group(1)) <= 128, out


def test_tile_table_and_bad_configs() -> None:
    from specquant.kernels.triton_ops import w4_wgmma_ws as WS
    from specquant.kernels.triton_ops.w4_fragment import lookup

    assert WS.ws_config(129, 4096, 4096) is None  # prefill: the synchronous table
    assert WS.ws_config(4, 4096, 1024) is None  # up to 4 tokens: the fragment kernel,
    assert WS.ws_config(1, 4096, 4096) == WS.WS_SHAPE_CONFIGS[(4096, 4096)][4]  # but 8B's o
    assert WS.ws_config(1, 10240, 8192, group=128) is None  # 70B g128: the fragment kernel,
    assert WS.ws_config(1, 10240, 8192, group=0).block_n == 64  # per channel its own pick
    assert WS.ws_config(8, 4096, 4096) == WS.WS_CONFIGS[8][0][1]
    assert WS.ws_config(8, 8192, 28672) is None  # 70B down at 8: the fragment kernel
    assert WS.ws_config(16, 4096, 4096) is None  # smallest class at 16: synchronous
    assert WS.ws_config(64, 4096, 4096) == WS.WS_CONFIGS[64][0][1]
    qkv = WS.ws_config(64, 10240, 8192)  # Llama-3-70B qkv: its own pick
    assert qkv == WS.WS_SHAPE_CONFIGS[(10240, 8192)][64] and qkv.x_perm
    down = (8192, 28672)  # Llama-3-70B down at 64 tokens: per channel, the async consumer
    assert WS.ws_config(64, *down, group=0).async_mma
    assert WS.ws_config(64, *down, group=128) == lookup(WS.WS_CONFIGS, 64, 8192 * 28672)
    for cfg in {c for rows in WS.WS_CONFIGS.values() for _, c in rows if c} | {
        c for per in WS.WS_SHAPE_CONFIGS.values() for c in per.values()
    }:
        WS.check_ws_config(cfg, group=128)  # the shared tables serve group scales too
    for per in WS.WS_CHANNEL_SHAPE_CONFIGS.values():
        for cfg in per.values():
            WS.check_ws_config(cfg)
    bad = [(WS.WsConfig(64, 128, 16), "warps must be 4 or 8"),
           (WS.WsConfig(96, 128, 4), "block_n 96 must be a multiple of 16 \\* warps \\(64\\)"),
           (WS.WsConfig(64, 192, 4), "block_k 192 is not a multiple of 128"),
           (WS.WsConfig(64, 128, 4, 1), "stages must be >= 2"),
           (WS.WsConfig(64, 128, 4, 4, 1, 40), "maxnreg must be 0 .* not 40"),
           (WS.WsConfig(128, 128, 4, async_mma=True),
            "async_mma needs block_n == 16 \\* warps .* not block_n 128 with 4 warps")]  # fmt: skip
    for cfg, msg in bad:
        with pytest.raises(ValueError, match=msg):
            WS.check_ws_config(cfg)
    from specquant.kernels.triton_ops import w4a8_wgmma as Q

    with pytest.raises(ValueError, match="async_mma is a W4A16 option"):
        Q.w4a8_wgmma_linear(torch.zeros(2, 256, dtype=torch.int8), torch.ones(2),
                            Q.prepare_fragments_i8(torch.zeros(64, 128, dtype=torch.uint8)),
                            torch.ones(64), None, torch.bfloat16,
                            WS.WsConfig(64, 128, 4, async_mma=True))  # fmt: skip


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def _layer(n: int, k: int, group: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Random int4 codes, their fragments, fp32 scales [N, G] and the dequantized weight."""
    from specquant.kernels.triton_ops import w4_fragment as F
    from specquant.quant.pack import dequantize
    from specquant.quant.spec import get_format

    g = 1 if group == 0 else k // group
    qweight = torch.randint(0, 256, (n, k // 2), device="cuda", generator=gen, dtype=torch.uint8)
    scales = torch.rand(n, g, device="cuda", generator=gen) * 0.02 + 1e-3
    w = dequantize({"qweight": qweight, "scales": scales}, get_format("w4a16"))
    return F.prepare_fragments(qweight), scales, w


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("n", "k", "group"), [(272, 1024, 128), (48, 384, 0), (384, 2048, 256)])
def test_ws_linear_matches_the_reference_and_the_synchronous_kernel(dtype, n, k, group) -> None:
    """Odd N (not a multiple of BLOCK_N: TMA zero-fills the atoms past it), token counts
    from one (TMA zero-fills the x rows past it) past each token tile and two of them (130),
    with and without split K and bias, plain x (the launcher gathers) and x in mma
    order."""
    if not _hopper():
        pytest.skip("wgmma and TMA need a Hopper GPU")
    from specquant.kernels.triton_ops import w4_wgmma as W
    from specquant.kernels.triton_ops import w4_wgmma_ws as WS

    gen = torch.Generator(device="cuda").manual_seed(n + k)
    frag, scales, w = _layer(n, k, group, gen)
    gm = scales.t().contiguous().t()  # group-major, as the layers keep them
    configs = [WS.WsConfig(64, 128, 4, 2), WS.WsConfig(128, 128, 4, 3, 1, 128),
               WS.WsConfig(128, 256, 8, 3)]  # fmt: skip
    for i, m in enumerate((1, 4, 9, 33, 64, 100, 130)):
        x = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
        bias = torch.randn(n, device="cuda", dtype=dtype) if i % 2 else None
        want = x.float() @ w.T + (bias.float() if bias is not None else 0)
        for cfg in configs:
            for split in (None, 2):
                got = WS.wgmma_ws_linear(x, frag, gm, bias, group, cfg, split)
                err = float((got.float() - want).norm() / want.norm())
                assert err < 8e-3, (m, cfg, split, err)
                twin = W.WgmmaConfig(cfg.block_n, cfg.block_k, cfg.warps, 3, 1, True,
                                     x_perm=True)  # fmt: skip
                same = W.wgmma_linear(x, frag, gm, bias, group, twin, split)
                assert torch.equal(got, same), (m, cfg, split)
                ordered = WS.wgmma_ws_linear(to_mma_order(x), frag, gm, bias, group, cfg, split,
                                             x_in_mma_order=True)  # fmt: skip
                assert torch.equal(ordered, got), (m, cfg, split)


@pytest.mark.cuda
def test_every_table_config_matches_the_reference_at_its_bucket() -> None:
    """Each distinct WS_CONFIGS and WS_SHAPE_CONFIGS entry (and, per channel,
    WS_CHANNEL_SHAPE_CONFIGS') at one token fewer than its bucket, both formats on
    group-major scales, x in mma order as the model hands it."""
    if not _hopper():
        pytest.skip("wgmma and TMA need a Hopper GPU")
    from specquant.kernels.triton_ops import w4_wgmma_ws as WS

    n, k = 384, 2048
    gen = torch.Generator(device="cuda").manual_seed(17)
    picks = {(b, c) for b, rows in WS.WS_CONFIGS.items() for _, c in rows if c} | {
        (b, c) for per in WS.WS_SHAPE_CONFIGS.values() for b, c in per.items()
    }
    channel = {(b, c) for per in WS.WS_CHANNEL_SHAPE_CONFIGS.values() for b, c in per.items()}
    for group in (128, 0):
        frag, scales, w = _layer(n, k, group, gen)
        gm = scales.t().contiguous().t()
        for bucket, cfg in sorted(picks | (set() if group else channel), key=str):
            x = torch.randn(bucket - 1, k, device="cuda", dtype=torch.bfloat16, generator=gen)
            want = x.float() @ w.T
            got = WS.wgmma_ws_linear(to_mma_order(x), frag, gm, None, group, cfg,
                                     x_in_mma_order=True).float()  # fmt: skip
            err = float((got - want).norm() / want.norm())
            assert err < 8e-3, (bucket, cfg, group, err)


def test_zero_tokens_give_an_empty_result_without_a_launch() -> None:
    """Every fragment-order launcher starts from the same buffers (launch_buffers): x's
    leading shape is kept, and no kernel runs for zero tokens (so this holds on the CPU)."""
    from specquant.kernels.triton_ops import w4_fragment as F
    from specquant.kernels.triton_ops import w4_wgmma as W
    from specquant.kernels.triton_ops import w4_wgmma_ws as WS

    frag = torch.zeros(48 // 16, 256 // 128, 512, dtype=torch.int16)
    x = torch.zeros(2, 0, 256, dtype=torch.bfloat16)
    scales = torch.ones(48, 2)
    for y in (F.fragment_linear(x, frag, scales, None, 128),
              W.wgmma_linear(x, frag, scales, None, 128),
              WS.wgmma_ws_linear(x, frag, scales, None, 128, WS.WsConfig(64, 128, 4))):  # fmt: skip
        assert y.shape == (2, 0, 48) and y.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"needs a Hopper GPU .* not a cpu device"):
        WS.wgmma_ws_linear(torch.zeros(3, 256, dtype=torch.bfloat16), frag, scales, None, 128,
                           WS.WsConfig(64, 128, 4))  # fmt: skip


# ------------------------------------------------------------------------- the W4A8 twin
@pytest.mark.parametrize(
    ("tile", "group", "most"), [("64,128,64,4,4,128", 0, 1.2), ("128,128,64,4,3,128", 128, 2.5)]
)
def test_w4a8_twin_compiles_with_a_lean_consumer_loop(tile, group, most) -> None:
    """The W4A8 twin (w4a8_wgmma_ws.py) offline: one int8 wgmma per 32 k of each 64 rows,
    no CTA-wide barrier, no local memory, one TMA copy each for x's codes (128 bytes a
    row: one swizzle row) and the atoms; fewer instructions per weight than the synchronous
    W4A8 loop (1.70 per channel and 2.95 with g128 scales on Triton 3.6)."""
    out = compiled_loop(["--ws", tile, "--a8", "--group", str(group)], most)
    bn, bk, _, warps, _, _ = (int(v) for v in tile.split(","))
    loop = re.search(r"wgmma (\d+), WARPGROUP.DEPBAR (\d+) \(\d+ leaving one running\), "
                     r"CTA-wide BAR.SYNC (\d+), local memory (\d+)", out)  # fmt: skip
    assert loop and int(loop.group(1)) == (bk // 32) * (bn // (16 * warps)), out
    assert loop.group(2) == "1", out  # one wait per K tile: the wgmmas run synchronously
    assert loop.group(3) == "0" and loop.group(4) == "0", out
    assert re.search(r"producer loop: UTMALDG 2\b", out), out


def test_w4a8_layers_route_to_the_twin_where_its_table_says(monkeypatch) -> None:
    """W4A8Forward asks W4A8_WS_CONFIGS first (here a made-up one), and the
    launcher hands a WsConfig to the twin after its own checks."""
    from specquant.kernels.triton_ops import w4_wgmma_ws as WS
    from specquant.kernels.triton_ops import w4a8_wgmma as Q
    from specquant.kernels.triton_ops import w4a8_wgmma_ws as QW

    layer = Q.W4A8Forward(torch.empty(4096 // 16, 4096 // 128, 1024, dtype=torch.int8))
    assert layer.route(64) == "wgmma"  # the table leaves the smallest class at 64 tokens
    ws = WS.WsConfig(64, 128, 4)
    none = Q._table(None, None, None, None)
    monkeypatch.setattr(Q, "W4A8_WS_CONFIGS", {32: none, 64: Q._table(ws, ws, ws, ws)})
    assert [layer.route(m) for m in (1, 64, 65, 600)] == ["canonical", "wgmma-ws", "wgmma",
                                                          "canonical"]  # fmt: skip
    launched = []
    monkeypatch.setattr(QW, "launch_ws", lambda *a: launched.append(a))
    codes = torch.zeros(64, 4096, dtype=torch.int8)
    y = Q.w4a8_wgmma_linear(codes, torch.ones(64), layer.frag, torch.ones(4096), None,
                            torch.bfloat16, ws)  # fmt: skip
    assert y.shape == (64, 4096) and len(launched) == 1 and launched[0][9] is ws
    with pytest.raises(ValueError, match="activation codes must be int8"):  # checks first
        Q.w4a8_wgmma_linear(codes.float(), torch.ones(64), layer.frag, torch.ones(4096), None,
                            torch.bfloat16, ws)  # fmt: skip
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"W4A8 kernel needs a Hopper GPU .* not a cpu device"):
        Q.w4a8_wgmma_linear(codes, torch.ones(64), layer.frag, torch.ones(4096), None,
                            torch.bfloat16, ws)  # fmt: skip


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["w4a8", "w4a8-g128"])
@pytest.mark.parametrize(("n", "k"), [(272, 1152), (208, 384), (128, 1024)])
def test_w4a8_twin_gives_the_synchronous_kernels_bits(fmt, n, k) -> None:
    """Odd N, K splits, BLOCK_K 256 and its fallback, token tiles of 8-64 and two of them,
    with and without bias: the same int32 sums in the same order as the synchronous W4A8
    kernel with the same tiles (itself checked against the integer reference)."""
    if not _hopper():
        pytest.skip("wgmma and TMA need a Hopper GPU")
    from specquant.kernels.reference import quantize_per_token
    from specquant.kernels.triton_ops import w4_wgmma_ws as WS
    from specquant.kernels.triton_ops import w4a8_wgmma as Q
    from specquant.quant.spec import get_format

    spec = get_format(fmt)
    gen = torch.Generator().manual_seed(n + k)
    qweight = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8).cuda()
    group = 0 if spec.group_size == -1 else spec.group_size
    cs = None
    sw = (torch.rand(n, generator=gen) * 0.02 + 1e-3).cuda()
    if group:
        cs = sw * 0.01
        sw = torch.randint(-128, 128, (n, k // group), generator=gen, dtype=torch.int8).cuda()
    frag = Q.prepare_fragments_i8(qweight)
    configs = [WS.WsConfig(64, 128, 4, 2), WS.WsConfig(128, 128, 4, 3, 1, 128),
               WS.WsConfig(128, 256, 8, 3)]  # fmt: skip
    for i, m in enumerate((9, 33, 64, 100, 130)):
        x = torch.randn(m, k, generator=gen).to("cuda", torch.bfloat16)
        qa = quantize_per_token(x, "int8")
        bias = torch.randn(n, generator=gen).to("cuda", torch.bfloat16) if i % 2 else None
        for cfg in configs:
            twin = Q.W4A8WgmmaConfig(cfg.block_n, cfg.block_k, cfg.warps, cfg.stages)
            for split in (None, 2):
                args = (qa.codes, qa.scales, frag, sw, bias, torch.bfloat16)
                y = Q.w4a8_wgmma_linear(*args, cfg, split, group, cs)
                want = Q.w4a8_wgmma_linear(*args, twin, split, group, cs)
                assert torch.equal(y, want), (m, cfg, split)


@pytest.mark.cuda
def test_every_w4a8_table_config_gives_the_synchronous_kernels_bits() -> None:
    """Each distinct W4A8_WS_CONFIGS and W4A8_WS_SHAPE_CONFIGS entry, at one token fewer
    than its bucket, per channel and g128: the bits of the synchronous kernel with the same
    tiles and split."""
    if not _hopper():
        pytest.skip("wgmma and TMA need a Hopper GPU")
    from specquant.kernels.reference import quantize_per_token
    from specquant.kernels.triton_ops import w4a8_wgmma as Q

    n, k = 384, 2048
    gen = torch.Generator().manual_seed(23)
    qweight = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8).cuda()
    frag = Q.prepare_fragments_i8(qweight)
    sc = (torch.rand(n, generator=gen) * 0.02 + 1e-3).cuda()
    picks = {(b, c) for b, rows in Q.W4A8_WS_CONFIGS.items() for _, c in rows if c} | {
        (b, c) for per in Q.W4A8_WS_SHAPE_CONFIGS.values() for b, c in per.items()
    }
    assert picks, "the table is empty"
    for group in (0, 128):
        sw = torch.randint(-128, 128, (n, k // 128), generator=gen, dtype=torch.int8).cuda()
        args = (frag, sw, None, torch.bfloat16) if group else (frag, sc, None, torch.bfloat16)
        for bucket, cfg in sorted(picks, key=str):
            qa = quantize_per_token(torch.randn(bucket - 1, k, generator=gen).cuda().bfloat16(),
                                    "int8")  # fmt: skip
            # the same split waves: both launchers plan the same K split
            twin = Q.W4A8WgmmaConfig(cfg.block_n, cfg.block_k, cfg.warps, cfg.stages,
                                     cfg.split_waves)  # fmt: skip
            cs = sc * 0.01 if group else None
            y = Q.w4a8_wgmma_linear(qa.codes, qa.scales, *args, cfg, None, group, cs)
            want = Q.w4a8_wgmma_linear(qa.codes, qa.scales, *args, twin, None, group, cs)
            assert torch.equal(y, want), (bucket, cfg, group)


@pytest.mark.cuda
@pytest.mark.parametrize(("n", "k"), [(272, 1024), (64, 1152), (384, 2048)])
def test_async_mma_gives_the_synchronous_bits(n, k) -> None:
    """Per channel: even and odd K tile counts per split (the odd one takes the last tile
    alone), split K, a short ring (stages 2: a slot is released only after the next wgmma
    was issued), 8 consumer warps: the same bits as the synchronous consumer."""
    if not _hopper():
        pytest.skip("wgmma and TMA need a Hopper GPU")
    from specquant.kernels.triton_ops import w4_wgmma_ws as WS

    gen = torch.Generator(device="cuda").manual_seed(n + k)
    frag, scales, _ = _layer(n, k, 0, gen)
    for m in (5, 64, 100):
        x = to_mma_order(torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen))
        for fields in ((64, 128, 4, 2), (64, 128, 4, 4, 1, 128), (128, 128, 8, 3)):
            for split in (None, 1, 3):
                sync = WS.wgmma_ws_linear(x, frag, scales, None, 0, WS.WsConfig(*fields),
                                          split, x_in_mma_order=True)  # fmt: skip
                got = WS.wgmma_ws_linear(x, frag, scales, None, 0,
                                         WS.WsConfig(*fields, async_mma=True), split,
                                         x_in_mma_order=True)  # fmt: skip
                assert torch.equal(got, sync), (m, fields, split)


@pytest.mark.cuda
@pytest.mark.parametrize(("n", "k"), [(272, 1024), (64, 1152)])
def test_async_mma_with_group_scales_gives_the_overlap_kernels_bits(n, k) -> None:
    """g128 with async_mma scales A in bf16, as w4_wgmma's overlap path does, and chains
    the tiles in K order into one accumulator: the same bits as that kernel with the same
    tiles and split (odd and even tile counts), and close to dequantize-and-matmul."""
    if not _hopper():
        pytest.skip("wgmma and TMA need a Hopper GPU")
    from specquant.kernels.triton_ops import w4_wgmma as W
    from specquant.kernels.triton_ops import w4_wgmma_ws as WS

    gen = torch.Generator(device="cuda").manual_seed(n * k)
    frag, scales, w = _layer(n, k, 128, gen)
    gm = scales.t().contiguous().t()
    for m in (5, 64, 100):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        xo = to_mma_order(x)
        for split in (1, 3):
            got = WS.wgmma_ws_linear(xo, frag, gm, None, 128, WS.WsConfig(64, 128, 4, 4,
                                     async_mma=True), split, x_in_mma_order=True)  # fmt: skip
            want = W.wgmma_linear(xo, frag, gm, None, 128, W.WgmmaConfig(64, 128, 4, 3,
                                  overlap=True, x_perm=True), split,
                                  x_in_mma_order=True)  # fmt: skip
            assert torch.equal(got, want), (m, split)
            ref = x.float() @ w.T
            err = float((got.float() - ref).norm() / ref.norm())
            assert err < 8e-3, (m, split, err)
