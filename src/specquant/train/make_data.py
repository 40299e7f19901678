"""`specquant make-data`: the target answers training prompts itself (self-distillation).

Output: one JSON object per line, `{"source", "prompt_ids", "answer_ids"}`, appended as
batches finish, so an interrupted run resumes where it stopped (`resume=True` skips the
prompts already written). Drafters trained on a model's own answers learn what that model
says, not what a dataset's authors wrote (EAGLE-3, Medusa-2).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from specquant.config import SamplingParams
from specquant.train.batch_generate import generate_batch
from specquant.train.prompts import Prompt


@dataclass(frozen=True)
class MakeDataConfig:
    max_new_tokens: int = 256
    batch_size: int = 32
    max_prompt_tokens: int = 512
    temperature: float = 0.0
    seed: int = 0


def make_data(
    generator: Any,  # specquant Generator (model + tokenizer + stop tokens)
    prompts: list[Prompt],
    out: Path,
    cfg: MakeDataConfig,
    *,
    resume: bool = False,
) -> int:
    """Write answers for `prompts` to `out`; returns the number of records written."""
    done = 0
    if out.exists():
        if not resume:
            raise FileExistsError(f"{out} exists; pass --resume to continue it or remove it")
        done = sum(1 for line in out.read_text().splitlines() if line.strip())
    out.parent.mkdir(parents=True, exist_ok=True)
    todo = prompts[done:]
    encoded = []
    for p in todo:
        ids = generator.encode(p.text, chat=None)
        encoded.append((p, ids[-cfg.max_prompt_tokens :]))
    sampling = SamplingParams(temperature=cfg.temperature, seed=cfg.seed)
    rng = None
    if not sampling.greedy:
        rng = torch.Generator(device=generator.device).manual_seed(cfg.seed)
    written = 0
    bar = tqdm(total=len(todo), desc="make-data", unit="prompt", initial=0)
    with out.open("a") as f:
        # Keep the file order equal to the prompt order (resume relies on it); batches are
        # contiguous slices, so similar lengths are not grouped.
        for start in range(0, len(encoded), cfg.batch_size):
            chunk = encoded[start : start + cfg.batch_size]
            answers = generate_batch(
                generator.model,
                [ids for _, ids in chunk],
                cfg.max_new_tokens,
                generator.stop_token_ids,
                sampling,
                rng,
            )
            for (prompt, ids), answer in zip(chunk, answers, strict=True):
                record = {"source": prompt.source, "prompt_ids": ids, "answer_ids": answer}
                f.write(json.dumps(record) + "\n")
            f.flush()
            written += len(chunk)
            bar.update(len(chunk))
    bar.close()
    return done + written


@dataclass
class Sample:
    prompt_ids: list[int]
    answer_ids: list[int]
    source: str = "?"  # the prompt set it came from (for model cards)


def read_data(path: Path, vocab_size: int | None = None) -> list[Sample]:
    """Read a make-data file; a bad line is reported with file and line number."""
    if not path.exists():
        raise FileNotFoundError(f"training data file {path} does not exist")
    samples = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            prompt, answer = rec["prompt_ids"], rec["answer_ids"]
            if not isinstance(prompt, list) or not isinstance(answer, list):
                raise TypeError("prompt_ids and answer_ids must be lists of token ids")
            ids = [int(t) for t in prompt + answer]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}:{n}: not a make-data record ({e})") from None
        if vocab_size is not None and any(not 0 <= t < vocab_size for t in ids):
            raise ValueError(f"{path}:{n}: token id outside the vocabulary [0, {vocab_size})")
        if answer:
            samples.append(Sample(list(prompt), list(answer), str(rec.get("source", "?"))))
    if not samples:
        raise ValueError(f"training data file {path} holds no usable records")
    return samples
