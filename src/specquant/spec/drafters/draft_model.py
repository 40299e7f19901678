"""SpS: a smaller model with the same tokenizer drafts a chain of k tokens.

The draft model keeps its own KV cache. Each step it is synced to the target's committed
tokens plus the root: after a partial accept that only truncates its cache (the rejected
drafts are dropped, nothing recomputed) and runs the root; after a full accept it runs the
last draft token and the root together.
"""

from __future__ import annotations

import torch

from specquant.engine.runner import ModelRunner
from specquant.engine.sampling import target_probs
from specquant.spec.drafters.base import DraftRequest, DraftStats
from specquant.spec.tree import DraftTree


class DraftModelDrafter:
    name = "sps"

    def __init__(self, runner: ModelRunner, draft_length: int):
        if draft_length < 1:
            raise ValueError(f"draft_length must be >= 1, got {draft_length}")
        self.runner = runner
        self.draft_length = draft_length
        self.stats = DraftStats()

    def reset(self) -> None:
        self.runner.reset()

    def propose(self, req: DraftRequest) -> DraftTree:
        k = min(
            self.draft_length, req.max_nodes - 1, self.runner.max_seq_len - req.target.length - 1
        )
        context = [*req.target.ids, req.root]
        logits = self.runner.sync(context, min_recompute=1)
        assert logits is not None
        tokens: list[torch.Tensor] = []
        probs: list[torch.Tensor] = []
        for i in range(k):
            if req.sampling.greedy:
                tok = logits.argmax(-1, keepdim=True)  # [1]
            else:
                q = target_probs(logits[None], req.sampling)[0]  # [V]
                tok = torch.multinomial(q, 1, generator=req.rng)
                probs.append(q)
            tokens.append(tok)
            if i < k - 1:
                out, hidden = self.runner.run(tok)
                self.runner.commit([int(tok)], hidden)
                logits = out[-1]
        drafted = torch.cat(tokens) if tokens else torch.empty(0, dtype=torch.long)
        return DraftTree.chain(
            req.root, drafted.to(req.target.device), torch.stack(probs) if probs else None
        )
