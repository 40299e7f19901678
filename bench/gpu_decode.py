"""Decoding on the GPU with and without CUDA graphs, on a Llama-3-8B shape (random weights).

Per format (bf16; W4A16-g128 and W4A16 per channel, RTN of the same random weights), in one
run: greedy decode tokens/s of specquant eager (EngineConfig(cuda_graphs=False)) and with
its one-token steps replayed from CUDA graphs (the default on CUDA), how many leading
tokens the two agree on, and the HBM roofline: the bytes one step reads (every weight but
the embedding table, of which a step reads one row) over the measured copy bandwidth. With
--hf, transformers `generate` with its static cache (compiled) on the bf16 model, last.

    python bench/gpu_decode.py --out bench/results [--hf]
    python bench/gpu_decode.py --render bench/results/gpu_decode.json   # figure only, no GPU

Writes gpu_decode.json, gpu_decode.md and gpu_decode.png (rewritten after each format, so a
run cut short keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch

from common import copy_bandwidth_gbs, gpu_run_meta, gpu_run_where, pyplot, write_report
from gpu_eager import LLAMA3_8B, hf_tok_s, random_model
from specquant.config import EngineConfig, GenerationConfig, ModelConfig
from specquant.engine.generator import Generator
from specquant.io.loader import LoadedModel
from specquant.models.llama import LlamaModel

FORMATS = ["bf16", "w4a16-g128", "w4a16"]


def step_bytes(model: LlamaModel) -> int:
    """Bytes one decoding step reads: every tensor of the model but the embedding table."""
    seen, total = {model.embed_tokens.weight.data_ptr()}, 0
    for t in model.state_dict().values():
        if t.data_ptr() not in seen:  # tied or shared tensors once
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def decode(gen: Generator, ids: list[int], n: int, runs: int) -> tuple[float, list[int]]:
    """Median decode tokens/s over `runs` generations (after one warm-up) and the tokens."""
    cfg = GenerationConfig(max_new_tokens=n, ignore_eos=True)
    gen.reset()
    gen.generate(ids, generation=cfg)  # compiles kernels, captures the graphs it needs
    rates, tokens = [], []
    for _ in range(runs):
        gen.reset()
        out = gen.generate(ids, generation=cfg)
        rates.append(out.stats.tokens_per_s)
        tokens = out.token_ids
    return statistics.median(rates), tokens


def markdown(report: dict[str, Any]) -> list[str]:
    m = report["meta"]
    md = [
        "# Decoding with CUDA graphs: Llama-3-8B shape, random weights, batch 1",
        "",
        f"{gpu_run_where(m)}; copy bandwidth {report['bw_gbs']:.0f} GB/s (read + write). "
        f"{report['new_tokens']} new tokens after a {report['prompt_tokens']}-token prompt, "
        f"greedy, median of {report['runs']} runs after a warm-up. Reproduce: "
        "`python bench/gpu_decode.py`.",
        "",
        "| format | GB per step | roofline tok/s | eager tok/s | CUDA graphs tok/s | graphs / "
        "eager | graphs % roofline | leading tokens equal |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        md.append(
            f"| {r['format']} | {r['step_gb']:.2f} | {r['roofline_tok_s']:.0f} | "
            f"{r['eager_tok_s']:.1f} | {r['graphs_tok_s']:.1f} | "
            f"{r['graphs_tok_s'] / r['eager_tok_s']:.2f}x | {r['graphs_pct_roofline']:.0f}% | "
            f"{r['leading_equal']}/{report['new_tokens']} |"
        )
    if "hf_static_tok_s" in report:
        md += ["", f"transformers `generate`, static cache (compiled), bf16: "
               f"{report['hf_static_tok_s']:.1f} tok/s in the same run."]  # fmt: skip
    md += [
        "",
        "Eager steps attend over the live prefix (torch SDPA), graphed ones over a "
        "power-of-two window through the decode_attention op (its live length read on the "
        "device): the sums run in different orders, so bf16 logits differ by rounding, and "
        "random weights' nearly flat logits turn that into different greedy tokens after a "
        "few steps. tests/test_cuda_graph.py checks graphed steps against eager ones (fp32 "
        "and bf16 logits, fp32 tokens).",
    ]
    return md


def plot(report: dict[str, Any], out: Path) -> None:
    """Bars per format: eager, CUDA graphs and the HBM roofline (tokens/s), and transformers'
    static-cache generate where the run has it."""
    plt = pyplot()
    rows = report["rows"]
    bars = [("eager_tok_s", "specquant eager"), ("graphs_tok_s", "specquant, CUDA graphs"),
            ("roofline_tok_s", "HBM roofline")]  # fmt: skip
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(bars)
    for i, (key, label) in enumerate(bars):
        pos = [j + (i - (len(bars) - 1) / 2) * width for j in range(len(rows))]
        ax.bar(pos, [r[key] for r in rows], width=width, label=label)
    if "hf_static_tok_s" in report:
        ax.axhline(report["hf_static_tok_s"], color="k", ls="--", lw=1,
                   label="transformers static cache (bf16)")  # fmt: skip
    ax.set_xticks(range(len(rows)), [r["format"] for r in rows])
    ax.set_ylabel("decode tokens/s, batch 1")
    m = report["meta"]
    ax.set_title(f"Llama-3-8B shape, random weights: {m['card']}, {m['date']}, "
                 f"{str(m['commit'])[:7]}", fontsize=9)  # fmt: skip
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--hf", action="store_true", help="also time transformers (static cache)")
    ap.add_argument("--commit", default=None, help="the checkout's name (default: git HEAD)")
    ap.add_argument("--render", type=Path, default=None,
                    help="only draw the figure of an existing gpu_decode.json")  # fmt: skip
    args = ap.parse_args()
    if args.render:
        plot(json.loads(args.render.read_text()), args.render.with_suffix(".png"))
        return
    cfg = ModelConfig.from_hf(LLAMA3_8B)
    ids = list(range(100, 164))
    report: dict[str, Any] = dict(
        meta=gpu_run_meta(args.commit), bw_gbs=copy_bandwidth_gbs(), new_tokens=args.new_tokens,
        runs=args.runs, prompt_tokens=len(ids), rows=[],
    )  # fmt: skip
    out = args.out / "gpu_decode.json"
    for fmt in args.formats.split(","):
        model = random_model(cfg, fmt)
        loaded = LoadedModel(model, cfg, None, Path(f"random-llama3-8b-{fmt}"))
        row: dict[str, Any] = dict(format=fmt, step_gb=step_bytes(model) / 1e9)
        eager, eager_ids = decode(Generator(loaded, EngineConfig(cuda_graphs=False)), ids,
                                  args.new_tokens, args.runs)  # fmt: skip
        graphs, graph_ids = decode(Generator(loaded, EngineConfig(cuda_graphs=True)), ids,
                                   args.new_tokens, args.runs)  # fmt: skip
        pairs = enumerate(zip(eager_ids, graph_ids, strict=True))
        roof = report["bw_gbs"] / row["step_gb"]
        row.update(
            eager_tok_s=eager, graphs_tok_s=graphs, roofline_tok_s=roof,
            graphs_pct_roofline=100 * graphs / roof,
            leading_equal=next((i for i, (a, b) in pairs if a != b), len(eager_ids)),
        )  # fmt: skip
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
        write_report(out, report, markdown(report))
        plot(report, out.with_suffix(".png"))
        del loaded, model
        torch.cuda.empty_cache()
    if args.hf:
        from transformers import LlamaConfig, LlamaForCausalLM

        hf_cfg = LlamaConfig(**{k: v for k, v in LLAMA3_8B.items() if k != "architectures"})
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device("cuda"):
                hf = LlamaForCausalLM(hf_cfg).eval()
        finally:
            torch.set_default_dtype(previous)
        hf.generation_config.eos_token_id = None
        report["hf_static_tok_s"] = hf_tok_s(
            hf, ids, args.new_tokens, args.runs, cache_implementation="static"
        )
        write_report(out, report, markdown(report))
        plot(report, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
