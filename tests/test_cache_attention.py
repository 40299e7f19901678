"""KV cache semantics and masked-block attention against full recomputation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import run_logits
from specquant.cache.static_kv import StaticKVCache
from specquant.io.loader import LoadedModel, load_checkpoint
from specquant.kernels.builtin import attention_sdpa
from specquant.kernels.reference import attention_reference
from specquant.layers.attention import AttnMetadata
from specquant.layers.rope import RopeTable

CPU = torch.device("cpu")


@pytest.fixture
def tiny(tiny_hf_dir: Path) -> LoadedModel:
    return load_checkpoint(tiny_hf_dir, CPU, torch.float32, with_tokenizer=False)


def _step(
    loaded: LoadedModel,
    cache: StaticKVCache,
    rope: RopeTable,
    tokens: torch.Tensor,
    block_mask: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    meta = AttnMetadata.plan(
        rope, cache.length, tokens.shape[0], positions=positions, block_mask=block_mask
    )
    return loaded.model(tokens[None], cache, meta).logits[0]


def test_decode_with_cache_equals_full_recompute(tiny: LoadedModel) -> None:
    tokens = torch.randint(0, 160, (24,), generator=torch.Generator().manual_seed(3))
    full = run_logits(tiny.model, tokens)
    cache = tiny.model.new_cache(32)
    rope = RopeTable(tiny.config, 32, CPU, torch.float32)
    got = [_step(tiny, cache, rope, tokens[:7])]  # chunked prefill ...
    cache.commit(7)
    got.append(_step(tiny, cache, rope, tokens[7:12]))
    cache.commit(5)
    for i in range(12, 24):  # ... then one token at a time
        got.append(_step(tiny, cache, rope, tokens[i : i + 1]))
        cache.commit(1)
    diff = (torch.cat(got) - full).abs().max().item()
    assert diff < 1e-5, diff


def _random_tree(n: int, gen: torch.Generator) -> list[int]:
    """parents[i] < i, parents[0] = -1 (the root)."""
    return [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, n)]


def _ancestor_mask(parents: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    n = len(parents)
    mask = torch.zeros(n, n, dtype=torch.bool)
    depth = torch.zeros(n, dtype=torch.long)
    for i in range(n):
        j = i
        while j >= 0:
            mask[i, j] = True
            j = parents[j]
        depth[i] = int(mask[i].sum()) - 1
    return mask, depth


def _path(parents: list[int], i: int) -> list[int]:
    out = []
    while i >= 0:
        out.append(i)
        i = parents[i]
    return out[::-1]


def test_tree_block_equals_sequential_paths(tiny: LoadedModel) -> None:
    """Each tree node's logits equal running prefix + its root-to-node path causally."""
    gen = torch.Generator().manual_seed(4)
    prefix = torch.randint(0, 160, (9,), generator=gen)
    parents = _random_tree(14, gen)
    tree_tokens = torch.randint(0, 160, (14,), generator=gen)
    mask, depth = _ancestor_mask(parents)
    cache = tiny.model.new_cache(64)
    rope = RopeTable(tiny.config, 64, CPU, torch.float32)
    _step(tiny, cache, rope, prefix)
    cache.commit(prefix.numel())
    tree_logits = _step(tiny, cache, rope, tree_tokens, block_mask=mask, positions=9 + depth)
    for i in range(14):
        seq = torch.cat([prefix, tree_tokens[_path(parents, i)]])
        ref = run_logits(tiny.model, seq)[-1]
        assert (tree_logits[i] - ref).abs().max() < 1e-5, i


def test_compaction_then_decode_equals_sequential(tiny: LoadedModel) -> None:
    """Keep one root-to-leaf path of a verified tree; the next step sees exactly that path."""
    gen = torch.Generator().manual_seed(5)
    prefix = torch.randint(0, 160, (6,), generator=gen)
    parents = _random_tree(10, gen)
    tree_tokens = torch.randint(0, 160, (10,), generator=gen)
    mask, depth = _ancestor_mask(parents)
    cache = tiny.model.new_cache(64)
    rope = RopeTable(tiny.config, 64, CPU, torch.float32)
    _step(tiny, cache, rope, prefix)
    cache.commit(6)
    _step(tiny, cache, rope, tree_tokens, block_mask=mask, positions=6 + depth)
    leaf = int(depth.argmax())
    path = _path(parents, leaf)
    cache.compact(torch.tensor(path))
    assert cache.length == 6 + len(path)
    nxt = torch.tensor([7])
    got = _step(tiny, cache, rope, nxt)[-1]
    ref = run_logits(tiny.model, torch.cat([prefix, tree_tokens[path], nxt]))[-1]
    assert (got - ref).abs().max() < 1e-5


def test_compact_keeps_exactly_selected_entries() -> None:
    cache = StaticKVCache(3, 2, 4, 32, batch=1)
    cache.k.copy_(torch.randn_like(cache.k))
    cache.v.copy_(torch.randn_like(cache.v))
    before_k, before_v = cache.k.clone(), cache.v.clone()
    cache.commit(10)
    keep = torch.tensor([0, 2, 3, 7])
    cache.compact(keep)
    assert cache.length == 14
    # prefix untouched, kept entries moved in order, nothing else before the new length
    assert torch.equal(cache.k[:, :, :, :10], before_k[:, :, :, :10])
    assert torch.equal(cache.k[:, :, :, 10:14], before_k[:, :, :, 10 + keep])
    assert torch.equal(cache.v[:, :, :, 10:14], before_v[:, :, :, 10 + keep])


def test_truncate_and_errors() -> None:
    cache = StaticKVCache(1, 1, 2, 8)
    cache.commit(5)
    cache.truncate(3)
    assert cache.length == 3
    with pytest.raises(ValueError, match="truncate"):
        cache.truncate(4)
    with pytest.raises(ValueError, match="overflow"):
        cache.write(0, 6, torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2))
    with pytest.raises(ValueError, match="cannot commit"):
        cache.commit(6)


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("t", [1, 5])
def test_sdpa_matches_reference(groups: int, t: int) -> None:
    gen = torch.Generator().manual_seed(t * 10 + groups)
    hkv, s, d = 2, 11, 16
    q = torch.randn(1, hkv * groups, t, d, generator=gen)
    k = torch.randn(1, hkv, s, d, generator=gen)
    v = torch.randn(1, hkv, s, d, generator=gen)
    mask = torch.rand(t, s, generator=gen) > 0.4
    mask[:, 0] = True  # every query sees at least one key
    for m in (mask, None):
        ref = attention_reference(q, k, v, m)
        got = attention_sdpa(q, k, v, m)
        assert (got - ref).abs().max() < 1e-5
    # per-sequence masks of a padded batch [B, 1, T, S], each row its own
    qb = torch.randn(3, hkv * groups, t, d, generator=gen)
    kb = torch.randn(3, hkv, s, d, generator=gen)
    vb = torch.randn(3, hkv, s, d, generator=gen)
    mb = torch.rand(3, 1, t, s, generator=gen) > 0.4
    mb[..., 0] = True
    ref = attention_reference(qb, kb, vb, mb)
    assert (attention_sdpa(qb, kb, vb, mb) - ref).abs().max() < 1e-5


def test_plan_rejects_bad_shapes() -> None:
    from conftest import TINY
    from specquant.config import ModelConfig

    cfg = ModelConfig.from_hf({**TINY, "architectures": ["LlamaForCausalLM"]})
    rope = RopeTable(cfg, 16, CPU, torch.float32)
    with pytest.raises(ValueError, match="block_mask"):
        AttnMetadata.plan(rope, 0, 3, block_mask=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="rope table"):
        AttnMetadata.plan(rope, 15, 3)


def _tree_case(seed: int) -> tuple[torch.Tensor, ...]:
    """A 12-node draft tree after a 137-token prefix: q [1, 9, 12, 64], k and v over the
    prefix then the nodes, and the verification mask (prefix + each node's ancestors)."""
    gen = torch.Generator().manual_seed(seed)
    parents = [-1, 0, 0, 1, 1, 2, 3, 3, 5, 6, 8, 9]
    t, n = len(parents), 137
    q = torch.randn(1, 9, t, 64, generator=gen)
    k, v = (torch.randn(1, 3, n + t, 64, generator=gen) for _ in range(2))
    mask = torch.zeros(t, n + t, dtype=torch.bool)
    mask[:, :n] = True
    paths = []
    for i in range(t):
        path, j = [], i
        while j >= 0:
            path.insert(0, j)
            j = parents[j]
        mask[i, [n + j for j in path]] = True
        paths.append(torch.tensor(path) + n)
    return q, k, v, mask, n, paths


def test_float64_attention_rows_do_not_depend_on_the_block_they_run_in() -> None:
    """Each node's row of a verified tree equals, bit for bit, the row a decoding step
    computes for that token alone over the prefix and its ancestors (contiguous, no mask):
    what greedy speculation on an activation-quantized target relies on. (float64's own
    order differences could in principle reach float32's rounding: about 1e-9 per value.)"""
    from specquant.kernels.builtin import attention_float64

    for seed in range(3):
        q, k, v, mask, n, paths = _tree_case(seed)
        block = attention_float64(q, k, v, mask)
        assert block.dtype == torch.float32
        for i, path in enumerate(paths):
            keys = torch.cat([k[:, :, :n], k[:, :, path]], dim=2)
            vals = torch.cat([v[:, :, :n], v[:, :, path]], dim=2)
            alone = attention_float64(q[:, :, i : i + 1], keys, vals, None)
            assert torch.equal(alone[:, :, 0], block[:, :, i]), (seed, i)
        assert torch.allclose(block, attention_reference(q, k, v, mask), atol=1e-5)


def test_the_runner_asks_for_exact_attention_per_block(tiny: LoadedModel) -> None:
    """Decoding steps and verified blocks of an activation-quantized model run exact
    attention, prompts the fast kernel; a model quantized after its runner was built too."""
    from specquant.engine.runner import ModelRunner
    from specquant.kernels.builtin import attention_float64
    from specquant.quant.model import quantize_model
    from specquant.quant.spec import get_format

    runner = ModelRunner(tiny.model, 64)
    assert runner.attention() is attention_sdpa  # dense
    quantize_model(tiny.model, get_format("w8a8"))
    tiny.model.prepare_kernels()
    assert runner.attention() is attention_float64
    assert runner.attention(prefill=True) is attention_sdpa
    seen = []
    runner._exact_attn = lambda *a: seen.append("exact") or attention_float64(*a)
    runner._fast_attn = lambda *a: seen.append("fast") or attention_sdpa(*a)
    runner.sync([5, 6, 7])  # a prompt: one block per layer
    runner.run(torch.tensor([8, 9]))  # a verified chain
    n = tiny.config.num_layers
    assert seen == ["fast"] * n + ["exact"] * n


def test_exact_attention_can_be_named_for_any_cpu_model(monkeypatch: pytest.MonkeyPatch) -> None:
    from specquant.kernels.builtin import attention_float64
    from specquant.layers.attention import select_attention

    monkeypatch.setenv("SPECQUANT_KERNEL_ATTENTION", "float64")
    assert select_attention(CPU, torch.float32) is attention_float64  # no exact=True asked


def test_exact_attention_is_chosen_for_activation_quantized_targets_on_the_cpu() -> None:
    from specquant.kernels.builtin import attention_float64
    from specquant.kernels.registry import KernelContext, explain
    from specquant.layers.attention import select_attention

    cpu = torch.device("cpu")
    assert select_attention(cpu, torch.float32, exact=True) is attention_float64
    assert select_attention(cpu, torch.float32) is attention_sdpa
    ctx = KernelContext(torch.device("cuda"), torch.bfloat16, (("exact", True),))
    reasons = {name: (ok, why) for name, ok, why in explain("attention", ctx)}
    assert reasons["float64"] == (False, "float64 math is for the CPU, not cuda")
    assert "quantizes activations" in explain("attention", KernelContext(cpu, torch.float32))[0][2]


def test_attention_takes_an_additive_float_mask_as_its_bool_mask() -> None:
    """Every attention kernel reads a 0 / -inf float mask (what a graphed block builds once)
    as the bool mask it stands for, GQA folding included."""
    from specquant.kernels.builtin import attention_float64

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 5, 8, generator=gen)
    k, v = torch.randn(2, 1, 2, 9, 8, generator=gen)
    mask = torch.rand(5, 9, generator=gen) > 0.4
    mask[:, 0] = True  # every row sees a key
    bias = torch.zeros(5, 9).masked_fill(~mask, float("-inf"))
    for fn in (attention_reference, attention_sdpa, attention_float64):
        torch.testing.assert_close(fn(q, k, v, bias), fn(q, k, v, mask), rtol=1e-6, atol=1e-6)
