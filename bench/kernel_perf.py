"""Quantized linear-layer latency vs tokens M on one GPU: specquant's Triton kernels next to
bf16 cuBLAS and torch's own int4 / int8 / fp8 kernels, measured in the same run.

For each Llama-3-8B and -70B decoder linear (qkv, o, gate_up, down), each M in 1..128 and
each implementation: the median time of CUDA-graph replays, the weights rotated over enough
copies that they stream from HBM rather than L2. A8 rows include the per-token activation
quantization (our Triton kernel, or torch ops for torch's kernels); the "gemm" rows take
already-quantized activations, as qkv/gate_up do after the fused RMSNorm. Roofline: bytes
the layer must read (all weight tensors + activations) over the copy bandwidth measured in
this run. Then one decoder layer's linear path as the model runs it (norms and silu * up
included, quantization fused where the model fuses it), per format against bf16; and with
--humming, humming-kernels' W4A16 (the fastest W4A16 GEMM we know of, as a ceiling).

    python bench/kernel_perf.py --out bench/results             # about 2 min on an H200
    python bench/kernel_perf.py --tune-only --out $OUT           # time candidate tiles
    python bench/kernel_perf.py --configs $OUT/kernel_configs.json --out bench/results
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from common import copy_bandwidth_gbs, gpu_run_meta
from specquant.layers.linear import wants_mma_order
from specquant.quant.spec import FORMATS, QuantSpec

SHAPES = {  # name -> (K, N) of y = x @ W^T, W [N, K]
    "8b": {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)},
    "70b": {
        "qkv": (8192, 10240),
        "o": (8192, 8192),
        "gate_up": (8192, 57344),
        "down": (28672, 8192),
    },
}
MS = [1, 2, 4, 8, 16, 32, 64, 128]
OURS = ["w4a16-g128", "w4a16", "w4a16-g128-asym", "w8a8", "w4a8", "w4a8-g128", "fp8"]
# W4A16 rows time what the model runs (the fragment-order kernels: mma.sync up to
# w4_fragment.max_m() tokens, on Hopper wgmma where w4_wgmma.WGMMA_CONFIGS has a config, else
# the canonical-layout kernel); these rows time the canonical kernel at every M
CANONICAL = ["w4a16-g128:canonical"]
# on request (--formats) only: the fragment kernels launched with programmatic dependent
# launch after a norm / silu * up that lets them start early (FragForward's pdl). Per
# linear, one launch overlaps the one before of the same layer, which a model never runs;
# the chains are the measure.
CHAIN_EXPERIMENTS = ["w4a16-g128:pdl", "w4a16:pdl"]
# and W4A16-g128 with the fragment and wgmma kernels reading the layer's row-major scales
# (prepare_forward(group_major_scales=False)), as before they kept a group-major copy
EXPERIMENTS = ["w4a16-g128:row-major", *CHAIN_EXPERIMENTS]
GEMM_ONLY = ["w8a8", "w4a8", "w4a8-g128", "fp8"]  # also timed on pre-quantized activations
BASELINES = ["bf16-cublas", "torch-int4-g128", "torch-int-mm-w8a8", "torch-scaled-mm-fp8"]
HUMMING = ["humming-w4a16-g128"]  # with --humming (pip install humming-kernels)
L2_BYTES = 60 << 20  # at least this many bytes of weight copies between reuses


# ------------------------------------------------------------------------------- timing
def time_graph(fn: Callable[[int], Any], copies: int, replays: int = 7) -> float:
    """Median microseconds per call: `fn(i)` (i cycling over the weight copies) captured
    `calls` times into one CUDA graph, replayed."""
    calls = max(copies, 16)
    for i in range(3):  # compile, allocate, warm up outside the capture
        fn(i % copies)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        for i in range(calls):
            fn(i % copies)
    torch.cuda.current_stream().wait_stream(stream)
    # Replay for ~30 ms before timing: after the host-side weight setup the GPU needs that
    # long to reach its clocks (the first layer measured after it ran ~10% slow otherwise;
    # bench/frag_m1.py).
    warm_until = time.perf_counter() + 0.03
    while time.perf_counter() < warm_until:
        graph.replay()
        torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        graph.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e3 / calls)
    del graph
    return statistics.median(times)


# ------------------------------------------------------------------------ weights (random)
def random_tensors(spec: QuantSpec, n: int, k: int, gen: torch.Generator) -> dict[str, Any]:
    """The canonical tensors of `spec` for a random [n, k] weight, on the GPU."""
    dev = "cuda"
    g = 1 if spec.group_size == -1 else k // spec.group_size

    def scales(rows: int, cols: int) -> torch.Tensor:
        return torch.rand(rows, cols, device=dev, generator=gen) * 0.01 + 1e-3

    if spec.weight_type == "fp8":
        w = torch.randn(n, k, device=dev, generator=gen).to(torch.float8_e4m3fn)
        return {"qweight": w, "scales": scales(n, 1)}
    t: dict[str, Any] = {}
    if spec.weight_bits == 8:
        t["qweight"] = torch.randint(-127, 128, (n, k), device=dev, generator=gen, dtype=torch.int8)
    else:
        shape = (n, k // 2)
        t["qweight"] = torch.randint(0, 256, shape, device=dev, generator=gen, dtype=torch.uint8)
    if spec.two_level:
        t["scales"] = torch.randint(1, 128, (n, g), device=dev, generator=gen, dtype=torch.int8)
        t["channel_scales"] = scales(n, 1).view(n)
    else:
        t["scales"] = scales(n, g)
    if not spec.symmetric:
        t["zeros"] = torch.randint(0, 16, (n, g), device=dev, generator=gen, dtype=torch.uint8)
    return t


def nbytes(t: dict[str, Any] | torch.Tensor) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    return sum(nbytes(v) for v in t.values())


def copies_for(size: int) -> int:
    return max(1, min(64, math.ceil(L2_BYTES / size)))


# ------------------------------------------------------------------ implementations to time
def model_linear(spec: QuantSpec, t: dict[str, Any], variant: str = "") -> Callable:
    """x -> y as a QLinear of this format runs on the GPU: the kernel the registry picks,
    prepared once (the fragment-order W4A16 kernel repacks its weights here). `variant`
    "canonical": the canonical-layout kernel; "row-major": the fragment-order kernels on the
    layer's row-major scales; "pdl": the fragment kernel with programmatic dependent launch."""
    from specquant.kernels.registry import KernelContext, select
    from specquant.kernels.triton_ops.qlinear import qlinear

    n, k = t["qweight"].shape[0], t["qweight"].shape[1] * (2 if spec.weight_bits == 4 else 1)
    extra = (("spec", spec), ("shape", (n, k)))
    impl = select("qlinear", KernelContext(torch.device("cuda"), torch.bfloat16, extra))
    if variant in ("row-major", "pdl"):
        from specquant.kernels.triton_ops.w4_fragment import prepare_forward

        hopper = torch.cuda.get_device_capability()[0] == 9
        fwd = prepare_forward(t, spec, hopper, group_major_scales=variant != "row-major",
                              pdl=variant == "pdl")  # fmt: skip
        return Prepared(fwd, t, spec)
    if variant == "canonical" or impl.prepare is None:
        return lambda x: qlinear(x, t, None, spec)
    return Prepared(impl.prepare(t, spec, torch.bfloat16), t, spec)


class Prepared:
    """A prepared layer kernel with its tensors bound: x -> y, and whether it reads x in mma
    K order at a token count (as QLinear.takes_mma_order)."""

    def __init__(self, fn: Callable, t: dict[str, Any], spec: QuantSpec):
        self.fn, self.t, self.spec = fn, t, spec

    def __call__(self, x: Any) -> torch.Tensor:
        return self.fn(x, self.t, None, self.spec)

    def takes_mma_order(self, tokens: int) -> bool:
        return wants_mma_order(self.fn, tokens)


def ours(name: str, n: int, k: int, gen: torch.Generator, gemm_only: bool = False) -> Any:
    from specquant.kernels.reference import MmaOrderActivations, to_mma_order
    from specquant.kernels.triton_ops.act_quant import quantize_per_token

    base, _, variant = name.partition(":")
    spec = FORMATS[base]
    one = random_tensors(spec, n, k, gen)
    weights = [one] + [_clone(one) for _ in range(1, copies_for(nbytes(one)))]
    fns = [model_linear(spec, w, variant) for w in weights]

    def make(x: torch.Tensor) -> Callable[[int], Any]:
        if gemm_only:
            qa = quantize_per_token(x, spec.activations)
            return lambda i: fns[i](qa)
        if wants_mma_order(fns[0], x.shape[0]):  # W4A16 wgmma with x_perm: the model's
            xo = MmaOrderActivations(to_mma_order(x))  # norm / silu / head merge write this
            return lambda i: fns[i](xo)
        return lambda i: fns[i](x)

    return make, len(weights), nbytes(one)


def baseline(name: str, n: int, k: int, gen: torch.Generator) -> Any:
    dev = "cuda"
    if name == "bf16-cublas":
        one = torch.randn(n, k, device=dev, generator=gen, dtype=torch.bfloat16) * 0.02
        ws = [one] + [one.clone() for _ in range(1, copies_for(nbytes(one)))]
        return (lambda x: lambda i: F.linear(x, ws[i])), len(ws), nbytes(one)
    if name == "torch-int4-g128":
        q = torch.randint(0, 256, (n, k // 2), device=dev, generator=gen, dtype=torch.uint8)
        packed = torch._convert_weight_to_int4pack(q, 8)
        sz = torch.rand(k // 128, n, 2, device=dev, generator=gen).to(torch.bfloat16) * 0.01
        ws = [(packed, sz)] + [
            (packed.clone(), sz.clone()) for _ in range(1, copies_for(n * k // 2))
        ]
        return (
            lambda x: lambda i: torch._weight_int4pack_mm(x, ws[i][0], 128, ws[i][1]),
            len(ws),
            n * k // 2 + nbytes(sz),
        )
    if name == "torch-int-mm-w8a8":
        w = torch.randint(-127, 128, (n, k), device=dev, generator=gen, dtype=torch.int8)
        sw = torch.rand(1, n, device=dev, generator=gen) * 0.01
        ws = [w] + [w.clone() for _ in range(1, copies_for(n * k))]

        def make_int(x: torch.Tensor) -> Callable[[int], Any]:
            pad = max(0, 17 - x.shape[0])  # torch._int_mm needs M > 16

            def run(i: int) -> torch.Tensor:
                xf = F.pad(x, (0, 0, 0, pad)).float()
                s = xf.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127
                a = (xf / s).round().clamp(-127, 127).to(torch.int8)
                y = torch._int_mm(a, ws[i].t())
                return (y.float() * s * sw)[: x.shape[0]].to(torch.bfloat16)

            return run

        return make_int, len(ws), n * k + nbytes(sw)
    if name == "torch-scaled-mm-fp8":
        w = torch.randn(n, k, device=dev, generator=gen).to(torch.float8_e4m3fn)
        sw = torch.rand(1, n, device=dev, generator=gen) * 0.01
        ws = [w] + [w.clone() for _ in range(1, copies_for(n * k))]

        def make_fp8(x: torch.Tensor) -> Callable[[int], Any]:
            pad = (-x.shape[0]) % 16

            def run(i: int) -> torch.Tensor:
                xf = F.pad(x, (0, 0, 0, pad)).float()
                s = xf.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 448
                a = (xf / s).to(torch.float8_e4m3fn)
                y = torch._scaled_mm(a, ws[i].t(), scale_a=s, scale_b=sw, out_dtype=torch.bfloat16)
                return y[: x.shape[0]]

            return run

        return make_fp8, len(ws), n * k + nbytes(sw)
    if name.startswith("humming-"):
        return humming_baseline(name, n, k, gen)
    raise ValueError(f"unknown baseline {name!r}; known: {', '.join(BASELINES + HUMMING)}")


def humming_baseline(name: str, n: int, k: int, gen: torch.Generator) -> Any:
    """humming-kernels (vLLM's JIT Marlin successor) W4A16, symmetric int4 with bf16 scales,
    quantized by humming itself from a random bf16 weight: the ceiling the issue names."""
    from humming.layer import HummingLayer

    group = 128 if name.endswith("-g128") else 0  # 0: one scale per output channel

    def one_layer() -> Any:
        layer = HummingLayer(
            shape_n=n,
            shape_k=k,
            weight_config={"dtype": "int4", "group_size": group},
            torch_dtype=torch.bfloat16,
        ).cuda()
        w = torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02
        layer.load_from_unquantized(w)
        layer.transform()
        return layer, w

    first, w = one_layer()
    x = torch.randn(4, k, device="cuda", generator=gen, dtype=torch.bfloat16)
    cos = F.cosine_similarity(first(x).float().flatten(), (x @ w.t()).float().flatten(), dim=0)
    if cos < 0.98:  # 4-bit rounding keeps ~0.99; anything lower is a wrong result
        raise RuntimeError(f"humming output disagrees with x @ W^T (cosine {float(cos):.3f})")
    size = sum(
        t.numel() * t.element_size() for key, t in first.state_dict().items() if key != "locks"
    )
    layers = [first] + [one_layer()[0] for _ in range(1, copies_for(size))]
    return (lambda x: lambda i: layers[i](x)), len(layers), size


# ------------------------------------------------------- the linears of a layer, as in the model
CHAIN = ["bf16", "w4a16-g128", "w4a16", "w8a8", "w4a8", "w4a8-g128", "fp8"]


def chain(name: str, model: str, gen: torch.Generator) -> Any:
    """One decoder layer's linear path as models/llama.py runs it, attention excluded:
    norm -> qkv, o (its input quantized by qlinear where the format needs it), norm ->
    gate_up, silu(gate) * up -> down. A8 formats run the fused RMSNorm + quantization and
    silu * up + quantization kernels; bf16 and W4A16 the one-kernel RMSNorm (the model's on
    CUDA from 2026-11-28 on; before, torch's cast, norm, cast and product) and the fused
    silu * up, both written in mma K order where the W4A16 layer after them reads x so."""
    from specquant.kernels.reference import MmaOrderActivations, to_mma_order
    from specquant.kernels.triton_ops.act_quant import (
        rmsnorm,
        rmsnorm_quant,
        silu_mul,
        silu_mul_quant,
    )

    shapes = SHAPES[model]
    hidden = shapes["qkv"][0]
    norm_w = torch.ones(hidden, device="cuda", dtype=torch.bfloat16)
    base, _, variant = name.partition(":")
    early = variant == "pdl"  # the norm and silu * up let the linear after them start
    spec = None if name == "bf16" else FORMATS[base]
    if spec is None:
        one = {
            layer: torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02
            for layer, (k, n) in shapes.items()
        }
        size = sum(nbytes(w) for w in one.values())
    else:
        one = {layer: random_tensors(spec, n, k, gen) for layer, (k, n) in shapes.items()}
        size = sum(nbytes(t) for t in one.values())
    copies = copies_for(size)
    weights = [one] + [{layer: _clone(t) for layer, t in one.items()} for _ in range(1, copies)]
    act = None if spec is None or spec.activations == "none" else spec.activations
    if spec is not None:
        weights = [{layer: model_linear(spec, t, variant) for layer, t in w.items()}
                   for w in weights]  # fmt: skip

    def linear(x: Any, w: Any) -> torch.Tensor:
        return F.linear(x, w) if spec is None else w(x)

    def norm(x: torch.Tensor, w: Any) -> Any:
        if act is not None:
            return rmsnorm_quant(x, norm_w, 1e-5, act)
        if wants_mma_order(w, x.shape[0]):
            return MmaOrderActivations(rmsnorm(x, norm_w, 1e-5, mma_order=True))
        return rmsnorm(x, norm_w, 1e-5, launch_dependents=early)

    def gate(up: torch.Tensor, w: Any) -> Any:
        if act is not None:
            return silu_mul_quant(up, act)
        if wants_mma_order(w, up.shape[0]):
            return MmaOrderActivations(silu_mul(up, mma_order=True))
        return silu_mul(up, launch_dependents=early)

    def make(x: torch.Tensor) -> Callable[[int], Any]:
        attn_out = torch.randn(x.shape[0], shapes["o"][0], device="cuda", dtype=x.dtype)
        # the model merges the heads with one copy either way (in mma order for heads of
        # 128 features when o_proj reads that order): not timed here
        attn_mma = MmaOrderActivations(to_mma_order(attn_out))

        def run(i: int) -> torch.Tensor:
            w = weights[i]
            linear(norm(x, w["qkv"]), w["qkv"])
            h = x + linear(attn_mma if wants_mma_order(w["o"], x.shape[0]) else attn_out, w["o"])
            up = linear(norm(h, w["gate_up"]), w["gate_up"])
            return h + linear(gate(up, w["down"]), w["down"])

        return run

    return make, copies, size


def _clone(t: Any) -> Any:
    """A copy of a tensor or of a format's tensors (dict)."""
    return t.clone() if isinstance(t, torch.Tensor) else {k: v.clone() for k, v in t.items()}


def measure_chains(
    models: list[str], ms: list[int], deadline: float, names: list[str] = CHAIN
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for model in models:
        for name in names:
            if time.time() > deadline:
                print(f"deadline reached before the {model} {name} chain", flush=True)
                return rows
            make, copies, size = chain(name, model, gen)
            k = SHAPES[model]["qkv"][0]
            fields = dict(model=model, impl=name, weight_bytes=size, copies=copies)
            rows += time_each_m(make, copies, k, ms, fields)
            del make
            torch.cuda.empty_cache()
    return rows


def chain_goals(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for model in SHAPES:
        t = {(r["impl"], r["m"]): r["us"] for r in rows if r["model"] == model and "us" in r}
        for f in ("w8a8", "fp8"):
            ms = [m for (impl, m) in t if impl == f and ("bf16", m) in t]
            if not ms:
                continue
            slower = [m for m in sorted(ms) if t[(f, m)] >= t[("bf16", m)]]
            lines.append(
                f"{model} {f.upper()} layer linears as run in the model (norm/SiLU-fused "
                f"quantization) faster than bf16 at every M: "
                f"{'yes' if not slower else 'no, not at M=' + str(slower)}"
            )
        ms = [m for (impl, m) in t if impl == "w4a8" and m >= 32 and ("w4a16", m) in t]
        if ms:  # the paper's W4A8 claim, with quantization fused as the model runs it
            slower = [m for m in sorted(ms) if t[("w4a8", m)] >= t[("w4a16", m)]]
            lines.append(
                f"{model} W4A8 layer linears as run in the model faster than W4A16 (both per "
                f"channel) at M >= 32: {'yes' if not slower else 'no, not at M=' + str(slower)}"
            )
    return lines


# ------------------------------------------------------------------------ parallel compile
def apply_configs(table: dict[str, Any] | None) -> None:
    """Replace the kernels' tile tables: tile key (qlinear.tile_key) -> [[largest M, (largest
    N * K,) [tile config fields]], ...]; a rule without a size applies to every size."""
    import specquant.kernels.triton_ops.qlinear as Q

    for key, rules in (table or {}).items():
        Q.CONFIGS[key] = [
            (r[0], r[1] if len(r) == 3 else Q.ANY, Q.TileConfig(*r[-1])) for r in rules
        ]


def _warm_one(job: tuple[Any, ...]) -> str:
    """Compile (into Triton's on-disk cache) what one launch needs:
    (format, N, K, M, tile table or None, pre-quantized activations)."""
    name, n, k, m, table, prequant = job
    try:
        apply_configs(table)
        gen = torch.Generator(device="cuda").manual_seed(0)
        make, _, _ = ours(name, n, k, gen, gemm_only=prequant)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        make(x)(0)
        torch.cuda.synchronize()
        return "ok"
    except Exception as e:  # reported by the main process
        return f"{job[:4]}: {type(e).__name__}: {str(e)[:300]}"


def precompile(jobs: list[tuple[Any, ...]], workers: int) -> list[str]:
    import multiprocessing as mp

    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        return [r for r in pool.map(_warm_one, jobs) if r != "ok"]


# ---------------------------------------------------------------------------------- runs
def time_each_m(
    make: Callable[[torch.Tensor], Callable[[int], Any]],
    copies: int,
    k: int,
    ms: list[int],
    fields: dict[str, Any],
) -> list[dict[str, Any]]:
    """One row per M: `fields` plus the median microseconds (or the error) of make(x [M, k])."""
    rows = []
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        row = {**fields, "m": m}
        try:
            row["us"] = time_graph(make(x), copies)
        except Exception as e:
            row["error"] = repr(e)[:300]
        rows.append(row)
    return rows


def measure(
    models: list[str],
    ms: list[int],
    deadline: float,
    partial: Path,
    baselines: list[str],
    formats: list[str] = OURS,
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for model in models:
        for layer, (k, n) in SHAPES[model].items():
            impls: list[tuple[str, Callable[[], Any]]] = [
                *[(f, lambda f=f, n=n, k=k: ours(f, n, k, gen)) for f in formats],
                *[
                    (f + ":gemm", lambda f=f, n=n, k=k: ours(f, n, k, gen, True))
                    for f in formats
                    if f in GEMM_ONLY
                ],
                *[(b, lambda b=b, n=n, k=k: baseline(b, n, k, gen)) for b in baselines],
            ]
            for impl, build in impls:
                if time.time() > deadline:
                    print(f"deadline reached before {model} {layer} {impl}", flush=True)
                    return rows
                try:
                    make, copies, size = build()
                except Exception as e:
                    rows.append(dict(model=model, layer=layer, impl=impl, error=repr(e)[:300]))
                    continue
                fields = dict(model=model, layer=layer, impl=impl, n=n, k=k,
                              weight_bytes=size, copies=copies)  # fmt: skip
                rows += time_each_m(make, copies, k, ms, fields)
                del make
                torch.cuda.empty_cache()
            partial.write_text(json.dumps(rows))  # in case the run is cut short
            print(f"{model} {layer} done at {time.time():.0f}", flush=True)
    return rows


TUNE_FORMATS = ["w4a16-g128", "w4a16", "w4a16-g128-asym", "w8a8", "w4a8", "w4a8-g128", "fp8"]
TUNE_SHAPES = [(model, layer) for model in SHAPES for layer in SHAPES[model]]
# M bucket -> candidates (BLOCK_N, BLOCK_M, BLOCK_K, warps, stages, split waves); fp8 needs
# wgmma (BLOCK_M >= 64 and 4+ warps), so its small-M candidates are the BLOCK_M = 64 ones.
# With 2 warps Triton runs BLOCK_M = 64 on mma.sync: the dequantized weights stay in
# registers instead of taking wgmma's trip through shared memory.
TUNE_CANDIDATES = {
    16: [(128, 16, 128, 4, 4, 1), (128, 16, 128, 4, 4, 2), (128, 16, 128, 4, 4, 4),
         (64, 16, 128, 4, 4, 1), (64, 16, 128, 4, 4, 2), (64, 16, 128, 4, 4, 4),
         (32, 16, 128, 2, 4, 2), (32, 16, 128, 2, 4, 4), (32, 16, 256, 2, 3, 4),
         (128, 16, 256, 4, 3, 1), (128, 16, 256, 8, 3, 1), (128, 16, 128, 8, 5, 1),
         (256, 16, 128, 8, 3, 1), (64, 16, 256, 4, 3, 2), (128, 16, 128, 4, 6, 2),
         (128, 64, 128, 4, 3, 1), (64, 64, 128, 4, 3, 2)],
    32: [(128, 32, 128, 4, 4, 1), (64, 32, 128, 4, 4, 1), (64, 32, 128, 4, 4, 2),
         (128, 32, 128, 8, 4, 1), (32, 32, 128, 2, 4, 2), (128, 64, 128, 4, 3, 1),
         (64, 32, 128, 2, 4, 1), (64, 32, 128, 2, 4, 2)],
    64: [(128, 64, 128, 4, 3, 1), (64, 64, 128, 4, 3, 1), (128, 64, 64, 4, 4, 1),
         (128, 64, 128, 8, 3, 1), (256, 64, 64, 8, 3, 1), (64, 64, 128, 4, 4, 2),
         (128, 64, 128, 4, 3, 2), (64, 64, 64, 4, 5, 1),
         (64, 64, 128, 2, 3, 1), (64, 64, 128, 2, 4, 1), (32, 64, 128, 2, 4, 1),
         (64, 64, 64, 2, 4, 1), (64, 64, 128, 2, 3, 2)],
    128: [(128, 128, 64, 8, 3, 1), (64, 128, 128, 4, 3, 1), (128, 128, 64, 4, 3, 1),
          (128, 128, 128, 8, 3, 1), (256, 128, 64, 8, 3, 1)],
}  # fmt: skip


# fp8 only: e4m3 K tiles of 256, as many bytes as a bf16 tile of 128, at BLOCK_M 64 and 128
# (_candidates adds the 64 bucket's tiles to the others: at 128 tokens two rows of BLOCK_M =
# 64 programs fill more SMs than one row of 128)
FP8_EXTRA = [(64, 64, 256, 4, 3, 1), (128, 64, 256, 4, 3, 1), (64, 64, 256, 4, 3, 2),
             (64, 128, 256, 4, 3, 1), (128, 128, 128, 4, 4, 1), (128, 128, 256, 8, 3, 1),
             (256, 128, 128, 8, 3, 1)]  # fmt: skip


def _candidates(name: str, m: int) -> list[tuple[int, ...]]:
    if FORMATS[name].activations != "fp8":
        return TUNE_CANDIDATES[m]
    pool = TUNE_CANDIDATES[m] + (TUNE_CANDIDATES[64] if m != 64 else []) + FP8_EXTRA
    return list(dict.fromkeys(c for c in pool if 64 <= c[1] <= max(m, 64) and c[3] >= 4))


def tune_jobs(formats: list[str], buckets: list[int]) -> list[tuple[Any, ...]]:
    return [
        (f, SHAPES[mo][la][1], SHAPES[mo][la][0], m, {table_key(f): [[10**9, c]]}, prequant(f))
        for f in formats
        for mo, la in TUNE_SHAPES
        for m in buckets
        for c in _candidates(f, m)
    ]


def table_key(name: str) -> str:
    """The tile table (qlinear.tile_key) that format `name` uses."""
    from specquant.kernels.triton_ops.qlinear import tile_key

    return tile_key(FORMATS[name])


def prequant(name: str) -> bool:
    return FORMATS[name].activations != "none"


def tune(deadline: float, formats: list[str], buckets: list[int]) -> list[dict[str, Any]]:
    """Time candidate tile configs per tile table and M bucket (GEMM only)."""
    import specquant.kernels.triton_ops.qlinear as Q

    rows: list[dict[str, Any]] = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    saved = dict(Q.CONFIGS)
    try:
        for name in formats:
            for model, layer in TUNE_SHAPES:
                k, n = SHAPES[model][layer]
                make, copies, _ = ours(name, n, k, gen, gemm_only=prequant(name))
                for m in buckets:
                    if time.time() > deadline:
                        return rows
                    fn = make(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
                    for c in _candidates(name, m):
                        apply_configs({table_key(name): [[10**9, c]]})
                        try:
                            us = time_graph(fn, copies, replays=5)
                        except Exception as e:
                            us = float("nan")
                            print(name, layer, c, repr(e)[:200], flush=True)
                        rows.append(dict(fmt=name, model=model, layer=layer, m=m, cfg=c, us=us))
                del make
                torch.cuda.empty_cache()
    finally:
        Q.CONFIGS.clear()
        Q.CONFIGS.update(saved)
    return rows


def size_class(model: str, layer: str) -> int:
    """The largest N * K of the weight-size class (qlinear.SIZE_CLASSES) this layer is in."""
    from specquant.kernels.triton_ops.qlinear import SIZE_CLASSES

    k, n = SHAPES[model][layer]
    return next(c for c in SIZE_CLASSES if n * k <= c)


def best_configs(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """tile table -> [[bucket, largest N * K, best candidate]]: per M bucket and weight-size
    class, the candidate with the smallest total time over that class's shapes (the tables
    and buckets `rows` has)."""
    from specquant.kernels.triton_ops.qlinear import SIZE_CLASSES

    table: dict[str, Any] = {}
    for f in dict.fromkeys(r["fmt"] for r in rows):
        for m in sorted({r["m"] for r in rows if r["fmt"] == f}):
            for size in SIZE_CLASSES:
                shapes = [s for s in TUNE_SHAPES if size_class(*s) == size]
                totals = []
                for c in _candidates(f, m):
                    us = [
                        r["us"]
                        for r in rows
                        if r["fmt"] == f
                        and r["m"] == m
                        and tuple(r["cfg"]) == c
                        and (r["model"], r["layer"]) in shapes
                    ]
                    if shapes and len(us) == len(shapes) and all(u == u for u in us):
                        totals.append((sum(us), c))
                if totals:
                    table.setdefault(table_key(f), []).append([m, size, list(min(totals)[1])])
    return table


def with_untuned_buckets(table: dict[str, Any]) -> dict[str, Any]:
    """A tuned table (best_configs) completed with the built-in rules of the M buckets the
    run did not tune: apply_configs replaces a tile key's whole table, so `--configs` with
    a run that tuned some buckets would otherwise lose the others."""
    from dataclasses import astuple

    import specquant.kernels.triton_ops.qlinear as Q

    out = {}
    for key, rules in table.items():
        done = {r[0] for r in rules}
        kept = [[m, w, list(astuple(c))] for m, w, c in Q.CONFIGS[key] if m not in done]
        out[key] = sorted(rules + kept, key=lambda r: (r[0], r[1]))
    return out


# ------------------------------------------------------------------------------- report
def summarize(rows: list[dict[str, Any]], bw_gbs: float) -> dict[str, Any]:
    """Per model and implementation: the four linears' total per M, roofline %, ratios."""
    out: dict[str, Any] = {}
    for model in SHAPES:
        table: dict[str, dict[int, float]] = {}
        roof: dict[str, float] = {}
        for impl in sorted({r["impl"] for r in rows if r["model"] == model}):
            got = [r for r in rows if r["model"] == model and r["impl"] == impl and "us" in r]
            per_m: dict[int, float] = {}
            for m in MS:
                layer_times = [r["us"] for r in got if r["m"] == m]
                if len(layer_times) == len(SHAPES[model]):
                    per_m[m] = sum(layer_times)
            if not per_m:
                continue
            table[impl] = per_m
            # bytes at M=1: the weights (+scales) and the bf16 activations in and out
            one = [r for r in got if r["m"] == 1]
            if len(one) == len(SHAPES[model]):
                b = sum(r["weight_bytes"] + 2 * (r["k"] + r["n"]) for r in one)
                roof[impl] = b / (bw_gbs * 1e3)  # microseconds
        if table:  # a model this run did not time gets no section
            out[model] = {"total_us": table, "roofline_us": roof}
    return out


def goals(summary: dict[str, Any]) -> list[str]:
    lines = []
    for model, s in summary.items():
        t, roof = s["total_us"], s["roofline_us"]
        if "w4a16-g128" in t and 1 in t["w4a16-g128"]:
            pct = 100 * roof["w4a16-g128"] / t["w4a16-g128"][1]
            ratio = t["w4a16-g128"].get(64, float("nan")) / t["w4a16-g128"][1]
            lines.append(
                f"{model} W4A16-g128: {pct:.0f}% of its roofline at M=1 (goal >= 70%), "
                f"time(64)/time(1) = {ratio:.2f} (goal <= 1.6)"
            )
        for f in ("w8a8", "fp8"):
            if f in t and "bf16-cublas" in t:
                slower = [m for m in t[f] if t[f][m] >= t["bf16-cublas"].get(m, float("inf"))]
                lines.append(
                    f"{model} {f.upper()} (with activation quantization) faster than bf16 at "
                    f"every M: {'yes' if not slower else 'no, not at M=' + str(slower)}"
                )
        for h in ("humming-w4a16-g128", "humming-w4a16"):
            if h in t and 1 in t[h]:
                ours_name = h.removeprefix("humming-")
                pct = 100 * roof[h] / t[h][1]
                ratio = t[h].get(64, float("nan")) / t[h][1]
                vs = t[ours_name][1] / t[h][1] if ours_name in t and 1 in t[ours_name] else 0
                lines.append(
                    f"{model} {h} (the ceiling): {pct:.0f}% of its roofline at M=1, "
                    f"time(64)/time(1) = {ratio:.2f}; ours takes {vs:.2f}x its time at M=1"
                )
        if "w4a8" in t and "w4a16" in t:
            slower = [m for m in t["w4a8"] if m >= 32 and t["w4a8"][m] >= t["w4a16"][m]]
            lines.append(
                f"{model} W4A8 faster than W4A16 (both per channel) at M >= 32: "
                f"{'yes' if not slower else 'no, not at M=' + str(slower)}"
            )
    return lines


def write_markdown(
    path: Path,
    meta: dict[str, Any],
    summary: dict[str, Any],
    lines: list[str],
    chains: list[dict[str, Any]],
) -> None:
    md = [
        "# Quantized linear layers: latency vs tokens M",
        "",
        f"Card: {meta['card']}; date {meta['date']}; commit {meta['commit']}; torch "
        f"{meta['torch']}, triton {meta['triton']}; copy bandwidth {meta['copy_bw_gbs']:.0f} GB/s "
        "(read + write, measured in this run). Times: sum of one decoder layer's four linears "
        "(qkv, o, gate_up, down), microseconds, median of CUDA-graph replays with the weights "
        "rotated through HBM. A8 rows include per-token activation quantization; `:gemm` rows "
        "take pre-quantized activations (what qkv/gate_up get from the fused RMSNorm). "
        "W4A16 rows hand x in the weights' mma K order where the layer's wgmma config reads "
        "it so, as the model's norm, silu(gate) * up and head merge write it (reports before "
        "2026-11-28's fused hand-over included a gather there). "
        "Reproduce: `STAGE=measure HUMMING=1 bench/gpu_kernels.sh` (humming rows need "
        "`pip install humming-kernels`).",
        *[f"Merged: {m}." for m in meta.get("merged", [])],
        *(
            [f"Timed here: {', '.join(meta['formats'] + meta['baselines'])} (a subset)."]
            if set(meta.get("formats", OURS + CANONICAL)) != set(OURS + CANONICAL)
            else []
        ),
        "",
        "## Goals",
        "",
        *[f"- {line}" for line in lines],
    ]
    for model, s in summary.items():
        t, roof = s["total_us"], s["roofline_us"]
        md += ["", f"## Llama-3-{model.upper()} decoder layer", ""]
        md.append(
            "| implementation | "
            + " | ".join(f"M={m}" for m in MS)
            + " | % roofline M=1 | t(64)/t(1) | t(128)/t(1) |"
        )
        md.append("|---" * (len(MS) + 4) + "|")
        for impl, per_m in t.items():
            cells = [f"{per_m[m]:.1f}" if m in per_m else "-" for m in MS]
            pct = f"{100 * roof[impl] / per_m[1]:.0f}%" if impl in roof and 1 in per_m else "-"
            r64 = f"{per_m[64] / per_m[1]:.2f}" if 1 in per_m and 64 in per_m else "-"
            r128 = f"{per_m[128] / per_m[1]:.2f}" if 1 in per_m and 128 in per_m else "-"
            md.append(f"| {impl} | " + " | ".join(cells) + f" | {pct} | {r64} | {r128} |")
    md += chain_markdown(chains)
    path.write_text("\n".join(md) + "\n")


def chain_markdown(chains: list[dict[str, Any]]) -> list[str]:
    md = [
        "",
        "## A decoder layer's linears as the model runs them",
        "",
        "norm -> qkv, o, norm -> gate_up, silu(gate) * up -> down (attention excluded), "
        "microseconds. A8 formats: RMSNorm + quantization and silu * up + quantization in one "
        "kernel each, o_proj quantizes its input; bf16 / W4A16: the RMSNorm kernel and the "
        "fused silu * up, in mma K order where a W4A16 wgmma config reads x so (runs before "
        "2026-11-28's one-kernel RMSNorm timed torch's ops for the norm, and W4A16 gathered "
        "x into mma order in the launcher).",
    ]
    for model in SHAPES:
        t = {(r["impl"], r["m"]): r["us"] for r in chains if r["model"] == model and "us" in r}
        if not t:
            continue
        md += ["", f"### Llama-3-{model.upper()}", ""]
        md.append("| format | " + " | ".join(f"M={m}" for m in MS) + " | vs bf16 at M=1 / 128 |")
        md.append("|---" * (len(MS) + 2) + "|")
        timed = (c for c in CHAIN + CHAIN_EXPERIMENTS if any(impl == c for impl, _ in t))
        for name in timed:
            cells = [f"{t[(name, m)]:.1f}" if (name, m) in t else "-" for m in MS]
            ratio = "-"
            if all((k, m) in t for k in (name, "bf16") for m in (1, 128)):
                ratio = " / ".join(f"{t[(name, m)] / t[('bf16', m)]:.2f}" for m in (1, 128))
            md.append(f"| {name} | " + " | ".join(cells) + f" | {ratio} |")
    return md


def merge(paths: list[Path], out: Path) -> None:
    """One report from runs of one commit on one card that each finished part of the models
    (a run stops at its budget): the per-linear rows and summary of each model from the first
    run that measured them, the layer chains from the first run."""
    runs = [json.loads(p.read_text()) for p in paths]
    if len({(r["meta"]["commit"], r["meta"]["card"]) for r in runs}) != 1:
        raise SystemExit("--merge takes runs of one commit on one card")
    meta = dict(runs[0]["meta"], merged=[])
    summary: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for model in SHAPES:
        for path, run in zip(paths, runs, strict=True):
            if run["summary"].get(model, {}).get("total_us"):
                one = run["summary"][model]
                totals = {impl: {int(m): us for m, us in t.items()}  # JSON keys are strings
                          for impl, t in one["total_us"].items()}  # fmt: skip
                summary[model] = dict(one, total_us=totals)
                rows += [r for r in run["rows"] if r["model"] == model]
                bw = run["meta"]["copy_bw_gbs"]
                meta["merged"].append(f"{model} per linear from run {paths.index(path) + 1} of "
                                      f"{len(paths)} (copy bandwidth {bw:.0f} GB/s)")  # fmt: skip
                break
    chains = runs[0]["chains"]
    lines = goals(summary) + chain_goals(chains)
    report = dict(meta=meta, goals=lines, summary=summary, rows=rows, chains=chains)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernel_perf.json").write_text(json.dumps(report, indent=1))
    write_markdown(out / "kernel_perf.md", meta, summary, lines, chains)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--models", default="8b,70b")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument(
        "--tune-only",
        action="store_true",
        help="time candidate tile configs; write the best to OUT/kernel_configs.json",
    )
    ap.add_argument(
        "--configs",
        type=Path,
        default=None,
        help="tile table (from --tune-only) to measure instead of the built-in one",
    )
    ap.add_argument("--buckets", default=",".join(map(str, TUNE_CANDIDATES)),
                    help="with --tune-only: the M buckets to tune, comma-separated")  # fmt: skip
    ap.add_argument("--budget-s", type=float, default=400, help="stop measuring after this")
    ap.add_argument(
        "--chain-budget-s", type=float, default=120, help="extra time for the layer chains"
    )
    ap.add_argument(
        "--humming",
        action="store_true",
        help="also time humming-kernels' W4A16 (JIT-compiled with nvcc/NVRTC on first use)",
    )
    ap.add_argument("--formats", default=",".join(OURS + CANONICAL),
                    help="our formats to time, comma-separated (the layer chains take those "
                         "of them that are chains, and bf16)")  # fmt: skip
    ap.add_argument("--baselines", default=",".join(BASELINES), help="comma-separated")
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    ap.add_argument("--commit", default=None, help="git commit (default: this checkout's)")
    ap.add_argument("--merge", type=Path, nargs="+", default=None,
                    help="only combine kernel_perf.json files of one commit and card: per "
                         "model the first with its per-linear rows, the chains from the "
                         "first")  # fmt: skip
    args = ap.parse_args()  # fmt: skip
    if args.merge:
        merge(args.merge, args.out)
        return
    formats = [f for f in args.formats.split(",") if f]
    unknown = [f for f in formats if f not in OURS + CANONICAL + EXPERIMENTS]
    unknown += [b for b in args.baselines.split(",") if b and b not in BASELINES + HUMMING]
    if unknown:
        known = OURS + CANONICAL + EXPERIMENTS + BASELINES + HUMMING
        raise SystemExit(f"unknown formats or baselines {unknown}; known: {', '.join(known)}")
    buckets = [b for b in args.buckets.split(",") if b]
    if args.tune_only:
        if args.formats == ap.get_default("formats"):  # every format with a tile table
            formats = TUNE_FORMATS
        if set(formats) - set(TUNE_FORMATS) or set(buckets) - set(map(str, TUNE_CANDIDATES)):
            raise SystemExit(f"--tune-only tunes formats {TUNE_FORMATS} at M buckets "
                             f"{list(TUNE_CANDIDATES)}; got {formats} and {buckets}")  # fmt: skip
    elif args.buckets != ap.get_default("buckets"):
        raise SystemExit("--buckets chooses what --tune-only tunes; to time token counts use --ms")
    if not torch.cuda.is_available():
        raise SystemExit("kernel_perf needs a CUDA GPU")
    start = time.time()
    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in SHAPES:
            raise SystemExit(f"unknown model {m!r}; known: {', '.join(SHAPES)}")
    ms = [int(m) for m in args.ms.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    import triton

    if args.tune_only:
        tuned, at = [f for f in TUNE_FORMATS if f in formats], [int(b) for b in buckets]
        errors = precompile(tune_jobs(tuned, at), args.workers)
        print(f"precompiled in {time.time() - start:.0f}s; errors: {errors[:5]}", flush=True)
        rows = tune(start + args.budget_s, tuned, at)
        table = with_untuned_buckets(best_configs(rows))
        (args.out / "kernel_tune.json").write_text(json.dumps(rows, indent=1))
        (args.out / "kernel_configs.json").write_text(json.dumps(table, indent=1))
        print(f"tuned in {time.time() - start:.0f}s: {json.dumps(table)}", flush=True)
        return
    table = json.loads(args.configs.read_text()) if args.configs else None
    apply_configs(table)
    jobs = [
        (f, n, k, m, table, gemm)
        for f in OURS
        if f in formats
        for mo in models
        for (k, n) in SHAPES[mo].values()
        for m in (1, 32, 64, 128)
        for gemm in ((False, True) if f in GEMM_ONLY else (False,))
    ]
    errors = precompile(jobs, args.workers)
    print(f"precompiled in {time.time() - start:.0f}s; errors: {errors[:5]}", flush=True)
    bw = copy_bandwidth_gbs()
    # once each: --humming with humming also among --baselines timed it twice, and a model's
    # sums (four linears per M) then dropped it
    baselines = list(dict.fromkeys([b for b in args.baselines.split(",") if b]
                                   + (HUMMING if args.humming else [])))  # fmt: skip
    partial = args.out / "kernel_perf_rows.json"
    rows = measure(models, ms, start + args.budget_s, partial, baselines, formats)
    summary = summarize(rows, bw)
    chain_names = [c for c in CHAIN + CHAIN_EXPERIMENTS if c == "bf16" or c in formats]
    chains = measure_chains(models, ms, start + args.budget_s + args.chain_budget_s, chain_names)
    meta = dict(
        gpu_run_meta(args.commit),
        triton=triton.__version__,
        copy_bw_gbs=bw,
        seconds=time.time() - start,
        tile_configs=table or "built-in",
        formats=formats,
        baselines=baselines,
    )
    lines = goals(summary) + chain_goals(chains)
    report = dict(meta=meta, goals=lines, summary=summary, rows=rows, chains=chains)
    (args.out / "kernel_perf.json").write_text(json.dumps(report, indent=1))
    write_markdown(args.out / "kernel_perf.md", meta, summary, lines, chains)
    print("\n".join(lines))
    print((args.out / "kernel_perf.md").read_text())


if __name__ == "__main__":
    main()
