"""HierSpec: EAGLE drafts trees for an intermediate model, which turns them into a sequence.

    EAGLE head --tree--> intermediate model M --sequence--> target
                  (M verifies, exactly as a target would)   (target verifies a chain)

One `propose` for the target:
1. M is synced to the target's committed tokens (after a partial accept this truncates M's
   cache; after a full accept it runs the tokens M has not seen);
2. from the target's root, repeat until the sequence holds `min_draft_length` tokens:
   EAGLE drafts a tree for M, M verifies it (greedy or recursive rejection), M's cache is
   compacted to the accepted path, and the accepted tokens plus M's bonus join the sequence;
3. the sequence goes to the target as a chain. When sampling, each token's proposal is M's
   own distribution at that point: every level's output is exactly distributed as M, so the
   target's rejection sampling keeps the target's distribution.

The EAGLE head keys its cache by M's token context, so it realigns itself after any
rollback of M (see `EagleDrafter._sync`).
"""

from __future__ import annotations

import torch

from specquant.engine.runner import ModelRunner
from specquant.engine.sampling import target_probs
from specquant.spec.drafters.base import DraftRequest, DraftStats
from specquant.spec.drafters.eagle import EagleDrafter
from specquant.spec.tree import DraftTree
from specquant.spec.verify import verify


class HierSpecDrafter:
    name = "hierspec"

    def __init__(self, intermediate: ModelRunner, eagle: EagleDrafter, min_draft_length: int):
        if min_draft_length < 1:
            raise ValueError(f"min_draft_length must be >= 1, got {min_draft_length}")
        if eagle.base is not intermediate:
            raise ValueError("the EAGLE drafter must draft for the intermediate model")
        self.inter, self.eagle = intermediate, eagle
        self.min_draft_length = min_draft_length
        self.stats = DraftStats()

    @property
    def max_draft_length(self) -> int:
        return self.min_draft_length + self.eagle.depth

    def reset(self) -> None:
        self.inter.reset()
        self.eagle.reset()

    def propose(self, req: DraftRequest) -> DraftTree:
        m = self.inter
        m.sync(req.target.ids)
        budget = min(req.max_nodes - 1, self.max_draft_length)
        root = req.root
        seq: list[int] = []
        qrows: list[torch.Tensor] = []
        while len(seq) < min(self.min_draft_length, budget):
            room = m.max_seq_len - m.length
            if room < 2:
                break
            tree = self.eagle.propose(
                DraftRequest(m, root, req.sampling, req.rng, max_nodes=min(room, budget + 1))
            )
            logits, hidden = m.run(tree.tokens, block_mask=tree.mask, depth=tree.depth)
            res = verify(tree, logits, req.sampling, req.rng)
            m.accept(res.path, tree.tokens[res.path].tolist(), hidden)
            if not req.sampling.greedy:
                qrows.append(target_probs(logits[res.path], req.sampling))
            seq.extend(res.tokens)
            self.stats.inner_accept_lengths.append(res.accept_length)
            root = res.bonus
        seq = seq[:budget]
        device = req.target.device
        probs = torch.cat(qrows)[: len(seq)] if qrows else None
        return DraftTree.chain(req.root, torch.tensor(seq, device=device, dtype=torch.long), probs)
