"""Verification: which drafted tokens the target accepts, and the bonus token.

Vocabulary (as in vLLM's rejection sampler):
- *draft* tokens: the tree nodes after the root, proposed by a drafter;
- *accepted* tokens: the draft tokens on the path the target agrees with;
- *recovered* (residual) token: on a rejection, a sample from the normalised residual
  max(p - q, 0), which makes the output exactly target-distributed;
- *bonus* token: the target's own next token after the accepted path (a recovered token
  if the path ended with a rejection). It becomes the next step's root.
The accept length counts accepted tokens plus the bonus (1 .. depth + 1).

Greedy: a node is accepted iff its token is the target's argmax after its parent, and all of
its ancestors are accepted; the deepest accepted node wins.

Sampling (SpecInfer/EAGLE-style recursive rejection): at a node with target distribution p,
try its children in order; child c with token x drawn from proposal q_c is accepted with
probability min(1, p(x) / q_c(x)); after a rejection p <- norm(max(p - q_c, 0)). When a tree
was built deterministically (top-k), q_c is the point mass on x: acceptance probability is
p(x) and the residual is p with x removed. Either way the emitted token is distributed as p,
independently of the draft (each candidate's proposal is fixed before verification).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specquant.config import SamplingParams
from specquant.engine.sampling import target_probs
from specquant.spec.tree import DraftTree


@dataclass
class AcceptResult:
    path: torch.Tensor  # [a] node indices root..last accepted, ascending
    tokens: list[int]  # [a] new tokens: accepted draft tokens, then the bonus
    bonus: int

    @property
    def accept_length(self) -> int:
        return len(self.tokens)

    @classmethod
    def make_dummy(cls, device: torch.device | str = "cpu") -> AcceptResult:
        return cls(torch.tensor([0], device=device), [0], 0)


def verify(
    tree: DraftTree,
    logits: torch.Tensor,  # [n, V] target logits after each node
    sampling: SamplingParams,
    rng: torch.Generator | None,
) -> AcceptResult:
    if sampling.greedy:
        return verify_greedy(tree, logits)
    return verify_sampling(tree, target_probs(logits, sampling), rng)


def verify_greedy(tree: DraftTree, logits: torch.Tensor) -> AcceptResult:
    target = logits.argmax(-1)  # [n] the target's choice after each node
    parent = tree.parents.clamp(min=0)
    correct = tree.tokens == target[parent]  # [n]
    correct[0] = True
    # valid: every node on the root path is correct
    valid = ~(tree.mask & ~correct[None, :]).any(-1)  # [n]
    depth = torch.where(valid, tree.depth, -1)
    best = int(depth.argmax())  # first node of maximal depth among valid ones
    path = tree.path_to(best)
    bonus = int(target[best])
    tokens = [*tree.tokens[path[1:]].tolist(), bonus]
    return AcceptResult(path, tokens, bonus)


def verify_sampling(
    tree: DraftTree,
    probs: torch.Tensor,  # [n, V] target distribution after each node
    rng: torch.Generator | None,
) -> AcceptResult:
    """Recursive rejection sampling. The per-candidate numbers (p at the parent, q of the
    candidate, one uniform draw per node) are gathered in one go, so the walk down the tree
    runs on host floats; a full-vocabulary residual is built once, for the bonus token."""
    n = tree.size
    device = probs.device
    children = tree.children()
    tokens = tree.tokens.tolist()
    p_tok = probs[tree.parents.clamp(min=0), tree.tokens].tolist()  # p(x_c | parent of c)
    dense = tree.draft_probs is not None
    q_tok = (
        tree.draft_probs[torch.arange(n, device=device), tree.tokens].tolist() if dense else None
    )
    u = torch.rand(n, generator=rng, device=device).tolist()
    node, path = 0, [0]
    while True:
        kids = children[node]
        if dense and len(kids) > 1:  # several sampled siblings: general residual updates
            return _verify_sampling_general(tree, probs, rng, node, path)
        removed: dict[int, float] = {}  # point-mass proposals rejected so far: token -> p
        moved = False
        for c in kids:
            x = tokens[c]
            if dense:
                assert q_tok is not None
                accept = q_tok[c] > 0 and u[c] * q_tok[c] < p_tok[c]
            else:
                # residual after rejecting point masses: p without them, renormalised
                p_x = 0.0 if x in removed else p_tok[c]
                accept = u[c] * (1.0 - sum(removed.values())) < p_x
            if accept:
                node, moved = c, True
                path.append(c)
                break
            if not dense:
                removed[x] = p_tok[c]
        if not moved:
            p = probs[node]
            if dense and kids:
                assert tree.draft_probs is not None
                p = _residual(p, tree.draft_probs[kids[0]], tokens[kids[0]])
            elif removed:
                p = p.clone()
                p[list(removed)] = 0.0
                p = p / p.sum() if p.sum() > 0 else probs[node]
            bonus = int(torch.multinomial(p, 1, generator=rng))
            break
    path_t = torch.tensor(path, device=tree.tokens.device)
    return AcceptResult(path_t, [*(tokens[i] for i in path[1:]), bonus], bonus)


def _verify_sampling_general(
    tree: DraftTree,
    probs: torch.Tensor,
    rng: torch.Generator | None,
    node: int,
    path: list[int],
) -> AcceptResult:
    """The textbook form (full-vocabulary residual after each rejection), continuing from
    `node`; used when several siblings carry their own sampled proposals."""
    children = tree.children()
    tokens = tree.tokens.tolist()
    while True:
        p = probs[node]
        moved = False
        for child in children[node]:
            x = tokens[child]
            q = tree.draft_probs[child] if tree.draft_probs is not None else None
            q_x = 1.0 if q is None else float(q[x])
            u = float(torch.rand((), generator=rng, device=p.device))
            if q_x > 0 and u * q_x < float(p[x]):
                node, moved = child, True
                path.append(child)
                break
            p = _residual(p, q, x)
        if not moved:
            bonus = int(torch.multinomial(p, 1, generator=rng))
            break
    path_t = torch.tensor(path, device=tree.tokens.device)
    return AcceptResult(path_t, [*(tokens[i] for i in path[1:]), bonus], bonus)


def _residual(p: torch.Tensor, q: torch.Tensor | None, x: int) -> torch.Tensor:
    """norm(max(p - q, 0)); for a point-mass proposal that is p without x."""
    if q is None:
        r = p.clone()
        r[x] = 0.0
    else:
        r = (p - q).clamp(min=0)
    total = r.sum()
    # All mass removed only happens when p == q (acceptance was then certain); keep p.
    return r / total if total > 0 else p
