"""Speculation on quantized targets on the CPU: the embedded SmolLM2 dense (float32) and
RTN-quantized to W8A8 and W4A8, each decoded plainly and with its shipped drafters (EAGLE-2
with the CPU tree and the paper's, SpS), in the same run.

On a 2-core CPU a float32 target verifies a tree at several times the cost of one step, so
EAGLE-2 barely breaks even (cpu_tree.md). An int8 target's GEMMs (torch._int_mm) make the
verification cheaper relative to the step, which is where speculation starts to pay. Every
speculative run is checked against its target's own greedy tokens.

    python bench/cpu_spec_quant.py --out bench/results/cpu_spec_quant.json
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
from specquant.config import EngineConfig, GenerationConfig, SpecConfig
from specquant.engine.generator import Generator
from specquant.quant.model import quantize_model
from specquant.quant.spec import get_format
from specquant.spec.factory import build_generator
from specquant.train.prompts import default_data_dir

TARGETS = ["dense", "w8a8", "w4a8"]
METHODS: list[tuple[str, SpecConfig]] = [
    ("ar", SpecConfig()),
    ("eagle2 (5, 4, 24)", SpecConfig(method="eagle2")),  # the CPU default tree
    ("eagle2 (6, 10, 60)", SpecConfig(method="eagle2", depth=6, tree_topk=10, tree_size=60)),
    ("sps (k = 6)", SpecConfig(method="sps")),
]


def decode(gen: Generator, ids: list[list[int]], n: int) -> dict[str, Any]:
    """Median decode tok/s, mean accept length and every prompt's tokens."""
    cfg = GenerationConfig(max_new_tokens=n, ignore_eos=True)
    gen.generate(ids[0], generation=GenerationConfig(max_new_tokens=8, ignore_eos=True))
    speeds, accepts, tokens = [], [], []
    for one in ids:
        gen.reset()
        out = gen.generate(one, generation=cfg)
        speeds.append(out.stats.tokens_per_s)
        accepts.append(out.stats.mean_accept_length or 1.0)
        tokens.append(out.token_ids)
    return {"tok_s": statistics.median(speeds), "accept": statistics.mean(accepts),
            "tokens": tokens}  # fmt: skip


def target_rows(fmt: str, prompts: list[str], n: int) -> list[dict[str, Any]]:
    engine = EngineConfig(device="cpu", dtype="float32", max_seq_len=2048)
    loaded = specquant.load(device="cpu", dtype="float32", max_seq_len=2048).loaded
    if fmt != "dense":
        quantize_model(loaded.model, get_format(fmt))  # RTN, in place
        loaded.model.prepare_kernels()
    rows, want = [], None
    for name, spec in METHODS:
        gen = build_generator(loaded, engine, spec)
        ids = [gen.encode(p, chat=True) for p in prompts]
        got = decode(gen, ids, n)
        tokens = got.pop("tokens")
        want = tokens if want is None else want
        rows.append({"target": fmt, "method": name, **got, "same_tokens": tokens == want})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(report: dict[str, Any]) -> list[str]:
    md = [
        "# Speculation on quantized targets on the CPU",
        "",
        f"{cpu_run_text(report)} Embedded SmolLM2-135M-Instruct, float32 activations, dense "
        "or RTN-quantized in the run; its shipped drafters; greedy, "
        f"{report['new_tokens']} new tokens, {report['prompts']} Spec-Bench prompts (one per "
        "category); median decode tok/s, mean accept length. `same tokens`: every prompt's "
        "output equals the target's own autoregressive output. Reproduce: "
        "`python bench/cpu_spec_quant.py`.",
        "",
        "| target | method | tok/s | vs its AR | vs dense AR | accept length | same tokens |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = report["rows"]
    dense_ar = next(r["tok_s"] for r in rows if r["target"] == "dense" and r["method"] == "ar")
    for r in rows:
        ar = next(x["tok_s"] for x in rows if x["target"] == r["target"] and x["method"] == "ar")
        md.append(
            f"| {r['target']} | {r['method']} | {r['tok_s']:.1f} | {r['tok_s'] / ar:.2f}x | "
            f"{r['tok_s'] / dense_ar:.2f}x | {r['accept']:.2f} | "
            f"{'yes' if r['same_tokens'] else 'NO'} |"
        )
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-category", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--targets", nargs="*", default=TARGETS, choices=TARGETS)
    ap.add_argument("--data", type=Path, default=None, help="Spec-Bench question.jsonl")
    ap.add_argument("--out", type=Path, default=Path("bench/results/cpu_spec_quant.json"))
    args = ap.parse_args()
    data = args.data or default_data_dir() / "spec_bench" / "question.jsonl"
    prompts = [p["prompt"] for p in spec_bench_prompts(data, args.per_category)]
    rows = [r for fmt in args.targets for r in target_rows(fmt, prompts, args.new_tokens)]
    report = {"benchmark": "cpu_spec_quant", **cpu_run_meta(), "prompts": len(prompts),
              "new_tokens": args.new_tokens, "rows": rows}  # fmt: skip
    write_report(args.out, report, markdown(report))


if __name__ == "__main__":
    main()
