"""What verifying T draft tokens costs the whole model, per format, on a Llama-3-8B shape.

The compatibility study of SpecMQuant at the model level: one forward pass of a block of T
tokens after a 512-token prefix (what verifying a chain or tree of T drafted tokens costs
the target), T = 1..128, in each weight format, with the block replayed from a CUDA graph
(ModelRunner with cuda_graphs, the default on CUDA) and eagerly. Random weights: timings
need shapes, not trained values. Wall time of `runner.run` (inputs filled, graph replayed,
outputs copied), synchronized, median of --reps after a warm-up that captures the graph.

    python bench/gpu_verify_cost.py --out bench/results
    python bench/gpu_verify_cost.py --render bench/results/gpu_verify_cost.json  # no GPU

Writes gpu_verify_cost.json, .md and .png (rewritten after each format).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from common import gpu_run_meta, gpu_run_where, pyplot, write_report
from gpu_eager import LLAMA3_8B, random_model
from specquant.config import ModelConfig
from specquant.engine.runner import ModelRunner

FORMATS = ["bf16", "w4a16-g128", "w4a16", "w8a8", "w4a8", "fp8"]
TOKENS = [1, 2, 4, 8, 16, 32, 64, 128]
PREFIX = 512


def block_ms(runner: ModelRunner, t: int, reps: int) -> float:
    """Median wall milliseconds of one T-token block after the runner's prefix (not
    committed, so every repetition runs the same block)."""
    tokens = torch.arange(1000, 1000 + t, device=runner.device)
    runner.run(tokens)  # compiles, captures
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        runner.run(tokens)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(fmt: str, cfg: ModelConfig, reps: int, eager_reps: int) -> dict[str, Any]:
    model = random_model(cfg, fmt)
    prefix = list(range(100, 100 + PREFIX))
    row: dict[str, Any] = dict(format=fmt, graphs_ms={}, eager_ms={})
    for graphs, key, n in ((True, "graphs_ms", reps), (False, "eager_ms", eager_reps)):
        runner = ModelRunner(model, PREFIX + 2 * max(TOKENS), cuda_graphs=graphs)
        runner.sync(prefix)
        for t in TOKENS:
            row[key][t] = block_ms(runner, t, n)
        del runner
    del model
    torch.cuda.empty_cache()
    return row


def markdown(report: dict[str, Any]) -> list[str]:
    head = "| format | " + " | ".join(f"T={t}" for t in TOKENS) + " | t(64)/t(1) | eager T=1 |"
    md = [
        "# Verification cost vs draft tokens, whole model (Llama-3-8B shape, batch 1)",
        "",
        f"{gpu_run_where(report['meta'])}. Random weights (RTN for the quantized formats); "
        f"one block of T tokens after a {PREFIX}-token prefix, replayed from a CUDA graph "
        "(blocks padded to a power of two); wall milliseconds of `ModelRunner.run`, median "
        f"of {report['reps']} (eager: {report['eager_reps']}). Reproduce: "
        "`python bench/gpu_verify_cost.py`.",
        "",
        "Milliseconds per block, with CUDA graphs:",
        "",
        head,
        "|" + "---|" * (len(TOKENS) + 3),
    ]
    for r in report["rows"]:
        g = {int(k): v for k, v in r["graphs_ms"].items()}
        e = {int(k): v for k, v in r["eager_ms"].items()}
        cells = " | ".join(f"{g[t]:.2f}" for t in TOKENS)
        md.append(f"| {r['format']} | {cells} | {g[64] / g[1]:.2f} | {e[1]:.2f} |")
    md += ["", "Eagerly (the same blocks without graphs):", "", head.replace(
        " | t(64)/t(1) | eager T=1 |", " |"), "|" + "---|" * (len(TOKENS) + 1)]  # fmt: skip
    for r in report["rows"]:
        e = {int(k): v for k, v in r["eager_ms"].items()}
        md.append(f"| {r['format']} | " + " | ".join(f"{e[t]:.2f}" for t in TOKENS) + " |")
    for fmt, err in report.get("errors", {}).items():
        md += ["", f"{fmt} failed: `{err}`"]
    md += ["", "![time(T) / time(1) per format, with CUDA graphs](gpu_verify_cost.png)"]
    return md


def plot(report: dict[str, Any], out: Path) -> None:
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for r in report["rows"]:
        g = {int(k): v for k, v in r["graphs_ms"].items()}
        a.plot(TOKENS, [g[t] for t in TOKENS], marker="o", label=r["format"])
        b.plot(TOKENS, [g[t] / g[1] for t in TOKENS], marker="o", label=r["format"])
    for ax, title in ((a, "ms per block"), (b, "time(T) / time(1)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens verified in one pass (T)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    a.legend()
    fig.suptitle(f"Llama-3-8B shape, batch 1, CUDA graphs ({report['meta']['card']})")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--eager-reps", type=int, default=5)
    ap.add_argument("--commit", default=None, help="the checkout's name (default: git HEAD)")
    ap.add_argument("--render", type=Path, default=None,
                    help="only draw the figure of an existing gpu_verify_cost.json")  # fmt: skip
    args = ap.parse_args()
    if args.render:
        plot(json.loads(args.render.read_text()), args.render.with_suffix(".png"))
        return
    cfg = ModelConfig.from_hf(LLAMA3_8B)
    report: dict[str, Any] = dict(meta=gpu_run_meta(args.commit), reps=args.reps,
                                  eager_reps=args.eager_reps, rows=[])  # fmt: skip
    out = args.out / "gpu_verify_cost.json"
    for fmt in args.formats.split(","):
        try:
            row = measure(fmt, cfg, args.reps, args.eager_reps)
        except Exception as e:  # one format failing (e.g. a capture) keeps the others
            report.setdefault("errors", {})[fmt] = repr(e)[:500]
            print(f"{fmt}: {e!r}", flush=True)
            torch.cuda.empty_cache()
            continue
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
        write_report(out, report, markdown(report))
        plot(report, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
