"""GGUF checkpoints through the production loader, checked against transformers.

Each test builds a tiny random `transformers` model, writes it to a GGUF file the way llama.cpp's
`convert_hf_to_gguf.py` does (metadata keys, tensor names, the q/k row permutation of the `llama`
architecture, 1-D tensors kept in F32), loads that file with `load_checkpoint` and compares
logits with the transformers model. For F16 and quantized files the transformers weights are
replaced by the dequantized values first, so the comparison stays exact up to float32 rounding.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from specquant.io.loader import LoadedModel, load_checkpoint
from specquant.layers.attention import AttnMetadata
from specquant.layers.rope import RopeTable

SEQ_LEN = 16
TOLERANCE = 1e-4

# Shapes: every matrix has a column count that is a multiple of the 32-element quant block.
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 256,
}
# Non-default rope bases and eps, so that a loader ignoring the metadata keys is caught.
ROPE_THETA = {"llama": 1000.0, "qwen2": 5000.0}
RMS_EPS = {"llama": 1e-5, "qwen2": 1e-6}

_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}

# Matrix encodings a test can ask for; 2-D tensors cycle through the listed types.
ENCODINGS: dict[str, tuple[Q, ...]] = {
    "f32": (Q.F32,),
    "f16": (Q.F16,),
    "q8_0": (Q.Q8_0,),
    "mixed": (Q.F16, Q.Q8_0, Q.BF16, Q.Q4_0, Q.Q5_1, Q.Q4_1, Q.Q5_0),
}


# --------------------------------------------------------------------------------- helpers
def make_hf_model(arch: str, *, tied: bool, seed: int) -> PreTrainedModel:
    """A tiny random fp32 transformers model with weights large enough to expose mistakes."""
    torch.manual_seed(seed)
    common = {**TINY, "rms_norm_eps": RMS_EPS[arch], "tie_word_embeddings": tied}
    rope = {"rope_theta": ROPE_THETA[arch], "rope_type": "default"}
    model: PreTrainedModel
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, rope_parameters=rope))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common, rope_parameters=rope))
    model = model.float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    return model


def gguf_tensor_name(hf_name: str) -> str:
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{_LAYER_NAMES[rest]}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (rotate-half rope -> interleaved rope)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def encode(w: np.ndarray, qtype: Q) -> tuple[np.ndarray, np.ndarray]:
    """(payload for GGUFWriter.add_tensor, the float32 values a reader decodes from it)."""
    if qtype == Q.F32:
        return w, w
    if qtype == Q.F16:
        half = w.astype(np.float16)
        return half, half.astype(np.float32)
    payload = gguf.quants.quantize(w, qtype)  # uint8 [rows, bytes per row]
    return payload, gguf.quants.dequantize(payload, qtype).astype(np.float32).reshape(w.shape)


@dataclass
class GGUFOptions:
    permute_qk: bool = True  # what llama.cpp does for arch "llama"; a negative test turns it off
    vocab_size_key: bool = True  # else the vocab size comes from tokenizer.ggml.tokens
    rope_dimension_key: bool = True


def write_gguf(
    path: Path,
    model: PreTrainedModel,
    arch: str,
    encoding: tuple[Q, ...] = (Q.F32,),
    options: GGUFOptions | None = None,
) -> None:
    """Write `model` as llama.cpp would; quantized weights are written back into `model`."""
    opts = options or GGUFOptions()
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = cfg.hidden_size // heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny-test-model")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if opts.rope_dimension_key:
        writer.add_rope_dimension_count(head_dim)
    if opts.vocab_size_key:
        writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"<t{i}>" for i in range(cfg.vocab_size)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    permute = {"q_proj": heads, "k_proj": kv_heads} if arch == "llama" and opts.permute_qk else {}
    types = itertools.cycle(encoding)
    tied = cfg.tie_word_embeddings
    for name, param in model.named_parameters():  # the tied head appears once, as embed_tokens
        if tied and name == "lm_head.weight":
            continue
        w = param.detach().numpy().copy()
        if w.ndim == 1:  # llama.cpp keeps norms and biases in F32
            payload, raw_dtype = w, None
        else:
            qtype = next(types)
            payload, decoded = encode(w, qtype)
            with torch.no_grad():
                param.copy_(torch.from_numpy(decoded))
            raw_dtype = qtype if payload.dtype == np.uint8 else None
        proj = name.split(".")[-2]
        if proj in permute:
            # The quant blocks run along a row, so permuting rows of the payload is the same as
            # quantizing the permuted weight.
            payload = llama_cpp_permute(payload, permute[proj])
        writer.add_tensor(
            gguf_tensor_name(name), np.ascontiguousarray(payload), raw_dtype=raw_dtype
        )

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def load(path: Path) -> LoadedModel:
    return load_checkpoint(path, torch.device("cpu"), torch.float32, with_tokenizer=False)


def random_tokens(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (SEQ_LEN,), generator=torch.Generator().manual_seed(seed))


def specquant_logits(loaded: LoadedModel, tokens: torch.Tensor) -> torch.Tensor:
    m, cfg = loaded.model, loaded.config
    cache = m.new_cache(64)
    rope = RopeTable(cfg, 64, torch.device("cpu"), torch.float32)
    meta = AttnMetadata.plan(rope, 0, tokens.shape[0])
    with torch.no_grad():
        return m(tokens[None], cache, meta).logits[0]


def hf_logits(model: PreTrainedModel, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens[None]).logits[0]


def max_logit_diff(loaded: LoadedModel, model: PreTrainedModel, label: str) -> float:
    tokens = random_tokens(model.config.vocab_size)
    ours, ref = specquant_logits(loaded, tokens), hf_logits(model, tokens)
    assert ours.shape == ref.shape == (SEQ_LEN, model.config.vocab_size)
    diff = (ours - ref).abs().max().item()
    print(f"{label}: max |logits - transformers| = {diff:.2e} (logit scale {ref.abs().max():.2f})")
    return diff


# ----------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_llama_gguf_matches_transformers(tmp_path: Path, encoding: str, tied: bool) -> None:
    model = make_hf_model("llama", tied=tied, seed=1)
    path = tmp_path / "tiny-llama.gguf"
    write_gguf(path, model, "llama", ENCODINGS[encoding])

    loaded = load(path)

    cfg = loaded.config
    assert loaded.path == path
    assert loaded.tokenizer is None
    assert (cfg.family, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == ("llama", 2, 4, 2)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim) == (64, 128, 16)
    assert (cfg.vocab_size, cfg.max_position_embeddings) == (128, 256)
    assert cfg.rope_theta == ROPE_THETA["llama"]
    assert cfg.rms_norm_eps == pytest.approx(RMS_EPS["llama"])
    assert cfg.tie_word_embeddings is tied
    assert not cfg.qkv_bias
    assert (cfg.bos_token_id, cfg.eos_token_ids) == (1, (2,))
    head, embed = loaded.model.lm_head.weight, loaded.model.embed_tokens.weight
    assert (head.data_ptr() == embed.data_ptr()) is tied
    assert max_logit_diff(loaded, model, f"llama {encoding} tied={tied}") < TOLERANCE


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("encoding", ["f32", "q8_0"])
def test_qwen2_gguf_matches_transformers(tmp_path: Path, encoding: str, tied: bool) -> None:
    """qwen2: q/k are not permuted, q/k/v carry biases, and no rope.dimension_count key."""
    model = make_hf_model("qwen2", tied=tied, seed=2)
    path = tmp_path / "tiny-qwen2.gguf"
    write_gguf(path, model, "qwen2", ENCODINGS[encoding], GGUFOptions(rope_dimension_key=False))

    loaded = load(path)

    cfg = loaded.config
    assert (cfg.family, cfg.qkv_bias, cfg.head_dim) == ("qwen2", True, 16)
    assert cfg.rope_theta == ROPE_THETA["qwen2"]
    assert cfg.rms_norm_eps == pytest.approx(RMS_EPS["qwen2"])
    assert cfg.tie_word_embeddings is tied
    bias = loaded.model.layers[0].self_attn.qkv_proj.bias
    assert bias is not None and bias.abs().max() > 0
    assert max_logit_diff(loaded, model, f"qwen2 {encoding} tied={tied}") < TOLERANCE


def test_vocab_size_from_token_list(tmp_path: Path) -> None:
    """Files without `llama.vocab_size` take the vocabulary size from the token list."""
    model = make_hf_model("llama", tied=False, seed=3)
    path = tmp_path / "no-vocab-key.gguf"
    write_gguf(path, model, "llama", options=GGUFOptions(vocab_size_key=False))

    loaded = load(path)

    assert loaded.config.vocab_size == 128
    assert max_logit_diff(loaded, model, "llama without vocab_size key") < TOLERANCE


def test_directory_with_one_gguf_loads_it(tmp_path: Path) -> None:
    model = make_hf_model("llama", tied=True, seed=4)
    path = tmp_path / "only.gguf"
    write_gguf(path, model, "llama")

    loaded = load(tmp_path)

    assert loaded.path == path
    assert max_logit_diff(loaded, model, "llama via directory") < TOLERANCE


def test_unpermuted_llama_gguf_does_not_match(tmp_path: Path) -> None:
    """The parity tests can see the q/k permutation: skipping it in the file breaks the logits."""
    model = make_hf_model("llama", tied=False, seed=1)
    path = tmp_path / "unpermuted.gguf"
    write_gguf(path, model, "llama", options=GGUFOptions(permute_qk=False))

    assert max_logit_diff(load(path), model, "llama, q/k not permuted") > 1e-2


def test_loaded_weights_do_not_alias_the_file(tmp_path: Path) -> None:
    """Weights are copied out of the memory-mapped file: later edits to it change nothing."""
    model = make_hf_model("llama", tied=False, seed=5)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, model, "llama")
    original = path.read_bytes()

    loaded = load(path)
    before = specquant_logits(loaded, random_tokens(128))
    data_offset = gguf.GGUFReader(str(path)).data_offset
    path.write_bytes(original[:data_offset] + bytes(len(original) - data_offset))
    after = specquant_logits(loaded, random_tokens(128))

    torch.testing.assert_close(after, before, rtol=0, atol=0)
