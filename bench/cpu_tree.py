"""EAGLE-2 tree size on the CPU: decode speed of the embedded SmolLM2 with its shipped EAGLE
head for several (depth, top-k, tree size), against plain decoding in the same run.

On a 2-core CPU verification is compute-bound (a 60-token tree costs several one-token
steps), so the paper's tree (6, 10, 60) gives back what it gains. This picks the CPU default
(config.EAGLE_TREE_CPU).

    python bench/cpu_tree.py --per-category 2 --new-tokens 64 --out bench/results/cpu_tree.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import specquant

# isort: split

from common import cpu_run_meta, cpu_run_text, write_report
from cpu_decode import spec_bench_prompts
from specquant.config import GenerationConfig, SpecConfig
from specquant.train.prompts import default_data_dir

TREES = [(6, 10, 60), (5, 4, 24), (4, 3, 12), (5, 2, 8)]  # (depth, top-k, tree size)


def run(spec: SpecConfig, prompts: list[str], n: int) -> dict[str, Any]:
    gen = specquant.load(device="cpu", dtype="float32", max_seq_len=2048, spec=spec)
    ids = [gen.encode(p, chat=True) for p in prompts]
    gen.generate(ids[0], generation=GenerationConfig(max_new_tokens=8, ignore_eos=True))
    speeds, accepts = [], []
    for one in ids:
        gen.reset()
        out = gen.generate(one, generation=GenerationConfig(max_new_tokens=n, ignore_eos=True))
        speeds.append(out.stats.tokens_per_s)
        accepts.append(out.stats.mean_accept_length or 1.0)
    return {"tok_s": statistics.median(speeds), "accept": statistics.mean(accepts)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-category", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--data", type=Path, default=None, help="Spec-Bench question.jsonl")
    ap.add_argument("--out", type=Path, default=Path("bench/results/cpu_tree.json"))
    args = ap.parse_args()
    data = args.data or default_data_dir() / "spec_bench" / "question.jsonl"
    prompts = [p["prompt"] for p in spec_bench_prompts(data, args.per_category)]
    rows = [{"method": "ar", **run(SpecConfig(), prompts, args.new_tokens)}]
    print(json.dumps(rows[-1]), flush=True)
    for depth, topk, size in TREES:
        spec = SpecConfig(method="eagle2", depth=depth, tree_topk=topk, tree_size=size)
        rows.append({"method": "eagle2", "depth": depth, "topk": topk, "tree_size": size,
                     **run(spec, prompts, args.new_tokens)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    ar = rows[0]["tok_s"]
    report = {
        "benchmark": "cpu_tree",
        **cpu_run_meta(),
        "prompts": len(prompts),
        "new_tokens": args.new_tokens,
        "rows": rows,
    }
    md = [
        "# EAGLE-2 tree size on the CPU",
        "",
        f"{cpu_run_text(report)} Embedded SmolLM2-135M-Instruct (float32) with its shipped EAGLE "
        f"head, greedy, {args.new_tokens} new tokens, {len(prompts)} Spec-Bench prompts "
        f"({args.per_category} per category); median decode tok/s, mean accept length. "
        "Reproduce: `python bench/cpu_tree.py`.",
        "",
        "| method | depth | top-k | tree size | tok/s | vs plain | accept length |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['method']} | {r.get('depth', '-')} | {r.get('topk', '-')} | "
            f"{r.get('tree_size', '-')} | {r['tok_s']:.1f} | {r['tok_s'] / ar:.2f}x | "
            f"{r['accept']:.2f} |"
        )
    write_report(args.out, report, md)


if __name__ == "__main__":
    main()
