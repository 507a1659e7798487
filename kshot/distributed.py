"""Process-group plumbing for meta-training on several processes (torchrun).

The trainer talks to a :class:`Distributed` object only: which tasks of a meta-batch this rank
computes, how gradients are averaged, and whether this rank does the side effects (logs,
checkpoints, progress bars). :func:`single_process` is the trivial one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def task_indices(self, meta_batch_size: int) -> list[int]:
        """Indices of this rank's share of the tasks of each meta-batch."""
        per_rank = meta_batch_size // self.world_size
        return list(range(self.rank * per_rank, (self.rank + 1) * per_rank))

    def average_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Make every rank's ``.grad`` the mean over ranks (nothing to do in one process)."""

    def barrier(self) -> None:
        """Wait for every rank (nothing to do in one process)."""


def single_process() -> Distributed:
    return Distributed()
