"""EAGLE-2: an EAGLE head drafts a dynamic tree from the base model's features.

State: the head's own 1-layer KV cache holds rows t = 0 .. E-1, row t being the pair
(f_t, tok_{t+1}) of the context it last saw. Each `propose`:

1. syncs that cache with the base model's committed tokens + root (rows whose tokens changed
   are dropped; missing rows are run from the base model's stored features);
2. expands `depth` levels: each level runs the k frontier nodes (their KV lands after the
   committed rows, seen only by their descendants), scores k children per node by cumulative
   log-probability and keeps the best k as the next frontier (EAGLE-2 "expand");
3. reranks every node tried and keeps the best `tree_size - 1` ("rerank"); ancestors
   always rank before descendants, so the selection is a tree.

All of it stays on the device; the tree-level KV entries are dropped afterwards.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from specquant.cache.static_kv import KVCache
from specquant.engine.cuda_graph import GraphCaptureError
from specquant.engine.runner import (
    PREFILL_CHUNK,
    FeatureSpec,
    ModelRunner,
    common_prefix,
    eagle3_layers,
)
from specquant.layers.attention import AttnMetadata, select_attention
from specquant.layers.linear import QLinear
from specquant.layers.rope import RopeTable
from specquant.models.eagle import Eagle3Head, EagleHead
from specquant.models.llama import lm_head_rows
from specquant.spec.drafters.base import DraftRequest, DraftStats
from specquant.spec.drafters.tree_graphs import TreeGraphs
from specquant.spec.tree import MAX_TREE_SIZE, DraftTree

# (level, frontier tokens [k], their features [k, H], their ancestors' mask [k, level * k])
# -> the head's (hidden [k, H], log-probs [k, V_draft]) for that level
LevelRun = Callable[
    [int, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]
]


def validate_tree_params(depth: int, topk: int, tree_size: int, vocab: int) -> None:
    if depth < 1:
        raise ValueError(f"tree depth must be >= 1, got {depth}")
    if not 1 <= topk <= vocab:
        raise ValueError(f"top-k must be in [1, vocabulary size {vocab}], got {topk}")
    if not 2 <= tree_size <= MAX_TREE_SIZE:
        raise ValueError(
            f"tree size {tree_size} is not supported: it must be in [2, {MAX_TREE_SIZE}] "
            "(nodes verified in one pass, root included)"
        )
    tried = topk + (depth - 1) * topk * topk
    if tree_size - 1 > tried:
        raise ValueError(
            f"tree size {tree_size} needs {tree_size - 1} draft nodes but depth {depth} and "
            f"top-k {topk} only produce {tried}"
        )


def head_features(head: EagleHead | Eagle3Head, base_layers: int) -> FeatureSpec:
    """What the base model must record for this head: post-norm features (EAGLE-1/2) or the
    inputs of three layers (EAGLE-3)."""
    return eagle3_layers(base_layers) if isinstance(head, Eagle3Head) else "final"


class EagleDrafter:
    name = "eagle2"

    def __init__(
        self,
        head: EagleHead | Eagle3Head,
        base: ModelRunner,
        *,
        depth: int,
        topk: int,
        tree_size: int,
        vocab_ids: torch.Tensor | None = None,  # [V_draft] FR-Spec drafting vocabulary
        cuda_graphs: bool = False,  # replay the tree expansion from CUDA graphs (CUDA only)
    ):
        want = head_features(head, base.config.num_layers)
        if base.features != want:
            raise ValueError(
                f"the base runner must record features {want!r}, not {base.features!r}"
            )
        # FR-Spec: an EAGLE-1/2 head drafts from the lm_head rows of frequent tokens only
        # (its own `lm_head_vocab.json`, or the rows a draft base already restricted to), so
        # each tree level multiplies by 8k rows instead of the whole vocabulary.
        self.vocab_ids: torch.Tensor | None = None
        self.draft_lm_head: QLinear | None = None
        model = base.model
        if isinstance(head, Eagle3Head):
            vocab = head.lm_head.out_features
        elif model.vocab_ids is not None:
            self.vocab_ids, self.draft_lm_head = model.vocab_ids, model.lm_head
            vocab = int(model.vocab_ids.numel())
        elif vocab_ids is not None:
            self.draft_lm_head, self.vocab_ids = lm_head_rows(model.lm_head, vocab_ids)
            vocab = int(self.vocab_ids.numel())
        else:
            vocab = base.config.vocab_size
        validate_tree_params(depth, topk, tree_size, vocab)
        self.head, self.base = head, base
        self.depth, self.topk, self.tree_size = depth, topk, tree_size
        max_len = base.max_seq_len + depth * topk + 2
        self.cache = head.new_cache(max_len)
        w = head.lm_head.weight if isinstance(head, Eagle3Head) else head.fc.weight
        self.rope = RopeTable(head.config, max_len, w.device, w.dtype)
        self.attn_fn = select_attention(w.device, w.dtype)
        self.context: list[int] = []  # tokens whose pairs fill the committed cache rows
        self.stats = DraftStats()
        self.graphs: TreeGraphs | None = None
        if cuda_graphs and w.device.type == "cuda":
            self.graphs = TreeGraphs(self)

    def reset(self) -> None:
        self.cache.reset()
        self.context = []

    # ------------------------------------------------------------------ head calls
    def _run(
        self,
        tokens: torch.Tensor,  # [T] next tokens
        feats: torch.Tensor,  # [T, H]
        cache_len: int,
        positions: torch.Tensor,  # [T]
        block_mask: torch.Tensor | None,  # [T, W]
    ) -> tuple[torch.Tensor, torch.Tensor]:  # hidden [T, H], log-probs [T, V_draft]
        meta = AttnMetadata.plan(
            self.rope,
            cache_len,
            tokens.shape[0],
            positions=positions,
            block_mask=block_mask,
            attn_fn=self.attn_fn,
        )
        return self._head(tokens, feats, self.cache, meta)

    def _head(
        self, tokens: torch.Tensor, feats: torch.Tensor, cache: KVCache, meta: AttnMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:  # hidden [T, H], log-probs [T, V_draft]
        """The head on tokens [T] and their features [T, H] under `meta`, K/V into `cache`."""
        base = self.base.model
        head = self.head
        if isinstance(head, Eagle3Head):
            embed = head.embed_tokens if head.embed_tokens is not None else base.embed_tokens
            h = head(embed(tokens)[None], feats[None], cache, meta)[0]
            return h, torch.log_softmax(head.draft_logits(h).float(), dim=-1)
        h = head(base.embed_tokens(tokens)[None], feats[None], cache, meta)[0]
        logits = base.logits(h) if self.draft_lm_head is None else self.draft_lm_head(h)
        return h, torch.log_softmax(logits.float(), dim=-1)

    def _topk(self, logp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k over the head's vocabulary, ids mapped to the target's vocabulary."""
        scores, ids = logp.topk(k, dim=-1)
        if isinstance(self.head, Eagle3Head):
            ids = self.head.to_target_ids(ids)
        elif self.vocab_ids is not None:
            ids = self.vocab_ids[ids]
        return scores, ids

    def _sync(self, context: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Commit rows for `context` (base ids + root); return the last row's outputs."""
        same = common_prefix(self.context, context)
        # Row t needs tokens 0..t+1 unchanged; always rerun the last row for its output.
        keep = max(0, min(self.cache.length, same - 1, len(context) - 2))
        self.cache.truncate(keep)
        feats = self.base.feats
        assert feats is not None
        end = len(context) - 1  # rows keep .. end-1
        device = feats.device
        ids = torch.tensor(context[keep + 1 : end + 1], device=device)
        for start in range(keep, end, PREFILL_CHUNK):  # chunked like the base's prefill
            stop = min(start + PREFILL_CHUNK, end)
            positions = torch.arange(start, stop, device=device)
            h, logp = self._run(
                ids[start - keep : stop - keep], feats[start:stop], start, positions, None
            )
            self.cache.commit(stop - start)
        self.context = list(context)
        return h[-1], logp[-1]

    # ------------------------------------------------------------------ tree
    def propose(self, req: DraftRequest) -> DraftTree:
        assert req.target is self.base, "an EAGLE drafter drafts for the model it was built on"
        context = [*req.target.ids, req.root]
        last_h, last_logp = self._sync(context)
        n = min(self.tree_size, req.max_nodes)
        committed, root_pos = self.cache.length, len(context) - 1
        k, device = self.topk, last_h.device
        drafted = None
        if self.graphs is not None and n == self.tree_size:
            try:
                drafted = self.graphs.tree(last_h, last_logp, committed, root_pos, req.root)
            except GraphCaptureError as e:  # keep drafting, eagerly, and say why once
                warnings.warn(f"{e}; drafting without CUDA graphs from here on", stacklevel=2)
                self.graphs = None
        if drafted is not None:
            tokens, parents = drafted
        else:

            def level_run(level: int, tokens: torch.Tensor, feats: torch.Tensor,
                          mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
                positions = torch.full((k,), root_pos + level - 1, device=device)
                return self._run(tokens, feats, committed + (level - 1) * k, positions, mask)

            root = torch.full((1,), req.root, device=device)
            tokens, parents = self.expand(last_h, last_logp, root, n, level_run)
        self.cache.truncate(committed)  # drop the tree-level rows
        return DraftTree.from_parents(tokens, parents)

    def expand(
        self,
        last_h: torch.Tensor,  # [H] the head's output at the root's row
        last_logp: torch.Tensor,  # [V_draft] its log-probabilities
        root: torch.Tensor,  # [1] the root token
        n: int,  # nodes in the tree, root included
        level_run: LevelRun,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # tokens [n], parents [n] (root first)
        """Expand and rerank (steps 2-3 of the module docstring) with device ops of fixed
        shapes only, so that a CUDA graph can replay it: `level_run(level, tokens [k],
        features [k, H], mask [k, level * k])` runs level `level`'s frontier after the
        committed rows and the levels before it."""
        k = self.topk
        device = last_h.device
        scores, toks = self._topk(last_logp, k)  # [k]
        hist_scores, hist_tokens = [scores], [toks]
        hist_parents = [torch.full((k,), -1, device=device)]
        frontier_h = last_h.expand(k, -1)
        frontier_scores, frontier_tokens = scores, toks
        frontier_idx = torch.arange(k, device=device)
        frontier_mask = torch.eye(k, dtype=torch.bool, device=device)  # [k, level*k]
        n_hist = k
        depth = min(self.depth, n - 1)  # an n-node tree is at most n-1 deep
        for level in range(1, depth):
            h, logp = level_run(level, frontier_tokens, frontier_h, frontier_mask)
            child_scores, child_tokens = self._topk(logp, k)  # [k, k]
            child_scores = child_scores + frontier_scores[:, None]
            hist_scores.append(child_scores.flatten())
            hist_tokens.append(child_tokens.flatten())
            hist_parents.append(frontier_idx.repeat_interleave(k))
            best = child_scores.flatten().topk(k).indices  # [k] next frontier
            row = best // k
            frontier_h = h[row]
            frontier_tokens = child_tokens.flatten()[best]
            frontier_scores = child_scores.flatten()[best]
            frontier_idx = n_hist + best
            eye = torch.eye(k, dtype=torch.bool, device=device)
            frontier_mask = torch.cat([frontier_mask[row], eye], dim=1)
            n_hist += k * k

        all_scores = torch.cat(hist_scores)
        # Stable sort: on equal scores the earlier (shallower) node wins, so an ancestor
        # always ranks before its descendants and any top-m prefix is a tree.
        order = torch.sort(all_scores, descending=True, stable=True).indices[: n - 1]
        chosen = order.sort().values  # history order: parents before children
        parents_hist = torch.cat(hist_parents)[chosen]
        lookup = torch.full((n_hist,), -1, device=device)
        lookup[chosen] = torch.arange(1, chosen.numel() + 1, device=device)
        parents = torch.where(parents_hist < 0, 0, lookup[parents_hist.clamp(min=0)])
        tokens = torch.cat([root, torch.cat(hist_tokens)[chosen]])
        parents = torch.cat([torch.full((1,), -1, device=device), parents])
        return tokens, parents
