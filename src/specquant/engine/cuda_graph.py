"""One-token decoding steps replayed from CUDA graphs.

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

Drafting and verification blocks (several tokens, tree masks) still run eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from specquant.cache.static_kv import StaticKVCache
from specquant.kernels.registry import KernelContext, select
from specquant.layers.attention import AttnMetadata

if TYPE_CHECKING:
    from specquant.engine.runner import ModelRunner

MIN_WIDTH = 256  # narrowest key window: below it the graphs would only multiply


class GraphCaptureError(RuntimeError):
    """A step could not be captured (an op that synchronizes with the host, or one CUDA
    graphs do not support); the runner then decodes eagerly."""


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
    the new K/V go to the slot held in `slot` [1] (the int `start` the model passes is a
    placeholder), and attention reads slots [0, width)."""

    def __init__(self, cache: StaticKVCache, slot: torch.Tensor, width: int):
        self.cache, self.slot, self.width = cache, slot, width

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        # k, v [B, Hkv, 1, D] -> slot `slot` of `layer`
        self.cache.k[layer].index_copy_(2, self.slot, k)
        self.cache.v[layer].index_copy_(2, self.slot, v)

    def view(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.k[layer, :, :, : self.width], self.cache.v[layer, :, :, : self.width]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph | None  # None: run eagerly (CPU, or capture=False)
    logits: torch.Tensor  # [1, V] the step's outputs, overwritten by each replay
    hidden: torch.Tensor  # [1, F]
    cache_k: torch.Tensor  # the cache tensor captured (a new one needs a new graph)


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
        self.graphs: dict[int, _Graph] = {}
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
        layers = r.features if isinstance(r.features, tuple) else ()
        out = r.model(
            self.token[None],
            WindowKV(r.cache, pos, width),
            meta,
            return_hidden=True,
            hidden_layers=layers,
        )
        return r.outputs(out)

    def _capture(self, width: int) -> _Graph:
        cache_k = self.runner.cache.k
        if not self.capture:
            logits, hidden = self._step(width)
            return _Graph(None, logits, hidden, cache_k)
        side = torch.cuda.Stream(self.runner.device)
        side.wait_stream(torch.cuda.current_stream(self.runner.device))
        with torch.cuda.stream(side):  # compile the kernels, fill their caches
            self._step(width)  # writes this step's own K/V: the replay writes the same
        torch.cuda.current_stream(self.runner.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                logits, hidden = self._step(width)
        except RuntimeError as e:
            raise GraphCaptureError(f"capturing the {width}-key step failed: {e}") from e
        return _Graph(graph, logits, hidden, cache_k)

    def step(self, token: torch.Tensor, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Run `token` [1] at `position` (its K/V land in that slot, not committed):
        (logits [1, V], features [1, F]), fresh tensors the next step does not overwrite."""
        width = window_width(position + 1, self.runner.max_seq_len)
        self.token.copy_(token)
        self.position.fill_(position)
        g = self.graphs.get(width)
        if g is None or g.cache_k is not self.runner.cache.k:
            g = self.graphs[width] = self._capture(width)  # eagerly: this step already ran
        elif g.graph is None:
            g.logits, g.hidden = self._step(width)
        if g.graph is not None:  # a capture does not run the step: replay it
            g.graph.replay()
        return g.logits.clone(), g.hidden.clone()
