"""The engine: owns the KV cache and rope table, runs prefill then decode.

Prompts may share a prefix with what the cache already holds (the previous turn of a chat);
that prefix is kept and only the new suffix is prefilled.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from specquant.config import EngineConfig, GenerationConfig, SamplingParams
from specquant.engine.runner import FeatureSpec, ModelRunner
from specquant.engine.sampling import make_rng, sample
from specquant.io.loader import LoadedModel
from specquant.spec.drafters.base import Drafter, DraftRequest
from specquant.spec.tree import DraftTree
from specquant.spec.verify import verify

# Called with (new token id, text delta) as tokens are produced.
StreamCallback = Callable[[int, str], None]
Message = dict[str, str]
# End-of-turn markers of common chat templates, used as stop tokens when present in the vocab.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>")


class ContextLengthError(ValueError):
    pass


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    reused_prefix_tokens: int = 0  # prompt tokens whose KV was kept from the previous call
    prefill_ms: float = 0.0  # prefill incl. the first new token
    new_tokens: int = 0
    decode_s: float = 0.0  # after prefill, until the last token
    tokens_per_s: float = 0.0  # new tokens after the first / decode_s
    # speculative decoding (plain decoding reports accept length 1 per step)
    method: str = "ar"
    accept_lengths: list[int] = field(default_factory=list)  # per target step, bonus incl.
    mean_accept_length: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    intermediate_accept_lengths: list[int] = field(default_factory=list)  # HierSpec only


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # new tokens only (a final stop token included)
    finish_reason: str  # "stop" | "length" | "context"
    stats: GenerationStats = field(default_factory=GenerationStats)

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "stats": asdict(self.stats),
        }


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


class Generator:
    """Generation on one loaded target (batch 1): autoregressive, or speculative when a
    drafter is attached. Both run the same loop: draft -> verify -> accept; plain decoding
    verifies a tree holding only the root."""

    def __init__(
        self,
        loaded: LoadedModel,
        engine: EngineConfig | None = None,
        drafter: Drafter | None = None,
        *,
        features: FeatureSpec = None,
    ):
        engine = engine or EngineConfig()
        self.loaded = loaded
        self.model = loaded.model
        self.config = loaded.config
        self.tokenizer = loaded.tokenizer
        param = self.model.embed_tokens.weight
        self.device, self.dtype = param.device, param.dtype
        self.max_seq_len = min(engine.max_seq_len, self.config.max_position_embeddings)
        self.runner = ModelRunner(
            self.model, self.max_seq_len, features=features, cuda_graphs=engine.cuda_graphs
        )
        self.drafter = drafter
        self.stop_token_ids = self._default_stop_ids()

    @property
    def cache(self) -> Any:
        return self.runner.cache

    @property
    def method(self) -> str:
        return self.drafter.name if self.drafter is not None else "ar"

    def reset(self) -> None:
        """Forget all cached state (prefix reuse starts over)."""
        self.runner.reset()
        if self.drafter is not None:
            self.drafter.reset()

    # ------------------------------------------------------------------ prompts
    def _default_stop_ids(self) -> frozenset[int]:
        ids = set(self.config.eos_token_ids)
        tok = self.tokenizer
        if tok is not None:
            if tok.eos_token_id is not None:
                ids.add(int(tok.eos_token_id))
            vocab = tok.get_vocab()
            ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
        return frozenset(ids)

    def encode(
        self, prompt: str | Sequence[int] | Sequence[Message], chat: bool | None
    ) -> list[int]:
        """Token ids for a prompt: ids pass through; messages and (by default) text get the
        chat template when the tokenizer has one."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model was loaded without a tokenizer; pass token ids")
            use_template = chat if chat is not None else self.has_chat_template
            if not use_template:
                return list(self.tokenizer.encode(prompt, add_special_tokens=True))
            prompt = [{"role": "user", "content": prompt}]
        prompt = list(prompt)
        if prompt and isinstance(prompt[0], dict):
            if not self.has_chat_template:
                raise ValueError("this model's tokenizer has no chat template; pass plain text")
            ids = self.tokenizer.apply_chat_template(
                prompt, add_generation_prompt=True, tokenize=True, return_dict=False
            )
            return [int(i) for i in ids]
        vocab = self.config.vocab_size
        bad = [t for t in prompt if not 0 <= int(t) < vocab]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        return [int(t) for t in prompt]

    @property
    def has_chat_template(self) -> bool:
        return bool(self.tokenizer is not None and getattr(self.tokenizer, "chat_template", None))

    # ------------------------------------------------------------------ generation
    def check_context(self, prompt_len: int) -> None:
        if prompt_len == 0:
            raise ValueError("the prompt is empty")
        if prompt_len >= self.max_seq_len:
            raise ContextLengthError(
                f"prompt has {prompt_len} tokens but the context holds {self.max_seq_len} "
                f"(model limit {self.config.max_position_embeddings}); shorten the prompt "
                "or raise --max-seq-len"
            )

    @torch.inference_mode()
    def generate(
        self,
        prompt: str | Sequence[int] | Sequence[Message],
        *,
        sampling: SamplingParams | None = None,
        generation: GenerationConfig | None = None,
        stop_token_ids: Sequence[int] | None = None,
        stream: StreamCallback | None = None,
        chat: bool | None = None,
    ) -> GenerationResult:
        sampling = sampling or SamplingParams()
        generation = generation or GenerationConfig()
        ids = self.encode(prompt, chat)
        self.check_context(len(ids))
        stops = self.stop_token_ids if stop_token_ids is None else frozenset(stop_token_ids)
        if generation.ignore_eos:
            stops = frozenset()
        rng = make_rng(sampling, self.device)
        budget = min(generation.max_new_tokens, self.max_seq_len - len(ids))
        streamer = _TextStreamer(self.tokenizer, stream)
        stats = GenerationStats(prompt_tokens=len(ids), method=self.method)
        runner = self.runner

        t0 = time.perf_counter()
        stats.reused_prefix_tokens = min(runner.common_prefix(ids), len(ids) - 1)
        logits = runner.sync(ids, min_recompute=1)
        assert logits is not None
        root = int(sample(logits[None], sampling, rng)[0])
        _sync(self.device)
        t1 = time.perf_counter()
        new: list[int] = []
        finish = "length" if budget == generation.max_new_tokens else "context"

        def emit(token: int) -> bool:
            """Record a token; True when generation must stop."""
            nonlocal finish
            new.append(token)
            streamer.push(token)
            if token in stops:
                finish = "stop"
                return True
            return len(new) >= budget

        done = emit(root)
        while not done:
            # a tree of n nodes yields at most n tokens: draft no more than can be used
            room = min(self.max_seq_len - runner.length, budget - len(new))
            ta = time.perf_counter()
            if self.drafter is not None and room >= 2:
                tree = self.drafter.propose(DraftRequest(runner, root, sampling, rng, room))
            else:
                tree = DraftTree.single(root, self.device)
            _sync(self.device)
            tb = time.perf_counter()
            if tree.size == 1:
                out, hidden = runner.run(tree.tokens)
            else:
                out, hidden = runner.run(tree.tokens, block_mask=tree.mask, depth=tree.depth)
            res = verify(tree, out, sampling, rng)
            if tree.is_chain:  # the accepted path is a prefix: commit it in place
                runner.commit(tree.tokens[: res.path.numel()].tolist(), hidden)
            else:
                runner.accept(res.path, tree.tokens[res.path].tolist(), hidden)
            _sync(self.device)
            stats.draft_s += tb - ta
            stats.verify_s += time.perf_counter() - tb
            stats.accept_lengths.append(res.accept_length)
            for token in res.tokens:
                if emit(token):
                    done = True
                    break
            root = res.bonus
        _sync(self.device)
        t2 = time.perf_counter()
        stats.prefill_ms = (t1 - t0) * 1e3
        stats.new_tokens = len(new)
        stats.decode_s = t2 - t1
        stats.tokens_per_s = (len(new) - 1) / (t2 - t1) if len(new) > 1 and t2 > t1 else 0.0
        if stats.accept_lengths:
            stats.mean_accept_length = sum(stats.accept_lengths) / len(stats.accept_lengths)
        if self.drafter is not None and self.drafter.stats.inner_accept_lengths:
            stats.intermediate_accept_lengths = list(self.drafter.stats.inner_accept_lengths)
            self.drafter.stats.inner_accept_lengths.clear()
        return GenerationResult(self.decode(new), new, finish, stats)

    def decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            return ""
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _TextStreamer:
    """Emits text deltas incrementally: only a short window of recent tokens is decoded per
    token (as HF's TextStreamer and vLLM do), and an incomplete UTF-8 sequence is held back."""

    def __init__(self, tokenizer: Any, callback: StreamCallback | None):
        self.tokenizer, self.callback = tokenizer, callback
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the window decoded for context
        self.read_offset = 0  # tokens before this were already emitted

    def push(self, token: int) -> None:
        if self.callback is None:
            return
        if self.tokenizer is None:
            self.callback(token, "")
            return
        self.ids.append(token)
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        after = decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            delta = after[len(before) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        else:
            delta = ""
        self.callback(token, delta)


class ChatSession:
    """Multi-turn chat; each turn reuses the KV of the conversation so far."""

    def __init__(self, generator: Generator, system: str | None = None):
        self.generator = generator
        self.messages: list[Message] = []
        if system:
            self.messages.append({"role": "system", "content": system})

    def send(self, user: str, **kwargs: Any) -> GenerationResult:
        self.messages.append({"role": "user", "content": user})
        try:
            result = self.generator.generate(self.messages, **kwargs)
        except Exception:
            self.messages.pop()  # leave the history as it was
            raise
        self.messages.append({"role": "assistant", "content": result.text.strip()})
        return result
