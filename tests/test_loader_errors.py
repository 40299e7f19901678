"""Broken checkpoints fail with a `CheckpointError` / `ConfigError` that names the problem.

Every failure is also checked to leave the checkpoint files untouched, byte for byte.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from specquant.config import ConfigError
from specquant.io.checkpoint import CheckpointError
from specquant.io.loader import LoadedModel, load_checkpoint
from specquant.layers.attention import AttnMetadata
from specquant.layers.rope import RopeTable

TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# How to truncate a file of n bytes: both formats start with a small header, then the data.
CUTS: dict[str, Callable[[int], int]] = {
    "half": lambda n: n // 2,
    "last-byte": lambda n: n - 1,
    "in-header": lambda n: 100,
    "first-4-bytes": lambda n: 4,
    "empty": lambda n: 0,
}


# --------------------------------------------------------------------------------- helpers
def make_hf_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**TINY)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="module")
def hf_model() -> LlamaForCausalLM:
    return make_hf_model()


@pytest.fixture(scope="module")
def saved_checkpoint(hf_model: LlamaForCausalLM, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pristine single-file HF checkpoint; tests copy it before breaking it."""
    path = tmp_path_factory.mktemp("pristine") / "tiny"
    hf_model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture
def hf_dir(saved_checkpoint: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved_checkpoint, tmp_path / "tiny"))


def load(path: Path) -> LoadedModel:
    return load_checkpoint(path, torch.device("cpu"), torch.float32, with_tokenizer=False)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` (or `root` itself), relative name -> content."""
    if root.is_file():
        return {root.name: root.read_bytes()}
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def assert_load_fails(
    path: Path, error: type[ValueError], *fragments: str, watch: Path | None = None
) -> str:
    """Load `path`, expect `error` whose message contains every fragment; files must not change."""
    watched = watch or (path if path.is_dir() else path.parent)
    before = snapshot(watched)
    with pytest.raises(error) as excinfo:
        load(path)
    message = str(excinfo.value)
    print(f"{error.__name__}: {message}")
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert snapshot(watched) == before, "a failed load modified the checkpoint"
    return message


def rewrite_safetensors(path: Path, edit: dict[str, torch.Tensor | None]) -> None:
    """Replace (tensor), add (new name) or drop (None) tensors of a safetensors file."""
    tensors = load_file(str(path))
    for name, value in edit.items():
        if value is None:
            del tensors[name]
        else:
            tensors[name] = value
    save_file(tensors, str(path), metadata={"format": "pt"})


def logits(loaded: LoadedModel, tokens: torch.Tensor) -> torch.Tensor:
    m, cfg = loaded.model, loaded.config
    cache = m.new_cache(64)
    rope = RopeTable(cfg, 64, torch.device("cpu"), torch.float32)
    meta = AttnMetadata.plan(rope, 0, tokens.shape[0])
    with torch.no_grad():
        return m(tokens[None], cache, meta).logits[0]


def write_tiny_gguf(
    path: Path,
    model: LlamaForCausalLM,
    *,
    arch: str = "llama",
    skip_keys: tuple[str, ...] = (),
    tensor_edit: dict[str, np.ndarray | None] | None = None,
) -> None:
    """A minimal F32 GGUF of `model` (q/k left unpermuted: these tests never compare logits)."""
    cfg = model.config
    keys: dict[str, int | float] = {
        "block_count": cfg.num_hidden_layers,
        "context_length": cfg.max_position_embeddings,
        "embedding_length": cfg.hidden_size,
        "feed_forward_length": cfg.intermediate_size,
        "attention.head_count": cfg.num_attention_heads,
        "attention.head_count_kv": cfg.num_key_value_heads,
        "vocab_size": cfg.vocab_size,
    }
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in keys.items():
        if key not in skip_keys:
            writer.add_uint32(f"{arch}.{key}", int(value))
    writer.add_float32(f"{arch}.rope.freq_base", 10000.0)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    layer_names = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    tensors: dict[str, np.ndarray | None] = {}
    for name, p in model.state_dict().items():
        if name in names:
            gguf_name = names[name]
        else:
            _, _, layer, rest = name.split(".", 3)
            module, _, leaf = rest.rpartition(".")
            gguf_name = f"blk.{layer}.{layer_names[module]}.{leaf}"
        tensors[gguf_name] = p.numpy()
    tensors.update(tensor_edit or {})
    for gguf_name, value in tensors.items():
        if value is not None:
            writer.add_tensor(gguf_name, np.ascontiguousarray(value, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ------------------------------------------------------------------------- HF safetensors
@pytest.mark.parametrize("cut", list(CUTS))
def test_truncated_safetensors_names_the_file(hf_dir: Path, cut: str) -> None:
    """Cut in half, at the very end, inside the JSON header, in the length field, to nothing."""
    st = hf_dir / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: CUTS[cut](len(data))])

    assert_load_fails(hf_dir, CheckpointError, str(st))


def test_wrong_shape_names_tensor_shapes_and_file(hf_dir: Path) -> None:
    st = hf_dir / "model.safetensors"
    name = "model.layers.1.mlp.up_proj.weight"
    rewrite_safetensors(st, {name: torch.zeros(64, 128)})  # transposed: HF has [128, 64]

    msg = assert_load_fails(hf_dir, CheckpointError, f"'{name}'", "[64, 128]", "[128, 64]", str(st))
    assert re.search(r"has shape \[64, 128\], expected \[128, 64\]", msg)
    assert "1 problem" in msg


def test_missing_tensor_is_named(hf_dir: Path) -> None:
    name = "model.layers.0.self_attn.k_proj.weight"
    rewrite_safetensors(hf_dir / "model.safetensors", {name: None})

    assert_load_fails(hf_dir, CheckpointError, f"missing tensor '{name}'", "[32, 64]")


def test_missing_lm_head_of_untied_model_is_named(hf_dir: Path) -> None:
    rewrite_safetensors(hf_dir / "model.safetensors", {"lm_head.weight": None})

    assert_load_fails(hf_dir, CheckpointError, "missing tensor 'lm_head.weight'")


def test_unexpected_tensor_is_named(hf_dir: Path) -> None:
    name = "model.layers.0.self_attn.extra_proj.weight"
    rewrite_safetensors(hf_dir / "model.safetensors", {name: torch.zeros(8, 64)})

    assert_load_fails(hf_dir, CheckpointError, f"unexpected tensor '{name}'", "[8, 64]")


def test_every_problem_is_listed(hf_dir: Path) -> None:
    st = hf_dir / "model.safetensors"
    rewrite_safetensors(
        st,
        {
            "model.norm.weight": None,
            "model.layers.1.mlp.down_proj.weight": torch.zeros(64, 127),
            "model.extra.weight": torch.zeros(3),
        },
    )

    assert_load_fails(
        hf_dir,
        CheckpointError,
        "3 problem(s)",
        "missing tensor 'model.norm.weight'",
        "'model.layers.1.mlp.down_proj.weight' has shape [64, 127], expected [64, 128]",
        "unexpected tensor 'model.extra.weight'",
    )


def test_rotary_inv_freq_buffer_is_ignored(hf_dir: Path, hf_model: LlamaForCausalLM) -> None:
    """Old exporters write `rotary_emb.inv_freq` buffers; they carry no weights."""
    name = "model.layers.0.self_attn.rotary_emb.inv_freq"
    rewrite_safetensors(hf_dir / "model.safetensors", {name: torch.ones(8)})

    loaded = load(hf_dir)

    tokens = torch.arange(10) * 7 % 128
    with torch.no_grad():
        ref = hf_model(tokens[None]).logits[0]
    assert (logits(loaded, tokens) - ref).abs().max().item() < 1e-4


def test_unsupported_architecture_lists_supported_ones(hf_dir: Path) -> None:
    config = hf_dir / "config.json"
    raw = json.loads(config.read_text())
    raw["architectures"] = ["GPT2LMHeadModel"]
    raw["model_type"] = "gpt2"
    config.write_text(json.dumps(raw))

    msg = assert_load_fails(hf_dir, ConfigError, "'GPT2LMHeadModel'", *SUPPORTED)
    assert "unsupported architecture" in msg


def test_unknown_model_type_without_architectures_is_named(hf_dir: Path) -> None:
    config = hf_dir / "config.json"
    raw = json.loads(config.read_text())
    del raw["architectures"]
    raw["model_type"] = "gpt_neox"
    config.write_text(json.dumps(raw))

    assert_load_fails(hf_dir, ConfigError, "gpt_neox", *SUPPORTED)


def test_invalid_config_json_names_the_file(hf_dir: Path) -> None:
    config = hf_dir / "config.json"
    config.write_text(config.read_text()[:40])

    assert_load_fails(hf_dir, CheckpointError, str(config), "not valid JSON")


def test_pytorch_bin_only_directory_asks_for_safetensors(hf_dir: Path) -> None:
    (hf_dir / "model.safetensors").rename(hf_dir / "pytorch_model.bin")

    assert_load_fails(hf_dir, CheckpointError, "no *.safetensors", "pytorch_model.bin")


def test_missing_path_and_unknown_file_type(tmp_path: Path) -> None:
    assert_load_fails(tmp_path / "nope", CheckpointError, "does not exist", watch=tmp_path)
    other = tmp_path / "weights.pt"
    other.write_bytes(b"\0" * 16)
    assert_load_fails(other, CheckpointError, str(other), ".gguf")


# --------------------------------------------------------------------------------- sharded
@pytest.fixture
def sharded_dir(hf_model: LlamaForCausalLM, tmp_path: Path) -> Path:
    path = tmp_path / "sharded"
    hf_model.save_pretrained(path, safe_serialization=True, max_shard_size="50KB")
    assert (path / "model.safetensors.index.json").exists()
    assert len(list(path.glob("model-*-of-*.safetensors"))) > 2
    return path


def test_sharded_checkpoint_matches_transformers(
    sharded_dir: Path, hf_model: LlamaForCausalLM
) -> None:
    before = snapshot(sharded_dir)
    loaded = load(sharded_dir)
    assert snapshot(sharded_dir) == before

    tokens = torch.randint(0, 128, (16,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf_model(tokens[None]).logits[0]
    diff = (logits(loaded, tokens) - ref).abs().max().item()
    print(f"sharded: max |logits - transformers| = {diff:.2e}")
    assert diff < 1e-4


def test_sharded_checkpoint_with_deleted_shard_names_it(sharded_dir: Path) -> None:
    shards = sorted(sharded_dir.glob("model-*-of-*.safetensors"))
    victim = shards[len(shards) // 2]
    victim.unlink()

    assert_load_fails(sharded_dir, CheckpointError, victim.name, "missing")


def test_sharded_checkpoint_with_truncated_shard_names_it(sharded_dir: Path) -> None:
    victim = sorted(sharded_dir.glob("model-*-of-*.safetensors"))[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])

    assert_load_fails(sharded_dir, CheckpointError, str(victim))


@pytest.mark.parametrize("content", ['{"weight_map": {', '{"metadata": {}}'], ids=["cut", "no-map"])
def test_broken_shard_index_names_the_file(sharded_dir: Path, content: str) -> None:
    """A truncated index or one without `weight_map` is reported with the file's name."""
    index = sharded_dir / "model.safetensors.index.json"
    index.write_text(content)

    assert_load_fails(sharded_dir, CheckpointError, str(index))


def test_config_without_required_key_names_it(hf_dir: Path) -> None:
    config = hf_dir / "config.json"
    raw = json.loads(config.read_text())
    del raw["num_attention_heads"]
    config.write_text(json.dumps(raw))

    assert_load_fails(hf_dir, ConfigError, "num_attention_heads")


# ------------------------------------------------------------------------------------ GGUF
@pytest.fixture
def gguf_path(hf_model: LlamaForCausalLM, tmp_path: Path) -> Path:
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, hf_model)
    load(path)  # the intact file loads
    return path


@pytest.mark.parametrize("cut", list(CUTS))
def test_truncated_gguf_names_the_file(gguf_path: Path, cut: str) -> None:
    """Cut in half, at the very end, inside the metadata, inside the magic, to nothing."""
    data = gguf_path.read_bytes()
    gguf_path.write_bytes(data[: CUTS[cut](len(data))])

    assert_load_fails(gguf_path, CheckpointError, str(gguf_path))


def test_directory_with_truncated_gguf_names_the_file(gguf_path: Path) -> None:
    data = gguf_path.read_bytes()
    gguf_path.write_bytes(data[: len(data) // 3])

    assert_load_fails(gguf_path.parent, CheckpointError, str(gguf_path))


def test_directory_with_two_ggufs_names_both(gguf_path: Path) -> None:
    shutil.copy(gguf_path, gguf_path.with_name("other.gguf"))

    assert_load_fails(gguf_path.parent, CheckpointError, "tiny.gguf", "other.gguf")


def test_gguf_wrong_shape_missing_and_unexpected_tensors(
    hf_model: LlamaForCausalLM, tmp_path: Path
) -> None:
    path = tmp_path / "broken.gguf"
    edit = {
        "blk.0.ffn_up.weight": np.zeros((64, 128), np.float32),  # transposed
        "blk.1.attn_v.weight": None,
        "blk.1.attn_sinks.weight": np.zeros(4, np.float32),
    }
    write_tiny_gguf(path, hf_model, tensor_edit=edit)

    assert_load_fails(
        path,
        CheckpointError,
        str(path),
        "'model.layers.0.mlp.up_proj.weight' has shape [64, 128], expected [128, 64]",
        "missing tensor 'model.layers.1.self_attn.v_proj.weight'",
        "blk.1.attn_sinks.weight",
    )


def test_gguf_unsupported_architecture_lists_supported_ones(
    hf_model: LlamaForCausalLM, tmp_path: Path
) -> None:
    path = tmp_path / "gpt2.gguf"
    write_tiny_gguf(path, hf_model, arch="gpt2")

    assert_load_fails(path, ConfigError, "'gpt2'", "llama", "qwen2")


def test_gguf_missing_metadata_key_is_named(hf_model: LlamaForCausalLM, tmp_path: Path) -> None:
    path = tmp_path / "no-blocks.gguf"
    write_tiny_gguf(path, hf_model, skip_keys=("block_count",))

    assert_load_fails(path, ConfigError, "llama.block_count")


def test_gguf_llama31_rope_freqs_is_refused(hf_model: LlamaForCausalLM, tmp_path: Path) -> None:
    path = tmp_path / "llama31.gguf"
    write_tiny_gguf(path, hf_model, tensor_edit={"rope_freqs.weight": np.ones(8, np.float32)})

    assert_load_fails(path, CheckpointError, "rope_freqs.weight", str(path))


def test_requested_dtype_is_honoured(hf_dir: Path) -> None:
    model = load_checkpoint(hf_dir, torch.device("cpu"), torch.bfloat16, with_tokenizer=False).model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
