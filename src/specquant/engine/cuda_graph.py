"""Decoding steps and speculative blocks replayed from CUDA graphs.

At batch 1 a decoding step launches a few hundred small kernels (norms, rope, attention,
four linears per layer); eagerly, the CPU's launch time exceeds the GPU's work on any model
this library targets (bench/results/gpu_eager.md: 29% of the HBM roofline on a Llama-3-8B
shape). A CUDA graph replays the whole step with one launch.

A graph fixes every shape and address, so the step reads what changes from device buffers
instead of Python ints:

    token [1], position [1]   written before each replay
    K/V                       written at slot `position` (index_copy_), read over a fixed
                              window of slots [0, width) of which [0, position] are live
                              (and inside the sliding window, if the model has one): the
                              "decode_attention" op reads that length on the device

One graph per window width (powers of two from MIN_WIDTH up to the cache length): a step at
position p replays the narrowest graph whose window holds p + 1 keys, so attention reads at
most twice the live prefix. Graphs are captured on first use (a warm-up step first compiles
the kernels and fills their caches) and share one memory pool.

Blocks of several tokens (a verification tree or chain, a draft model catching up) replay
graphs too, one per (padded token count, window width):

    tokens [P], positions [P]  the block's T tokens and their rope positions, then P - T
                               padding tokens (P: T rounded up to a power of two, so a
                               few graphs serve every tree size)
    slots [P]                  K/V land at slots [start, start + P): the block's own at
                               [start, start + T), as eagerly; the padding's after them,
                               never committed
    mask [P, width]            the block's rows: the prefix, the tree mask, nothing past the
                               block; a padding row sees only its own key

and attention reads the window under that mask (the "block_attention" op: split-K over the
keys on CUDA). Only the first T rows of logits and features are returned. An EAGLE-2
drafter's tree expansion replays its own graphs (spec/drafters/tree_graphs.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from specquant.cache.static_kv import StaticKVCache
from specquant.kernels.registry import KernelContext, select
from specquant.layers.attention import AttnMetadata, block_keys_mask

if TYPE_CHECKING:
    from specquant.engine.runner import ModelRunner

MIN_WIDTH = 256  # narrowest key window: below it the graphs would only multiply
MAX_BLOCK = 128  # longer blocks (prompt chunks) run eagerly: compute-bound, and varied


class GraphCaptureError(RuntimeError):
    """A step could not be captured (an op that synchronizes with the host, or one CUDA
    graphs do not support); the runner then decodes eagerly."""


def block_tokens(t: int) -> int:
    """The padded token count of the graph that serves a block of `t` tokens."""
    if not 2 <= t <= MAX_BLOCK:
        raise ValueError(f"a graphed block holds 2..{MAX_BLOCK} tokens, not {t}")
    return 1 << (t - 1).bit_length()


def window_width(keys: int, max_len: int) -> int:
    """The key window of the graph that serves a step needing `keys` keys."""
    if not 1 <= keys <= max_len:
        raise ValueError(f"a step needs 1..{max_len} keys, not {keys}")
    width = MIN_WIDTH
    while width < keys:
        width *= 2
    return min(width, max_len)


class WindowKV:
    """The KV cache as a captured step sees it (implements the model's KVCache protocol):
    the new K/V go to the slots held in `slots` [T] (the int `start` the model passes is a
    placeholder), and attention reads slots [0, width)."""

    def __init__(self, cache: StaticKVCache, slots: torch.Tensor, width: int):
        self.cache, self.slots, self.width = cache, slots, width

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        # k, v [B, Hkv, T, D] -> slots `slots` of `layer`
        self.cache.k[layer].index_copy_(2, self.slots, k)
        self.cache.v[layer].index_copy_(2, self.slots, v)

    def view(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.k[layer, :, :, : self.width], self.cache.v[layer, :, :, : self.width]


def capture(
    fn: Callable[[], tuple[torch.Tensor, ...]], device: torch.device, pool: Any, what: str
) -> tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]:
    """`fn` captured into a CUDA graph (in memory pool `pool`), after one eager run on a side
    stream that compiles its kernels and fills their caches, and the tensors it returns,
    which each replay overwrites. The capture itself does not run `fn`: replay it. `fn` may
    only read device buffers that its caller fills before each replay."""
    graph = torch.cuda.CUDAGraph()
    # the warm-up inside too: a kernel that fails to compile or launch there (say a Triton
    # kernel only the graphed code uses) leaves the eager path to the caller, as a failed
    # capture does
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            fn()  # (a step writes its own K/V here: the replay writes the same)
        torch.cuda.current_stream(device).wait_stream(side)
        with torch.cuda.graph(graph, pool=pool):
            out = fn()
    except RuntimeError as e:
        raise GraphCaptureError(f"capturing {what} failed: {e}") from e
    return graph, out


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph | None  # None: run eagerly (CPU, or capture=False)
    logits: torch.Tensor  # [1, V] the step's outputs, overwritten by each replay
    hidden: torch.Tensor  # [1, F]
    cache_k: torch.Tensor  # the cache tensor captured (a new one needs a new graph)


@dataclass
class _Block:
    """A graphed block's inputs (filled before each replay) and outputs."""

    tokens: torch.Tensor  # [P]
    positions: torch.Tensor  # [P]
    slots: torch.Tensor  # [P]
    mask: torch.Tensor  # [P, width] bool
    eye: torch.Tensor  # [P, P] bool: the padding rows' own keys
    offsets: torch.Tensor  # [P] 0 .. P - 1: the slots after the committed prefix
    run: _Graph | None = None


class GraphedDecoder:
    """One-token steps of a ModelRunner as CUDA-graph replays (see the module docstring).
    With `capture=False` the same step runs eagerly, over the same window and live length:
    what the CPU tests check against the runner's own step."""

    def __init__(self, runner: ModelRunner, capture: bool = True):
        if capture and runner.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {runner.device}")
        self.runner, self.capture = runner, capture
        dev = runner.device
        self.token = torch.zeros(1, dtype=torch.long, device=dev)
        self.position = torch.zeros(1, dtype=torch.long, device=dev)
        # one query over the window, its live length a device tensor (registry
        # "decode_attention": a Triton kernel on CUDA in 16-bit, else masked SDPA)
        ctx = KernelContext(dev, runner.dtype)
        self.attend = select("decode_attention", ctx).fn
        # a block's tokens under its mask (registry "block_attention": a Triton kernel on
        # CUDA in 16-bit, else SDPA); on the CPU the runner's own attention, which is exact
        # for models that quantize activations (so blocks verify as their steps decode)
        self.attend_block = select("block_attention", ctx).fn if dev.type == "cuda" else None
        self.graphs: dict[int, _Graph] = {}
        self.blocks: dict[tuple[int, int], _Block] = {}
        self.blocks_enabled = True  # False once a block failed to capture: steps still replay
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    def _step(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The model on `token` at `position`, keys [0, width): (logits [1, V], features
        [1, F]) as ModelRunner.run returns them."""
        r = self.runner
        pos = self.position
        window = r.config.sliding_window
        attend, length = self.attend, pos + 1

        def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, _mask: None) -> Any:
            return attend(q, k, v, length, window)  # keys [0, length) of the window live

        cos, sin = r.rope.gather(pos)
        meta = AttnMetadata(0, pos, cos, sin, None, attention, window)
        return r.forward(self.token, WindowKV(r.cache, pos, width), meta)

    def _block_step(self, b: _Block, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The model on a block's padded tokens, keys [0, width) under its mask: (logits
        [P, V], features [P, F])."""
        r = self.runner
        cos, sin = r.rope.gather(b.positions)
        # additive, once per block: SDPA would convert a bool mask again in every layer
        bias = torch.zeros(b.mask.shape, dtype=r.dtype, device=r.device)
        bias.masked_fill_(~b.mask, float("-inf"))
        attend = self.attend_block or r.attention()
        meta = AttnMetadata(0, b.positions, cos, sin, bias, attend, r.config.sliding_window)
        return r.forward(b.tokens, WindowKV(r.cache, b.slots, width), meta)

    def _capture(self, width: int, step: Callable[[], tuple[torch.Tensor, torch.Tensor]],
                 what: str) -> _Graph:  # fmt: skip
        cache_k = self.runner.cache.k
        if not self.capture:
            logits, hidden = step()
            return _Graph(None, logits, hidden, cache_k)
        graph, (logits, hidden) = capture(step, self.runner.device, self.pool,
                                          f"the {what} over {width} keys")  # fmt: skip
        return _Graph(graph, logits, hidden, cache_k)

    def _replay(self, g: _Graph | None, width: int,
                step: Callable[[], tuple[torch.Tensor, torch.Tensor]],
                what: str) -> _Graph:  # fmt: skip
        """Run a step through its graph: captured on first use (or when the cache tensor
        changed), eagerly with capture=False."""
        if g is None or g.cache_k is not self.runner.cache.k:
            g = self._capture(width, step, what)  # eagerly: this step already ran
        elif g.graph is None:
            g.logits, g.hidden = step()
        if g.graph is not None:  # a capture does not run the step: replay it
            g.graph.replay()
        return g

    def step(self, token: torch.Tensor, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Run `token` [1] at `position` (its K/V land in that slot, not committed):
        (logits [1, V], features [1, F]), fresh tensors the next step does not overwrite."""
        width = window_width(position + 1, self.runner.max_seq_len)
        self.token.copy_(token)
        self.position.fill_(position)
        g = self.graphs[width] = self._replay(
            self.graphs.get(width), width, lambda: self._step(width), "one-token step"
        )
        return g.logits.clone(), g.hidden.clone()

    def fits_block(self, t: int, start: int) -> bool:
        """Whether a block of `t` tokens after `start` committed ones can replay a graph
        (2..MAX_BLOCK tokens, room in the cache for its padding, and no block has failed to
        capture)."""
        return (
            self.blocks_enabled
            and 2 <= t <= MAX_BLOCK
            and start + block_tokens(t) <= self.runner.max_seq_len
        )

    def block(
        self,
        tokens: torch.Tensor,  # [T] int64
        start: int,  # committed tokens before the block
        block_mask: torch.Tensor | None,  # [T, W] bool over the last W keys; None = causal
        depth: torch.Tensor | None,  # [T] offsets from `start`; None = arange(T)
    ) -> tuple[torch.Tensor, torch.Tensor]:  # logits [T, V], features [T, F]
        """Run a block of T tokens (fits_block) as ModelRunner.run does, its K/V written at
        slots [start, start + T), not committed; fresh tensors the next block does not
        overwrite."""
        r, t = self.runner, tokens.shape[0]
        if not self.fits_block(t, start):
            raise ValueError(
                f"a block of {t} tokens after {start} does not fit a graph "
                f"(2..{MAX_BLOCK} tokens, padded within {r.max_seq_len} slots)"
            )
        p = block_tokens(t)
        width = window_width(start + p, r.max_seq_len)
        b = self.blocks.get((p, width))
        if b is None:
            dev = r.device
            b = self.blocks[(p, width)] = _Block(
                torch.zeros(p, dtype=torch.long, device=dev),
                torch.zeros(p, dtype=torch.long, device=dev),
                torch.zeros(p, dtype=torch.long, device=dev),
                torch.zeros(p, width, dtype=torch.bool, device=dev),
                torch.eye(p, dtype=torch.bool, device=dev),
                torch.arange(p, device=dev),
            )
        # inputs, in place (the graph reads these addresses)
        b.tokens.zero_()
        b.tokens[:t].copy_(tokens)
        torch.add(b.offsets, start, out=b.slots)
        b.positions.copy_(b.slots)  # the padding's positions follow the block's slots
        if depth is not None:
            torch.add(depth, start, out=b.positions[:t])
        keys = block_keys_mask(start, b.positions[:t], block_mask, r.config.sliding_window)
        assert keys is not None  # (None only for a single token)
        b.mask.zero_()
        b.mask[:t, : start + t] = keys
        # a padding row sees only its own key (copied: no value from the host, which would
        # wait for the device)
        b.mask[t:, start + t : start + p].copy_(b.eye[: p - t, : p - t])
        b.run = self._replay(b.run, width, lambda: self._block_step(b, width), f"{p}-token block")
        return b.run.logits[:t].clone(), b.run.hidden[:t].clone()
