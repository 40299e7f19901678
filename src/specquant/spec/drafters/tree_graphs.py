"""An EAGLE-2 drafter's tree expansion replayed from CUDA graphs.

After the head's cache is synced (a row or two per step, eagerly), expanding and reranking
the tree (`EagleDrafter.expand`) has fixed shapes for a given depth, top-k and tree size:
only the committed length, the root's position and the root token change, and they live
in device buffers here. Each level's head call writes its K/V through a `WindowKV` at slots
committed + (level - 1) * k + [0, k) and attends over a fixed window of the head's cache
under a mask built on the device from the committed length: the committed rows, the
level's ancestors in the tree, nothing else. One graph per (window width, tree size).
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import torch

from specquant.engine.cuda_graph import WindowKV, capture, window_width
from specquant.kernels.registry import KernelContext, select
from specquant.layers.attention import AttnMetadata

if TYPE_CHECKING:
    from specquant.spec.drafters.eagle import EagleDrafter


class TreeGraphs:
    """`tree()` runs EagleDrafter.expand for the drafter's full tree size through a graph
    (capture=False: the same code eagerly, which the CPU tests compare with the drafter's
    own eager expansion)."""

    def __init__(self, drafter: EagleDrafter, capture: bool = True):
        d = drafter
        device = d.rope.cos.device
        if capture and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
        self.drafter, self.capture = d, capture
        dtype = d.rope.cos.dtype
        # sized on first use: the head's hidden size (an EAGLE-3 head's may differ from the
        # base's) and its drafting vocabulary
        self.last_h = torch.zeros(0, dtype=dtype, device=device)
        self.last_logp = torch.zeros(0, dtype=torch.float32, device=device)
        self.committed = torch.zeros(1, dtype=torch.long, device=device)
        self.root_pos = torch.zeros(1, dtype=torch.long, device=device)
        self.root = torch.zeros(1, dtype=torch.long, device=device)
        # the head's attention under an additive mask: on CUDA the block kernel (16-bit),
        # else SDPA; on the CPU the drafter's own
        self.attend = (
            select("block_attention", KernelContext(device, dtype)).fn
            if device.type == "cuda"
            else d.attn_fn
        )
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph | None, tuple]] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    def _level(
        self,
        width: int,
        level: int,
        tokens: torch.Tensor,  # [k]
        feats: torch.Tensor,  # [k, H]
        frontier_mask: torch.Tensor,  # [k, level * k] bool: each node's ancestors in the tree
    ) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.drafter
        k, dev = d.topk, tokens.device
        first = self.committed + (level - 1) * k  # [1] this level's first slot
        slots = first + torch.arange(k, device=dev)
        positions = (self.root_pos + (level - 1)).repeat(k)
        cols = torch.arange(width, device=dev)
        rel = cols - self.committed  # key's place after the committed rows
        in_tree = (rel >= 0) & (rel < level * k)
        tree = frontier_mask[:, rel.clamp(0, level * k - 1)]  # [k, width]
        allowed = (cols < self.committed)[None, :] | (in_tree[None, :] & tree)
        bias = torch.zeros(k, width, dtype=feats.dtype, device=dev)
        bias.masked_fill_(~allowed, float("-inf"))
        cos, sin = d.rope.gather(positions)
        meta = AttnMetadata(0, positions, cos, sin, bias, self.attend)  # (as _run: no window)
        return d._head(tokens, feats, WindowKV(d.cache, slots, width), meta)

    def _expand(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.drafter
        return d.expand(self.last_h, self.last_logp, self.root, d.tree_size,
                        partial(self._level, width))  # fmt: skip

    def tree(
        self,
        last_h: torch.Tensor,  # [H]
        last_logp: torch.Tensor,  # [V_draft]
        committed: int,  # rows in the head's cache
        root_pos: int,
        root: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # tokens [n], parents [n], fresh tensors
        d = self.drafter
        width = window_width(committed + d.depth * d.topk, d.cache.max_len)
        if self.last_h.shape != last_h.shape or self.last_logp.shape != last_logp.shape:
            self.last_h = torch.zeros_like(last_h)
            self.last_logp = torch.zeros_like(last_logp)
            self.graphs.clear()  # they read the old buffers
        self.last_h.copy_(last_h)
        self.last_logp.copy_(last_logp)
        self.committed.fill_(committed)
        self.root_pos.fill_(root_pos)
        self.root.fill_(root)
        key = (width, d.tree_size)
        if not self.capture:
            tokens, parents = self._expand(width)
            return tokens, parents
        entry = self.graphs.get(key)
        if entry is None:
            device = self.last_h.device
            entry = self.graphs[key] = capture(partial(self._expand, width), device, self.pool,
                                               f"the EAGLE tree over {width} keys")  # fmt: skip
        graph, (tokens, parents) = entry
        assert graph is not None
        graph.replay()
        return tokens.clone(), parents.clone()
