"""The compatibility study as a figure: how a decoder layer's linears slow down as the number
of tokens verified at once grows, per weight format (kernel_perf.json -> PNG; matplotlib,
`pip install specquant[bench]`).

Per model, two panels: the linears as the model runs them (microseconds, norm and SiLU
kernels included) and each implementation's time(M) / time(1) per linear.

    python bench/kernel_plot.py bench/results/kernel_perf.json --out bench/results/kernel_perf.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from common import pyplot

# what each panel shows, in legend order (absent ones are skipped)
CHAIN = ["bf16", "w8a8", "fp8", "w4a16-g128", "w4a16", "w4a8-g128", "w4a8"]
RATIO = ["bf16-cublas", "w8a8", "fp8", "w4a16-g128", "w4a16", "w4a8-g128", "w4a8",
         "humming-w4a16-g128", "torch-int4-g128"]  # fmt: skip
RATIO_TOP = 4.0  # torch's int4 kernel grows to ~30x; the panel is about the others


Series = dict[str, list[tuple[int, float]]]  # implementation -> [(M, value)] by M


def chain_series(report: dict[str, Any], model: str) -> Series:
    """Microseconds of a layer's linears as the model runs them, per format."""
    out: Series = {}
    for row in report.get("chains", []):
        if row["model"] == model and row.get("us") is not None:
            out.setdefault(row["impl"], []).append((row["m"], row["us"]))
    return {impl: sorted(out[impl]) for impl in CHAIN if impl in out}


def ratio_series(report: dict[str, Any], model: str) -> Series:
    """time(M) / time(1) of the sum of a layer's four linears, per implementation."""
    totals = report["summary"].get(model, {}).get("total_us", {})
    out: Series = {}
    for impl in RATIO:
        by_m = {int(m): us for m, us in totals.get(impl, {}).items() if us is not None}
        if 1 in by_m:
            out[impl] = [(m, by_m[m] / by_m[1]) for m in sorted(by_m)]
    return out


def plot(report: dict[str, Any], out: Path) -> None:
    plt = pyplot()
    models = [m for m in report["summary"] if chain_series(report, m) or ratio_series(report, m)]
    if not models:
        raise SystemExit("the report has no per-model timings (summary / chains)")
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 3.8 * len(models)), squeeze=False)
    names = {"8b": "Llama-3-8B", "70b": "Llama-3-70B"}
    for row, model in zip(axes, models, strict=True):
        for ax, series, ylabel in (
            (row[0], chain_series(report, model), "us, linears as the model runs them"),
            (row[1], ratio_series(report, model), "time(M) / time(1), per linear"),
        ):
            for impl, points in series.items():
                dashed = impl.startswith(("bf16", "humming", "torch"))
                ax.plot(*zip(*points, strict=True), "--" if dashed else "-", marker="o", ms=3,
                        label=impl)  # fmt: skip
            if ax is row[1]:
                ax.axhline(1.6, color="gray", lw=0.8, ls=":", label="W4A16 goal: 1.6 at M = 64")
                ax.set_ylim(0.8, RATIO_TOP)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tokens verified at once (M)")
            ax.set_ylabel(ylabel)
            ax.set_title(names.get(model, model))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, ncol=2)
    meta = report["meta"]
    fig.suptitle(f"Quantized linears vs tokens: {meta['card']}, {meta['date']}, commit "
                 f"{meta['commit']} (bench/kernel_perf.py)", fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", type=Path, help="a kernel_perf.json")
    ap.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = ap.parse_args()
    if not args.report.is_file():
        raise SystemExit(f"no such report: {args.report}")
    plot(json.loads(args.report.read_text()), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
