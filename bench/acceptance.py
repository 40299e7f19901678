"""Acceptance report: mean accepted length tau per method on MT-Bench and Spec-Bench.

Greedy decoding, SmolLM2-135M-Instruct as target (the embedded default unless --model),
first turns with the chat template. tau is the mean over all verification steps of the
accepted length, bonus token included (1 for autoregressive decoding). Tokens/s is
reported too, with the device named; greedy tau does not depend on the device.

    python bench/acceptance.py --eagle drafters/smollm2-eagle --draft drafters/smollm2-draft \
        --draft-eagle drafters/smollm2-draft-eagle --per-category 10 \
        --out bench/results/acceptance.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import specquant  # noqa: F401

# isort: split
import torch

from common import git_commit
from specquant.config import EAGLE_TREE_PAPER, EngineConfig, GenerationConfig, SpecConfig
from specquant.io.loader import load_checkpoint
from specquant.spec.factory import build_generator
from specquant.train.prompts import default_data_dir

SPEC_BENCH_ONLY = ("translation", "summarization", "qa", "math_reasoning", "rag")


def questions(data: Path, per_category: int) -> list[dict[str, Any]]:
    rows = []
    mt = [json.loads(x) for x in (data / "mt_bench" / "question.jsonl").read_text().splitlines()]
    taken: dict[str, int] = {}
    for q in mt:  # the file is sorted by category: take the first few of each
        if taken.get(q["category"], 0) < per_category:
            taken[q["category"]] = taken.get(q["category"], 0) + 1
            rows.append({"bench": "mt_bench", "category": q["category"], "prompt": q["turns"][0]})
    sb = [json.loads(x) for x in (data / "spec_bench" / "question.jsonl").read_text().splitlines()]
    for cat in SPEC_BENCH_ONLY:
        for q in [r for r in sb if r["category"] == cat][:per_category]:
            rows.append({"bench": "spec_bench", "category": cat, "prompt": q["turns"][0]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--eagle", default=None)
    ap.add_argument("--draft", default=None)
    ap.add_argument("--draft-eagle", default=None)
    ap.add_argument("--per-category", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--methods", nargs="*", default=["ar", "eagle2", "sps", "hierspec"])
    ap.add_argument(
        "--data", type=Path, default=None, help="shared/data (default: $SPECQUANT_DATA or found)"
    )
    ap.add_argument("--format", default="bf16/fp32", help="label of the target's format")
    ap.add_argument("--out", type=Path, default=Path("bench/results/acceptance.json"))
    args = ap.parse_args()
    if args.data is None:
        args.data = default_data_dir()

    from specquant.engine.generator import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    loaded = load_checkpoint(args.model, device, resolve_dtype(args.dtype, device))
    engine = EngineConfig(device=str(device), dtype=args.dtype, max_seq_len=2048)
    depth, topk, size = EAGLE_TREE_PAPER
    specs = {
        "ar": SpecConfig(),
        "eagle2": SpecConfig(  # the paper's tree on every device, so CPU and GPU agree
            method="eagle2", eagle=args.eagle, depth=depth, tree_topk=topk, tree_size=size
        ),
        "sps": SpecConfig(method="sps", draft=args.draft),
        "hierspec": SpecConfig(method="hierspec", draft=args.draft, draft_eagle=args.draft_eagle),
    }
    qs = questions(args.data, args.per_category)
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens)
    results: dict[str, Any] = {}
    reference: dict[int, list[int]] = {}
    for method in args.methods:
        gen = build_generator(loaded, engine, specs[method])
        per_cat: dict[str, dict[str, list[float]]] = {}
        mismatches = 0
        t0 = time.perf_counter()
        for i, q in enumerate(qs):
            gen.reset()
            out = gen.generate(q["prompt"], generation=cfg)
            if method == "ar":
                reference[i] = out.token_ids
            elif reference and out.token_ids != reference[i]:
                mismatches += 1
            key = f"{q['bench']}/{q['category']}"
            slot = per_cat.setdefault(key, {"accept": [], "tok_s": [], "inner": []})
            slot["accept"].extend(out.stats.accept_lengths)
            slot["tok_s"].append(out.stats.tokens_per_s)
            slot["inner"].extend(out.stats.intermediate_accept_lengths)
        summary = {}
        for key, v in sorted(per_cat.items()):
            summary[key] = {
                "tau": statistics.fmean(v["accept"]),
                "tok_s": statistics.median(v["tok_s"]),
                "inner_tau": statistics.fmean(v["inner"]) if v["inner"] else None,
            }
        for bench in ("mt_bench", "spec_bench"):
            acc = [a for k, v in per_cat.items() if k.startswith(bench) for a in v["accept"]]
            inner = [a for k, v in per_cat.items() if k.startswith(bench) for a in v["inner"]]
            summary[f"{bench}/ALL"] = {
                "tau": statistics.fmean(acc),
                "inner_tau": statistics.fmean(inner) if inner else None,
            }
        results[method] = {
            "categories": summary,
            "greedy_mismatches_vs_ar": mismatches,
            "wall_s": time.perf_counter() - t0,
        }
        print(
            json.dumps({method: {k: v for k, v in summary.items() if k.endswith("ALL")}}),
            flush=True,
        )
    commit = git_commit()
    report = {
        "benchmark": "acceptance",
        "target": loaded.path.name,
        "format": args.format,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "dtype": args.dtype,
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit,
        "max_new_tokens": args.max_new_tokens,
        "questions": len(qs),
        "settings": {m: specs[m].__dict__ for m in args.methods},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


def markdown(report: dict[str, Any]) -> str:
    """Per-category tau table (one column per method) for one target format."""
    res = report["results"]
    methods = [m for m in ("eagle2", "sps", "hierspec") if m in res]
    cats = sorted({c for m in methods for c in res[m]["categories"]})
    head = " | ".join(f"{m} tau" for m in methods)
    lines = [
        f"## {report['target']} ({report['format']}), {report['device']}, "
        f"{report['questions']} questions, {report['max_new_tokens']} new tokens, "
        f"commit {report['commit']}, {report['date']}",
        "",
        f"| category | {head} | hierspec inner tau |"
        if "hierspec" in res
        else f"| category | {head} |",
        "|---" * (len(methods) + 1 + ("hierspec" in res)) + "|",
    ]
    for c in cats:
        cells = [f"{res[m]['categories'].get(c, {}).get('tau', float('nan')):.2f}" for m in methods]
        if "hierspec" in res:
            inner = res["hierspec"]["categories"].get(c, {}).get("inner_tau")
            cells.append(f"{inner:.2f}" if inner else "-")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    bad = {m: res[m]["greedy_mismatches_vs_ar"] for m in methods}
    lines += ["", f"Greedy outputs differing from autoregressive decoding: {bad}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
