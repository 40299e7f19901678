"""Batched generation for self-distillation data (many prompts at once, left-padded).

The serving engine is batch-1 and speculative; producing training data wants throughput
instead, so this runs B prompts together. Rows are left-padded to a common length; each row
has its own rope positions and a key mask that hides its padding::

    row 0:  pad pad  p0 p1 p2 | g0 g1 ...      positions 0 0 0 1 2 | 3 4 ...
    row 1:  p0  p1  p2 p3 p4  | g0 g1 ...      positions 0 1 2 3 4 | 5 6 ...
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from specquant.config import SamplingParams
from specquant.engine.sampling import sample
from specquant.layers.attention import AttnMetadata, select_attention
from specquant.layers.rope import RopeTable
from specquant.models.llama import LlamaModel

DROP_SHARE = 8  # drop finished rows once 1/DROP_SHARE of the batch has finished


@torch.inference_mode()
def generate_batch(
    model: LlamaModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop_ids: frozenset[int],
    sampling: SamplingParams | None = None,
    rng: torch.Generator | None = None,
) -> list[list[int]]:
    """New tokens for every prompt (a final stop token included)."""
    sampling = sampling or SamplingParams()
    cfg = model.config
    param = model.embed_tokens.weight
    device, dtype = param.device, param.dtype
    b, width = len(prompts), max(len(p) for p in prompts)
    total = width + max_new_tokens
    if total > cfg.max_position_embeddings:
        raise ValueError(f"prompt + answer of {total} tokens exceeds the model's context")
    cache = model.new_cache(total, batch=b)
    rope = RopeTable(cfg, total, device, dtype)
    attn_fn = select_attention(device, dtype)

    pad = torch.tensor([width - len(p) for p in prompts], device=device)
    tokens = torch.zeros(b, width, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p) :] = torch.tensor(list(p), device=device)
    valid = torch.zeros(b, total, dtype=torch.bool, device=device)  # key slots with content
    valid[:, :width] = torch.arange(width, device=device)[None] >= pad[:, None]
    positions = (torch.arange(width, device=device)[None] - pad[:, None]).clamp(min=0)  # [B, W]

    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    # Padding queries see only themselves, so no softmax row is empty (their output is unused).
    mask = (causal[None] & valid[:, None, :width]) | torch.eye(
        width, dtype=torch.bool, device=device
    )
    meta = _meta(rope, 0, positions, mask[:, None], attn_fn, cfg.sliding_window)
    last = torch.tensor([width - 1], device=device)
    logits = model(tokens, cache, meta, logits_index=last).logits[:, -1]  # [B, V]

    out: list[list[int]] = [[] for _ in range(b)]
    live = list(range(b))  # prompt index of each batch row
    finished: set[int] = set()  # batch rows done but not yet dropped
    pos = positions[:, -1]
    for step in range(max_new_tokens):
        nxt = sample(logits, sampling, rng)  # [B']
        for row, tok in enumerate(nxt.tolist()):  # one device sync per step
            if row not in finished:
                out[live[row]].append(tok)
                if tok in stop_ids:
                    finished.add(row)
        if len(finished) == len(live) or step == max_new_tokens - 1:
            break
        if len(finished) * DROP_SHARE >= len(live):
            # Finished rows leave the batch (their cache rows too), so a batch whose answers
            # differ in length stops paying for the short ones; waiting until a share of the
            # batch has finished keeps the cache copies rare.
            keep = [r for r in range(len(live)) if r not in finished]
            rows = torch.tensor(keep, device=device)
            cache.select_rows(rows)
            valid, pos, nxt = valid[rows], pos[rows], nxt[rows]
            live, finished = [live[r] for r in keep], set()
        slot = width + step
        valid[:, slot] = True
        pos = pos + 1
        meta = _meta(
            rope, slot, pos[:, None], valid[:, None, None, : slot + 1], attn_fn, cfg.sliding_window
        )
        logits = model(nxt[:, None], cache, meta).logits[:, -1]
    return out


def _meta(
    rope: RopeTable,
    cache_len: int,
    positions: torch.Tensor,  # [B, T]
    mask: torch.Tensor,  # [B, 1, T, S]
    attn_fn: object,
    sliding_window: int | None,
) -> AttnMetadata:
    if sliding_window is not None:
        raise ValueError("batched generation does not support sliding-window models yet")
    cos, sin = rope.cos[positions][:, None], rope.sin[positions][:, None]  # [B, 1, T, D]
    return AttnMetadata(cache_len, positions, cos, sin, mask, attn_fn, sliding_window)  # type: ignore[arg-type]
