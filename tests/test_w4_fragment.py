"""The fragment-order W4A16 kernel: packing on the CPU, layouts compiled offline for sm_90,
results against the dequantize-and-matmul reference on the GPU."""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch

from conftest import compiled_loop

HAS_GLUON = importlib.util.find_spec("triton") is not None and (
    importlib.util.find_spec("triton.experimental.gluon") is not None
)
pytestmark = pytest.mark.skipif(not HAS_GLUON, reason="needs triton with Gluon")


def _reference(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, bias=None) -> torch.Tensor:
    """Symmetric int4, any number of groups: the project's dequantize, then a float matmul."""
    from specquant.quant.pack import dequantize
    from specquant.quant.spec import get_format

    w = dequantize({"qweight": q, "scales": scales}, get_format("w4a16"))
    y = x.float() @ w.T
    return y if bias is None else y + bias.float()


def test_column_order_is_a_permutation_that_makes_each_thread_contiguous() -> None:
    from specquant.kernels.triton_ops.w4_fragment import pi

    assert sorted(pi(k) for k in range(128)) == list(range(128))
    # lane t of a fragment holds k = 2t + {0,1} + 8 {0..15 in steps}: 32 values, contiguous in x
    for t in range(4):
        ks = [k for k in range(128) if (k >> 1) & 3 == t]
        cols = sorted(pi(k) for k in ks)
        assert cols == list(range(32 * t, 32 * t + 32))


def test_mma_order_reference_is_pi_per_128_column_block_and_inverts() -> None:
    """reference.to_mma_order (what the wgmma launcher and the fused norm / silu produce)
    puts x's column block * 128 + pi(j) at position block * 128 + j."""
    from specquant.kernels.reference import MmaOrderActivations, from_mma_order, to_mma_order
    from specquant.kernels.triton_ops.w4_fragment import ATOM_K, pi

    x = torch.arange(2 * 3 * 384, dtype=torch.float32).view(2, 3, 384)
    got = to_mma_order(x)
    for j in range(384):
        block, pos = divmod(j, ATOM_K)
        assert torch.equal(got[..., j], x[..., block * ATOM_K + pi(pos)]), j
    assert torch.equal(from_mma_order(got), x)
    held = MmaOrderActivations(got)
    assert held.shape == x.shape and held.dtype == x.dtype and torch.equal(held.natural(), x)
    with pytest.raises(ValueError, match="K a multiple of 128, not 200"):
        to_mma_order(torch.zeros(2, 200))


def test_atoms_hold_each_code_where_the_docstring_says() -> None:
    """Independent of prepare_fragments' reshapes: the documented address of code (n, k)."""
    from specquant.kernels.triton_ops.w4_fragment import pi, prepare_fragments

    gen = torch.Generator().manual_seed(0)
    n, k = 48, 384
    q = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8)
    frag = prepare_fragments(q).to(torch.int32) & 0xFFFF
    inv = {pi(i): i for i in range(128)}
    for row in range(0, n, 5):
        for col in range(0, k, 7):
            code = int(q[row, col // 2]) >> (4 * (col % 2)) & 0xF
            km = inv[col % 128]  # mma K position of x column col
            k1, t, k8, k16, k32, k64 = (
                km & 1,
                km >> 1 & 3,
                km >> 3 & 1,
                km >> 4 & 1,
                km >> 5 & 1,
                km >> 6 & 1,
            )
            g, n8 = row & 7, row >> 3 & 1
            lane, reg, j = 4 * g + t, 4 * k32 + 2 * n8 + k1, 2 * k16 + k8
            word = int(frag[row // 16, col // 128, 256 * k64 + lane * 8 + reg])
            assert word >> (4 * j) & 0xF == code, (row, col)


def test_fragment_codes_inverts_the_packing_and_bad_shapes_are_refused() -> None:
    from specquant.kernels.triton_ops.w4_fragment import fragment_codes, prepare_fragments

    q = torch.randint(0, 256, (32, 128), dtype=torch.uint8)
    assert torch.equal(fragment_codes(prepare_fragments(q)), q)
    with pytest.raises(ValueError, match="N % 16 == K % 128 == 0, not 24, 256"):
        prepare_fragments(torch.zeros(24, 128, dtype=torch.uint8))


@pytest.mark.parametrize(
    ("tile", "group", "most"),
    [("128,128,8,4", 128, 2.2), ("64,256,16,2", 0, 2.2), ("64,128,64,2,4,3", 128, 3.2)],
)
def test_kernel_compiles_for_sm90_in_few_instructions_per_weight(tile, group, most) -> None:
    """Compiled offline (Triton's compiler and ptxas, no GPU): every convert_layout in the
    kernel is asserted free, so a layout mismatch fails here (the last tile splits its 64
    tokens over 4 warps and streams its tiles through a 3-stage cp.async ring); the K loop
    stays near the 1.8-1.95 instructions per weight measured on the H200 at few tokens (the
    canonical kernel: 3.8), with one mma per 16 x 16 weights per 8 tokens on top for more;
    and nothing spills to local memory."""
    compiled_loop(["--fragment", tile, "--group", str(group)], most)


@pytest.mark.parametrize(
    ("tile", "split_k", "least"), [("128,128,8,4", 16, 32), ("64,128,8,2", 8, 32)]
)
def test_split_k_fix_up_reads_several_splits_per_round_trip(tile, split_k, least) -> None:
    """The program that arrives last adds the other splits' partial sums, each an L2 round
    trip. At one token (8 sums per thread per split) it loads four splits per trip of its
    loop: 8B's down_proj runs 16 splits, and one split per trip (8 loads) made its fix-up 15
    round trips long. Offline SASS, no spills (compiled_loop checks)."""
    out = compiled_loop(["--fragment", tile, "--split-k", str(split_k)], 2.2)
    found = re.search(r"split-K fix-up: (\d+) loads of partial sums", out)
    assert found and int(found.group(1)) >= least, out


@pytest.mark.parametrize("tile", ["128,128,8,4", "128,128,8,4,1,3"])
def test_group_major_scales_compile_as_lean_as_row_major(tile) -> None:
    """With the scales in group-major memory (the copy prepare_forward keeps for group
    formats; kernel_sass's default) the one-token kernel compiles to the same instruction
    count per weight as with row-major ones, within one instruction per K step, and spills
    nothing."""
    lean = compiled_loop(["--fragment", tile, "--split-k", "4", "--row-major"], 2.5)
    out = compiled_loop(["--fragment", tile, "--split-k", "4"], 2.5)
    steps = [int(re.search(r"(\d+) instructions per K step", o).group(1)) for o in (lean, out)]
    assert "row-major scales" in lean and abs(steps[1] - steps[0]) <= 1, (steps, out)
    assert re.search(r"STACK:0\b", out), out


@pytest.mark.parametrize(("tile", "copies"), [("128,128,8,4,1,1", 0), ("128,128,8,4,1,3", 8)])
def test_programmatic_dependent_launch_waits_before_x_and_after_the_first_weights(
    tile, copies
) -> None:
    """With FragConfig.pdl the kernel may start while the one before (which writes x) still
    runs. Offline PTX: it lets its own successor launch, then copies only the weights of
    the ring's first tiles (2 tiles x 4 copies of 16 bytes per thread; none without a ring)
    before it waits; no load, store or atomic of x, the workspace, the locks or the output
    comes before the wait."""
    out = compiled_loop(["--fragment", tile, "--split-k", "4", "--pdl"], 2.4)
    want = f"griddepcontrol: 1 wait, 1 launch_dependents, {copies} cp.async before the wait, "
    assert want + "0 other global loads, stores or atomics before it" in out, out


def test_scale_strides_take_both_memory_orders_and_refuse_strided_per_channel() -> None:
    """The W4A16 kernels read scales [N, G] through their strides: row-major, or a view of
    group-major memory (prepare_forward's group_major_scales copy, equal in value). Per
    channel the epilogue reads [N] contiguously, so other strides are refused."""
    from specquant.kernels.triton_ops.w4_fragment import prepare_forward, scale_strides
    from specquant.quant.spec import get_format

    s = torch.rand(256, 4)
    assert scale_strides(s, 128) == (4, 1)
    assert scale_strides(s.t().contiguous().t(), 128) == (1, 256)
    assert scale_strides(torch.rand(256, 1), 0) == (1, 1)
    with pytest.raises(ValueError, match=r"contiguous along N, not strides \(2, 1\)"):
        scale_strides(torch.rand(256, 2)[:, :1], 0)
    q = torch.randint(0, 256, (256, 256), dtype=torch.uint8)
    t = {"qweight": q, "scales": torch.rand(256, 4)}
    layer = prepare_forward(t, get_format("w4a16-g128"))
    assert layer.scales.stride() == (1, 256) and torch.equal(layer.scales, t["scales"])
    assert prepare_forward(t, get_format("w4a16-g128"), group_major_scales=False).scales is None
    per_channel = {"qweight": q, "scales": torch.rand(256, 1)}
    assert prepare_forward(per_channel, get_format("w4a16")).scales is None


# ------------------------------------------------------------------------------------ GPU
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("n", "k", "group"), [(64, 256, 128), (48, 384, 0), (272, 1024, 256)])
def test_fragment_linear_matches_the_reference(dtype, n, k, group) -> None:
    from specquant.kernels.triton_ops.w4_fragment import (
        FragConfig,
        fragment_linear,
        prepare_fragments,
    )

    gen = torch.Generator(device="cuda").manual_seed(n + k)
    q = torch.randint(0, 256, (n, k // 2), device="cuda", generator=gen, dtype=torch.uint8)
    g = 1 if group == 0 else k // group
    scales = torch.rand(n, g, device="cuda", generator=gen) * 0.02 + 1e-3
    frag = prepare_fragments(q)
    configs = [
        (None, None),
        (FragConfig(32, 128, 1), 2),
        (FragConfig(128, 256, 4), 1),
        (FragConfig(32, 128, 2, warps_m=4, stages=3), 2),
        (FragConfig(64, 128, 4, warps_m=2, stages=4), 1),
        (FragConfig(32, 128, 1, stages=2), 1),
        (FragConfig(64, 128, 2, prefetch=True), 2),
        (FragConfig(128, 128, 4, prefetch=True), 1),
        (FragConfig(32, 256, 1, prefetch=True), 3),
    ]
    if torch.cuda.get_device_capability()[0] >= 9:  # programmatic dependent launch
        configs += [(FragConfig(32, 128, 2, stages=3, pdl=True), 2),
                    (FragConfig(128, 256, 4, pdl=True), 1)]  # fmt: skip
    group_major = scales.t().contiguous().t()
    for m in (1, 3, 8, 9, 16, 17, 33, 64, 100):
        x = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
        bias = torch.randn(n, device="cuda", dtype=dtype, generator=gen)
        for cfg, split in configs:
            if k % (cfg.block_k if cfg else 128):
                continue
            y = fragment_linear(x, frag, scales, bias, group, config=cfg, split_k=split)
            want = _reference(x, q, scales, bias)
            err = float((y.float() - want).norm() / want.norm())
            assert err < 8e-3, (m, cfg, split, err)
            # the same scales in group-major memory: the same arithmetic, the same bits
            again = fragment_linear(x, frag, group_major, bias, group, config=cfg, split_k=split)
            assert torch.equal(again, y), (m, cfg, split)


@pytest.mark.cuda
def test_every_tile_table_entry_matches_the_reference() -> None:
    """Each config of FRAG_CONFIGS (per channel) and FRAG_CONFIGS_GROUPED (g128, group-major
    scales as the layers keep them) on a 4096 x 4096 layer at 1, 5 and 8 tokens, with the
    split its table would choose there (so the register prefetch and the ring run over
    several K tiles)."""
    from specquant.kernels.triton_ops import w4_fragment as F

    n = k = 4096
    gen = torch.Generator(device="cuda").manual_seed(11)
    q = torch.randint(0, 256, (n, k // 2), device="cuda", generator=gen, dtype=torch.uint8)
    frag = F.prepare_fragments(q)
    for table, group in ((F.FRAG_CONFIGS, 0), (F.FRAG_CONFIGS_GROUPED, 128)):
        g = 1 if group == 0 else k // group
        scales = torch.rand(n, g, device="cuda", generator=gen) * 0.02 + 1e-3
        kept = F.group_major(scales) if group else scales
        configs = {cfg for rows in table.values() for _, cfg in rows if cfg is not None}
        for cfg in sorted(configs, key=repr):
            for m in (1, 5, 8):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
                y = F.fragment_linear(x, frag, kept, None, group, config=cfg)
                want = _reference(x, q, scales)
                err = float((y.float() - want).norm() / want.norm())
                assert err < 8e-3, (cfg, group, m, err)


@pytest.mark.cuda
def test_programmatic_dependent_launch_chain_reads_what_the_kernel_before_wrote() -> None:
    """Three layers, each fed the one before's output, every launch under programmatic
    dependent launch (so each may start while the one before still writes its x), eagerly
    and replayed from a CUDA graph: every output equals the reference chain's."""
    from specquant.kernels.triton_ops.w4_fragment import (
        FragConfig,
        fragment_linear,
        prepare_fragments,
    )

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs Hopper")
    gen = torch.Generator(device="cuda").manual_seed(7)
    n = k = 2048
    qs = [torch.randint(0, 256, (n, k // 2), device="cuda", generator=gen, dtype=torch.uint8)
          for _ in range(3)]  # fmt: skip
    scales = [torch.rand(n, k // 128, device="cuda", generator=gen) * 0.01 + 1e-3 for _ in qs]
    frags = [prepare_fragments(q) for q in qs]
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    for cfg in (FragConfig(128, 128, 4, 2, stages=3, pdl=True), FragConfig(128, 128, 4, pdl=True)):

        def chain(x=x, cfg=cfg) -> list[torch.Tensor]:
            outs = [x]
            for f, sc in zip(frags, scales, strict=True):
                outs.append(fragment_linear(outs[-1], f, sc, None, 128, config=cfg))
            return outs[1:]

        eager = chain()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = chain()
        graph.replay()
        torch.cuda.synchronize()
        want = x
        for q, sc, y, yg in zip(qs, scales, eager, captured, strict=True):
            want = _reference(want.to(torch.bfloat16), q, sc)
            for got in (y, yg):
                err = float((got.float() - want).norm() / want.norm())
                assert err < 1e-2, (cfg, err)
            want = y  # the next layer's input, as the kernel chain computed it


@pytest.mark.cuda
def test_pdl_layers_after_an_early_norm_and_silu_give_the_same_bits() -> None:
    """The `:pdl` chains of bench/kernel_perf.py: the norm and silu * up let the next kernel
    launch at once, and the W4A16 layers after them (prepare_forward(pdl=True)) copy their
    first weights before waiting for x. Norm -> gate_up -> silu * up -> down at 1 and 8
    tokens, eagerly and from a CUDA graph, equals the same chain launched plainly, bit for
    bit, in both formats."""
    from specquant.kernels.triton_ops.act_quant import rmsnorm, silu_mul
    from specquant.kernels.triton_ops.w4_fragment import prepare_forward
    from specquant.quant.spec import get_format

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs Hopper")
    gen = torch.Generator(device="cuda").manual_seed(5)
    hidden, inner = 2048, 4096
    norm_w = torch.rand(hidden, device="cuda", generator=gen, dtype=torch.bfloat16) + 0.5
    for fmt, group in (("w4a16-g128", 128), ("w4a16", 0)):
        layers = {}
        for name, (n, k) in {"gate_up": (2 * inner, hidden), "down": (hidden, inner)}.items():
            g = 1 if group == 0 else k // group
            q = torch.randint(0, 256, (n, k // 2), device="cuda", generator=gen, dtype=torch.uint8)
            scales = torch.rand(n, g, device="cuda", generator=gen) * 0.01 + 1e-3
            t = {"qweight": q, "scales": scales}
            layers[name] = (t, prepare_forward(t, get_format(fmt)),
                            prepare_forward(t, get_format(fmt), pdl=True))  # fmt: skip

        def chain(x: torch.Tensor, early: bool, layers: dict = layers) -> torch.Tensor:
            (tu, plain_u, pdl_u), (td, plain_d, pdl_d) = layers["gate_up"], layers["down"]
            up = (pdl_u if early else plain_u)(
                rmsnorm(x, norm_w, 1e-5, launch_dependents=early), tu, None, None
            )
            return (pdl_d if early else plain_d)(silu_mul(up, launch_dependents=early), td,
                                                 None, None)  # fmt: skip

        for m in (1, 8):
            x = torch.randn(m, hidden, device="cuda", dtype=torch.bfloat16, generator=gen)
            want = chain(x, early=False)
            assert torch.equal(chain(x, early=True), want), (fmt, m)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = chain(x, early=True)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(captured, want), (fmt, m)


@pytest.mark.cuda
def test_layer_runs_fragments_where_tuned_and_the_canonical_kernel_elsewhere() -> None:
    """mma.sync fragments up to 8 tokens, on Hopper the wgmma kernel where WGMMA_CONFIGS has a
    config (from 17 tokens for this small layer, prefill included), the canonical kernel
    elsewhere."""
    from specquant.kernels.reference import qlinear_reference
    from specquant.layers.linear import QLinear
    from specquant.quant.rtn import quantize_rtn
    from specquant.quant.spec import get_format

    spec = get_format("w4a16-g128")
    w = torch.randn(160, 512) * 0.05
    t = quantize_rtn(w, spec)
    layer = QLinear(512, 160)
    layer.load_quantized_(spec, {a: v.cuda() for a, v in t.items()}, torch.bfloat16)
    assert layer.kernel_name == "triton-w4a16-frag:w4a16-g128"
    for m in (1, 16, 17, 40, 64, 128, 200):
        x = torch.randn(m, 512, dtype=torch.bfloat16)
        want = qlinear_reference(x, t, None, spec).float()
        got = layer(x.cuda()).float().cpu()
        assert float((got - want).norm() / want.norm()) < 8e-3, m
    # moved to the CPU without prepare(): the reference, not a GPU kernel on CPU tensors
    layer.to("cpu")
    x = torch.randn(2, 512, dtype=torch.bfloat16)
    assert torch.equal(layer(x), qlinear_reference(x, layer.qtensors(), None, spec))


def test_tile_table_picks_by_token_bucket_and_weight_size(monkeypatch) -> None:
    """None in the table (or M beyond every bucket) sends the layer to the canonical kernel;
    group formats read a table of their own, and max_m covers both."""
    from specquant.kernels.triton_ops import w4_fragment as F

    a, b, c, d, e, f = (F.FragConfig(16 * 2**i, 128, 1) for i in range(6))
    monkeypatch.setattr(
        F, "FRAG_CONFIGS", {8: F._table(a, b, c, d), 32: F._table(None, e, None, None)}
    )
    monkeypatch.setattr(F, "FRAG_CONFIGS_GROUPED", {16: F._table(f, f, f, None)})
    assert F.frag_config(1, 16 << 20) == a
    assert F.frag_config(8, 1 << 40) == d
    assert F.frag_config(9, 100 << 20) == e
    assert F.frag_config(9, 16 << 20) is None
    assert F.frag_config(33, 100 << 20) is None
    assert F.frag_config(9, 16 << 20, grouped=True) == f
    assert F.frag_config(9, 1 << 40, grouped=True) is None
    assert F.max_m() == 32
    monkeypatch.setattr(F, "FRAG_CONFIGS", {4: F._table(a, b, c, d)})
    assert F.max_m() == 16
    assert [F.block_m(m) for m in (1, 8, 9, 17, 64, 300)] == [8, 8, 16, 32, 64, 64]
    with pytest.raises(ValueError, match="BLOCK_M 16 gives fewer than 8 tokens"):
        F.layouts(64, 128, 16, 2, 4)


def test_layer_hands_mma_ordered_x_to_wgmma_without_a_copy(monkeypatch) -> None:
    """FragForward's dispatch (kernels stubbed, so it runs on the CPU): x that arrives in mma
    order goes to a wgmma config with x_perm, or to a warp-specialized one, as it is (no copy
    back to feature order); plain x reaches the warp-specialized launcher plain (it gathers);
    every other path gets feature order, restored once."""
    from specquant.kernels import reference as R
    from specquant.kernels.triton_ops import w4_fragment as F
    from specquant.kernels.triton_ops import w4_wgmma as W
    from specquant.kernels.triton_ops import w4_wgmma_ws as WS
    from specquant.quant.spec import get_format

    n, k = 4096, 8320  # past the smallest size class: the x_perm configs apply
    qweight = torch.zeros(n, k // 2, dtype=torch.uint8)
    layer = F.FragForward(F.prepare_fragments(qweight), get_format("w4a16-g128"), wgmma=True)
    calls: list[tuple[str, bool]] = []
    restored = []

    def wgmma_stub(x, frag, scales, bias, group, config, x_in_mma_order=False):
        calls.append(("wgmma", x_in_mma_order))
        return torch.zeros(x.shape[0], n)

    def frag_stub(x, frag, scales, bias, group, config):
        calls.append(("fragment", False))
        return torch.zeros(x.shape[0], n)

    def ws_stub(x, frag, scales, bias, group, config, x_in_mma_order=False):
        calls.append(("ws", x_in_mma_order))
        return torch.zeros(x.shape[0], n)

    def counted(x):
        restored.append(x.shape)
        return from_mma(x)

    from_mma = R.from_mma_order
    monkeypatch.setattr(W, "wgmma_linear", wgmma_stub)
    monkeypatch.setattr(WS, "wgmma_ws_linear", ws_stub)
    monkeypatch.setattr(F, "fragment_linear", frag_stub)
    monkeypatch.setattr(R, "from_mma_order", counted)
    # the dispatch under test, not the probes' current picks: warp-specialized at 17-32
    # tokens, x_perm at 33-64 only
    plain, perm = W.WgmmaConfig(128, 128, 4, 3), W.WgmmaConfig(128, 128, 8, 3, x_perm=True)
    table = {16: W._table(plain, plain, plain, plain), 64: W._table(perm, perm, perm, perm)}
    monkeypatch.setattr(W, "WGMMA_CONFIGS", table)
    ws = WS.WsConfig(64, 128, 4)
    ws_table = {16: W._table(None, None, None, None), 32: W._table(ws, ws, ws, ws)}
    monkeypatch.setattr(WS, "WS_CONFIGS", ws_table)
    live = {"scales": torch.ones(n, k // 128)}
    cases = [(64, True, ("wgmma", True), 0), (64, False, ("wgmma", False), 0),
             (32, True, ("ws", True), 0), (32, False, ("ws", False), 0),
             (9, True, ("wgmma", False), 1), (1, True, ("fragment", False), 1)]  # fmt: skip
    assert [layer.route(m) for m in (1, 9, 32, 64)] == ["fragment", "wgmma", "wgmma-ws", "wgmma"]
    for m, ordered, want, copies in cases:
        assert layer.takes_mma_order(m) == (m in (32, 64))
        x = torch.randn(m, k)
        layer(R.MmaOrderActivations(R.to_mma_order(x)) if ordered else x, live, None, None)
        assert calls.pop() == want and len(restored) == copies, (m, ordered)
        restored.clear()


def test_ring_read_keeps_the_fragment_kernels_copies_and_drops_its_math() -> None:
    """bench/ring_read.py (read_floor's `ring`) issues the same cp.async copies per K tile
    as the fragment kernel with the same tile and ring, in under half its instructions."""
    ring = compiled_loop(["--ring-read", "128,128,8,4,3"], 1.2)
    frag = compiled_loop(["--fragment", "128,128,8,4,1,3", "--split-k", "2"], 2.5)

    def count(out: str, what: str) -> int:
        found = re.search(rf"\b{what} (\d+)", out)
        return int(found.group(1)) if found else 0

    assert count(ring, "LDGSTS") == count(frag, "LDGSTS") > 0, (ring, frag)
    assert count(ring, "HMMA") == 0 and count(frag, "HMMA") > 0
    steps = [int(re.search(r"(\d+) instructions per K step", o).group(1)) for o in (ring, frag)]
    assert 2 * steps[0] < steps[1], steps
