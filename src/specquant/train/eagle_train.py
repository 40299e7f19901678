"""`specquant train-eagle`: train an EAGLE-1/2 head on a target's own features.

Recipe (EAGLE-1): the head sees (f_t + noise, token_{t+1}) and regresses f_{t+1} with a
smooth-L1 loss, plus a cross-entropy between the target's next-token distribution and the
head's, both through the frozen lm_head. The features come from whatever model is loaded,
so a quantized target trains a head on its own (quantized) features.

The head starts from the target's last decoder layer, and its fc from the identity on the
feature half, so step 0 already passes the feature through a plausible layer.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from specquant.cache.static_kv import BlockKV
from specquant.io.eagle import head_config, save_eagle_head
from specquant.layers.attention import AttnMetadata
from specquant.layers.linear import init_random_
from specquant.layers.rope import RopeTable
from specquant.models.eagle import EagleHead
from specquant.models.llama import LlamaModel
from specquant.train.loop import Batch, TrainConfig, train
from specquant.train.make_data import Sample

FEATURE_WEIGHT = 1.0  # EAGLE's v_w
TOKEN_WEIGHT = 0.1  # EAGLE's p_w
NOISE = 0.2  # uniform input noise U(-0.1, 0.1) on the features


def init_head(target: LlamaModel, seed: int = 0) -> EagleHead:
    cfg = head_config({}, target.config)
    param = target.embed_tokens.weight
    head = init_random_(EagleHead(cfg), seed).to(device=param.device, dtype=torch.float32)
    last = target.layers[-1]
    layer = head.layers[0]
    with torch.no_grad():
        layer.self_attn.load_state_dict(last.self_attn.state_dict())
        layer.mlp.load_state_dict(last.mlp.state_dict())
        layer.post_attention_layernorm.load_state_dict(last.post_attention_layernorm.state_dict())
        h = cfg.hidden_size
        head.fc.weight[:, h:] = torch.eye(h)
        assert head.fc.bias is not None
        head.fc.bias.zero_()
    head.prepare_kernels()
    return head


def features(target: LlamaModel, tokens: torch.Tensor, rope: RopeTable) -> torch.Tensor:
    """Post-norm features [B, T, H] of a right-padded batch (no grad)."""
    b, t = tokens.shape
    with torch.no_grad():
        cache = target.new_cache(t, batch=b)
        meta = AttnMetadata.plan(rope, 0, t, sliding_window=target.config.sliding_window)
        last = torch.tensor([t - 1], device=tokens.device)
        out = target(tokens, cache, meta, logits_index=last, return_hidden=True)
    assert out.hidden is not None
    return out.hidden.float()


def eagle_loss_fn(head: EagleHead, target: LlamaModel, max_len: int, seed: int) -> Any:
    device = target.embed_tokens.weight.device
    rope_t = RopeTable(target.config, max_len, device, target.embed_tokens.weight.dtype)
    rope_h = RopeTable(head.config, max_len, device, torch.float32)
    gen = torch.Generator(device=device).manual_seed(seed)

    def loss_fn(batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        tokens = batch.tokens
        t = tokens.shape[1]
        feats = features(target, tokens, rope_t)  # [B, T, H]
        f_in, f_next = feats[:, :-1], feats[:, 1:]
        noise = (torch.rand(f_in.shape, generator=gen, device=device) - 0.5) * NOISE
        emb = target.embed_tokens(tokens[:, 1:]).float()
        cache = BlockKV()
        meta = AttnMetadata.plan(rope_h, 0, t - 1)
        h = head(emb, f_in + noise, cache, meta)  # [B, T-1, H]
        m = batch.loss_mask[:, :-1]
        hv, fv = h[m], f_next[m]
        loss_v = F.smooth_l1_loss(hv, fv)
        lm_head = target.lm_head.weight.float()
        with torch.no_grad():
            p = F.linear(fv, lm_head).softmax(-1)
        logq = F.linear(hv, lm_head).log_softmax(-1)
        loss_p = -(p * logq).sum(-1).mean()
        acc = (logq.argmax(-1) == p.argmax(-1)).float().mean()
        loss = FEATURE_WEIGHT * loss_v + TOKEN_WEIGHT * loss_p
        return loss, {
            "feature_loss": float(loss_v),
            "token_loss": float(loss_p),
            "top1": float(acc),
        }

    return loss_fn


def train_eagle(
    target: LlamaModel,
    samples: list[Sample],
    cfg: TrainConfig,
    out_dir: Path,
    *,
    resume: bool = False,
    card: dict[str, Any] | None = None,
) -> EagleHead:
    """Train, then save the head (public EAGLE layout), its log and a model card."""
    target.requires_grad_(False)
    head = init_head(target, cfg.seed)
    loss_fn = eagle_loss_fn(head, target, cfg.max_len, cfg.seed)
    device = target.embed_tokens.weight.device
    history = train(head, loss_fn, samples, cfg, out_dir, device, resume=resume, desc="train-eagle")
    save_eagle_head(head, out_dir, dtype=torch.bfloat16)  # compact; loads into any dtype
    write_card(out_dir, "EAGLE-1/2 head", cfg, history, card or {})
    return head


def write_card(
    out_dir: Path,
    kind: str,
    cfg: TrainConfig,
    history: list[dict[str, float]],
    card: dict[str, Any],
) -> None:
    (out_dir / "train_log.json").write_text(json.dumps(history) + "\n")
    tail = history[-min(50, len(history)) :]
    final = (
        {k: sum(h[k] for h in tail) / len(tail) for k in tail[0] if k not in ("step",)}
        if tail
        else {}
    )
    lines = [
        f"# {kind}",
        "",
        f"Target: {card.get('target', '?')}",
        f"Training data: {card.get('data', '?')}",
        "",
        "| source | prompts | license |",
        "|---|---|---|",
    ]
    for source, info in sorted(card.get("sources", {}).items()):
        lines.append(f"| {source} | {info.get('count', '?')} | {info.get('license', '?')} |")
    lines += [
        "",
        f"Steps: {cfg.steps} x {cfg.batch_size} sequences (max {cfg.max_len} tokens), "
        f"peak lr {cfg.lr}, seed {cfg.seed}.",
        "Final losses (mean of the last 50 steps): "
        + ", ".join(f"{k} {v:.4f}" for k, v in final.items()),
        "",
        f"Reproduce: `{card.get('command', '?')}`",
        "",
        f"Config: `{json.dumps(asdict(cfg))}`",
    ]
    (out_dir / "README.md").write_text("\n".join(lines) + "\n")
