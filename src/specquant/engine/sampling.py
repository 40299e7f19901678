"""Turning logits into the distribution we sample from, and sampling it.

`target_probs` is *the* distribution of a request: temperature, then top-k, then top-p
(nucleus) are applied to the logits, in that order, and the result is renormalised.
Speculative verification (rejection sampling) uses exactly this distribution, so top-k/top-p
are part of what "lossless" preserves.
"""

from __future__ import annotations

import torch

from specquant.config import SamplingParams


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [N, V] -> probabilities [N, V] (fp32). Requires temperature > 0."""
    assert params.temperature > 0, "greedy decoding has no sampling distribution"
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the mass strictly before it already reaches top_p; the most
        # likely token is always kept.
        before = sorted_p.cumsum(-1) - sorted_p
        sorted_p = sorted_p.masked_fill(before >= params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def make_rng(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.greedy:
        return None
    gen = torch.Generator(device=device)
    if params.seed is not None:
        gen.manual_seed(params.seed)
    else:
        gen.seed()
    return gen


def sample(
    logits: torch.Tensor,  # [N, V]
    params: SamplingParams,
    rng: torch.Generator | None,
) -> torch.Tensor:  # [N] int64
    if params.greedy:
        return logits.argmax(-1)
    return torch.multinomial(target_probs(logits, params), 1, generator=rng).squeeze(-1)
