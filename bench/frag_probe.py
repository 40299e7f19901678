"""The fragment-order W4A16 kernel (kernels/triton_ops/w4_fragment.py) on the GPU: checked
against a dequantize-and-matmul reference, its tile configs timed per M bucket on the Llama-3
8B/70B linears, and the best per bucket and weight-size class timed for M = 1..128 against
the canonical-layout Triton kernel in the same run.

    python bench/frag_probe.py --out bench/results
    python bench/frag_probe.py --stages check,tune --buckets 16,32 --out DIR   # split over
    python bench/frag_probe.py --stages tune,compare --buckets 64 --previous DIR/frag_probe.json

Writes frag_probe.json (every timing, the chosen configs) and frag_probe.md.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

import torch

from common import gpu_run_meta, gpu_run_text, write_report
from kernel_perf import SHAPES, _clone, copies_for, nbytes, random_tensors, time_graph
from specquant.kernels.triton_ops import w4_fragment as F
from specquant.kernels.triton_ops.qlinear import qlinear
from specquant.quant.pack import dequantize
from specquant.quant.spec import get_format

# Tile configs tried per M bucket (timed at the bucket's largest M; bucket 8 at M = 1, decode):
# FragConfig(BLOCK_N, BLOCK_K, warps along N, split waves, warps along M, stages, pdl,
# prefetch)
_C = F.FragConfig
CANDIDATES: dict[int, list[F.FragConfig]] = {
    8: [_C(128, 128, 4, w, 1, s) for w in (2, 4) for s in (1, 3, 4)]
    + [_C(bn, bk, w, 4, 1, s) for bn, bk, w in [(128, 256, 4), (64, 256, 2), (64, 128, 2)]
       for s in (1, 3)]
    + [_C(128, 128, 4, 1, 1, 4)]
    # more splits, since the fix-up reads four splits per L2 round trip (it read one)
    + [_C(128, 128, 4, 8, 1, s) for s in (1, 3)] + [_C(64, 128, 2, 8, 1, 3)]
    # programmatic dependent launch: each launch starts while the one before runs (with a
    # ring it copies its first weight tiles meanwhile; time_graph replays one kernel back
    # to back)
    + [_C(128, 128, 4, w, 1, s, True) for w, s in [(2, 3), (4, 1), (4, 3), (4, 4)]]
    + [_C(128, 256, 4, 4, 1, s, True) for s in (1, 3)],
    16: [_C(128, 128, 4, 2, 1, s) for s in (1, 3, 4)]
    + [_C(64, 128, 2, 1, 1, s) for s in (1, 3)]
    + [_C(64, 128, 2, 2, 1, 3), _C(128, 128, 4, 1, 1, 3), _C(64, 128, 4, 2, 1, 3)],
    32: [_C(64, 128, 2, 2, 2, s) for s in (1, 3)]
    + [_C(128, 128, 4, 1, 1, s) for s in (1, 3)]
    + [_C(128, 128, 4, 2, 1, 3), _C(64, 128, 2, 1, 2, 3), _C(64, 128, 4, 2, 2, 3),
       _C(128, 128, 4, 2, 2, 3)],
    64: [_C(64, 128, 2, 2, 4, s) for s in (1, 3)]
    + [_C(128, 128, 4, 2, 2, s) for s in (1, 3)]
    + [_C(64, 128, 2, 1, 4, 3), _C(64, 128, 4, 2, 2, 3), _C(128, 128, 4, 1, 2, 3),
       _C(64, 128, 2, 2, 2, 3)],
}  # fmt: skip
CHECKED = [None, _C(32, 128, 1, 4), _C(128, 256, 4), _C(64, 128, 2, 1, 4, 3), _C(128, 128, 4, 2, 2),
           _C(128, 256, 4, 4, 1, 4), _C(32, 128, 1, 2, 1, 2), _C(128, 128, 4, 2, 1, 3, True),
           _C(128, 128, 4, 4, 1, 1, True),
           # one-warp and unsplit programs with deep rings (one token)
           _C(16, 128, 1, 1, 1, 4), _C(16, 256, 1, 1, 1, 6), _C(64, 128, 4, 1, 1, 8)]  # fmt: skip
# g128 on group-major scales ([G, N], Marlin's order), as prepare_forward keeps them for the
# layers, and per channel: what the tile tables serve. "w4a16-g128" (on request) passes the
# scales row-major, as a caller of fragment_linear may.
GROUP_MAJOR = "w4a16-g128:group-major"
FORMATS = [GROUP_MAJOR, "w4a16"]
KNOWN = [*FORMATS, "w4a16-g128"]
MS = [1, 2, 4, 8, 16, 32, 64, 128]


def timed_m(bucket: int) -> int:
    return 1 if bucket == 8 else bucket


def reference(x: torch.Tensor, t: dict[str, torch.Tensor], bias: Any) -> torch.Tensor:
    """Symmetric int4 with any number of groups (taken from the scales' shape)."""
    y = x.float() @ dequantize(t, get_format("w4a16")).T
    return y if bias is None else y + bias.float()


# (N, K, group; 0: per channel) of the checked layers
CHECK_SHAPES = [(64, 256, 128), (48, 384, 0), (4096, 4096, 128), (10240, 8192, 0),
                (1024, 28672, 128), (272, 1024, 256)]  # fmt: skip


@dataclass
class Case:
    """One check: a random symmetric int4 layer, its fragments, an input and the reference."""

    n: int
    k: int
    group: int
    t: dict[str, torch.Tensor]
    frag: torch.Tensor
    m: int
    dtype: torch.dtype
    x: torch.Tensor
    bias: torch.Tensor | None
    ref: torch.Tensor


def check_cases(gen: torch.Generator, ms: tuple[int, ...]) -> Iterator[Case]:
    """Every CHECK_SHAPES layer at each token count in `ms`, in bf16 and fp16; the bias
    alternates, so every combination meets several token counts."""
    for n, k, group in CHECK_SHAPES:
        g = 1 if group == 0 else k // group
        t = {
            "qweight": torch.randint(0, 256, (n, k // 2), device="cuda", generator=gen,
                                     dtype=torch.uint8),
            "scales": torch.rand(n, g, device="cuda", generator=gen) * 0.02 + 1e-3,
        }  # fmt: skip
        frag = F.prepare_fragments(t["qweight"])
        for i, m in enumerate(ms):
            for dtype, with_bias in [(torch.bfloat16, i % 2 == 0), (torch.float16, i % 2 == 1)]:
                x = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
                bias = torch.randn(n, device="cuda", dtype=dtype) if with_bias else None
                yield Case(n, k, group, t, frag, m, dtype, x, bias, reference(x, t, bias))


def rel_err(y: torch.Tensor, c: Case) -> dict[str, Any]:
    """The check's row: the case and y's relative error against its reference."""
    return dict(n=c.n, k=c.k, group=c.group, dtype=str(c.dtype), m=c.m, bias=c.bias is not None,
                rel_err=float((y.float() - c.ref).norm() / c.ref.norm()))  # fmt: skip


def check(gen: torch.Generator) -> list[dict[str, Any]]:
    rows = []
    for c in check_cases(gen, (1, 3, 8, 9, 16, 17, 33, 64, 100)):
        roundtrip = bool(torch.equal(F.fragment_codes(c.frag), c.t["qweight"]))
        for cfg in CHECKED:
            if cfg is not None and cfg.block_n > c.n:
                continue
            y = F.fragment_linear(c.x, c.frag, c.t["scales"], c.bias, c.group, config=cfg)
            rows.append(dict(rel_err(y, c), config=str(cfg), roundtrip=roundtrip))
    return rows


def base_format(fmt: str) -> str:
    """The quantization format of a --formats entry (without its scale-memory variant)."""
    return fmt.split(":")[0]


def weights(fmt: str, n: int, k: int, gen: torch.Generator) -> tuple[list[Any], int]:
    one = random_tensors(get_format(base_format(fmt)), n, k, gen)
    if fmt == GROUP_MAJOR:  # same values, as the layers keep them
        one["scales"] = F.group_major(one["scales"])
    ws = [one] + [_clone(one) for _ in range(1, copies_for(nbytes(one)))]
    return ws, nbytes(one)


def time_frag(x: torch.Tensor, frags: list[Any], ws: list[Any], group: int, cfg: Any) -> float:
    def run(i: int) -> torch.Tensor:
        return F.fragment_linear(x, frags[i], ws[i]["scales"], None, group, config=cfg)

    return time_graph(run, len(ws))


def parse_config(text: str) -> F.FragConfig:
    """A --configs entry: FragConfig's fields in order, as integers (pdl, prefetch: 0 / 1)."""
    values = [int(v) for v in text.split(",")]
    flags = [bool(v) for v in values[6:]]  # pdl, prefetch
    return F.FragConfig(*values[:6], *flags)


def size_class(n: int, k: int) -> str:
    return next(name for name, bound in F.SIZE_CLASSES if n * k <= bound)


def tune(
    gen: torch.Generator,
    buckets: list[int],
    formats: list[str],
    deadline: float,
    configs: list[F.FragConfig] | None = None,
    models: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Every candidate of each bucket (or `configs` in every bucket) on every Llama linear
    (of `models`, default all), in each format (stops at the deadline; best_by_size only
    ranks configs timed on every layer of a class)."""
    rows = []
    for fmt in formats:
        group = get_format(base_format(fmt)).group_size
        group = 0 if group == -1 else group
        for model, layers in SHAPES.items():
            if models and model not in models:
                continue
            for layer, (k, n) in layers.items():
                ws, size = weights(fmt, n, k, gen)
                frags = [F.prepare_fragments(w["qweight"]) for w in ws]
                for bucket in buckets:
                    x = torch.randn(timed_m(bucket), k, device="cuda", dtype=torch.bfloat16)
                    for cfg in configs or CANDIDATES[bucket]:
                        if time.time() > deadline:
                            return rows
                        row = dict(fmt=fmt, model=model, layer=layer, n=n, k=k, bytes=size,
                                   bucket=bucket, config=list(astuple(cfg)))  # fmt: skip
                        try:
                            row["us"] = time_frag(x, frags, ws, group, cfg)
                        except Exception as e:
                            row["error"] = repr(e)[:300]
                        rows.append(row)
                print(f"tuned {fmt} {model} {layer} at {time.time():.0f}", flush=True)
                del ws, frags
                torch.cuda.empty_cache()
    return rows


def best_by_size(rows: list[dict[str, Any]]) -> dict[str, dict[str, list[Any]]]:
    """Per bucket and size class: the config of least total time over the tuned formats."""
    out: dict[str, dict[str, list[Any]]] = {}
    for bucket in sorted({r.get("bucket", 8) for r in rows}):
        out[str(bucket)] = {}
        for cls, _ in F.SIZE_CLASSES:
            totals: dict[tuple[Any, ...], float] = {}
            counts: dict[tuple[Any, ...], int] = {}
            for r in rows:
                if r.get("bucket", 8) == bucket and size_class(r["n"], r["k"]) == cls and "us" in r:
                    c = tuple(r["config"])
                    totals[c] = totals.get(c, 0.0) + r["us"]
                    counts[c] = counts.get(c, 0) + 1
            full = max(counts.values(), default=0)
            complete = {c: v for c, v in totals.items() if counts[c] == full}
            if complete:
                out[str(bucket)][cls] = list(min(complete, key=lambda c: complete[c]))
    return out


def config_for(best: dict[str, dict[str, list[Any]]], m: int, n: int, k: int) -> Any:
    """The tuned config of the smallest tuned bucket holding m (the largest one beyond)."""
    buckets = sorted(int(b) for b in best)
    bucket = next((b for b in buckets if m <= b), buckets[-1]) if buckets else None
    cfg = best.get(str(bucket), {}).get(size_class(n, k))
    return F.FragConfig(*cfg) if cfg else None


def compare(
    gen: torch.Generator, best: dict[str, Any], ms: list[int], formats: list[str], deadline: float
) -> list[dict[str, Any]]:
    rows = []
    for fmt in formats:
        spec = get_format(base_format(fmt))
        group = 0 if spec.group_size == -1 else spec.group_size
        for model, layers in SHAPES.items():
            for layer, (k, n) in layers.items():
                if time.time() > deadline:
                    return rows
                ws, size = weights(fmt, n, k, gen)
                frags = [F.prepare_fragments(w["qweight"]) for w in ws]
                for m in ms:
                    cfg = config_for(best, m, n, k)
                    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                    base = dict(fmt=fmt, model=model, layer=layer, n=n, k=k, bytes=size, m=m,
                                config=list(astuple(cfg)) if cfg else None)  # fmt: skip
                    t_frag = time_frag(x, frags, ws, group, cfg)
                    t_canon = time_graph(lambda i, x=x, ws=ws, spec=spec: qlinear(x, ws[i], None, spec), len(ws))  # fmt: skip  # noqa: E501
                    rows.append(dict(base, frag_us=t_frag, canonical_us=t_canon))
                del ws, frags
                torch.cuda.empty_cache()
    return rows


def table(rows: list[dict[str, Any]], best: dict[str, Any]) -> dict[str, list[Any]]:
    """The FRAG_CONFIGS this run supports: per bucket and size class its tuned config where
    the fragment kernel beat the canonical one over the bucket's compared M (summed over the
    class's layers and both formats), else None (also where nothing was compared). M beyond
    the tuned buckets (128) gets a bucket of its own with the largest tuned bucket's
    configs, if they win there."""
    tuned = sorted(int(b) for b in best)
    out: dict[str, list[Any]] = {}
    lo = 0
    if not rows:
        return out
    for bucket in tuned + [b for b in (max(MS),) if tuned and b > tuned[-1]]:
        by_cls = best[str(min(bucket, tuned[-1]))]
        out[str(bucket)] = []
        for cls, _ in F.SIZE_CLASSES:
            sel = [r for r in rows if lo < r["m"] <= bucket and size_class(r["n"], r["k"]) == cls]
            frag = sum(r["frag_us"] for r in sel)
            canon = sum(r["canonical_us"] for r in sel)
            out[str(bucket)].append(by_cls.get(cls) if sel and frag < canon else None)
        lo = bucket
    return out


def config_table_md(table: dict[str, list[Any]]) -> list[str]:
    """A tile table (per M bucket, one config or None per weight-size class) as markdown."""
    return [
        "| M bucket | " + " | ".join(name for name, _ in F.SIZE_CLASSES) + " |",
        "|---" * (1 + len(F.SIZE_CLASSES)) + "|",
        *(
            f"| {m} | " + " | ".join(json.dumps(c) for c in cfgs) + " |"
            for m, cfgs in table.items()
        ),
    ]


def markdown(result: dict[str, Any]) -> list[str]:
    """The report: where it ran, the checks, and fragment vs canonical per layer and M."""
    checks = result["checks"]
    md = [
        "# Fragment-order W4A16 kernel: checks, tile configs, fragment vs canonical",
        "",
        gpu_run_text(result, "frag"),
        "",
        f"Checks against dequantize-and-matmul: {len(checks)} cases, worst relative error "
        f"{max(r['rel_err'] for r in checks):.1e}; packing round-trips: "
        f"{'yes' if all(r['roundtrip'] for r in checks) else 'NO'}."
        if checks
        else "Checks against dequantize-and-matmul: not run (not among --stages).",
        "",
        "Tile configs per M bucket and weight-size class (BLOCK_N, BLOCK_K, warps along N, "
        "split waves, warps along M, stages, programmatic dependent launch), tuned at the "
        "bucket's M (bucket 8 at M = 1); null where the canonical kernel was faster (the "
        "table `FRAG_CONFIGS` takes):",
        "",
        *config_table_md(result.get("table", {})),
    ]
    md += [
        "",
        "Microseconds per linear, median of CUDA-graph replays (weights rotated through HBM).",
        "",
        "| format | model | layer | " + " | ".join(f"M={m} frag / canonical" for m in MS) + " |",
        "|---" * (3 + len(MS)) + "|",
    ]
    by_layer: dict[tuple[str, str, str], dict[int, str]] = {}
    for r in result["compare"]:
        cell = f"{r['frag_us']:.1f} / {r['canonical_us']:.1f}"
        by_layer.setdefault((r["fmt"], r["model"], r["layer"]), {})[r["m"]] = cell
    for (fmt, model, layer), cells in by_layer.items():
        md.append(f"| {fmt} | {model} | {layer} | "
                  + " | ".join(cells.get(m, "-") for m in MS) + " |")  # fmt: skip
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--budget-s", type=float, default=300)
    ap.add_argument("--commit", default=None, help="the checkout's name (default: git HEAD)")
    ap.add_argument("--stages", default="check,tune,compare",
                    help="comma-separated: check, tune, compare")  # fmt: skip
    ap.add_argument("--buckets", default="8,16,32,64", help="M buckets to tune")
    ap.add_argument("--formats", default=",".join(FORMATS),
                    help=f"comma-separated, of {KNOWN}; the picks rank "
                         "configs by their total time over these")  # fmt: skip
    ap.add_argument("--compare-ms", default=",".join(map(str, MS)),
                    help="token counts of the fragment vs canonical comparison")  # fmt: skip
    ap.add_argument("--configs", default=None,
                    help="';'-separated configs to tune instead of CANDIDATES, each BLOCK_N,"
                         "BLOCK_K,warps,split_waves,warps_m,stages[,pdl[,prefetch]]]")  # fmt: skip
    ap.add_argument("--models", default=",".join(SHAPES),
                    help=f"comma-separated, of {list(SHAPES)}: the layers to tune")  # fmt: skip
    ap.add_argument("--previous", type=Path, default=None,
                    help="an earlier frag_probe.json whose checks and tuning rows this run "
                         "keeps (rows of buckets tuned again are replaced)")  # fmt: skip
    ap.add_argument("--render", type=Path, default=None,
                    help="only rewrite the markdown of an existing frag_probe.json")  # fmt: skip
    args = ap.parse_args()
    if args.render:
        result = json.loads(args.render.read_text())
        write_report(args.render, result, markdown(result))
        return
    stages = set(args.stages.split(","))
    formats = args.formats.split(",")
    unknown = [f for f in formats if f not in KNOWN]
    if unknown:
        ap.error(f"unknown --formats {unknown}; choose from {KNOWN}")
    buckets = [int(b) for b in args.buckets.split(",")]
    prev = json.loads(args.previous.read_text()) if args.previous else {}
    start = time.time()
    gen = torch.Generator(device="cuda").manual_seed(0)
    checks = check(gen) if "check" in stages else prev.get("checks", [])
    if checks:
        worst = max(r["rel_err"] for r in checks)
        print(f"checks: {len(checks)}, worst relative error {worst:.2e}, "
              f"roundtrips ok: {all(r['roundtrip'] for r in checks)}", flush=True)  # fmt: skip
    tuned = [r for r in prev.get("tune", []) if "tune" not in stages
             or r.get("bucket", 8) not in buckets]  # fmt: skip
    if "tune" in stages:
        frac = 0.6 if "compare" in stages else 1.0
        configs = None
        if args.configs:
            configs = [parse_config(c) for c in args.configs.split(";")]
        tuned += tune(gen, buckets, formats, start + args.budget_s * frac, configs,
                      args.models.split(","))  # fmt: skip
    best = best_by_size(tuned)
    print("best:", json.dumps(best), flush=True)
    ms = [int(m) for m in args.compare_ms.split(",")]
    comp = compare(gen, best, ms, formats, start + args.budget_s) if "compare" in stages else []
    for r in comp:
        print(f"{r['fmt']:>11} {r['model']:>3} {r['layer']:>7} M={r['m']:>3}: frag "
              f"{r['frag_us']:6.1f} us ({r['bytes'] / r['frag_us'] / 1e3:5.0f} GB/s), canonical "
              f"{r['canonical_us']:6.1f} us")  # fmt: skip
    result = dict(gpu_run_meta(args.commit), checks=checks, tune=tuned, best=best, compare=comp,
                  table=table(comp, best))  # fmt: skip
    print("table:", json.dumps(result["table"]), flush=True)
    write_report(args.out / "frag_probe.json", result, markdown(result))


if __name__ == "__main__":
    main()
