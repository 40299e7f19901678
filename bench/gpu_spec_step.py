"""What one EAGLE-2 step costs on the GPU, with and without CUDA graphs (Llama-3-8B shape).

Per target format, after a 512-token prefix: the one-token decoding step (autoregressive
decoding's cost per token), the EAGLE-2 draft (the head syncs its cache, expands the tree,
reranks it) and the verification of the drafted tree by the target, each the median wall
time of --reps synchronized calls. Random weights and a random head: the trees are the
shape EAGLE-2 drafts (depth, top-k and size of the engine's defaults), the acceptance is
not, so this measures cost, not speed-up. `break-even tau` is the mean accepted length
(tokens per step) above which the speculative step beats autoregressive decoding:
(draft + verify) / step.

    python bench/gpu_spec_step.py --out bench/results [--formats w4a16-g128,bf16]

Writes gpu_spec_step.json and .md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from common import gpu_run_meta, gpu_run_where, write_report
from gpu_eager import LLAMA3_8B, random_model
from specquant.config import EngineConfig, ModelConfig, SamplingParams, SpecConfig
from specquant.io.loader import LoadedModel
from specquant.quant.model import quantize_model
from specquant.quant.spec import get_format
from specquant.spec.drafters.base import DraftRequest
from specquant.spec.factory import build_generator

PREFIX = 512


def median_ms(fn: Callable[[], Any], reps: int) -> float:
    fn()  # compiles, captures
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(loaded: LoadedModel, graphs: bool, reps: int) -> dict[str, Any]:
    gen = build_generator(loaded, EngineConfig(max_seq_len=2048, cuda_graphs=graphs),
                          SpecConfig(method="eagle2", eagle="random"))  # fmt: skip
    runner, drafter = gen.runner, gen.drafter
    assert drafter is not None
    runner.sync(list(range(100, 100 + PREFIX)))
    root = 7
    req = DraftRequest(runner, root, SamplingParams(), None, 64)
    tree = drafter.propose(req)
    token = torch.tensor([root], device=runner.device)
    return dict(
        graphs=graphs, tree_size=tree.size,
        step_ms=median_ms(lambda: runner.run(token), reps),
        draft_ms=median_ms(lambda: drafter.propose(req), reps),
        verify_ms=median_ms(
            lambda: runner.run(tree.tokens, block_mask=tree.mask, depth=tree.depth), reps
        ),
    )  # fmt: skip


def markdown(report: dict[str, Any]) -> list[str]:
    md = [
        "# One EAGLE-2 step on the GPU: draft, verify, and the decoding step it replaces",
        "",
        f"{gpu_run_where(report['meta'])}. Llama-3-8B shape, random weights (RTN for the "
        f"quantized formats) and a random EAGLE head in the model's dtype; {PREFIX}-token "
        "prefix; the engine's default tree for CUDA; wall milliseconds, median of "
        f"{report['reps']} synchronized calls. Reproduce: `python bench/gpu_spec_step.py`.",
        "",
        "| format | CUDA graphs | tree | decoding step | draft | verify | break-even tau |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        tau = (r["draft_ms"] + r["verify_ms"]) / r["step_ms"]
        md.append(f"| {r['format']} | {'yes' if r['graphs'] else 'no'} | {r['tree_size']} | "
                  f"{r['step_ms']:.2f} | {r['draft_ms']:.2f} | {r['verify_ms']:.2f} | "
                  f"{tau:.2f} |")  # fmt: skip
    md += ["", "break-even tau: (draft + verify) / decoding step, the mean accepted length a "
           "drafter must reach for the speculative step to beat autoregressive decoding "
           "(EAGLE-2's on our SmolLM2 head: 3-4, `acceptance.md`)."]  # fmt: skip
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--formats", default="w4a16-g128,bf16")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--commit", default=None, help="the checkout's name (default: git HEAD)")
    args = ap.parse_args()
    cfg = ModelConfig.from_hf(LLAMA3_8B)
    report: dict[str, Any] = dict(meta=gpu_run_meta(args.commit), reps=args.reps, rows=[])
    for fmt in args.formats.split(","):
        model = random_model(cfg)
        if fmt != "bf16":
            quantize_model(model, get_format(fmt))
        model.prepare_kernels()
        loaded = LoadedModel(model, cfg, None, Path(f"random-llama3-8b-{fmt}"))
        for graphs in (True, False):
            report["rows"].append(dict(format=fmt, **measure(loaded, graphs, args.reps)))
            write_report(args.out / "gpu_spec_step.json", report, markdown(report))
        del loaded, model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
