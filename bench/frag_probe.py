"""The fragment-order W4A16 kernel (kernels/triton_ops/w4_fragment.py) on the GPU: checked
against a dequantize-and-matmul reference, its tile configs timed at M = 1 on the Llama-3
8B/70B linears, and the best per weight-size class timed for M = 1..16 against the
canonical-layout Triton kernel in the same run.

    python bench/frag_probe.py --out bench/results

Writes frag_probe.json (every timing, the chosen configs) and frag_probe.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from common import git_commit, write_report
from kernel_perf import SHAPES, _clone, copies_for, nbytes, random_tensors, time_graph
from specquant.kernels.triton_ops import w4_fragment as F
from specquant.kernels.triton_ops.qlinear import qlinear
from specquant.quant.pack import dequantize
from specquant.quant.spec import get_format

CANDIDATES = [
    F.FragConfig(bn, bk, w, waves)
    for bn, bk, w in [(32, 128, 1), (64, 128, 1), (64, 128, 2), (128, 128, 2), (128, 128, 4),
                      (64, 256, 2), (128, 256, 4)]
    for waves in (1, 2, 4)
]  # fmt: skip
FORMATS = ["w4a16-g128", "w4a16"]
MS = [1, 2, 4, 8, 16]


def reference(x: torch.Tensor, t: dict[str, torch.Tensor], bias: Any) -> torch.Tensor:
    """Symmetric int4 with any number of groups (taken from the scales' shape)."""
    y = x.float() @ dequantize(t, get_format("w4a16")).T
    return y if bias is None else y + bias.float()


def check(gen: torch.Generator) -> list[dict[str, Any]]:
    rows = []
    for n, k, group in [(64, 256, 128), (48, 384, 0), (4096, 4096, 128), (10240, 8192, 0),
                        (1024, 28672, 128), (272, 1024, 256)]:  # fmt: skip
        g = 1 if group == 0 else k // group
        t = {
            "qweight": torch.randint(0, 256, (n, k // 2), device="cuda", generator=gen,
                                     dtype=torch.uint8),
            "scales": torch.rand(n, g, device="cuda", generator=gen) * 0.02 + 1e-3,
        }  # fmt: skip
        frag = F.prepare_fragments(t["qweight"])
        roundtrip = bool(torch.equal(F.fragment_codes(frag), t["qweight"]))
        for dtype in (torch.bfloat16, torch.float16):
            for m in (1, 3, 8, 9, 16):
                for with_bias in (False, True):
                    x = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
                    bias = torch.randn(n, device="cuda", dtype=dtype) if with_bias else None
                    for cfg in (None, F.FragConfig(32, 128, 1, 4), F.FragConfig(128, 256, 4)):
                        if cfg is not None and cfg.block_n > n:
                            continue
                        y = F.fragment_linear(x, frag, t["scales"], bias, group, config=cfg)
                        ref = reference(x, t, bias)
                        err = float((y.float() - ref).norm() / ref.norm())
                        rows.append(dict(n=n, k=k, group=group, dtype=str(dtype), m=m,
                                         bias=with_bias, config=str(cfg), rel_err=err,
                                         roundtrip=roundtrip))  # fmt: skip
    return rows


def weights(fmt: str, n: int, k: int, gen: torch.Generator) -> tuple[list[Any], int]:
    one = random_tensors(get_format(fmt), n, k, gen)
    ws = [one] + [_clone(one) for _ in range(1, copies_for(nbytes(one)))]
    return ws, nbytes(one)


def time_frag(x: torch.Tensor, frags: list[Any], ws: list[Any], group: int, cfg: Any) -> float:
    def run(i: int) -> torch.Tensor:
        return F.fragment_linear(x, frags[i], ws[i]["scales"], None, group, config=cfg)

    return time_graph(run, len(ws))


def tune(gen: torch.Generator, deadline: float) -> list[dict[str, Any]]:
    rows = []
    for fmt in FORMATS:
        group = get_format(fmt).group_size
        group = 0 if group == -1 else group
        for model, layers in SHAPES.items():
            for layer, (k, n) in layers.items():
                ws, size = weights(fmt, n, k, gen)
                frags = [F.prepare_fragments(w["qweight"]) for w in ws]
                x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
                for cfg in CANDIDATES:
                    if time.time() > deadline:
                        return rows
                    cfg_list = [cfg.block_n, cfg.block_k, cfg.warps, cfg.split_waves]
                    row = dict(fmt=fmt, model=model, layer=layer, n=n, k=k, bytes=size,
                               config=cfg_list)  # fmt: skip
                    try:
                        row["us"] = time_frag(x, frags, ws, group, cfg)
                    except Exception as e:
                        row["error"] = repr(e)[:300]
                    rows.append(row)
                print(f"tuned {fmt} {model} {layer} at {time.time():.0f}", flush=True)
                torch.cuda.empty_cache()
    return rows


def best_by_size(rows: list[dict[str, Any]]) -> dict[str, dict[str, list[int]]]:
    """Per format and size class (<= 32M, <= 160M, larger N * K): least total time."""
    out: dict[str, dict[str, list[int]]] = {}
    for fmt in FORMATS:
        out[fmt] = {}
        for cls, lo, hi in (("32M", 0, 32 << 20), ("160M", 32 << 20, 160 << 20),
                            ("any", 160 << 20, 1 << 62)):  # fmt: skip
            totals: dict[tuple[int, ...], float] = {}
            counts: dict[tuple[int, ...], int] = {}
            for r in rows:
                if r["fmt"] == fmt and lo < r["n"] * r["k"] <= hi and "us" in r:
                    c = tuple(r["config"])
                    totals[c] = totals.get(c, 0.0) + r["us"]
                    counts[c] = counts.get(c, 0) + 1
            full = max(counts.values(), default=0)
            complete = {c: v for c, v in totals.items() if counts[c] == full}
            if complete:
                out[fmt][cls] = list(min(complete, key=lambda c: complete[c]))
    return out


def compare(gen: torch.Generator, best: dict[str, Any], deadline: float) -> list[dict[str, Any]]:
    rows = []
    for fmt in FORMATS:
        spec = get_format(fmt)
        group = 0 if spec.group_size == -1 else spec.group_size
        for model, layers in SHAPES.items():
            for layer, (k, n) in layers.items():
                if time.time() > deadline:
                    return rows
                ws, size = weights(fmt, n, k, gen)
                frags = [F.prepare_fragments(w["qweight"]) for w in ws]
                cls = "32M" if n * k <= 32 << 20 else "160M" if n * k <= 160 << 20 else "any"
                cfg = F.FragConfig(*best[fmt][cls]) if cls in best.get(fmt, {}) else None
                for m in MS:
                    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                    base = dict(fmt=fmt, model=model, layer=layer, n=n, k=k, bytes=size, m=m)
                    t_frag = time_frag(x, frags, ws, group, cfg)
                    t_canon = time_graph(lambda i, x=x, ws=ws, spec=spec: qlinear(x, ws[i], None, spec), len(ws))  # fmt: skip  # noqa: E501
                    rows.append(dict(base, frag_us=t_frag, canonical_us=t_canon))
                torch.cuda.empty_cache()
    return rows


def markdown(result: dict[str, Any]) -> list[str]:
    """The report: where it ran, the checks, and fragment vs canonical per layer and M."""
    checks = result["checks"]
    md = [
        "# Fragment-order W4A16 kernel: checks, tile configs, fragment vs canonical",
        "",
        f"Card: {result['card']}; date {result['date']}; commit {result['commit']}; torch "
        f"{result['torch']}. Reproduce: `STAGE=frag bench/gpu_kernels.sh`.",
        "",
        f"Checks against dequantize-and-matmul: {len(checks)} cases, worst relative error "
        f"{max(r['rel_err'] for r in checks):.1e}; packing round-trips: "
        f"{'yes' if all(r['roundtrip'] for r in checks) else 'NO'}. Tile configs chosen at "
        "M = 1 (BLOCK_N, BLOCK_K, warps, split waves per size class): "
        f"{json.dumps(result['best'])}.",
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
    ap.add_argument("--render", type=Path, default=None,
                    help="only rewrite the markdown of an existing frag_probe.json")  # fmt: skip
    args = ap.parse_args()
    if args.render:
        result = json.loads(args.render.read_text())
        write_report(args.render, result, markdown(result))
        return
    start = time.time()
    gen = torch.Generator(device="cuda").manual_seed(0)
    checks = check(gen)
    worst = max(r["rel_err"] for r in checks)
    print(f"checks: {len(checks)}, worst relative error {worst:.2e}, "
          f"roundtrips ok: {all(r['roundtrip'] for r in checks)}", flush=True)  # fmt: skip
    tuned = tune(gen, start + args.budget_s * 0.6)
    best = best_by_size(tuned)
    print("best:", json.dumps(best), flush=True)
    comp = compare(gen, best, start + args.budget_s)
    for r in comp:
        print(f"{r['fmt']:>11} {r['model']:>3} {r['layer']:>7} M={r['m']:>2}: frag "
              f"{r['frag_us']:6.1f} us ({r['bytes'] / r['frag_us'] / 1e3:5.0f} GB/s), canonical "
              f"{r['canonical_us']:6.1f} us")  # fmt: skip
    result = dict(card=torch.cuda.get_device_name(), torch=torch.__version__,
                  date=time.strftime("%Y-%m-%d"), commit=args.commit or git_commit(),
                  checks=checks, tune=tuned, best=best, compare=comp)  # fmt: skip
    write_report(args.out / "frag_probe.json", result, markdown(result))


if __name__ == "__main__":
    main()
