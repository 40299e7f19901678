"""Draft trees: the one data structure every drafter hands to verification.

A chain of k draft tokens is a tree whose node i has parent i-1. Node 0 is always the *root*:
the token sampled last (the previous bonus token) that the target has not processed yet::

    node:    0      1     2     3     4            parents: [-1, 0, 0, 1, 3]
    token:  root   d1    d1'   d2    d3            depth:   [ 0, 1, 1, 2, 3]
    tree:   root ─┬─ d1 ── d2 ── d3
                  └─ d1'

`mask[i, j]` is True iff j is an ancestor of i or i itself (the tree attention mask);
positions are prefix length + depth. Nodes are ordered so that every ancestor precedes its
descendants, which the verifier and the cache compaction rely on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Verification runs the whole tree in one forward pass; the mask is dense [n, n].
MAX_TREE_SIZE = 256


@dataclass
class DraftTree:
    tokens: torch.Tensor  # [n] int64; tokens[0] is the root
    parents: torch.Tensor  # [n] int64; parents[0] = -1, parents[i] < i
    depth: torch.Tensor  # [n] int64; depth[0] = 0
    mask: torch.Tensor  # [n, n] bool ancestor-or-self relation
    # [n, V] proposal distribution each node's token was drawn from (row 0 unused), or None
    # when tokens were chosen deterministically (top-k): verification then treats each node
    # as a point-mass proposal, which keeps rejection sampling exact.
    draft_probs: torch.Tensor | None = None
    # Set by `chain()`: the accepted path is then a prefix and can be committed in place.
    # Known at construction, so the decode loop needs no device check (and no sync) per step;
    # a chain built any other way is still verified and compacted correctly.
    is_chain: bool = False

    @property
    def size(self) -> int:
        return int(self.tokens.shape[0])

    @classmethod
    def single(cls, root: int, device: torch.device) -> DraftTree:
        """No draft: plain autoregressive decoding is verification of the root alone."""
        return cls.chain(root, torch.empty(0, dtype=torch.long, device=device))

    @classmethod
    def chain(
        cls,
        root: int,
        tokens: torch.Tensor,  # [k] int64
        draft_probs: torch.Tensor | None = None,  # [k, V]
    ) -> DraftTree:
        device = tokens.device
        k = tokens.shape[0]
        all_tokens = torch.cat([torch.tensor([root], device=device), tokens.long()])
        probs = None
        if draft_probs is not None:
            probs = torch.cat([torch.zeros_like(draft_probs[:1]), draft_probs])
        n = k + 1
        return cls(
            tokens=all_tokens,
            parents=torch.arange(-1, k, device=device),
            depth=torch.arange(n, device=device),
            mask=torch.ones(n, n, dtype=torch.bool, device=device).tril(),
            draft_probs=probs,
            is_chain=True,
        )

    @classmethod
    def from_parents(
        cls, tokens: torch.Tensor, parents: torch.Tensor, draft_probs: torch.Tensor | None = None
    ) -> DraftTree:
        """Build mask and depth on the device from parent pointers (ancestors first)."""
        n = tokens.shape[0]
        device = tokens.device
        # Pointer doubling: after round r every node holds its 2^r nearest ancestors, so
        # ceil(log2 n) rounds cover any depth. The root points at itself.
        jump = torch.where(parents >= 0, parents, torch.arange(n, device=device))
        mask = torch.eye(n, dtype=torch.bool, device=device)
        for _ in range(max(1, (n - 1).bit_length())):
            mask = mask | mask[jump]
            jump = jump[jump]
        depth = mask.sum(-1) - 1
        return cls(tokens.long(), parents.long(), depth, mask, draft_probs)

    def children(self) -> list[list[int]]:
        """Children of every node, in node order (host-side; used by the sampler)."""
        out: list[list[int]] = [[] for _ in range(self.size)]
        for i, p in enumerate(self.parents.tolist()):
            if p >= 0:
                out[p].append(i)
        return out

    def path_to(self, node: int) -> torch.Tensor:
        """Node indices from the root to `node`, ascending (ancestors precede)."""
        return torch.nonzero(self.mask[node], as_tuple=False).squeeze(1)
