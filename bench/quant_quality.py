"""Quality of quantized SmolLM2 in every format: RTN vs GPTQ, rotation off and on.

For each (format, quantizer, rotation) the report gives
  - perplexity on held-out text: WMT22 English reference translations, which no calibration
    or training set uses (the prompt loader refuses WMT unless asked for it explicitly);
  - top-1 agreement with the unquantized model on those same tokens;
  - GSM8K 8-shot accuracy on the first N test problems (shots: the first 8 train problems,
    greedy, the answer is the number after '####', else the last number).

Group size 128 does not divide SmolLM2's hidden size (576), so its g128 formats run with the
largest of 128/64/32 that divides every K; the report names the size used.

    python bench/quant_quality.py --device cuda --out bench/results/quant_quality.json

The top-1 agreement and perplexity references are the unquantized model with its tensors
rounded to bfloat16 (the "bf16" row).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import specquant  # noqa: F401

# isort: split
import torch
from tqdm import tqdm

from common import git_commit
from specquant.cache.static_kv import BlockKV
from specquant.io.loader import load_checkpoint
from specquant.io.quant_checkpoint import round_dense_
from specquant.layers.linear import QLinear
from specquant.models.llama import LlamaModel
from specquant.quant.calib_data import CALIBRATION_SOURCES, calibration_tokens
from specquant.quant.calibrate import full_sequence_meta
from specquant.quant.model import quantize_model
from specquant.quant.rotate import rotate_model_
from specquant.quant.spec import FORMATS, QuantSpec
from specquant.train.batch_generate import generate_batch
from specquant.train.prompts import default_data_dir

HELDOUT_GLOB = "wmt22/generaltest2022.*.ref.*.en"
# Quantization (rotation, GPTQ) and all matmuls run in float32; the dense tensors a quantized
# checkpoint keeps (embeddings, norms, lm_head) are rounded to bfloat16, as it stores them.
DENSE_DTYPE = torch.bfloat16


# ----------------------------------------------------------------------------- data
def heldout_tokens(tok: Any, data: Path, seqs: int, length: int) -> torch.Tensor:
    """[seqs, length] token ids of WMT22 English references, concatenated in file order."""
    files = sorted(data.glob(HELDOUT_GLOB))
    if not files:
        raise FileNotFoundError(f"no held-out text matches {data / HELDOUT_GLOB}")
    text = "\n".join(f.read_text(encoding="utf-8") for f in files)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) < seqs * length:
        raise ValueError(f"held-out text has {len(ids)} tokens, need {seqs * length}")
    return torch.tensor(ids[: seqs * length]).view(seqs, length)


def _parquet_rows(path: Path) -> list[dict[str, str]]:
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=["question", "answer"]).to_pylist()


def gsm8k_prompts(data: Path, n: int) -> tuple[list[str], list[str]]:
    root = data / "gsm8k" / "gsm8k" / "main"
    shots = _parquet_rows(root / "train-00000-of-00001.parquet")[:8]
    test = _parquet_rows(root / "test-00000-of-00001.parquet")[:n]
    prefix = "".join(
        f"Question: {s['question']}\nAnswer: {re.sub(r'<<.*?>>', '', s['answer'])}\n\n"
        for s in shots
    )
    prompts = [f"{prefix}Question: {q['question']}\nAnswer:" for q in test]
    return prompts, [q["answer"].split("####")[-1].strip() for q in test]


def extract_answer(text: str) -> str | None:
    text = text.split("Question:")[0]
    m = re.search(r"####\s*(-?[\d,]*\.?\d+)", text)
    nums = [m.group(1)] if m else re.findall(r"-?[\d,]*\.?\d+", text)
    return nums[-1].replace(",", "").rstrip(".") if nums else None


# ----------------------------------------------------------------------------- metrics
@torch.inference_mode()
def logits_of(model: LlamaModel, tokens: torch.Tensor, batch: int) -> torch.Tensor:
    """Full-sequence logits [S, T, V] in float32 on the CPU."""
    device = model.embed_tokens.weight.device
    meta = full_sequence_meta(model, tokens.shape[1])
    out = []
    for i in range(0, tokens.shape[0], batch):
        x = tokens[i : i + batch].to(device)
        out.append(model(x, BlockKV(), meta).logits.float().cpu())
    return torch.cat(out)


def ppl_and_agreement(logits: torch.Tensor, tokens: torch.Tensor, ref_top1: torch.Tensor):
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)
    )
    agree = (logits.argmax(-1) == ref_top1).float().mean()
    return float(nll.exp()), float(agree)


@torch.inference_mode()
def gsm8k_accuracy(
    model: LlamaModel, tok: Any, prompts: list[str], answers: list[str], batch: int, new: int
) -> float:
    correct = 0
    stop = frozenset({tok.eos_token_id})
    for i in range(0, len(prompts), batch):
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts[i : i + batch]]
        outs = generate_batch(model, ids, new, stop)
        for out, gold in zip(outs, answers[i : i + batch], strict=True):
            pred = extract_answer(tok.decode(out, skip_special_tokens=True))
            correct += pred is not None and _same_number(pred, gold)
    return correct / len(prompts)


def _same_number(a: str, b: str) -> bool:
    try:
        return abs(float(a) - float(b.replace(",", ""))) < 1e-6
    except ValueError:
        return False


# ----------------------------------------------------------------------------- configs
def fit_group_size(spec: QuantSpec, model: LlamaModel) -> QuantSpec:
    """The format, with its group size lowered to one dividing every quantized K if needed."""
    if spec.group_size == -1:
        return spec
    ks = {m.in_features for m in model.layers.modules() if isinstance(m, QLinear)}
    for g in (spec.group_size, 64, 32):
        if g <= spec.group_size and all(k % g == 0 for k in ks):
            name = spec.name.replace(f"g{spec.group_size}", f"g{g}")
            return replace(spec, name=name, group_size=g)
    raise ValueError(f"no group size <= {spec.group_size} divides every K in {sorted(ks)}")


def build_variant(
    dense: LlamaModel, spec: QuantSpec, method: str, rotate: bool, calib: torch.Tensor
) -> tuple[LlamaModel, dict[str, float]]:
    model = copy.deepcopy(dense)
    if rotate:
        rotate_model_(model, seed=0)
    errors = quantize_model(model, spec, method, calib if method == "gptq" else None)
    round_dense_(model, DENSE_DTYPE)
    return model, errors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--formats", nargs="*", default=list(FORMATS))
    ap.add_argument("--methods", nargs="*", default=["rtn", "gptq"])
    ap.add_argument("--rotate", nargs="*", default=["off", "on"], choices=["off", "on"])
    ap.add_argument("--ppl-seqs", type=int, default=32)
    ap.add_argument("--ppl-len", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--gsm8k", type=int, default=200, help="first N GSM8K test problems")
    ap.add_argument("--gsm8k-batch", type=int, default=100)
    ap.add_argument("--gsm8k-new-tokens", type=int, default=192)
    ap.add_argument("--batch", type=int, default=8, help="sequences per perplexity forward")
    ap.add_argument(
        "--data", type=Path, default=None, help="shared/data (default: $SPECQUANT_DATA or found)"
    )
    ap.add_argument("--out", type=Path, default=Path("bench/results/quant_quality.json"))
    ap.add_argument(
        "--merge",
        action="store_true",
        help="update the rows of an existing --out report in place (each new row records its "
        "own device, commit and date); the bf16 row is kept, not re-evaluated",
    )
    args = ap.parse_args()
    if args.merge and not args.out.is_file():
        raise SystemExit(f"--merge needs an existing report at --out, found none at {args.out}")
    if args.data is None:
        args.data = default_data_dir()

    device = torch.device(args.device)
    loaded = load_checkpoint(args.model, device, torch.float32)
    heldout = f"{HELDOUT_GLOB}: {args.ppl_seqs} x {args.ppl_len} tokens"
    if args.merge:  # checked before any evaluation runs
        previous = json.loads(args.out.read_text())
        if (previous["model"], previous["heldout"]) != (loaded.path.name, heldout):
            raise SystemExit(
                f"--merge: {args.out} measured {previous['model']} on {previous['heldout']}; "
                f"this run measures {loaded.path.name} on {heldout}"
            )
    dense, tok = loaded.model, loaded.tokenizer
    tokens = heldout_tokens(tok, args.data, args.ppl_seqs, args.ppl_len)
    calib = calibration_tokens(
        tok, args.calib_samples, args.calib_len, seed=0, data_dir=args.data
    ).tokens
    prompts, answers = gsm8k_prompts(args.data, args.gsm8k)

    def evaluate(model: LlamaModel, ref_top1: torch.Tensor) -> dict[str, float]:
        t0 = time.perf_counter()
        ppl, agree = ppl_and_agreement(logits_of(model, tokens, args.batch), tokens, ref_top1)
        acc = gsm8k_accuracy(model, tok, prompts, answers, args.gsm8k_batch, args.gsm8k_new_tokens)
        return {
            "ppl": ppl,
            "top1_agreement": agree,
            "gsm8k": acc,
            "eval_s": time.perf_counter() - t0,
        }

    reference = copy.deepcopy(dense)
    round_dense_(reference, DENSE_DTYPE)
    ref_logits = logits_of(reference, tokens, args.batch)
    ref_top1 = ref_logits.argmax(-1)
    del ref_logits
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    if args.merge:
        rows: list[dict[str, Any]] = previous["rows"]
    else:
        rows = [
            {"format": "bf16", "method": "-", "rotation": False, **evaluate(reference, ref_top1)}
        ]
    configs = [(f, m, r == "on") for f in args.formats for m in args.methods for r in args.rotate]
    for fmt, method, rotate in tqdm(configs, desc="formats", unit="cfg"):
        spec = fit_group_size(FORMATS[fmt], dense)
        row: dict[str, Any] = {"format": spec.name, "method": method, "rotation": rotate}
        try:
            t0 = time.perf_counter()
            model, errors = build_variant(dense, spec, method, rotate, calib)
            row["quantize_s"] = time.perf_counter() - t0
            row["mean_weight_error"] = sum(errors.values()) / len(errors)
            row.update(evaluate(model, ref_top1))
            del model
        except Exception as exc:  # a failing variant is reported, the rest still run
            row["error"] = f"{type(exc).__name__}: {exc}"
        if args.merge:
            row.update(device=name, commit=git_commit(), date=time.strftime("%Y-%m-%d"))
        tqdm.write(json.dumps(row))
        _put_row(rows, row)
        if args.merge:  # a long CPU run keeps what it finished
            previous["rows"] = rows
            args.out.write_text(json.dumps(previous, indent=1))

    if args.merge:
        print(markdown(previous))
        return
    report = {
        "model": str(loaded.path.name),
        "device": name,
        "dtype": "float32 math, dense tensors rounded to bfloat16",
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d"),
        "heldout": heldout,
        "calibration": f"{', '.join(CALIBRATION_SOURCES)} (seed 0): {args.calib_samples} x "
        f"{args.calib_len} tokens",
        "gsm8k": f"8-shot (first 8 train problems), first {args.gsm8k} test problems, greedy, "
        f"{args.gsm8k_new_tokens} new tokens",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


def _put_row(rows: list[dict[str, Any]], row: dict[str, Any]) -> None:
    """Replace the row of the same (format, method, rotation), or append it."""
    key = (row["format"], row["method"], row["rotation"])
    for i, r in enumerate(rows):
        if (r["format"], r["method"], r["rotation"]) == key:
            rows[i] = row
            return
    rows.append(row)


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Quantization quality: {report['model']}",
        "",
        f"{report['device']}, {report['dtype']}, commit {report['commit']}, "
        f"{report['date']}. Held-out perplexity: {report['heldout']}. Calibration (GPTQ): "
        f"{report['calibration']}. GSM8K: {report['gsm8k']}.",
        "",
        "| format | quantizer | rotation | weight error | perplexity | top-1 agreement | GSM8K "
        "| run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        if "error" in r:
            rot = "on" if r["rotation"] else "off"
            lines.append(f"| {r['format']} | {r['method']} | {rot} | {r['error']} |")
            continue
        err = f"{r['mean_weight_error']:.4f}" if "mean_weight_error" in r else "-"
        lines.append(
            f"| {r['format']} | {r['method']} | {'on' if r['rotation'] else 'off'} | {err} | "
            f"{r['ppl']:.2f} | {r['top1_agreement']:.3f} | {r['gsm8k']:.3f} |"
            f" {r.get('device', report['device'])}"
            + (f", {r['commit']} |" if "commit" in r else " |")
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
