"""Calibration tokens (GPTQ, SmoothQuant) from the permissive training prompts.

Sources (train/prompts.py, all Apache-2.0 or MIT): FLAN CoT, GPTeacher, NL2Bash, the
Self-Instruct seeds and GSM8K train. Held out for the perplexity report and never read here:
WMT21/22 (train/prompts.py keeps them out of every training source) and the T0 passages
(`t0_train_50k`: CNN/DM, XSum and QA contexts, the long-form English text the report
measures). Evaluation sets (MT-Bench, Spec-Bench, HumanEval, GSM8K test) are refused by
`load_prompts` itself.

The prompts are shuffled with the seed, tokenized, joined with EOS into one stream and cut into
`samples` windows of `seq_len` tokens (the usual random-window GPTQ calibration).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from specquant.train.prompts import default_data_dir, license_summary, load_prompts

CALIBRATION_SOURCES = ("flan_cot", "gpteacher", "nl2bash", "self_instruct_seed", "gsm8k_train")
PERPLEXITY_HELDOUT = ("wmt21", "wmt22", "t0_train_50k")


@dataclass(frozen=True)
class Calibration:
    tokens: torch.Tensor  # [samples, seq_len] token ids
    info: dict[str, Any]  # what was used (stored in the checkpoint's quantization_config)


def calibration_tokens(
    tokenizer: Any,
    samples: int,
    seq_len: int,
    *,
    seed: int = 0,
    data_dir: Path | None = None,
    sources: Sequence[str] = CALIBRATION_SOURCES,
) -> Calibration:
    """`samples` x `seq_len` calibration tokens from the training prompts of `sources`."""
    if samples < 1 or seq_len < 2:
        raise ValueError(f"need >= 1 calibration samples of >= 2 tokens, got {samples} x {seq_len}")
    reserved = sorted(set(sources) & set(PERPLEXITY_HELDOUT))
    if reserved:
        raise ValueError(
            f"{reserved} are held out for the perplexity report; calibration sources may be "
            f"any of {', '.join(CALIBRATION_SOURCES)}"
        )
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("the tokenizer has no EOS token to separate calibration prompts")
    prompts = load_prompts(data_dir or default_data_dir(), sources, permissive_only=True, seed=seed)
    need = samples * seq_len
    stream: list[int] = []
    used = []
    for prompt in prompts:
        stream += tokenizer(prompt.text, add_special_tokens=False)["input_ids"] + [eos]
        used.append(prompt)
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise ValueError(
            f"the calibration sources hold {len(stream)} tokens, fewer than the {samples} x "
            f"{seq_len} requested"
        )
    info = {
        "samples": samples,
        "seq_len": seq_len,
        "seed": seed,
        "prompts": license_summary(used),
        "held_out_for_perplexity": list(PERPLEXITY_HELDOUT),
    }
    return Calibration(torch.tensor(stream[:need]).view(samples, seq_len), info)
