"""One model plus its run state: KV cache, rope table, committed token ids, features.

Every model in a speculative stack (target, intermediate, draft) gets a `ModelRunner`. The
runner keeps three things aligned, position by position::

    ids    [0 .. n)            committed token ids
    cache  slots [0 .. n)      their K/V
    feats  rows  [0 .. n)      their features, if asked for: "final" = post-norm hidden
                               states (EAGLE-1/2), or a tuple of layer indices = those
                               layers' input residual streams, concatenated (EAGLE-3)

`run()` computes a block after the committed prefix without committing it; `commit()` or
`accept()` then keeps all of it or a subset (a verified tree path); `sync()` makes the
runner hold a given token sequence, reusing the longest common prefix.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from specquant.cache.static_kv import KVCache
from specquant.config import ConfigError, ModelConfig
from specquant.engine.cuda_graph import GraphCaptureError, GraphedDecoder
from specquant.layers.attention import AttentionFn, AttnMetadata, select_attention
from specquant.layers.linear import QLinear, quantizes_activations
from specquant.layers.rope import RopeTable
from specquant.models.llama import LlamaModel, ModelOutput

PREFILL_CHUNK = 1024
# prompt chunks up to this many tokens replay graphs (a drafter syncing to the target's
# last tokens each step); longer ones run eagerly
MAX_PREFILL_GRAPH = 16
FeatureSpec = str | tuple[int, ...] | None


MIN_EAGLE3_LAYERS = 7  # below this, (2, L//2, L-3) repeats or leaves the model


def eagle3_layers(num_layers: int) -> tuple[int, int, int]:
    """Low, middle and high layers whose inputs EAGLE-3 heads read."""
    if num_layers < MIN_EAGLE3_LAYERS:
        raise ConfigError(
            f"EAGLE-3 heads read layers (2, L/2, L-3); a model with {num_layers} layers has no "
            f"three distinct such layers (needs >= {MIN_EAGLE3_LAYERS})"
        )
    return (2, num_layers // 2, num_layers - 3)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the common case (a pure extension), compared at C speed
        return n
    lo, hi = 0, n  # invariant: a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class ModelRunner:
    def __init__(
        self,
        model: LlamaModel,
        max_seq_len: int,
        features: FeatureSpec = None,
        *,
        cuda_graphs: bool = False,
    ):
        self.model = model
        self.config: ModelConfig = model.config
        param = model.embed_tokens.weight
        self.device, self.dtype = param.device, param.dtype
        self.max_seq_len = max_seq_len
        self.cache = model.new_cache(max_seq_len)
        self.rope = RopeTable(self.config, max_seq_len, self.device, self.dtype)
        self._fast_attn = select_attention(self.device, self.dtype)
        self._exact_attn: AttentionFn | None = None
        # the model's linears, listed once: walking all its modules per block took 0.4 ms
        # (SmolLM2); their formats are read per block (quantizing works in place)
        self._linears = [m for m in model.modules() if isinstance(m, QLinear)]
        self.ids: list[int] = []
        self.features = features
        self.feats: torch.Tensor | None = None
        if features is not None:
            if features != "final" and not isinstance(features, tuple):
                raise ValueError(f"features must be None, 'final' or a tuple; got {features!r}")
            width = self.config.hidden_size * (1 if features == "final" else len(features))
            self.feats = torch.zeros(max_seq_len, width, device=self.device, dtype=self.dtype)
        # one-token steps and speculative blocks replayed from CUDA graphs; on other devices
        # the flag is ignored
        self.graphs: GraphedDecoder | None = None
        if cuda_graphs and self.device.type == "cuda":
            self.graphs = GraphedDecoder(self)

    @property
    def length(self) -> int:
        return len(self.ids)

    # ---------------------------------------------------------------- compute
    def attention(self, prefill: bool = False) -> AttentionFn:
        """The attention kernel for a block. Decoding steps and verified blocks of a model
        that quantizes activations get exact attention (kernels/builtin.attention_float64):
        rows that do not depend on the block, or verification would not reproduce the
        decoding steps. Asked per block, so a model quantized after this runner was built
        gets it too. A prompt's prefill runs the same blocks with or without speculation,
        so it keeps the fast kernel."""
        # (exact attention is CPU-only: elsewhere skip the check of the model's linears)
        if prefill or self.device.type != "cpu" or not quantizes_activations(self._linears):
            return self._fast_attn
        if self._exact_attn is None:
            self._exact_attn = select_attention(self.device, self.dtype, exact=True)
        return self._exact_attn

    def run(
        self,
        tokens: torch.Tensor,  # [T] int64 on self.device
        *,
        block_mask: torch.Tensor | None = None,  # [T, T] bool; None = causal
        depth: torch.Tensor | None = None,  # [T] offsets from the prefix end; None = arange
        last_only: bool = False,
        prefill: bool = False,  # a prompt's tokens (sync), not a decoding step or a draft
    ) -> tuple[torch.Tensor, torch.Tensor]:  # logits [T or 1, V], features [T, F]
        """Forward a block after the committed prefix; its K/V are written, not committed."""
        t = tokens.shape[0]
        n = self.length
        if n + t > self.max_seq_len:
            raise ValueError(
                f"sequence of {n + t} tokens exceeds the context of {self.max_seq_len}"
            )
        if self.graphs is not None:
            try:
                graphed = self._graphed(tokens, n, block_mask, depth, prefill)
            except GraphCaptureError as e:  # keep decoding, eagerly, and say why once
                graphed = None
                if t > 1:  # a block: blocks run eagerly, one-token steps keep their graphs
                    warnings.warn(f"{e}; blocks run without CUDA graphs from here on",
                                  stacklevel=2)  # fmt: skip
                    self.graphs.blocks_enabled = False
                else:
                    warnings.warn(f"{e}; decoding without CUDA graphs from here on",
                                  stacklevel=2)  # fmt: skip
                    self.graphs = None
            if graphed is not None:
                logits, hidden = graphed
                return (logits[-1:] if last_only else logits), hidden
        positions = None if depth is None else n + depth
        meta = AttnMetadata.plan(
            self.rope,
            n,
            t,
            positions=positions,
            block_mask=block_mask,
            sliding_window=self.config.sliding_window,
            attn_fn=self.attention(prefill),
        )
        index = torch.tensor([t - 1], device=self.device) if last_only else None
        return self.forward(tokens, self.cache, meta, logits_index=index)

    def forward(
        self,
        tokens: torch.Tensor,  # [T]
        cache: KVCache,
        meta: AttnMetadata,
        logits_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # logits [T or len(index), V], features [T, F]
        """The model on a block (batch row 0) with this cache view and metadata: its logits
        and the features this runner keeps (the graphed steps call it with their window of
        the cache)."""
        layers = self.features if isinstance(self.features, tuple) else ()
        out = self.model(
            tokens[None],
            cache,
            meta,
            logits_index=logits_index,
            return_hidden=True,
            hidden_layers=layers,
        )
        return self.outputs(out)

    def _graphed(
        self,
        tokens: torch.Tensor,  # [T]
        n: int,
        block_mask: torch.Tensor | None,
        depth: torch.Tensor | None,
        prefill: bool,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The block through a CUDA graph where one serves it: one-token steps, and blocks
        of up to MAX_BLOCK tokens (verification, a drafter catching up) but for prompt
        chunks longer than MAX_PREFILL_GRAPH, which vary too much to be worth a graph each.
        None: run it eagerly."""
        assert self.graphs is not None
        t = tokens.shape[0]
        if t == 1 and block_mask is None and depth is None:
            return self.graphs.step(tokens, n)
        if (prefill and t > MAX_PREFILL_GRAPH) or not self.graphs.fits_block(t, n):
            return None
        return self.graphs.block(tokens, n, block_mask, depth)

    def outputs(self, out: ModelOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """A block's (logits [T, V], features [T, F]) from the model's output (batch row 0):
        the features this runner keeps (the final hidden states, or its layers' inputs side
        by side)."""
        assert out.logits is not None and out.hidden is not None
        if isinstance(self.features, tuple):
            layers = self.features
            return out.logits[0], torch.cat([out.layer_hidden[i][0] for i in layers], dim=-1)
        return out.logits[0], out.hidden[0]

    # ---------------------------------------------------------------- commit
    def commit(self, tokens: Sequence[int], hidden: torch.Tensor) -> None:
        """Keep the first len(tokens) entries of the last block (hidden [T', H], T' >= n)."""
        n = len(tokens)
        if self.feats is not None:
            self.feats[self.length : self.length + n] = hidden[:n]
        self.cache.commit(n)
        self.ids.extend(int(t) for t in tokens)

    def accept(self, keep: torch.Tensor, tokens: Sequence[int], hidden: torch.Tensor) -> None:
        """Keep block entries `keep` [a] (ascending) whose ids are `tokens`; hidden [T, H]."""
        if self.feats is not None:
            self.feats[self.length : self.length + keep.numel()] = hidden[keep]
        self.cache.compact(keep)
        self.ids.extend(int(t) for t in tokens)

    def truncate(self, n: int) -> None:
        self.cache.truncate(n)
        del self.ids[n:]

    def reset(self) -> None:
        self.truncate(0)

    def common_prefix(self, ids: Sequence[int]) -> int:
        return common_prefix(self.ids, ids)

    def sync(self, ids: Sequence[int], *, min_recompute: int = 0) -> torch.Tensor | None:
        """Make the runner hold exactly `ids`; reuse the common prefix, run the rest.

        Returns the logits of the last token run ([V]), or None if nothing had to run.
        `min_recompute=1` forces the last token through the model (for its logits).
        """
        keep = min(self.common_prefix(ids), len(ids) - min_recompute)
        self.truncate(max(keep, 0))
        pending = list(ids[self.length :])
        logits = None
        for start in range(0, len(pending), PREFILL_CHUNK):
            chunk = pending[start : start + PREFILL_CHUNK]
            out, hidden = self.run(
                torch.tensor(chunk, device=self.device), last_only=True, prefill=True
            )
            self.commit(chunk, hidden)
            logits = out[-1]
        return logits
