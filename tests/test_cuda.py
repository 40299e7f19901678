"""CUDA path: the same model code on the GPU matches transformers and the CPU path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import make_hf_model, run_logits
from specquant.config import EngineConfig, GenerationConfig
from specquant.engine.generator import Generator
from specquant.io.loader import load_checkpoint
from specquant.kernels.builtin import attention_sdpa
from specquant.kernels.reference import attention_reference

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-3), (torch.bfloat16, 0.15)])
def test_logits_on_cuda_match_transformers(tmp_path: Path, dtype: torch.dtype, tol: float) -> None:
    hf = make_hf_model("llama", seed=3)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_checkpoint(tmp_path, CUDA, dtype, with_tokenizer=False)
    tokens = torch.randint(0, 160, (33,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(tokens[None]).logits[0]
        got = run_logits(ours.model, tokens.to(CUDA)).float().cpu()
    diff = (got - ref).abs().max().item()
    print(f"cuda {dtype}: max |logits - transformers(cpu fp32)| = {diff:.2e}")
    assert diff < tol


def test_greedy_generation_cuda_equals_cpu(tiny_hf_dir: Path) -> None:
    outs = []
    for device in ("cpu", "cuda"):
        loaded = load_checkpoint(
            tiny_hf_dir, torch.device(device), torch.float32, with_tokenizer=False
        )
        gen = Generator(loaded, EngineConfig(device=device, dtype="float32", max_seq_len=128))
        cfg = GenerationConfig(max_new_tokens=40, ignore_eos=True)
        outs.append(gen.generate([3, 14, 15, 92, 65], generation=cfg).token_ids)
    assert outs[0] == outs[1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sdpa_cuda_matches_reference(dtype: torch.dtype) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 8, 7, 64, device=CUDA, dtype=dtype, generator=gen)
    k = torch.randn(1, 2, 30, 64, device=CUDA, dtype=dtype, generator=gen)
    v = torch.randn(1, 2, 30, 64, device=CUDA, dtype=dtype, generator=gen)
    mask = torch.rand(7, 30, device=CUDA, generator=gen) > 0.3
    mask[:, 0] = True
    ref = attention_reference(q, k, v, mask).float()
    got = attention_sdpa(q, k, v, mask).float()
    assert ((got - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.parametrize("method", ["sps", "eagle2", "hierspec"])
def test_speculative_greedy_on_cuda_equals_ar(tiny_hf_dir: Path, method: str) -> None:
    from specquant.config import SpecConfig
    from specquant.spec.factory import build_generator

    spec = SpecConfig(
        method=method, depth=3, tree_topk=4, tree_size=10, min_draft_length=3, hier_tree_size=6
    )
    engine = EngineConfig(device="cuda", dtype="float32", max_seq_len=256)
    loaded = load_checkpoint(tiny_hf_dir, CUDA, torch.float32, with_tokenizer=False)
    gen = build_generator(loaded, engine, spec)
    ar = Generator(loaded, engine)
    cfg = GenerationConfig(max_new_tokens=48, ignore_eos=True)
    prompt = [3, 14, 15, 92, 65]
    assert (
        gen.generate(prompt, generation=cfg).token_ids
        == ar.generate(prompt, generation=cfg).token_ids
    )
