"""Frozen configuration dataclasses: the only place where defaults live.

`ModelConfig.from_hf` and `ModelConfig.from_gguf` are the only code that knows about
Hugging Face `config.json` quirks and GGUF metadata keys. Everything downstream reads the
normalised, frozen `ModelConfig`.

The CLI is built from the fields of `SamplingParams` and `GenerationConfig` (see
`specquant.cli`), so a default changed here changes everywhere.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# HF architecture name -> our family tag. Every family runs on the same Llama math;
# the tag only selects small differences (qkv bias, sliding window).
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
# GGUF `general.architecture` -> family tag. llama.cpp writes Mistral 7B as "llama".
SUPPORTED_GGUF_ARCHITECTURES: dict[str, str] = {"llama": "llama", "qwen2": "qwen2"}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class ConfigError(ValueError):
    """A model configuration that specquant cannot run."""


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (Llama 3.1 style `llama3`, or plain `linear`)."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Normalised shape and numerics of a Llama-family decoder."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False  # Llama's `attention_bias` also adds a bias to o_proj
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # A draft model that borrows its target's embedding and lm_head (not stored with it).
    shared_embeddings: bool = False
    # FR-Spec: a draft's lm_head covers only this many frequent tokens (0 = the full vocab);
    # the ids live in `lm_head_vocab.json` next to the checkpoint.
    lm_head_vocab: int = 0

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads != 0:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if self.rope_scaling.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"unsupported rope scaling type {self.rope_scaling.rope_type!r}; "
                f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        archs = hf.get("architectures") or []
        arch = archs[0] if archs else _arch_from_model_type(hf.get("model_type"))
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"unsupported architecture {arch!r}; supported: "
                f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        family = SUPPORTED_ARCHITECTURES[arch]
        required = (
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "num_hidden_layers",
            "vocab_size",
        )
        missing = [k for k in required if k not in hf]
        if missing:
            raise ConfigError(f"config.json lacks required key(s): {', '.join(missing)}")
        heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        # transformers >= 5 nests rope settings in `rope_parameters`; 4.x uses
        # `rope_theta` + `rope_scaling`.
        rope_params = dict(hf.get("rope_parameters") or {})
        rope_scaling_raw = hf.get("rope_scaling") or rope_params
        theta = float(rope_params.get("rope_theta", hf.get("rope_theta", 10000.0)))
        if family == "llama":
            qkv_bias = o_bias = bool(hf.get("attention_bias", False))
        else:
            qkv_bias, o_bias = family == "qwen2", False
        if hf.get("mlp_bias"):
            raise ConfigError("mlp_bias=true is not supported (no Llama-family model uses it)")
        sliding = hf.get("sliding_window") if family == "mistral" else None
        if family == "qwen2" and hf.get("use_sliding_window"):
            sliding = hf.get("sliding_window")
        eos = hf.get("eos_token_id")
        return cls(
            family=family,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hidden // heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            rope_theta=theta,
            rope_scaling=_rope_scaling(rope_scaling_raw),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            sliding_window=int(sliding) if sliding else None,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=_as_tuple(eos),
            shared_embeddings=bool(hf.get("specquant_shared_embeddings", False)),
            lm_head_vocab=int(hf.get("specquant_lm_head_vocab", 0)),
        )

    # ------------------------------------------------------------------ GGUF metadata
    @classmethod
    def from_gguf(cls, meta: dict[str, Any], has_output_tensor: bool) -> ModelConfig:
        arch = meta.get("general.architecture")
        if arch not in SUPPORTED_GGUF_ARCHITECTURES:
            raise ConfigError(
                f"unsupported GGUF architecture {arch!r}; supported: "
                f"{', '.join(sorted(SUPPORTED_GGUF_ARCHITECTURES))}"
            )

        def key(name: str, default: Any = None) -> Any:
            value = meta.get(f"{arch}.{name}", default)
            if value is None:
                raise ConfigError(f"GGUF metadata lacks required key '{arch}.{name}'")
            return value

        hidden = int(key("embedding_length"))
        heads = int(key("attention.head_count"))
        vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
        if not vocab:
            raise ConfigError(
                f"GGUF metadata lacks both '{arch}.vocab_size' and 'tokenizer.ggml.tokens'"
            )
        scaling_type = meta.get(f"{arch}.rope.scaling.type", "none")
        if scaling_type in ("none", None):
            scaling = RopeScaling()
        elif scaling_type == "linear":
            scaling = RopeScaling("linear", factor=float(key("rope.scaling.factor")))
        else:
            raise ConfigError(
                f"unsupported GGUF rope scaling {scaling_type!r}; supported: none, linear"
            )
        return cls(
            family=SUPPORTED_GGUF_ARCHITECTURES[arch],
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(key("feed_forward_length")),
            num_layers=int(key("block_count")),
            num_heads=heads,
            num_kv_heads=int(key("attention.head_count_kv", heads)),
            head_dim=int(key("rope.dimension_count", hidden // heads)),
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(key("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=int(key("context_length", 4096)),
            tie_word_embeddings=not has_output_tensor,
            qkv_bias=arch == "qwen2",
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=_as_tuple(meta.get("tokenizer.ggml.eos_token_id")),
        )


def _arch_from_model_type(model_type: str | None) -> str:
    for arch, fam in SUPPORTED_ARCHITECTURES.items():
        if fam == model_type:
            return arch
    return f"<model_type={model_type!r}>"


def _as_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def _rope_scaling(raw: dict[str, Any] | None) -> RopeScaling:
    if not raw:
        return RopeScaling()
    rope_type = raw.get("rope_type") or raw.get("type") or "default"
    if rope_type == "default":
        return RopeScaling()
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"unsupported rope scaling type {rope_type!r}; "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    return RopeScaling(
        rope_type=rope_type,
        factor=float(raw.get("factor", 1.0)),
        low_freq_factor=float(raw.get("low_freq_factor", 1.0)),
        high_freq_factor=float(raw.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(raw.get("original_max_position_embeddings", 8192)),
    )


# ---------------------------------------------------------------------- run-time settings
def _doc(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. temperature == 0 means greedy (argmax).

    top-k and top-p shape the target distribution before sampling; speculative
    verification (later) applies them to the same distribution.
    """

    temperature: float = field(default=0.0, metadata=_doc("0 = greedy; > 0 samples"))
    top_k: int = field(default=0, metadata=_doc("keep the k most likely tokens; 0 = off"))
    top_p: float = field(default=1.0, metadata=_doc("nucleus sampling mass; 1.0 = off"))
    seed: int | None = field(
        default=None, metadata=_doc("random seed for sampling; default: unseeded")
    )

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class GenerationConfig:
    """Per-request limits."""

    max_new_tokens: int = field(default=256, metadata=_doc("maximum tokens to generate"))
    ignore_eos: bool = field(default=False, metadata=_doc("keep going past stop tokens"))

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass(frozen=True)
class EngineConfig:
    """Where and how the model runs."""

    device: str = field(default="auto", metadata=_doc("cpu, cuda, cuda:N or auto"))
    dtype: str = field(
        default="auto", metadata=_doc("float32, bfloat16, float16 or auto (fp32 CPU, bf16 GPU)")
    )
    max_seq_len: int = field(
        default=4096, metadata=_doc("KV cache length (capped by the model's context)")
    )
    cuda_graphs: bool = field(
        default=True,
        metadata=_doc("replay decoding steps and verification blocks from CUDA graphs (CUDA only)"),
    )

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(
                f"dtype must be one of auto, float32, bfloat16, float16; got {self.dtype!r}"
            )
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {self.max_seq_len}")


SPEC_METHODS = ("ar", "sps", "eagle2", "hierspec")


EAGLE_VOCABS = ("auto", "reduced", "full")

# EAGLE-2 trees as (depth, top-k, size). The paper's suits a GPU, where verifying 60 tokens
# costs about one step; on the CPU verification is compute-bound and a smaller tree decodes
# faster (bench/results/cpu_tree.md).
EAGLE_TREE_PAPER = (6, 10, 60)
EAGLE_TREE_CPU = (5, 4, 24)


@dataclass(frozen=True)
class SpecConfig:
    """Speculative decoding method and its parameters (paper defaults; EAGLE-2's tree is
    smaller on the CPU unless given)."""

    method: str = field(default="ar", metadata=_doc("ar | sps | eagle2 | hierspec"))
    draft: str | None = field(
        default=None,
        metadata=_doc(
            "draft model (sps) or intermediate model (hierspec): path or 'random'; "
            "default: the one shipped for the embedded model"
        ),
    )
    eagle: str | None = field(
        default=None,
        metadata=_doc(
            "EAGLE head for the target: path, 'random' or 'random-eagle3'; "
            "default: the one shipped for the embedded model"
        ),
    )
    draft_eagle: str | None = field(
        default=None,
        metadata=_doc("hierspec: EAGLE head for the intermediate model; default: the one shipped"),
    )
    draft_length: int = field(default=6, metadata=_doc("sps: draft tokens per step (k)"))
    depth: int | None = field(
        default=None,
        metadata=_doc("eagle2: tree depth; default 6, or 5 on the CPU when no tree value is set"),
    )
    tree_topk: int | None = field(
        default=None,
        metadata=_doc(
            "eagle2: children per expanded node (top-k); default 10 on a GPU, 4 on the CPU"
        ),
    )
    tree_size: int | None = field(
        default=None,
        metadata=_doc(
            "eagle2: verified tokens, root incl.; default 60, or 24 on the CPU when no tree "
            "value is set"
        ),
    )
    min_draft_length: int = field(
        default=6, metadata=_doc("hierspec: sequence length the intermediate model reaches")
    )
    hier_depth: int = field(default=3, metadata=_doc("hierspec: EAGLE tree depth"))
    hier_topk: int = field(default=10, metadata=_doc("hierspec: EAGLE top-k"))
    hier_tree_size: int = field(default=30, metadata=_doc("hierspec: EAGLE tree size"))
    eagle_vocab: str = field(
        default="auto",
        metadata={
            "help": "eagle2: draft from the head's reduced vocabulary (lm_head_vocab.json, "
            "FR-Spec): auto = on the CPU only, where the lm_head product dominates drafting "
            "(on a GPU it costs accept length and saves little time), reduced or full",
            "choices": EAGLE_VOCABS,
        },
    )

    def __post_init__(self) -> None:
        if self.eagle_vocab not in EAGLE_VOCABS:
            raise ValueError(
                f"eagle_vocab must be one of {', '.join(EAGLE_VOCABS)}; got {self.eagle_vocab!r}"
            )
        if self.method not in SPEC_METHODS:
            raise ValueError(
                f"method must be one of {', '.join(SPEC_METHODS)}; got {self.method!r}"
            )
        if self.draft_length < 1:
            raise ValueError(f"draft_length must be >= 1, got {self.draft_length}")
        if self.min_draft_length < 1:
            raise ValueError(f"min_draft_length must be >= 1, got {self.min_draft_length}")
        for name in ("depth", "tree_topk", "hier_depth", "hier_topk"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def eagle_tree(self, device_type: str) -> tuple[int, int, int]:
        """EAGLE-2's (depth, top-k, tree size) on a device of this type ("cpu", "cuda"):
        EAGLE_TREE_CPU on the CPU when none is given, else the paper's tree with the values
        given (the CPU tree is tuned as a whole; mixing one given value into it can make an
        impossible tree, e.g. depth 2 with top-k 4 cannot fill 24 nodes)."""
        given = (self.depth, self.tree_topk, self.tree_size)
        none_given = all(g is None for g in given)
        base = EAGLE_TREE_CPU if device_type == "cpu" and none_given else EAGLE_TREE_PAPER
        depth, topk, size = (b if g is None else g for g, b in zip(given, base, strict=True))
        return depth, topk, size
