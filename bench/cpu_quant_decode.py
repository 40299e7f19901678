"""Quantized SmolLM2 decoding on the CPU: the prepared CPU kernels against the reference.

Each format quantizes the embedded SmolLM2-135M-Instruct by RTN (float32 activations), then
decodes the same Spec-Bench prompts greedily with every quantized linear on
`qlinear_reference` (dequantize or float64 integer products per call) and on the
`cpu-prepared` kernels (weights decoded once; torch's int8 GEMM for int8 activations). The
two must produce the same tokens; the report gives median decode tokens/s, the dense float32
model measured in the same run as the baseline.

    python bench/cpu_quant_decode.py --new-tokens 48 --out bench/results/cpu_quant_decode.json
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
from specquant.config import GenerationConfig
from specquant.layers.linear import QLinear
from specquant.quant.model import quantize_model
from specquant.quant.spec import get_format
from specquant.train.prompts import default_data_dir

FORMATS = ["w8a8", "w4a8", "w4a16-g64", "w4a8-g64", "fp8"]
KERNELS = ["reference", "cpu-prepared"]


def decode(gen: Any, prompts: list[list[int]], n: int) -> tuple[float, list[list[int]]]:
    """Median decode tokens/s over the prompts, and the tokens of each."""
    speeds, tokens = [], []
    for ids in prompts:
        gen.reset()
        out = gen.generate(ids, generation=GenerationConfig(max_new_tokens=n, ignore_eos=True))
        speeds.append(out.stats.tokens_per_s)
        tokens.append(list(out.token_ids))
    return statistics.median(speeds), tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--formats", nargs="*", default=FORMATS)
    ap.add_argument("--data", type=Path, default=None, help="Spec-Bench question.jsonl")
    ap.add_argument("--out", type=Path, default=Path("bench/results/cpu_quant_decode.json"))
    args = ap.parse_args()
    data = args.data or default_data_dir() / "spec_bench" / "question.jsonl"
    picked = [
        p for p in spec_bench_prompts(data) if p["category"] in ("qa", "coding", "math_reasoning")
    ]

    gen = specquant.load(device="cpu", dtype="float32", max_seq_len=2048)
    prompts = [gen.encode(p["prompt"], chat=True) for p in picked]
    decode(gen, prompts[:1], 4)  # warm-up
    dense, _ = decode(gen, prompts, args.new_tokens)
    print(f"dense float32: {dense:.1f} tok/s", flush=True)
    rows: list[dict[str, Any]] = []
    for name in args.formats:
        gen = specquant.load(device="cpu", dtype="float32", max_seq_len=2048)
        quantize_model(gen.loaded.model, get_format(name))
        row: dict[str, Any] = {"format": name}
        outputs = {}
        for kernel in KERNELS:
            for layer in gen.loaded.model.modules():  # the quantized ones (lm_head stays dense)
                if isinstance(layer, QLinear) and layer.spec is not None:
                    layer.prepare(qlinear_override=kernel)
            decode(gen, prompts[:1], 4)
            row[kernel], outputs[kernel] = decode(gen, prompts, args.new_tokens)
        row["same_tokens"] = outputs["reference"] == outputs["cpu-prepared"]
        row["speedup"] = row["cpu-prepared"] / row["reference"]
        row["vs_dense"] = row["cpu-prepared"] / dense
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {
        "benchmark": "cpu_quant_decode",
        **cpu_run_meta(),
        "new_tokens": args.new_tokens,
        "prompts": [p["category"] for p in picked],
        "dense_float32_tok_s": dense,
        "rows": rows,
    }
    md = [
        "# Quantized SmolLM2 on the CPU: prepared kernels vs the reference",
        "",
        f"{cpu_run_text(report)} RTN-quantized SmolLM2-135M-Instruct, float32 activations, greedy, "
        f"{args.new_tokens} new tokens, median decode tok/s over Spec-Bench prompts "
        f"({', '.join(report['prompts'])}). Dense float32 in the same run: {dense:.1f} tok/s. "
        "Reproduce: `python bench/cpu_quant_decode.py`.",
        "",
        "| format | reference tok/s | cpu-prepared tok/s | speedup | vs dense fp32 | same tokens |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['format']} | {r['reference']:.1f} | {r['cpu-prepared']:.1f} | "
            f"{r['speedup']:.1f}x | {r['vs_dense']:.2f}x | {'yes' if r['same_tokens'] else 'NO'} |"
        )
    write_report(args.out, report, md)


if __name__ == "__main__":
    main()
