"""EAGLE-2 tree builder against a slow reference, and DraftTree invariants."""

from __future__ import annotations

import heapq

import pytest
import torch

from conftest import make_hf_model
from specquant.config import GenerationConfig
from specquant.engine.runner import ModelRunner
from specquant.io.eagle import head_config, random_eagle_head
from specquant.io.loader import load_checkpoint
from specquant.spec.drafters.base import DraftRequest
from specquant.spec.drafters.eagle import EagleDrafter
from specquant.spec.tree import DraftTree
from specquant.spec.verify import verify_greedy

V = 40


def _table_logp(token: int, depth: int, seed: int) -> torch.Tensor:
    """A fixed log-distribution over V for a (token, depth) pair."""
    gen = torch.Generator().manual_seed(seed * 100003 + token * 131 + depth)
    return torch.log_softmax(torch.randn(V, generator=gen) * 3, dim=-1)


def reference_tree(root: int, depth: int, k: int, n: int, seed: int) -> set[tuple[int, ...]]:
    """EAGLE-2 by the book: expand the best k per level, rerank everything tried; paths of
    the n-1 chosen nodes (as token tuples)."""
    first = _table_logp(root, 0, seed)
    tried: list[tuple[float, tuple[int, ...]]] = []
    frontier = []
    for tok in first.topk(k).indices.tolist():
        item = (float(first[tok]), (tok,))
        tried.append(item)
        frontier.append(item)
    for level in range(1, depth):
        children = []
        for score, path in frontier:
            logp = _table_logp(path[-1], level, seed)
            for tok in logp.topk(k).indices.tolist():
                children.append((score + float(logp[tok]), (*path, tok)))
        tried += children
        frontier = heapq.nlargest(k, children, key=lambda x: x[0])
    best = heapq.nlargest(n - 1, tried, key=lambda x: x[0])
    return {path for _, path in best}


class TableDrafter(EagleDrafter):
    """EAGLE drafter whose head is replaced by the (token, depth) table above."""

    seed = 0

    def _run(self, tokens, feats, cache_len, positions, block_mask):  # type: ignore[no-untyped-def]
        # frontier nodes at depth d run at position root + d - 1
        depths = (positions - self._root_pos + 1).tolist()
        logp = torch.stack(
            [_table_logp(t, d, self.seed) for t, d in zip(tokens.tolist(), depths, strict=True)]
        )
        return feats.clone(), logp

    def _sync(self, context):  # type: ignore[no-untyped-def]
        self._root_pos = len(context) - 1
        self.cache.truncate(0)
        self.cache.commit(len(context) - 1)
        h = torch.zeros(self.head.config.hidden_size)
        return h, _table_logp(context[-1], 0, self.seed)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> ModelRunner:
    path = tmp_path_factory.mktemp("tree_base")
    make_hf_model("llama", seed=5, vocab_size=V).save_pretrained(path)
    loaded = load_checkpoint(path, torch.device("cpu"), torch.float32, with_tokenizer=False)
    runner = ModelRunner(loaded.model, 64, features="final")
    runner.sync([1, 2, 3])
    return runner


@pytest.mark.parametrize(
    ("depth", "k", "n", "seed"), [(1, 4, 5, 0), (3, 3, 9, 1), (4, 5, 20, 2), (6, 4, 30, 3)]
)
def test_builder_matches_reference(
    base: ModelRunner, depth: int, k: int, n: int, seed: int
) -> None:
    head = random_eagle_head(head_config({}, base.config), torch.device("cpu"), torch.float32)
    drafter = TableDrafter(head, base, depth=depth, topk=k, tree_size=n)
    drafter.seed = seed
    root = 7
    tree = drafter.propose(DraftRequest(base, root, None, None, 64))  # type: ignore[arg-type]
    _check_invariants(tree)
    assert tree.size == n
    paths = {tuple(tree.tokens[tree.path_to(i)][1:].tolist()) for i in range(1, n)}
    assert paths == reference_tree(root, depth, k, n, seed)


def _check_invariants(tree: DraftTree) -> None:
    n = tree.size
    parents = tree.parents.tolist()
    assert parents[0] == -1 and all(0 <= p < i for i, p in enumerate(parents) if i)
    for i in range(n):
        anc, j = set(), i
        while j >= 0:
            anc.add(j)
            j = parents[j]
        assert set(torch.nonzero(tree.mask[i]).flatten().tolist()) == anc
        assert int(tree.depth[i]) == len(anc) - 1


def test_from_parents_random_trees() -> None:
    gen = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 33, 100):
        parents = [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, n)]
        tree = DraftTree.from_parents(torch.arange(n), torch.tensor(parents))
        _check_invariants(tree)


def test_greedy_verify_literal_cases() -> None:
    # root -> a(1) -> b(2); root -> c(3) -> d(4)
    tree = DraftTree.from_parents(torch.tensor([9, 1, 2, 3, 4]), torch.tensor([-1, 0, 1, 0, 3]))
    logits = torch.full((5, 10), -1.0)

    def argmax_after(node: int, tok: int) -> None:
        logits[node, tok] = 5.0

    argmax_after(0, 3)  # target wants c after root: a rejected, c accepted
    argmax_after(3, 4)  # then d: accepted
    argmax_after(4, 8)  # bonus after d
    argmax_after(1, 2)
    res = verify_greedy(tree, logits)
    assert res.path.tolist() == [0, 3, 4] and res.tokens == [3, 4, 8] and res.bonus == 8
    logits[0] = -1.0
    argmax_after(0, 6)  # nothing matches: only the bonus
    res = verify_greedy(tree, logits)
    assert res.path.tolist() == [0] and res.tokens == [6]


def test_eagle_tree_greedy_lossless_on_real_head(base: ModelRunner) -> None:
    """Smoke: the real head path (KV for tree levels) builds valid trees."""
    head = random_eagle_head(head_config({}, base.config), torch.device("cpu"), torch.float32)
    drafter = EagleDrafter(head, base, depth=4, topk=3, tree_size=10)
    tree = drafter.propose(DraftRequest(base, 5, GenerationConfig(), None, 64))  # type: ignore[arg-type]
    _check_invariants(tree)
    assert drafter.cache.length == base.length  # tree rows dropped, committed rows kept


@pytest.mark.parametrize("kind", ["point-mass", "dense-chain", "general"])
def test_verify_sampling_first_token_is_target_distributed(kind: str) -> None:
    """Whatever the draft, the first emitted token is distributed as p(root)."""
    from specquant.spec.verify import _verify_sampling_general, verify_sampling

    v, n_samples = 6, 12000
    gen = torch.Generator().manual_seed(1)
    q = torch.softmax(torch.randn(2, v, generator=gen) * 2, -1)
    if kind == "dense-chain":
        tree = DraftTree.chain(0, torch.tensor([2, 4]), q)
    else:
        tree = DraftTree.from_parents(
            torch.tensor([0, 1, 2, 2, 3, 5]), torch.tensor([-1, 0, 0, 0, 1, 2])
        )
    probs = torch.softmax(torch.randn(tree.size, v, generator=gen) * 1.5, -1)
    rng = torch.Generator().manual_seed(2)
    counts = torch.zeros(v)
    for _ in range(n_samples):
        if kind == "dense-chain":  # dense proposals: the drafted tokens are samples of q
            drafted = torch.multinomial(q, 1, generator=rng).squeeze(1)
            tree = DraftTree.chain(0, drafted, q)
        if kind == "general":
            res = _verify_sampling_general(tree, probs, rng, 0, [0])
        else:
            res = verify_sampling(tree, probs, rng)
        counts[res.tokens[0]] += 1
    expected = probs[0] * n_samples
    stat = float(((counts - expected) ** 2 / expected).sum())
    assert stat < 25.0, (kind, counts.tolist(), expected.tolist())  # chi2(5): p ~ 1e-4
