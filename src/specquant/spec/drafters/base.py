"""The drafter protocol: propose a `DraftTree` for the target, rooted at its pending token."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from specquant.config import SamplingParams
from specquant.engine.runner import ModelRunner
from specquant.spec.tree import DraftTree


@dataclass
class DraftRequest:
    target: ModelRunner  # committed prefix (ids, features) of the model being drafted for
    root: int  # pending token: sampled, not yet processed by the target
    sampling: SamplingParams
    rng: torch.Generator | None
    max_nodes: int  # tree size the context still has room for (root included)


@dataclass
class DraftStats:
    """Per-step numbers a drafter reports (HierSpec: its inner level)."""

    inner_accept_lengths: list[int] = field(default_factory=list)


class Drafter(Protocol):
    name: str
    stats: DraftStats

    def propose(self, req: DraftRequest) -> DraftTree: ...

    def reset(self) -> None: ...
