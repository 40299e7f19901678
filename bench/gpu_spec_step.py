"""What one speculative step costs on the GPU, with and without CUDA graphs (Llama-3-8B
shape).

Per target format, after a 512-token prefix: the one-token decoding step (autoregressive
decoding's cost per token), the draft and the verification of what was drafted, each the
median wall time of --reps synchronized calls, for each drafter:

    eagle2         an EAGLE head drafts the engine's default tree (head sync, expand, rerank)
    eagle2-frspec  the same over a 32k-token drafting vocabulary (FR-Spec: the head's
                   lm_head multiplies by 32k rows instead of 128k)
    sps            a Llama-3.2-1B-shaped draft model drafts a chain of the engine's default
                   length (one-token steps of its own)

Random weights and heads: the trees and chains have the shape these drafters draft, the
acceptance does not, so this measures cost, not speed-up (HierSpec's cost depends on its
inner acceptance, so it is left out). `break-even tau` is the mean accepted length (tokens
per step) above which the speculative step beats autoregressive decoding:
(draft + verify) / step.

    python bench/gpu_spec_step.py --out bench/results [--formats w4a16-g128,bf16]
        [--drafters eagle2,eagle2-frspec,sps]

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
from specquant.engine.runner import ModelRunner
from specquant.io.loader import LoadedModel
from specquant.spec.drafters.base import DraftRequest
from specquant.spec.drafters.draft_model import DraftModelDrafter
from specquant.spec.drafters.eagle import EagleDrafter
from specquant.spec.factory import build_generator

PREFIX = 512
DRAFTERS = ["eagle2", "eagle2-frspec", "sps"]
FRSPEC_VOCAB = 32768
LLAMA32_1B = {**LLAMA3_8B, "hidden_size": 2048, "intermediate_size": 8192,
              "num_hidden_layers": 16, "tie_word_embeddings": True}  # fmt: skip


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


def measure(loaded: LoadedModel, drafter_name: str, graphs: bool, reps: int,
            draft_model: Any = None) -> dict[str, Any]:  # fmt: skip
    engine = EngineConfig(max_seq_len=2048, cuda_graphs=graphs)
    if drafter_name == "sps":
        gen = build_generator(loaded, engine, SpecConfig(method="ar"))
        spec = SpecConfig(method="sps")
        draft_runner = ModelRunner(draft_model, gen.max_seq_len + 1, cuda_graphs=graphs)
        gen.drafter = DraftModelDrafter(draft_runner, spec.draft_length)
    else:
        gen = build_generator(loaded, engine, SpecConfig(method="eagle2", eagle="random"))
        if drafter_name == "eagle2-frspec":
            d = gen.drafter
            assert isinstance(d, EagleDrafter)
            vocab = torch.arange(FRSPEC_VOCAB, device=gen.runner.device)
            gen.drafter = EagleDrafter(d.head, gen.runner, depth=d.depth, topk=d.topk,
                                       tree_size=d.tree_size, vocab_ids=vocab,
                                       cuda_graphs=graphs)  # fmt: skip
    runner, drafter = gen.runner, gen.drafter
    assert drafter is not None
    runner.sync(list(range(100, 100 + PREFIX)))
    root = 7
    req = DraftRequest(runner, root, SamplingParams(), None, 64)
    tree = drafter.propose(req)
    token = torch.tensor([root], device=runner.device)
    return dict(
        drafter=drafter_name, graphs=graphs, tree_size=tree.size,
        step_ms=median_ms(lambda: runner.run(token), reps),
        draft_ms=median_ms(lambda: drafter.propose(req), reps),
        verify_ms=median_ms(
            lambda: runner.run(tree.tokens, block_mask=tree.mask, depth=tree.depth), reps
        ),
    )  # fmt: skip


def markdown(report: dict[str, Any]) -> list[str]:
    md = [
        "# One speculative step on the GPU: draft, verify, and the decoding step it replaces",
        "",
        f"{gpu_run_where(report['meta'])}. Llama-3-8B shape, random weights (RTN for the "
        "quantized formats), a random EAGLE head in the model's dtype and a random "
        f"Llama-3.2-1B-shaped bf16 draft model for SpS; {PREFIX}-token "
        "prefix; the engine's default tree for CUDA; wall milliseconds, median of "
        f"{report['reps']} synchronized calls. Reproduce: `python bench/gpu_spec_step.py`.",
        "",
        "| format | drafter | CUDA graphs | tokens verified | decoding step | draft | verify "
        "| break-even tau |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        tau = (r["draft_ms"] + r["verify_ms"]) / r["step_ms"]
        md.append(f"| {r['format']} | {r.get('drafter', 'eagle2')} | "
                  f"{'yes' if r['graphs'] else 'no'} | {r['tree_size']} | "
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
    ap.add_argument("--drafters", default=",".join(DRAFTERS))
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--commit", default=None, help="the checkout's name (default: git HEAD)")
    args = ap.parse_args()
    cfg = ModelConfig.from_hf(LLAMA3_8B)
    report: dict[str, Any] = dict(meta=gpu_run_meta(args.commit), reps=args.reps, rows=[])
    drafters = args.drafters.split(",")
    draft_model = None
    if "sps" in drafters:  # in bf16, whatever the target's format
        draft_model = random_model(ModelConfig.from_hf(LLAMA32_1B))
    for fmt in args.formats.split(","):
        model = random_model(cfg, fmt)
        loaded = LoadedModel(model, cfg, None, Path(f"random-llama3-8b-{fmt}"))
        for name in drafters:
            for graphs in (True, False):
                row = measure(loaded, name, graphs, args.reps, draft_model)
                report["rows"].append(dict(format=fmt, **row))
                write_report(args.out / "gpu_spec_step.json", report, markdown(report))
        del loaded, model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
