"""`specquant distill-draft`: a shallow draft model distilled from its target.

The student keeps the target's width and tokenizer, starts from evenly spaced target layers,
and borrows the target's embedding and lm_head (frozen, not stored: the checkpoint says
`specquant_shared_embeddings`), so only its few layers are trained and shipped. Loss: the
forward KL divergence KL(p_target || p_student) on the answer tokens of make-data samples.
Held-out top-1 (see `train.loop`) is the number to watch: on 2,937 samples for ~9 epochs the
training-batch top-1 reached 0.64 while unseen answers stayed at 0.2-0.4, so more prompts
and fewer epochs help more than more steps.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from specquant.cache.static_kv import BlockKV
from specquant.io.export import (
    llama_config_dict,
    save_safetensors,
    unfused_state_dict,
    write_config,
)
from specquant.layers.attention import AttnMetadata
from specquant.layers.rope import RopeTable
from specquant.models.llama import LlamaModel
from specquant.train.eagle_train import write_card
from specquant.train.features import features
from specquant.train.loop import Batch, TrainConfig, split_heldout, train
from specquant.train.make_data import Sample


def pick_layers(num_target: int, num_student: int) -> list[int]:
    """Evenly spaced target layers, always including the first and the last."""
    if not 1 <= num_student <= num_target:
        raise ValueError(f"student layers must be in [1, {num_target}], got {num_student}")
    if num_student == 1:
        return [num_target - 1]
    step = (num_target - 1) / (num_student - 1)
    return [round(i * step) for i in range(num_student)]


def init_student(target: LlamaModel, num_layers: int) -> LlamaModel:
    cfg = dataclasses.replace(target.config, num_layers=num_layers, shared_embeddings=True)
    device = target.embed_tokens.weight.device
    student = LlamaModel(cfg).to(device=device, dtype=torch.float32)
    student.embed_tokens.weight = target.embed_tokens.weight  # borrowed, frozen
    student.lm_head.weight = target.lm_head.weight
    with torch.no_grad():
        for mine, theirs in zip(
            student.layers, pick_layers(target.config.num_layers, num_layers), strict=True
        ):
            mine.load_state_dict(target.layers[theirs].state_dict())
        student.norm.load_state_dict(target.norm.state_dict())
    for name, p in student.named_parameters():
        p.requires_grad_(not name.startswith(("embed_tokens", "lm_head")))
    student.prepare_kernels()
    return student


def distill_loss_fn(student: LlamaModel, target: LlamaModel, max_len: int) -> Any:
    device = target.embed_tokens.weight.device
    rope_t = RopeTable(target.config, max_len, device, target.embed_tokens.weight.dtype)
    rope_s = RopeTable(student.config, max_len, device, torch.float32)
    lm_head = target.lm_head.weight

    def loss_fn(batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        tokens = batch.tokens
        t = tokens.shape[1]
        m = batch.loss_mask
        with torch.no_grad():
            p_log = F.linear(features(target, tokens, rope_t)[m], lm_head.float()).log_softmax(-1)
        cache = BlockKV()
        meta = AttnMetadata.plan(rope_s, 0, t, sliding_window=student.config.sliding_window)
        last = torch.tensor([t - 1], device=device)
        out = student(tokens, cache, meta, logits_index=last, return_hidden=True)
        assert out.hidden is not None
        q_log = F.linear(out.hidden[m].float(), lm_head.float()).log_softmax(-1)
        kl = F.kl_div(q_log, p_log, log_target=True, reduction="batchmean")
        agree = (q_log.argmax(-1) == p_log.argmax(-1)).float().mean()
        return kl, {"kl": kl.item(), "top1": agree.item()}

    return loss_fn


def distill_draft(
    target: LlamaModel,
    samples: list[Sample],
    cfg: TrainConfig,
    out_dir: Path,
    *,
    num_layers: int = 4,
    tokenizer: Any = None,
    resume: bool = False,
    card: dict[str, Any] | None = None,
) -> LlamaModel:
    target.requires_grad_(False)
    student = init_student(target, num_layers)
    device = target.embed_tokens.weight.device
    loss_fn = distill_loss_fn(student, target, cfg.max_len)
    history = train(
        student, loss_fn, samples, cfg, out_dir, device, resume=resume, desc="distill-draft"
    )
    save_draft(student, out_dir, tokenizer)
    card = {**(card or {}), "heldout": len(split_heldout(samples, cfg)[1])}
    write_card(out_dir, f"{num_layers}-layer draft model", cfg, history, card)
    return student


def save_draft(
    model: LlamaModel, out_dir: Path, tokenizer: Any = None, dtype: torch.dtype = torch.bfloat16
) -> None:
    """HF-style directory (config.json + model.safetensors, unfused names) without the
    borrowed embedding/lm_head; loadable with `--draft PATH` next to its target."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    tensors = unfused_state_dict(model, cfg, skip=("embed_tokens", "lm_head", "vocab_ids"))
    save_safetensors({f"model.{k}": v for k, v in tensors.items()}, out_dir, dtype)
    qwen = cfg.family == "qwen2"
    config = {
        "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen else "llama",
        **llama_config_dict(cfg),
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.o_bias,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids),
        "specquant_shared_embeddings": True,
    }
    write_config(out_dir, config)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))


def write_lm_head_vocab(
    draft_dir: Path, data: Path, size: int, always: tuple[int, ...] = ()
) -> float:
    """FR-Spec: keep the draft's lm_head rows for the `size` most frequent answer tokens of a
    make-data file (plus `always`, e.g. stop tokens). Returns the share of answer tokens the
    kept vocabulary covers."""
    from collections import Counter

    from specquant.io.checkpoint import LM_HEAD_VOCAB_FILE
    from specquant.train.make_data import read_data

    if size < 1:
        raise ValueError(f"lm_head vocabulary size must be >= 1, got {size}")
    counts: Counter[int] = Counter()
    for sample in read_data(data):
        counts.update(sample.answer_ids)
    config_path = draft_dir / "config.json"
    config = json.loads(config_path.read_text())
    if size > int(config["vocab_size"]):
        raise ValueError(
            f"lm_head vocabulary size {size} exceeds the vocabulary {config['vocab_size']}"
        )
    ids = list(dict.fromkeys([*always, *(t for t, _ in counts.most_common())]))[:size]
    chosen = set(ids)  # pad with unseen ids if the data has fewer distinct tokens than `size`
    ids += [t for t in range(int(config["vocab_size"])) if t not in chosen][: size - len(ids)]
    (draft_dir / LM_HEAD_VOCAB_FILE).write_text(json.dumps(sorted(ids)) + "\n")
    config["specquant_lm_head_vocab"] = len(ids)
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    kept = set(ids)
    total = sum(counts.values())
    return sum(c for t, c in counts.items() if t in kept) / max(total, 1)
