"""CPU decode speed: specquant vs transformers `generate` on SmolLM2-135M-Instruct (GGUF).

Same prompts (Spec-Bench: summarization, RAG, coding, ...), same dtype, same number of new
tokens, measured in the same process. Each (system, prompt) pair runs `--runs` times; the
report gives medians. Decode tokens/s counts the tokens after the first one over the time
after the first token (prefill excluded); end-to-end tokens/s includes prefill.

    python bench/cpu_decode.py --runs 3 --new-tokens 128 --out bench/results/cpu_decode.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import specquant

# isort: split
import torch

from common import git_commit
from specquant.config import GenerationConfig
from specquant.train.prompts import default_data_dir

CATEGORIES = ("summarization", "rag", "coding", "qa", "translation", "math_reasoning")


def spec_bench_prompts(path: Path, per_category: int = 1) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out = []
    for cat in CATEGORIES:
        picked = [r for r in rows if r["category"] == cat][:per_category]
        out += [{"category": cat, "prompt": r["turns"][0]} for r in picked]
    return out


class _FirstTokenClock:
    """transformers streamer that records when the first new token arrives."""

    def __init__(self) -> None:
        self.calls = 0
        self.first: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 2:  # call 1 is the prompt
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def run_specquant(gen: Any, ids: list[int], n: int) -> dict[str, float]:
    gen.reset()  # no prefix reuse between runs: measure a cold prompt
    t0 = time.perf_counter()
    out = gen.generate(ids, generation=GenerationConfig(max_new_tokens=n, ignore_eos=True))
    total = time.perf_counter() - t0
    assert out.stats.new_tokens == n
    return {
        "decode_tok_s": out.stats.tokens_per_s,
        "e2e_tok_s": n / total,
        "prefill_ms": out.stats.prefill_ms,
    }


def run_transformers(model: Any, ids: list[int], n: int) -> dict[str, float]:
    clock = _FirstTokenClock()
    t0 = time.perf_counter()
    out = model.generate(
        torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0, streamer=clock
    )
    t1 = time.perf_counter()
    got = out.shape[1] - len(ids)
    assert got == n and clock.first is not None, got
    return {
        "decode_tok_s": (n - 1) / (t1 - clock.first),
        "e2e_tok_s": n / (t1 - t0),
        "prefill_ms": (clock.first - t0) * 1e3,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--per-category", type=int, default=1)
    ap.add_argument(
        "--data", type=Path, default=None, help="Spec-Bench question.jsonl (default: found)"
    )
    ap.add_argument("--out", type=Path, default=Path("bench/results/cpu_decode.json"))
    args = ap.parse_args()
    if args.data is None:
        args.data = default_data_dir() / "spec_bench" / "question.jsonl"

    from transformers import AutoModelForCausalLM

    gen = specquant.load(device="cpu", dtype="float32", max_seq_len=4096)
    path = gen.loaded.path
    hf = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    hf.generation_config.eos_token_id = None  # always generate exactly --new-tokens

    prompts = spec_bench_prompts(args.data, args.per_category)
    rows = []
    for i, p in enumerate(prompts):
        ids = gen.encode(p["prompt"], chat=True)
        run_specquant(gen, ids, 8)  # warm-up
        run_transformers(hf, ids, 8)
        res: dict[str, list[dict[str, float]]] = {"specquant": [], "transformers": []}
        for _ in range(args.runs):  # interleave so drift hits both systems alike
            res["specquant"].append(run_specquant(gen, ids, args.new_tokens))
            res["transformers"].append(run_transformers(hf, ids, args.new_tokens))
        row: dict[str, Any] = {"category": p["category"], "prompt_tokens": len(ids)}
        for system, runs in res.items():
            for key in ("decode_tok_s", "e2e_tok_s", "prefill_ms"):
                row[f"{system}_{key}"] = statistics.median(r[key] for r in runs)
        rows.append(row)
        print(
            f"[{i + 1}/{len(prompts)}] {p['category']:<15} {len(ids):>5} tok  "
            f"decode {row['specquant_decode_tok_s']:.1f} vs {row['transformers_decode_tok_s']:.1f}"
            f"  e2e {row['specquant_e2e_tok_s']:.1f} vs {row['transformers_e2e_tok_s']:.1f} tok/s",
            flush=True,
        )
    summary = {
        key: statistics.median(r[f"specquant_{key}"] / r[f"transformers_{key}"] for r in rows)
        for key in ("decode_tok_s", "e2e_tok_s")
    }
    report = {
        "benchmark": "cpu_decode",
        "model": path.name,
        "dtype": "float32",
        "new_tokens": args.new_tokens,
        "runs": args.runs,
        "date": time.strftime("%Y-%m-%d"),
        "commit": git_commit(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "linear_kernel": gen.model.lm_head.kernel_name,
        "rows": rows,
        "median_speedup": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"median speedup over transformers: decode {summary['decode_tok_s']:.2f}x, "
        f"end-to-end {summary['e2e_tok_s']:.2f}x  -> {args.out}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
