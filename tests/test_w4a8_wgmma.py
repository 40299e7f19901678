"""The W4A8 wgmma kernel (w4a8_wgmma.py): its int8 fragment packing and register model on
the CPU, compiled offline for sm_90 (every layout conversion asserted free, no spills, one
wgmma per 64 x 32 block), and on the GPU against the exact integer reference."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import compiled_loop

pytest.importorskip("triton.experimental.gluon")


def _codes(n: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8)


def _a_registers_i8(frag: torch.Tensor, nb: int, kb: int, lane: int) -> torch.Tensor:
    """int32 [2 (k64 half), 2 (k32), 4 (wgmma A register)] that lane `lane` of the warp owning
    atom row `nb` holds for the atom's 128 k after unpacking (each code times 16): what
    wgmma's int8 A layout asks of it (a CPU model of the kernel's unpack)."""
    words = frag[nb, kb].view(2, 32, 4, 4)[:, lane].to(torch.int32) & 0xFF  # h, word, byte
    lo = ((words & 0xF) << 4).to(torch.uint8).view(torch.int8).to(torch.int32)
    hi = (words & 0xF0).to(torch.uint8).view(torch.int8).to(torch.int32)

    def reg(v: torch.Tensor) -> torch.Tensor:  # 4 int8 (byte b at bits 8 b) -> int32
        v = v & 0xFF
        return v[..., 0] | v[..., 1] << 8 | v[..., 2] << 16 | v[..., 3] << 24

    # word = 2 s + n8; registers a0 (row g), a1 (g + 8), a2 (g, k + 16), a3 (g + 8, k + 16)
    lo, hi = reg(lo).view(2, 2, 2), reg(hi).view(2, 2, 2)  # h, s, n8
    return torch.stack([lo[..., 0], lo[..., 1], hi[..., 0], hi[..., 1]], dim=-1)


def test_int8_fragments_round_trip_and_reject_bad_shapes() -> None:
    from specquant.kernels.triton_ops.w4a8_wgmma import fragment_codes_i8, prepare_fragments_i8

    q = _codes(48, 384, 0)
    frag = prepare_fragments_i8(q)
    assert frag.shape == (3, 3, 1024) and frag.dtype == torch.int8
    assert torch.equal(fragment_codes_i8(frag), q)
    with pytest.raises(ValueError, match="N % 16 == K % 128 == 0, not 40, 384"):
        prepare_fragments_i8(_codes(40, 384, 0))


def test_each_lane_holds_wgmmas_int8_a_fragment_times_16() -> None:
    """The packing against PTX's register fragment of wgmma's int8 A (per warp's 16 rows, per
    32 k, lane 4 g + t): a0 row g, k 4t..4t+3; a1 row g + 8; a2 row g, k + 16; a3 row g + 8,
    k + 16; byte i of a register is k + i. This checks the packing's design through its CPU
    model (_a_registers_i8); what the compiled kernel's lanes hold follows from its index
    plan and Gluon's wgmma layout (the SASS for sm_90 wires them this way)."""
    from specquant.kernels.triton_ops.w4a8_wgmma import prepare_fragments_i8
    from specquant.quant.pack import unpack_int4

    q = _codes(32, 256, 1)
    centered = unpack_int4(q).to(torch.int32) - 8  # [N, K]
    frag = prepare_fragments_i8(q)
    for nb, kb, lane in [(0, 0, 0), (1, 1, 13), (0, 1, 31), (1, 0, 6)]:
        g, t = divmod(lane, 4)
        regs = _a_registers_i8(frag, nb, kb, lane)  # [h, s, 4]
        for h in range(2):
            for s in range(2):
                k0 = 128 * kb + 64 * h + 32 * s + 4 * t
                for r, (dn, dk) in enumerate([(0, 0), (8, 0), (0, 16), (8, 16)]):
                    word = int(regs[h, s, r]) & 0xFFFFFFFF
                    got = [((word >> (8 * i) & 0xFF) ^ 0x80) - 0x80 for i in range(4)]
                    row = 16 * nb + g + dn
                    want = [16 * int(centered[row, k0 + dk + i]) for i in range(4)]
                    assert got == want, (nb, kb, lane, h, s, r)


@pytest.mark.parametrize(("bn", "bk"), [(64, 128), (128, 256)])
def test_the_kernels_index_plan_turns_a_loaded_tile_into_its_weights_times_16(bn, bk) -> None:
    """The kernel's reshape / permute / unpack plan, run on the CPU with the same constants
    (`operand_i8_reference`): a tile of atoms as loaded becomes 16 x its codes in (n, k)
    order. The compile test below checks that the plan's register layout is wgmma's."""
    from specquant.kernels.triton_ops.w4a8_wgmma import operand_i8_reference, prepare_fragments_i8
    from specquant.quant.pack import unpack_int4

    q = _codes(256, 512, 2)
    centered = unpack_int4(q).to(torch.int32) - 8
    frag = prepare_fragments_i8(q)
    nb, kb = 1, 1  # the tile at rows bn.., k bk..
    tile = frag[nb * bn // 16 : (nb + 1) * bn // 16, kb * bk // 128 : (kb + 1) * bk // 128]
    a = operand_i8_reference(tile.reshape(bn // 16, bk // 128 * 1024))
    assert torch.equal(a, 16 * centered[nb * bn : (nb + 1) * bn, kb * bk : (kb + 1) * bk])


@pytest.mark.parametrize(
    ("tile", "group", "most"),
    [("128,128,64,8,3", 0, 1.8), ("64,128,16,4,4", 0, 2.0), ("128,256,64,8,3", 0, 2.3),
     ("128,128,64,8,3", 128, 3.0)],
)  # fmt: skip
def test_kernel_compiles_for_sm90_with_free_layout_conversions(tile, group, most) -> None:
    """Triton's compiler and ptxas, no GPU: the layout conversions from the loaded bytes to
    wgmma's int8 A are asserted free (no data moves between threads; registers may still be
    renamed, so this checks speed, not values: the index-plan test checks values), one
    wgmma per warpgroup's 64 rows per 32 k, nothing spills, and the K loop stays far below
    the bf16 wgmma kernel's 3.3-4.7 instructions per weight (two per 8 codes unpack; with
    two-level scales one conversion and one fp32 multiply-add more per sum)."""
    out = compiled_loop(["--w4a8-wgmma", tile, "--group", str(group)], most)
    bn, bk, _, warps, _ = (int(v) for v in tile.split(","))
    assert re.search(rf"\bIGMMA {(bk // 32) * (bn // (16 * warps))}\b", out), out
    assert "STACK:0 " in out, out


def test_launcher_names_what_is_wrong_before_launching() -> None:
    from specquant.kernels.triton_ops.w4a8_wgmma import (
        W4A8WgmmaConfig,
        prepare_fragments_i8,
        w4a8_wgmma_linear,
    )

    frag = prepare_fragments_i8(_codes(32, 256, 3))
    codes, xs, sw = torch.zeros(2, 256, dtype=torch.int8), torch.ones(2, 1), torch.ones(32, 1)
    cases = [
        (dict(codes=codes.float()), "activation codes must be int8, not torch.float32"),
        (dict(frag=frag.view(torch.int16)), "frag must be prepare_fragments_i8's int8"),
        (dict(codes=codes[:, :128]), "activations have 128 features, the weights K=256"),
        (dict(scales=torch.ones(32, 2)), "per-channel scales: 32 expected .* shape \\(32, 2\\)"),
        (dict(group=64), "group size must be a multiple of 128 that divides K=256, not 64"),
        (dict(group=128), "two-level group scales: int8 \\[32, 2\\] expected"),
        (dict(group=128, scales=torch.ones(32, 2, dtype=torch.int8)), "need channel_scales"),
        (dict(config=W4A8WgmmaConfig(96, 128, 8)), "block_n a multiple of 16 \\* warps"),
        (dict(config=W4A8WgmmaConfig(stages=1)), "stages must be >= 2"),
    ]
    for change, match in cases:
        args = dict(codes=codes, act_scales=xs, frag=frag, scales=sw, bias=None,
                    out_dtype=torch.bfloat16) | change  # fmt: skip
        with pytest.raises(ValueError, match=match):
            w4a8_wgmma_linear(**args)


# ------------------------------------------------------------------------------------ GPU
def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["w4a8", "w4a8-g128"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("n", "k"), [(256, 512), (272, 1152), (208, 384), (128, 1024)])
def test_w4a8_wgmma_matches_the_integer_reference(fmt, out_dtype, n, k) -> None:
    """Every code (-8..7 at random), N not a multiple of the tile, K splits of 1-3, BLOCK_K
    256 and its fallback to 128 where K is no multiple of 256, token tiles of 8-64 and two
    of them, with and without bias. The sums are exact integers: each output must be the
    reference's to within one step of its dtype."""
    if not _hopper():
        pytest.skip("wgmma needs Hopper")
    from specquant.kernels.reference import qlinear_reference, quantize_per_token
    from specquant.kernels.triton_ops.w4a8_wgmma import (
        W4A8WgmmaConfig,
        prepare_fragments_i8,
        w4a8_wgmma_linear,
    )
    from specquant.quant.spec import get_format

    spec = get_format(fmt)
    gen = torch.Generator().manual_seed(n + k)
    t = {"qweight": torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8),
         "scales": torch.rand(n, 1, generator=gen) * 0.02 + 1e-3}  # fmt: skip
    group = 0 if spec.group_size == -1 else spec.group_size
    if group:  # int8 group scales (every value, 0 included) under fp32 channel scales
        t["channel_scales"] = t.pop("scales").reshape(n) * 0.01
        t["scales"] = torch.randint(-128, 128, (n, k // group), generator=gen, dtype=torch.int8)
    t = {a: v.cuda() for a, v in t.items()}
    frag = prepare_fragments_i8(t["qweight"])
    cfg = W4A8WgmmaConfig
    configs = [(None, None), (cfg(64, 128, 4, 2), 2), (cfg(128, 128, 8, 4), 3),
               (cfg(256, 128, 16, 3), 1), (cfg(128, 256, 8, 3), None)]  # fmt: skip
    step = 2**-7 if out_dtype == torch.bfloat16 else 2**-10
    for i, m in enumerate((1, 9, 16, 32, 33, 64, 100, 130, 300)):
        x = torch.randn(m, k, generator=gen).to("cuda", out_dtype)
        qa = quantize_per_token(x, "int8")
        bias = torch.randn(n, generator=gen).to("cuda", out_dtype) if i % 2 else None
        want = qlinear_reference(qa, t, bias, spec).float()
        for c, split in configs:
            y = w4a8_wgmma_linear(qa.codes, qa.scales, frag, t["scales"], bias, out_dtype,
                                  c, split, group, t.get("channel_scales"))  # fmt: skip
            assert y.dtype == out_dtype and y.shape == (m, n)
            bad = (y.float() - want).abs() > want.abs() * step + 1e-5 * want.abs().max()
            assert not bad.any(), (m, c, split, int(bad.sum()), bad.nonzero()[:4].tolist())


def test_registered_above_the_canonical_kernel_and_rejected_off_hopper() -> None:
    from specquant.kernels.registry import KernelContext, explain, implementations
    from specquant.quant.spec import get_format

    names = [i.name for i in implementations("qlinear")]
    assert names.index("triton-w4a8-wgmma") < names.index("triton-w4a8")
    for fmt, why in [("w4a8", "needs a CUDA device, not cpu"),
                     ("w8a8", "computes w4a8 formats only, not w8a8")]:  # fmt: skip
        ctx = KernelContext(torch.device("cpu"), torch.bfloat16,
                            extra=(("spec", get_format(fmt)), ("shape", (64, 256))))  # fmt: skip
        rows = {name: (ok, reason) for name, ok, reason in explain("qlinear", ctx)}
        assert rows["triton-w4a8-wgmma"] == (False, why)


def test_its_table_holds_a_valid_config_or_none_per_bucket_and_size_class() -> None:
    from specquant.kernels.triton_ops.w4_fragment import SIZE_CLASSES
    from specquant.kernels.triton_ops.w4_wgmma_ws import WsConfig, check_ws_config
    from specquant.kernels.triton_ops.w4a8_wgmma import (
        W4A8_CONFIGS,
        W4A8_WS_CONFIGS,
        W4A8_WS_SHAPE_CONFIGS,
        W4A8WgmmaConfig,
        check_config,
        w4a8_config,
    )

    for table, kind, check in ((W4A8_CONFIGS, W4A8WgmmaConfig, check_config),
                               (W4A8_WS_CONFIGS, WsConfig, check_ws_config)):  # fmt: skip
        for bucket, row in table.items():
            assert [bound for bound, _ in row] == [bound for _, bound in SIZE_CLASSES], bucket
            for _, cfg in row:
                if cfg is not None:
                    assert isinstance(cfg, kind), (bucket, cfg)
                    check(cfg)
    for shape, per in W4A8_WS_SHAPE_CONFIGS.items():
        assert set(per) <= set(W4A8_WS_CONFIGS), shape
        for cfg in per.values():
            check_ws_config(cfg)
    small, large = (4096, 4096), (57344, 8192)  # the 8B o_proj, the 70B gate_up
    assert w4a8_config(1, *small) is None and w4a8_config(16, *small) is None
    # the warp-specialized table first; where it holds None, the synchronous one
    assert w4a8_config(1, *large) == w4a8_config(8, *large) == W4A8_CONFIGS[16][-1][1]
    assert W4A8_CONFIGS[16][-1][1] is not None
    assert w4a8_config(17, *small) == W4A8_WS_CONFIGS[32][0][1] is not None
    assert w4a8_config(64, *small) == W4A8_CONFIGS[64][0][1] is not None
    # a layer shape's own pick comes before its size class's
    gate_up = (28672, 4096)
    assert w4a8_config(32, *gate_up) == W4A8_WS_SHAPE_CONFIGS[gate_up][32]
    assert w4a8_config(32, *gate_up) != w4a8_config(32, 4096, 14336)  # same class, 8B down
    # prefill chunks up to 512 tokens; past them the canonical kernel's taller tiles win
    assert w4a8_config(129, *large) == w4a8_config(512, *large) == W4A8_CONFIGS[512][-1][1]
    assert w4a8_config(513, *large) is None


@pytest.mark.parametrize("fmt", ["w4a8", "w4a8-g128"])
def test_the_layer_forward_routes_each_token_count_by_the_table(monkeypatch, fmt) -> None:
    """W4A8Forward sends token counts without a config to the canonical kernel with the
    layer's own input, tensors, bias and format, the rest to this kernel with the table's
    config, the codes (the given ones, or its own quantizer's of plain x), its fragments
    and the layer's scales (two-level: int8 group scales and fp32 channel scales)."""
    from specquant.kernels import reference
    from specquant.kernels.triton_ops import act_quant, w4a8_wgmma
    from specquant.kernels.triton_ops import qlinear as canonical
    from specquant.quant.spec import get_format

    calls: list[tuple[str, tuple, dict]] = []
    monkeypatch.setattr(canonical, "qlinear", lambda *a, **kw: calls.append(("canonical", a, kw)))
    monkeypatch.setattr(w4a8_wgmma, "w4a8_wgmma_linear",
                        lambda *a, **kw: calls.append(("wgmma", a, kw)))  # fmt: skip
    made: list[reference.QuantizedActivations] = []  # what the layer's quantizer returned

    def quantize(x: torch.Tensor, kind: str) -> reference.QuantizedActivations:
        made.append(reference.quantize_per_token(x, kind))
        return made[-1]

    monkeypatch.setattr(act_quant, "quantize_per_token", quantize)
    spec, n, k = get_format(fmt), 4096, 4096
    layer = w4a8_wgmma.W4A8Forward(torch.empty(n // 16, k // 128, 1024, dtype=torch.int8))
    if spec.two_level:
        live = {
            "scales": torch.ones(n, k // 128, dtype=torch.int8),
            "channel_scales": torch.ones(n),
        }
    else:
        live = {"scales": torch.ones(n)}
    bias = torch.zeros(n)
    for m, route in [(1, "canonical"), (16, "canonical"), (17, "wgmma-ws"), (33, "wgmma"),
                     (64, "wgmma"), (65, "wgmma-ws"), (128, "wgmma-ws"), (129, "wgmma"),
                     (512, "wgmma"), (513, "canonical")]:  # fmt: skip
        assert layer.route(m) == route, m
        route = route.removesuffix("-ws")  # the twin launches through w4a8_wgmma_linear
        x = torch.randn(m, k)
        for given in (reference.quantize_per_token(x, "int8"), x):
            calls.clear()
            made.clear()
            layer(given, live, bias, spec)
            ((name, args, kw),) = calls
            assert name == route, m
            if route == "canonical":
                assert args == (given, live, bias, spec) and not made, m
                continue
            qa = given if isinstance(given, reference.QuantizedActivations) else made[0]
            assert args[:7] == (qa.codes, qa.scales, layer.frag, live["scales"], bias, x.dtype,
                                w4a8_wgmma.w4a8_config(m, n, k)), m  # fmt: skip
            assert kw["group"] == (128 if spec.two_level else 0), m
            assert kw["channel_scales"] is live.get("channel_scales"), m


@pytest.mark.cuda
def test_a_layer_picks_it_on_hopper_and_runs_codes_or_plain_x() -> None:
    if not _hopper():
        pytest.skip("wgmma needs Hopper")
    from specquant.kernels.reference import qlinear_reference, quantize_per_token
    from specquant.layers.linear import QLinear
    from specquant.quant.rtn import quantize_rtn
    from specquant.quant.spec import get_format

    spec = get_format("w4a8")
    t = quantize_rtn(torch.randn(256, 512) * 0.05, spec)
    layer = QLinear(512, 256)
    layer.load_quantized_(spec, {a: v.cuda() for a, v in t.items()}, torch.bfloat16)
    assert layer.kernel_name == "triton-w4a8-wgmma:w4a8"
    for m, route in [(1, "canonical"), (40, "wgmma"), (300, "wgmma")]:
        assert layer.qkernel.route(m) == route
        x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
        # the reference's codes, which the layer's quantization kernel must make of plain x
        qa = quantize_per_token(x, "int8")
        want = qlinear_reference(qa, layer.qtensors(), None, spec).float()
        for kind, given in (("codes", qa), ("x", x)):
            y = layer(given).float()
            bad = (y - want).abs() > want.abs() * 2**-7 + 1e-5 * want.abs().max()
            assert not bad.any(), (m, kind, int(bad.sum()), bad.nonzero()[:4].tolist())


def test_info_names_the_kernel_of_each_token_count_per_weight_shape() -> None:
    """`specquant info` (kernel_report) lists, per format and weight shape, which kernel
    runs which token counts when a layer's kernel switches by count."""
    from torch import nn

    from specquant.cli import kernel_report
    from specquant.kernels.triton_ops.w4_fragment import FragForward
    from specquant.kernels.triton_ops.w4a8_wgmma import W4A8Forward
    from specquant.layers.linear import QLinear
    from specquant.quant.rtn import quantize_rtn
    from specquant.quant.spec import get_format

    def layer(n: int, k: int, fmt: str) -> QLinear:
        lin = QLinear(k, n)
        lin.load_quantized_(get_format(fmt), quantize_rtn(torch.randn(n, k) * 0.05,
                                                          get_format(fmt)))  # fmt: skip
        return lin

    small, wide = layer(64, 256, "w4a8"), layer(64, 256, "w4a16")
    assert small.token_routes() is None  # the CPU kernel runs every count
    # the forwards a CUDA device would get (only their tables matter here)
    small.qkernel = W4A8Forward(torch.empty(4096 // 16, 4096 // 128, 1024, dtype=torch.int8))
    w4a8_routes = (
        "1-16 canonical, 17-32 wgmma-ws, 33-64 wgmma, 65-128 wgmma-ws, 129-512 wgmma, "
        "513+ canonical"
    )
    assert small.token_routes() == w4a8_routes
    big = torch.empty(57344 // 16, 8192 // 128, 512, dtype=torch.int16)
    wide.qkernel = FragForward(big, get_format("w4a16"), wgmma=True)
    routes = wide.token_routes()
    assert routes == "1-8 fragment, 9-128 wgmma-ws, 129+ wgmma", routes
    wide.qkernel = FragForward(big, get_format("w4a16"), wgmma=False)  # a GPU before Hopper
    assert wide.token_routes() == "1-8 fragment, 9+ canonical"
    wide.qkernel = FragForward(big, get_format("w4a16"), wgmma=True)
    report = kernel_report(nn.Sequential(small, wide), torch.device("cpu"), torch.float32)
    assert report["linear_kernels_by_token_count"] == {
        "w4a8 64x256": w4a8_routes,
        "w4a16 64x256": routes,
    }
