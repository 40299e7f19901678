"""Decode-step cost of the shipped intermediate draft model relative to SmolLM2 (same run).

python bench/draft_cost.py --out bench/results/draft_cost.json
python bench/draft_cost.py --random --device cuda --dtype bfloat16 --out ...   # shapes only

`--random` builds both models with random weights from the draft's config (the target with
SmolLM2's 30 layers): timings need shapes, not trained values, and no checkpoint has to
travel to a GPU machine.
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

from common import git_commit
from specquant.config import ModelConfig
from specquant.engine.runner import ModelRunner
from specquant.io.loader import load_checkpoint
from specquant.layers.linear import init_random_
from specquant.models.llama import LlamaModel
from specquant.spec.factory import SHIPPED

TARGET_LAYERS = 30  # SmolLM2-135M


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


def random_pair(
    draft_dir: Path, device: torch.device, dtype: torch.dtype
) -> tuple[LlamaModel, LlamaModel]:
    """SmolLM2-shaped target and the draft (same width, FR-Spec lm_head), random weights."""
    raw = json.loads((draft_dir / "config.json").read_text())
    dense = {k: v for k, v in raw.items() if not k.startswith("specquant_")}
    models = []
    for layers in (TARGET_LAYERS, raw["num_hidden_layers"]):
        cfg = ModelConfig.from_hf({**dense, "num_hidden_layers": layers})
        model = init_random_(LlamaModel(cfg), seed=layers).to(device=device, dtype=dtype)
        models.append(model.eval().requires_grad_(False))
    target, draft = models
    draft.embed_tokens = target.embed_tokens  # borrowed, as the shipped draft does
    draft.restrict_lm_head(torch.arange(int(raw.get("specquant_lm_head_vocab", 0)) or 8192))
    for model in models:
        model.prepare_kernels()
    return target, draft


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default=None, help="target (default: the embedded SmolLM2)")
    ap.add_argument("--draft", default=str(SHIPPED["draft"]), help="draft model directory")
    ap.add_argument("--out", type=Path, default=Path("bench/results/draft_cost.json"))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--random", action="store_true", help="random weights, real shapes")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.random:
        target, draft = random_pair(Path(args.draft), torch.device(args.device), dtype)
    else:
        gen = specquant.load(args.model, device=args.device, dtype=args.dtype, max_seq_len=512)
        target = gen.model
        draft = load_checkpoint(args.draft, gen.device, gen.dtype, shared_with=gen.model).model
    device = target.embed_tokens.weight.device
    target_ms = step_ms(ModelRunner(target, 512), args.steps)
    draft_ms = step_ms(ModelRunner(draft, 512), args.steps)
    params = {
        "target_layers": sum(p.numel() for p in target.layers.parameters()),
        "target_lm_head": target.lm_head.weight.numel(),
        "draft_layers": sum(p.numel() for p in draft.layers.parameters()),
        "draft_lm_head": draft.lm_head.weight.numel(),  # FR-Spec rows only
    }
    where = f"{torch.cuda.get_device_name()}, eager" if device.type == "cuda" else "cpu (2 cores)"
    report = {
        "device": f"{where}, {args.dtype}" + (", random weights" if args.random else ""),
        "draft": Path(args.draft).name,
        "date": time.strftime("%Y-%m-%d"),
        "commit": git_commit(),
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
