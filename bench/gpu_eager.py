"""GPU eager decoding (no CUDA graphs yet): does the CUDA path work, and how fast is it?

1. SmolLM2-135M-Instruct (the embedded GGUF) on the GPU in fp32 and bf16: greedy tokens vs
   the CPU path's (`--expected`, produced on the CPU by `--write-expected`), and decode
   tokens/s next to transformers `generate` (same device, dtype, prompts) in the same run.
2. A Llama-3-8B-shaped model with random bf16 weights: decode tokens/s next to transformers
   `generate` (static cache) and the HBM roofline from a copy-bandwidth measurement.

    python bench/gpu_eager.py --gguf PATH --expected bench/results/smollm2_cpu_greedy.json \
        --out $OUT/gpu_eager.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import specquant

# isort: split
import torch

from common import copy_bandwidth_gbs, git_commit
from specquant.config import GenerationConfig, ModelConfig
from specquant.engine.generator import Generator
from specquant.io.loader import LoadedModel
from specquant.models.llama import LlamaModel
from specquant.quant.model import quantize_model
from specquant.quant.spec import get_format

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a hash table is.",
    "Give me five tips for staying healthy.",
]
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
}


def random_model(cfg: ModelConfig, fmt: str = "bf16") -> LlamaModel:
    """A model of `cfg` on the GPU in bf16 with N(0, 0.02) weights, built without a CPU copy,
    quantized by RTN to `fmt` unless that is bf16, its kernels prepared."""
    with torch.device("meta"):
        model = LlamaModel(cfg)
    model.to_empty(device="cuda")
    model.to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.eval().requires_grad_(False)
    if fmt != "bf16":
        quantize_model(model, get_format(fmt))
    model.prepare_kernels()
    return model


def ours_tok_s(gen: Generator, ids: list[int], n: int, runs: int) -> tuple[float, list[int]]:
    rates, tokens = [], []
    for _ in range(runs):
        gen.reset()
        out = gen.generate(ids, generation=GenerationConfig(max_new_tokens=n, ignore_eos=True))
        rates.append(out.stats.tokens_per_s)
        tokens = out.token_ids
    return statistics.median(rates), tokens


def hf_tok_s(model: Any, ids: list[int], n: int, runs: int, **kw: Any) -> float:
    """transformers decode tokens/s: (n-1) tokens over the time after the first one."""
    x = torch.tensor([ids], device=model.device)
    rates = []
    for _ in range(runs + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(x, max_new_tokens=1, do_sample=False, pad_token_id=0, **kw)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        out = model.generate(x, max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        assert out.shape[1] - len(ids) == n
        rates.append((n - 1) / ((t2 - t1) - (t1 - t0)))
    return statistics.median(rates[1:])


def smollm2_section(gguf: Path, expected: dict[str, list[int]] | None, n: int, runs: int) -> Any:
    from transformers import AutoModelForCausalLM

    rows = []
    for dtype in ("float32", "bfloat16"):
        gen = specquant.load(gguf, device="cuda", dtype=dtype, max_seq_len=2048)
        hf = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=getattr(torch, dtype)
        ).to("cuda")
        hf.generation_config.eos_token_id = None
        for prompt in PROMPTS:
            ids = gen.encode(prompt, chat=True)
            ours, tokens = ours_tok_s(gen, ids, n, runs)
            theirs = hf_tok_s(hf, ids, n, runs)
            row = {
                "dtype": dtype,
                "prompt": prompt,
                "specquant_tok_s": ours,
                "transformers_tok_s": theirs,
            }
            if expected is not None and dtype == "float32":
                ref = expected[prompt][:n]
                pairs = enumerate(zip(tokens, ref, strict=False))
                # number of leading tokens equal to the CPU run's
                row["greedy_matches_cpu_tokens"] = next((i for i, (a, b) in pairs if a != b), n)
            rows.append(row)
            print(json.dumps(row), flush=True)
        del gen, hf
        torch.cuda.empty_cache()
    return rows


def llama8b_section(n: int, runs: int) -> dict[str, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = ModelConfig.from_hf(LLAMA3_8B)
    model = random_model(cfg)
    gen = Generator(LoadedModel(model, cfg, None, Path("random-llama3-8b")))
    ids = list(range(100, 164))
    ours, _ = ours_tok_s(gen, ids, n, runs)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    del gen, model
    torch.cuda.empty_cache()

    hf_cfg = LlamaConfig(**{k: v for k, v in LLAMA3_8B.items() if k != "architectures"})
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16 directly: no fp32 copy of 8B
    try:
        with torch.device("cuda"):
            hf = LlamaForCausalLM(hf_cfg).eval()
    finally:
        torch.set_default_dtype(previous)
    hf.generation_config.eos_token_id = None  # random weights: never stop early
    theirs_dynamic = hf_tok_s(hf, ids, n, runs)
    theirs_static = hf_tok_s(hf, ids, n, runs, cache_implementation="static")
    bw = copy_bandwidth_gbs(torch.device("cuda"))
    roofline = bw * 1e9 / weight_bytes
    return {
        "weights_gb": weight_bytes / 1e9,
        "copy_bandwidth_gbs": bw,
        "roofline_tok_s": roofline,
        "specquant_eager_tok_s": ours,
        "specquant_pct_roofline": 100 * ours / roofline,
        "transformers_dynamic_tok_s": theirs_dynamic,
        "transformers_static_tok_s": theirs_static,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, default=None)
    ap.add_argument("--expected", type=Path, default=None)
    ap.add_argument("--write-expected", type=Path, default=None, help="CPU: write tokens")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("gpu_eager.json"))
    args = ap.parse_args()

    if args.write_expected:
        gen = specquant.load(args.gguf, device="cpu", dtype="float32")
        cfg = GenerationConfig(max_new_tokens=args.new_tokens, ignore_eos=True)
        tokens = {p: gen.generate(p, generation=cfg).token_ids for p in PROMPTS}
        args.write_expected.write_text(json.dumps(tokens) + "\n")
        return

    expected = json.loads(args.expected.read_text()) if args.expected else None
    report: dict[str, Any] = {
        "benchmark": "gpu_eager",
        "card": torch.cuda.get_device_name(),
        "date": time.strftime("%Y-%m-%d"),
        "commit": git_commit(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "new_tokens": args.new_tokens,
        "runs": args.runs,
    }
    report["smollm2"] = smollm2_section(args.gguf, expected, args.new_tokens, args.runs)
    report["llama3_8b_random_bf16"] = llama8b_section(args.new_tokens, args.runs)
    print(json.dumps(report["llama3_8b_random_bf16"]), flush=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
