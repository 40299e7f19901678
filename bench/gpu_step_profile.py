"""Where one decoding step's GPU time goes, Llama-3-8B shape with random weights, batch 1.

Per format: the time of one graphed step (CUDA events over replays of the step a 128-token
prefix needs), and torch.profiler's GPU time per kernel over a few eager steps at the same
position, grouped by kernel name (top entries), next to the format's HBM roofline per step.

    python bench/gpu_step_profile.py --out bench/results [--formats w4a16-g128,bf16]
    python bench/gpu_step_profile.py --tokens 2   # a graphed 2-token block (a verification)

Writes gpu_step_profile.json and .md.
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path
from typing import Any

import torch

from common import copy_bandwidth_gbs, gpu_run_meta, gpu_run_where, write_report
from gpu_decode import step_bytes
from gpu_eager import LLAMA3_8B, random_model
from specquant.config import ModelConfig
from specquant.engine.runner import ModelRunner

STEPS = 5


def profile(fmt: str, bw_gbs: float, tokens: int = 1) -> dict[str, Any]:
    cfg = ModelConfig.from_hf(LLAMA3_8B)
    model = random_model(cfg, fmt)
    runner = ModelRunner(model, 1024, cuda_graphs=True)
    runner.sync(list(range(100, 228)))
    token = torch.arange(5, 5 + tokens, device="cuda")
    n = runner.length
    assert runner.graphs is not None
    graphs, run = runner.graphs, runner.run

    def graphed_step() -> Any:
        if tokens == 1:
            return graphs.step(token, n)
        return graphs.block(token, n, None, None)

    for _ in range(3):
        graphed_step()  # capture, warm
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(50):
        graphed_step()
    end.record()
    torch.cuda.synchronize()
    graphed_ms = start.elapsed_time(end) / 50
    graphed = kernel_times(graphed_step)
    runner.graphs = None  # eager steps from here on
    for _ in range(2):
        run(token)
    eager = kernel_times(lambda: run(token))
    roof_ms = step_bytes(model) / (bw_gbs * 1e6)
    del runner, model
    torch.cuda.empty_cache()
    return dict(
        format=fmt, tokens=tokens, graphed_ms=graphed_ms,
        graphed_gpu_ms=sum(k["ms"] for k in graphed),
        eager_gpu_ms=sum(k["ms"] for k in eager), roofline_ms=roof_ms,
        kernels=graphed[:15], eager_kernels=eager[:15],
    )  # fmt: skip


def kernel_times(step: Any) -> list[dict[str, Any]]:
    """torch.profiler's GPU time per kernel name over STEPS calls of `step`, ms per step,
    largest first (kernels replayed from a CUDA graph are traced too)."""
    acts = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(STEPS):
            step()
        torch.cuda.synchronize()
    per_kernel: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[e.name][0] += e.device_time / 1e3 / STEPS
            per_kernel[e.name][1] += 1
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])
    return [dict(name=k[:90], ms=v[0], launches=v[1] // STEPS) for k, v in top]


def markdown(report: dict[str, Any]) -> list[str]:
    m = report["meta"]
    md = [
        "# One decoding step's GPU time: Llama-3-8B shape, random weights, batch 1",
        "",
        f"{gpu_run_where(m)}; copy bandwidth {report['bw_gbs']:.0f} GB/s. The step at position "
        f"128. `graphed`: CUDA events over 50 replays; kernels: torch.profiler over {STEPS} "
        "steps, GPU time per step (a graphed step's kernels are traced inside its replays). "
        "Reproduce: `python bench/gpu_step_profile.py`.",
    ]
    for r in report["rows"]:
        md += [
            "",
            f"## {r['format']}, {r.get('tokens', 1)} token(s): graphed step "
            f"{r['graphed_ms']:.3f} ms (its kernels "
            f"{r['graphed_gpu_ms']:.3f} ms), eager step's kernels {r['eager_gpu_ms']:.3f} ms, "
            f"roofline {r['roofline_ms']:.3f} ms",
        ]
        for key, title in (("kernels", "graphed"), ("eager_kernels", "eager")):
            md += ["", f"{title}:", "", "| kernel | ms per step | launches per step |",
                   "|---|---|---|"]  # fmt: skip
            md += [f"| `{k['name']}` | {k['ms']:.3f} | {k['launches']} |" for k in r[key]]
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--formats", default="w4a16-g128,bf16")
    ap.add_argument("--tokens", default="1", help="comma-separated block sizes: 1 is a "
                    "decoding step, more a graphed block (verification)")  # fmt: skip
    ap.add_argument("--commit", default=None, help="the checkout's name (default: git HEAD)")
    args = ap.parse_args()
    report: dict[str, Any] = dict(meta=gpu_run_meta(args.commit), bw_gbs=copy_bandwidth_gbs(),
                                  rows=[])  # fmt: skip
    for fmt in args.formats.split(","):
        for t in (int(v) for v in args.tokens.split(",")):
            report["rows"].append(profile(fmt, report["bw_gbs"], t))
        write_report(args.out / "gpu_step_profile.json", report, markdown(report))


if __name__ == "__main__":
    main()
