"""`specquant make-data`: the target answers training prompts itself (self-distillation).

Output: one JSON object per line, `{"source", "prompt_ids", "answer_ids"}`, in prompt order,
appended as windows of `window` batches finish, so an interrupted run resumes where it
stopped (`resume=True` skips the prompts already written). Within a window the prompts are
batched by length, so batches pad little. With `time_limit` the run stops before a window
that would end past the limit (judged by the previous window's duration): a fixed GPU budget
yields as much data as fits. Drafters trained on a model's own answers learn what that model
says, not what a dataset's authors wrote (EAGLE-3, Medusa-2). With `cache_features` each
window's features are stored too (train/features.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from specquant.config import SamplingParams
from specquant.train.batch_generate import generate_batch
from specquant.train.features import cache_features, features_dir
from specquant.train.prompts import Prompt


@dataclass(frozen=True)
class MakeDataConfig:
    max_new_tokens: int = 256
    batch_size: int = 32
    max_prompt_tokens: int = 512
    temperature: float = 0.0
    seed: int = 0
    time_limit: float = 0.0  # seconds (0: none)
    window: int = 8  # batches per length-sorted window
    cache_features: bool = False  # also store the target's features (train/features.py)


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
    cache = features_dir(out)
    if cfg.cache_features and not resume and cache.exists() and any(cache.iterdir()):
        raise FileExistsError(
            f"feature cache {cache} is not empty; remove it (its records would be mixed with "
            "this run's) or pass --resume to continue the run that made it"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    todo = prompts[done:]
    sampling = SamplingParams(temperature=cfg.temperature, seed=cfg.seed)
    rng = None
    if not sampling.greedy:
        rng = torch.Generator(device=generator.device).manual_seed(cfg.seed)
    written = 0
    bar = tqdm(total=len(todo), desc="make-data", unit="prompt", initial=0)
    span = cfg.batch_size * cfg.window
    t0 = time.perf_counter()
    last_window = 0.0
    with out.open("a") as f:
        for start in range(0, len(todo), span):
            elapsed = time.perf_counter() - t0
            if cfg.time_limit and elapsed + last_window > cfg.time_limit:
                bar.write(f"make-data: stopping at the time limit ({elapsed:.0f} s)")
                break
            window = [
                (p, generator.encode(p.text, chat=None)[-cfg.max_prompt_tokens :])
                for p in todo[start : start + span]
            ]
            order = sorted(range(len(window)), key=lambda i: len(window[i][1]))
            answers: list[list[int]] = [[] for _ in window]
            for b in range(0, len(order), cfg.batch_size):
                rows = order[b : b + cfg.batch_size]
                outs = generate_batch(
                    generator.model,
                    [window[i][1] for i in rows],
                    cfg.max_new_tokens,
                    generator.stop_token_ids,
                    sampling,
                    rng,
                )
                for i, answer in zip(rows, outs, strict=True):
                    answers[i] = answer
                bar.update(len(rows))
            # File order = prompt order (resume relies on it), whatever the batching order.
            first = done + start  # record index of the window's first record
            if cfg.cache_features:
                cache_features(
                    generator.model,
                    [
                        (first + i, ids + answer)
                        for i, ((_, ids), answer) in enumerate(zip(window, answers, strict=True))
                    ],
                    cache / f"w{first:07d}.safetensors",
                    cfg.batch_size,
                )
            for (prompt, ids), answer in zip(window, answers, strict=True):
                record = {"source": prompt.source, "prompt_ids": ids, "answer_ids": answer}
                f.write(json.dumps(record) + "\n")
            f.flush()
            written += len(window)
            last_window = time.perf_counter() - t0 - elapsed
    bar.close()
    return done + written


def data_meta_path(data: Path) -> Path:
    """Where make-data records how a data file was made (`data.jsonl.meta.json`)."""
    return data.with_name(data.name + ".meta.json")


@dataclass
class Sample:
    prompt_ids: list[int]
    answer_ids: list[int]
    source: str = "?"  # the prompt set it came from (for model cards)
    index: int = -1  # record number in its make-data file (keys the feature cache)


def read_data(path: Path, vocab_size: int | None = None) -> list[Sample]:
    """Read a make-data file; a bad line is reported with file and line number."""
    if not path.exists():
        raise FileNotFoundError(f"training data file {path} does not exist")
    samples = []
    record = -1
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        record += 1
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
            samples.append(Sample(list(prompt), list(answer), str(rec.get("source", "?")), record))
    if not samples:
        raise ValueError(f"training data file {path} holds no usable records")
    return samples
