"""`specquant train-eagle`: train an EAGLE-1/2 head on a target's own features.

Recipe (EAGLE-1, Li et al. 2024): row t of the head sees (f_t + noise, token_{t+1}) and
regresses f_{t+1} with a smooth-L1 loss (weight 1.0), while its logits lm_head(h_t) match the
target's next-token distribution softmax(lm_head(f_{t+1})) under a cross-entropy (weight
0.1). The regression compares features divided by their per-dimension standard deviation
(measured on training samples): a few of SmolLM2's post-norm feature dimensions vary ~10x
more than the rest and would otherwise dominate it.

The head starts fresh (small random weights) as EAGLE's does. Starting from the target's last
decoder layer is far worse: that layer expects the target's un-normalised residual stream,
so on post-norm features its outputs start ~50x too large (feature loss ~37, token loss ~300
where a fresh head starts at ~1 and ~ln(V)) and 200 steps do not recover.

`unroll` > 1 also trains the later steps of a draft chain as drafting runs them ("training-
time test", as in HASS and EAGLE-3): step j+1 reads the head's own output of step j instead
of the target's feature, and sees only the real rows before the chain and its ancestors::

    copy 0 (real features)   row r: keys = real rows <= r                (causal)
    copy j (step j+1)        row r: keys = real rows <= r-j, and copy i row r-j+i, 1<=i<=j

The features come from whatever model is loaded, so a quantized target trains a head on its
own (quantized) features.
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
from specquant.quant.rotate import get_rotation, rotation_fingerprint
from specquant.train.features import FeatureStore, features
from specquant.train.loop import Batch, TrainConfig, autocast, make_batch, split_heldout, train
from specquant.train.make_data import Sample

FEATURE_WEIGHT = 1.0  # EAGLE's v_w
TOKEN_WEIGHT = 0.1  # EAGLE's p_w
NOISE = 0.2  # uniform input noise U(-0.1, 0.1) on the features
EVAL_DEPTH = 3  # chain steps scored on held-out samples after training


def init_head(target: LlamaModel, seed: int = 0) -> EagleHead:
    """A fresh head (std 0.02 weights, unit norms, zero fc bias) for `target`."""
    cfg = head_config({}, target.config)
    param = target.embed_tokens.weight
    head = init_random_(EagleHead(cfg), seed).to(device=param.device, dtype=torch.float32)
    assert head.fc.bias is not None
    with torch.no_grad():
        head.fc.bias.zero_()
    head.prepare_kernels()
    return head


def feature_scale(
    target: LlamaModel, samples: list[Sample], max_len: int, batch_size: int = 8
) -> torch.Tensor:
    """Per-dimension standard deviation [H] of the target's features on answer positions."""
    device = target.embed_tokens.weight.device
    rope = RopeTable(target.config, max_len, device, target.embed_tokens.weight.dtype)
    rows = []
    for start in range(0, len(samples), batch_size):
        batch = make_batch(samples[start : start + batch_size], max_len, device)
        rows.append(features(target, batch.tokens, rope)[batch.loss_mask])
    feats = torch.cat(rows)
    std = feats.std(0) if feats.shape[0] > 1 else torch.ones_like(feats[0])
    return std.clamp(min=1e-2 * float(std.mean()) + 1e-6)  # no division by a dead dimension


def chain_mask(n: int, depth: int, device: torch.device) -> torch.Tensor:
    """[depth*n, depth*n] attention of `depth` stacked copies of n rows (module docstring)."""
    r = torch.arange(n, device=device)
    j = torch.arange(depth, device=device)
    q_copy, q_row = j[:, None, None, None], r[None, :, None, None]
    k_copy, k_row = j[None, None, :, None], r[None, None, None, :]
    real = (k_copy == 0) & (k_row <= q_row - q_copy)
    ancestor = (k_copy >= 1) & (k_copy <= q_copy) & (k_row == q_row - q_copy + k_copy)
    return (real | ancestor).reshape(depth * n, depth * n)


def unroll(
    head: EagleHead,
    embeds: torch.Tensor,  # [B, n, H] embeddings of tokens 1..n
    feats: torch.Tensor,  # [B, n, H] target features at rows 0..n-1
    depth: int,
    rope: RopeTable,
) -> list[torch.Tensor]:  # depth x [B, n, H]; [j][:, r] = step j+1 of the chain ending at r
    n = embeds.shape[1]
    outs: list[torch.Tensor] = []
    for d in range(1, depth + 1):
        # step j+1 at row r reads step j's output at row r-1 (row 0 has no chain: zeros)
        fed = [F.pad(h[:, :-1], (0, 0, 1, 0)) for h in outs]
        mask = chain_mask(n, d, embeds.device)
        positions = torch.arange(n, device=embeds.device).repeat(d)
        meta = AttnMetadata.plan(rope, 0, d * n, positions=positions, block_mask=mask)
        out = head(embeds.repeat(1, d, 1), torch.cat([feats, *fed], dim=1), BlockKV(), meta)
        outs.append(out[:, (d - 1) * n :])
    return outs


def answer_rows(batch: Batch) -> torch.Tensor:  # [B, T-1]
    """Head rows that are scored: row t reads token t+1 and predicts token t+2, so both
    must be answer tokens (the row after the stop token would learn what follows the end)."""
    return batch.loss_mask[:, :-1] & batch.loss_mask[:, 1:]


def eagle_loss_fn(
    head: EagleHead,
    target: LlamaModel,
    max_len: int,
    seed: int,
    scale: torch.Tensor | None = None,  # [H] feature std for the regression (default 1)
    depth: int = 1,
    token_weight: float = TOKEN_WEIGHT,
    store: FeatureStore | None = None,  # cached features instead of running the target
) -> Any:
    device = target.embed_tokens.weight.device
    rope_t = RopeTable(target.config, max_len, device, target.embed_tokens.weight.dtype)
    rope_h = RopeTable(head.config, max_len, device, torch.float32)
    gen = torch.Generator(device=device).manual_seed(seed)
    scale = torch.ones(head.config.hidden_size, device=device) if scale is None else scale
    lm_head = target.lm_head.weight

    def loss_fn(batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        tokens = batch.tokens
        if store is None:
            feats = features(target, tokens, rope_t)  # [B, T, H]
        else:
            feats = store.batch(batch.indices, batch.lengths, tokens.shape[1], device)
        f_in, f_next = feats[:, :-1], feats[:, 1:]
        if head.training:  # EAGLE-1's feature augmentation; evaluation sees clean features
            f_in = f_in + (torch.rand(f_in.shape, generator=gen, device=device) - 0.5) * NOISE
        emb = target.embed_tokens(tokens[:, 1:]).float()
        outs = unroll(head, emb, f_in, depth, rope_h)
        m = answer_rows(batch)
        # zero, but part of the graph: a batch without a scorable row (answers of one token
        # within max_len) must give a zero gradient, not the NaN of a mean over nothing
        loss = outs[0].sum() * 0.0
        metrics: dict[str, float] = {}
        for j, h in enumerate(outs):
            mj = m.clone()
            mj[:, :j] = False  # a chain of j+1 steps needs j real rows before it
            if not mj.any():
                continue
            hv, fv = h[mj].float(), f_next[mj]
            loss_v = F.smooth_l1_loss(hv / scale, fv / scale)
            with torch.no_grad():
                p = F.linear(fv, lm_head).float().softmax(-1)
            logq = F.linear(hv, lm_head).float().log_softmax(-1)
            loss_p = -(p * logq).sum(-1).mean()
            loss = loss + FEATURE_WEIGHT * loss_v + token_weight * loss_p
            acc = (logq.argmax(-1) == p.argmax(-1)).float().mean()
            tag = "" if j == 0 else f"_step{j + 1}"
            metrics |= {
                f"feature_loss{tag}": loss_v.item(),
                f"token_loss{tag}": loss_p.item(),
                f"top1{tag}": acc.item(),
            }
        return loss, metrics

    return loss_fn


@torch.no_grad()
def chain_accuracy(
    head: EagleHead,
    target: LlamaModel,
    samples: list[Sample],
    cfg: TrainConfig,
    depth: int = EVAL_DEPTH,
) -> list[float]:
    """[k-1] = share of answer positions where a greedy chain drafted there gets its first k
    tokens right (the target's own argmax; true tokens fed back, as after acceptance)."""
    device = target.embed_tokens.weight.device
    rope_t = RopeTable(target.config, cfg.max_len, device, target.embed_tokens.weight.dtype)
    rope_h = RopeTable(head.config, cfg.max_len, device, torch.float32)
    was_training = head.training
    head.eval()
    hits, total = torch.zeros(depth), 0
    for start in range(0, len(samples), cfg.batch_size):
        batch = make_batch(samples[start : start + cfg.batch_size], cfg.max_len, device)
        with autocast(cfg, device):
            feats = features(target, batch.tokens, rope_t)
            emb = target.embed_tokens(batch.tokens[:, 1:]).float()
            outs = unroll(head, emb, feats[:, :-1], depth, rope_h)
            want = target.logits(feats[:, 1:]).argmax(-1)  # [B, n] target's token at r+2
            got = [target.logits(h).argmax(-1) for h in outs]
        m = answer_rows(batch)
        n = m.shape[1]
        # chains start at rows 0..n-depth, inside the answer with all their steps
        starts = m[:, : n - depth + 1] & m[:, depth - 1 :]
        ok = starts.clone()
        for j in range(depth):
            rows = slice(j, n - depth + 1 + j)
            ok = ok & (got[j][:, rows] == want[:, rows])
            hits[j] += int(ok.sum())
        total += int(starts.sum())
    head.train(was_training)
    return (hits / max(total, 1)).tolist()


def train_eagle(
    target: LlamaModel,
    samples: list[Sample],
    cfg: TrainConfig,
    out_dir: Path,
    *,
    depth: int = 1,
    token_weight: float = TOKEN_WEIGHT,
    features_from: Path | None = None,  # a make-data feature cache of this target
    resume: bool = False,
    card: dict[str, Any] | None = None,
) -> EagleHead:
    """Train, then save the head (public EAGLE layout), its log and a model card."""
    if depth < 1:
        raise ValueError(f"unroll depth must be >= 1, got {depth}")
    if token_weight < 0:
        raise ValueError(f"token loss weight must be >= 0, got {token_weight}")
    target.requires_grad_(False)
    head = init_head(target, cfg.seed)
    rotation = get_rotation(target)
    if rotation is not None:  # the head learns the rotated features: record which rotation
        head.trained_on_rotation = rotation_fingerprint(rotation)
    train_set, held = split_heldout(samples, cfg)
    scale = feature_scale(target, train_set[:32], cfg.max_len)
    store = None if features_from is None else FeatureStore(features_from, target)
    if store is not None:
        store.check_covers([s.index for s in samples])
    loss_fn = eagle_loss_fn(head, target, cfg.max_len, cfg.seed, scale, depth, token_weight, store)
    device = target.embed_tokens.weight.device
    history = train(
        head,
        loss_fn,
        samples,
        cfg,
        out_dir,
        device,
        resume=resume,
        desc="train-eagle",
        snapshot=lambda path: save_eagle_head(head, path, dtype=torch.bfloat16),
    )
    if held and history:
        chain = chain_accuracy(head, target, held, cfg)
        history[-1] |= {f"heldout_chain{k + 1}": v for k, v in enumerate(chain)}
    save_eagle_head(head, out_dir, dtype=torch.bfloat16)  # compact; loads into any dtype
    card = {**(card or {}), "heldout": len(held), "unroll": depth, "token_weight": token_weight}
    write_card(out_dir, "EAGLE-1/2 head", cfg, history, card)
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
    keys = [k for k in (tail[0] if tail else {}) if k != "step" and not k.startswith("heldout_")]
    final = {k: sum(h[k] for h in tail if k in h) / len(tail) for k in keys}
    held = next((h for h in reversed(history) if any(k.startswith("heldout_") for k in h)), {})
    done = int(history[-1]["step"]) if history else 0
    stopped = f" (of {cfg.steps} planned: stopped at the time limit)" if done < cfg.steps else ""
    lines = [
        f"# {kind}",
        "",
        f"Target: {card.get('target', '?')}",
        f"Training data: {card.get('data', '?')}"
        + (f", made by `{card['data_command']}`" if card.get("data_command") else ""),
        "",
        "| source | prompts | license |",
        "|---|---|---|",
    ]
    for source, info in sorted(card.get("sources", {}).items()):
        lines.append(f"| {source} | {info.get('count', '?')} | {info.get('license', '?')} |")
    lines += [
        "",
        f"Steps: {done}{stopped} x {cfg.batch_size} sequences (max {cfg.max_len} tokens), "
        f"peak lr {cfg.lr}, seed {cfg.seed}"
        + (f", {card['unroll']} chain steps trained per position" if "unroll" in card else "")
        + (f", token loss weight {card['token_weight']}." if "token_weight" in card else "."),
        "Final training-batch metrics (mean of the last 50 steps): "
        + ", ".join(f"{k} {v:.4f}" for k, v in final.items()),
    ]
    if held:
        lines.append(
            f"Held-out metrics ({card.get('heldout', '?')} samples never trained on, "
            f"step {int(held['step'])}): "
            + ", ".join(f"{k[8:]} {v:.4f}" for k, v in held.items() if k.startswith("heldout_"))
        )
    lines += [
        "",
        f"Reproduce: `{card.get('command', '?')}`",
        "",
        f"Config: `{json.dumps(asdict(cfg))}`",
    ]
    (out_dir / "README.md").write_text("\n".join(lines) + "\n")
