"""Decode-step cost of the shipped intermediate draft model relative to SmolLM2 (same run).

python bench/draft_cost.py --out bench/results/draft_cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import specquant

# isort: split
import torch

from specquant.engine.runner import ModelRunner
from specquant.io.loader import load_checkpoint
from specquant.spec.factory import SHIPPED


def step_ms(runner: ModelRunner, steps: int) -> float:
    runner.reset()
    runner.sync(list(range(100, 164)))  # a 64-token context
    times = []
    tok = torch.tensor([42], device=runner.device)
    for _ in range(steps):
        t0 = time.perf_counter()
        _, hidden = runner.run(tok)
        runner.commit([42], hidden)
        if runner.device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[5:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default=None, help="target (default: the embedded SmolLM2)")
    ap.add_argument("--draft", default=str(SHIPPED["draft"]), help="draft model directory")
    ap.add_argument("--out", type=Path, default=Path("bench/results/draft_cost.json"))
    args = ap.parse_args()
    gen = specquant.load(args.model, device=args.device, dtype="float32", max_seq_len=512)
    draft = load_checkpoint(args.draft, gen.device, gen.dtype, shared_with=gen.model)
    target_ms = step_ms(ModelRunner(gen.model, 512), args.steps)
    draft_ms = step_ms(ModelRunner(draft.model, 512), args.steps)
    params = {
        "target_layers": sum(p.numel() for p in gen.model.layers.parameters()),
        "target_lm_head": gen.model.lm_head.weight.numel(),
        "draft_layers": sum(p.numel() for p in draft.model.layers.parameters()),
        "draft_lm_head": draft.model.lm_head.weight.numel(),  # FR-Spec rows only
    }
    report = {
        "device": (
            f"{torch.cuda.get_device_name()}, float32, eager"
            if gen.device.type == "cuda"
            else "cpu (2 cores), float32"
        ),
        "draft": Path(args.draft).name,
        "date": time.strftime("%Y-%m-%d"),
        "target_step_ms": target_ms,
        "draft_step_ms": draft_ms,
        "ratio": draft_ms / target_ms,
        "params": params,
        "ratio_by_bytes": (params["draft_layers"] + params["draft_lm_head"])
        / (params["target_layers"] + params["target_lm_head"]),
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
