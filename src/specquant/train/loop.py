"""The training loop shared by `train-eagle` and `distill-draft`.

Batches are random subsets of the make-data samples (seeded), right-padded. A fixed, seeded
set of `heldout` samples never enters a batch: the loss function's metrics on it, every
`eval_every` steps and at the end, show generalisation (training-batch metrics only show
memorisation once a small data set has been seen many times). The loop shows a progress bar
with loss and ETA, checkpoints every `save_every` steps and at the end, stops early at
`time_limit` seconds (the learning-rate decay then follows elapsed time, so a cut-short run
still ends at a low rate), and resumes from its checkpoint (model, optimizer, step, loss
history, elapsed time and sampler state). On CUDA the forward passes run under bf16
autocast (`bf16`); parameters, optimizer state and the losses stay float32.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from specquant.train.make_data import Sample


@dataclass(frozen=True)
class TrainConfig:
    steps: int = field(default=2000, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=16, metadata={"help": "sequences per step"})
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate (AdamW)"})
    warmup: int = field(default=50, metadata={"help": "linear warm-up steps"})
    grad_clip: float = field(default=0.5, metadata={"help": "gradient norm clip"})
    max_len: int = field(default=1024, metadata={"help": "tokens per sequence (truncated)"})
    seed: int = field(default=0, metadata={"help": "sampling and noise seed"})
    save_every: int = field(default=500, metadata={"help": "checkpoint interval in steps"})
    time_limit: float = field(
        default=0.0, metadata={"help": "stop after this many seconds (0: no limit)"}
    )
    heldout: int = field(
        default=64, metadata={"help": "samples kept out of training for evaluation (at most 10%)"}
    )
    eval_every: int = field(default=250, metadata={"help": "held-out evaluation interval"})
    bf16: bool = field(default=True, metadata={"help": "bf16 autocast on CUDA"})
    snapshot_every: int = field(
        default=0,
        metadata={"help": "also save the weights every N steps to OUT/snapshots (0: never)"},
    )

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_len", "save_every", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.time_limit < 0 or self.heldout < 0 or self.snapshot_every < 0:
            raise ValueError(
                "time_limit, heldout and snapshot_every must be >= 0, got "
                f"{self.time_limit}, {self.heldout}, {self.snapshot_every}"
            )


@dataclass
class Batch:
    tokens: torch.Tensor  # [B, T] right-padded with 0
    loss_mask: torch.Tensor  # [B, T] True where position t predicts an answer token t+1
    num_tokens: int
    indices: list[int] = field(default_factory=list)  # records in the make-data file
    lengths: list[int] = field(default_factory=list)  # their untruncated lengths


def make_batch(samples: list[Sample], max_len: int, device: torch.device) -> Batch:
    seqs = [(s.prompt_ids + s.answer_ids)[:max_len] for s in samples]
    width = max(len(s) for s in seqs)
    tokens = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, (s, seq) in enumerate(zip(samples, seqs, strict=True)):
        tokens[i, : len(seq)] = torch.tensor(seq)
        # position t predicts token t+1; train where t+1 is an answer token
        start = max(len(s.prompt_ids) - 1, 0)
        mask[i, start : len(seq) - 1] = True
    lengths = [len(s.prompt_ids) + len(s.answer_ids) for s in samples]
    indices = [s.index for s in samples]
    return Batch(tokens.to(device), mask.to(device), int(mask.sum()), indices, lengths)


def split_heldout(samples: list[Sample], cfg: TrainConfig) -> tuple[list[Sample], list[Sample]]:
    """(training, held-out): a seeded choice of min(heldout, 10%) samples is held out."""
    n = min(cfg.heldout, len(samples) // 10)
    order = list(range(len(samples)))
    random.Random(cfg.seed + 1).shuffle(order)
    held = set(order[:n])
    train_set = [s for i, s in enumerate(samples) if i not in held]
    return train_set, [samples[i] for i in sorted(held)]


def lr_at(step: int, cfg: TrainConfig, elapsed: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak over the steps or, if it comes
    first, the time limit."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    if cfg.time_limit:
        progress = max(progress, elapsed / cfg.time_limit)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def autocast(cfg: TrainConfig, device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, torch.bfloat16, enabled=cfg.bf16 and device.type == "cuda")


LossFn = Callable[[Batch], tuple[torch.Tensor, dict[str, float]]]


@torch.no_grad()
def evaluate(
    module: torch.nn.Module,
    loss_fn: LossFn,
    samples: list[Sample],
    cfg: TrainConfig,
    device: torch.device,
) -> dict[str, float]:
    """Token-weighted means of the loss function's metrics over `samples` (eval mode)."""
    was_training = module.training
    module.eval()
    sums: dict[str, float] = {}
    total = 0
    for start in range(0, len(samples), cfg.batch_size):
        batch = make_batch(samples[start : start + cfg.batch_size], cfg.max_len, device)
        if batch.num_tokens == 0:
            continue
        with autocast(cfg, device):
            _, metrics = loss_fn(batch)
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v * batch.num_tokens
        total += batch.num_tokens
    module.train(was_training)
    return {f"heldout_{k}": v / total for k, v in sums.items()} if total else {}


def train(
    module: torch.nn.Module,
    loss_fn: LossFn,
    samples: list[Sample],
    cfg: TrainConfig,
    out_dir: Path,
    device: torch.device,
    *,
    resume: bool = False,
    desc: str = "train",
    snapshot: Callable[[Path], None] | None = None,
) -> list[dict[str, float]]:
    """Optimise the trainable parameters of `module`; returns the per-step log (held-out
    metrics are added to the entries of the steps that evaluated them). With
    `cfg.snapshot_every`, `snapshot(dir)` saves the weights to OUT/snapshots/step_N after
    every N steps, with the answer tokens trained on so far (learning curves)."""
    samples, held = split_heldout(samples, cfg)
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires grad")
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    ckpt = out_dir / "checkpoint.pt"
    history: list[dict[str, float]] = []
    rng = random.Random(cfg.seed)
    start, elapsed = 0, 0.0
    if resume and ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        if state["config"] != asdict(cfg):
            raise ValueError(
                f"{ckpt} was written with a different training config; "
                "start a new output directory or use the same settings"
            )
        module.load_state_dict(state["module"], strict=False)
        opt.load_state_dict(state["optimizer"])
        history, start = state["history"], state["step"]
        elapsed = state.get("elapsed", 0.0)
        rng.setstate(state["rng"])
    out_dir.mkdir(parents=True, exist_ok=True)
    module.train()
    bar = tqdm(range(start, cfg.steps), desc=desc, initial=start, total=cfg.steps)
    t0 = time.perf_counter() - elapsed
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg, elapsed)
        batch = make_batch(
            [samples[rng.randrange(len(samples))] for _ in range(cfg.batch_size)],
            cfg.max_len,
            device,
        )
        if batch.num_tokens == 0:
            continue
        with autocast(cfg, device):
            loss, metrics = loss_fn(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        metrics = {"step": step + 1, "loss": loss.item(), "tokens": batch.num_tokens, **metrics}
        history.append(metrics)
        bar.set_postfix({k: f"{v:.3f}" for k, v in metrics.items() if k not in ("step", "tokens")})
        elapsed = time.perf_counter() - t0
        last = step + 1 == cfg.steps or (cfg.time_limit > 0 and elapsed >= cfg.time_limit)
        if held and ((step + 1) % cfg.eval_every == 0 or last):
            metrics.update(evaluate(module, loss_fn, held, cfg, device))
        if snapshot and cfg.snapshot_every and (step + 1) % cfg.snapshot_every == 0:
            snap = out_dir / "snapshots" / f"step_{step + 1}"
            snapshot(snap)
            seen = sum(int(h["tokens"]) for h in history)
            (snap / "trained.json").write_text(json.dumps({"step": step + 1, "tokens": seen}))
        if (step + 1) % cfg.save_every == 0 or last:
            _save(ckpt, module, opt, step + 1, history, rng, cfg, elapsed)
        if last:
            break
    module.eval()
    return history


def _save(
    path: Path,
    module: torch.nn.Module,
    opt: torch.optim.Optimizer,
    step: int,
    history: list[dict[str, float]],
    rng: random.Random,
    cfg: TrainConfig,
    elapsed: float,
) -> None:
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    state: dict[str, Any] = {
        "module": {k: v for k, v in module.state_dict().items() if k in trainable},
        "optimizer": opt.state_dict(),
        "step": step,
        "history": history,
        "rng": rng.getstate(),
        "elapsed": elapsed,
        "config": asdict(cfg),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # never leave a half-written checkpoint behind
