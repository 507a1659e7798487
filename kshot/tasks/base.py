"""What every source of tasks shares: the task, the meta-batch, and how they are served.

A task is a support set (K labelled examples of each of N classes) and a query set (Q other
examples of the same classes), labels renumbered 0..N-1 in the order the classes were drawn.

Task ``(step, index)`` of every source is a pure function of ``(seed, step, index)``: the same
seed gives the same tasks on any machine, in any process, in any order. That one property gives
reproducible runs, exact resumption after an interruption (start again at the step after the
last checkpoint), DataLoader workers that agree with the main process, and distributed ranks
that split a meta-batch of exactly the tasks a single process would have drawn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from kshot.errors import DataError

if TYPE_CHECKING:
    from kshot.data.base import FewShotDataset

#: Seed of the fixed evaluation tasks, distinct from any training seed people commonly use.
EVAL_SEED = 20_170_315


@dataclass
class Task:
    """One episode. Shapes: ``support_x [N*K, ...]``, ``support_y [N*K]``, ``query_x [N*Q, ...]``,
    ``query_y [N*Q]``; ``classes [N]`` are the dataset's class indices behind labels 0..N-1."""

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    classes: torch.Tensor

    @property
    def ways(self) -> int:
        return len(self.classes)

    @property
    def shots(self) -> int:
        return len(self.support_y) // max(self.ways, 1)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Task":
        return Task(*(t.to(device, non_blocking=non_blocking) for t in
                      (self.support_x, self.support_y, self.query_x, self.query_y)), self.classes)


#: A meta-batch is simply a list of tasks; learners stack them when they can batch.
MetaBatch = list[Task]


def stack_tasks(tasks: Sequence[Task]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack same-shaped tasks into ``[B, ...]`` tensors: (support_x, support_y, query_x, query_y)."""
    shapes = {(t.support_x.shape, t.query_x.shape) for t in tasks}
    if len(shapes) != 1:
        raise ValueError("tasks of different ways/shots cannot be stacked; process them one by one")
    return tuple(torch.stack([getattr(t, f) for t in tasks])  # type: ignore[return-value]
                 for f in ("support_x", "support_y", "query_x", "query_y"))


class TaskSource:
    """What the trainer needs from any source of tasks, given ``task(step, index)``: meta-batches,
    iteration, and a stream for DataLoader workers. Samplers of labelled datasets, Meta-Dataset
    episodes and generated task families all build on it."""

    dataset: "FewShotDataset"  # what the tasks are drawn from (its example_shape, checkpoint_extra)
    meta_batch_size: int

    def task(self, step: int, index: int = 0) -> Task:
        raise NotImplementedError

    @property
    def example_shape(self) -> tuple[int, ...]:
        return tuple(self.dataset.example_shape)

    def meta_batch(self, step: int, indices: Sequence[int] | None = None) -> MetaBatch:
        """Tasks ``(step, i)`` for ``i`` in ``indices`` (default: the whole meta-batch)."""
        if indices is None:
            indices = range(self.meta_batch_size)
        return [self.task(step, i) for i in indices]

    def __iter__(self) -> Iterator[MetaBatch]:
        step = 0
        while True:
            yield self.meta_batch(step)
            step += 1

    def stream(self, start: int = 0, stop: int | None = None,
               indices: Sequence[int] | None = None) -> "TaskStream":
        """Meta-batches ``start..stop-1`` as an IterableDataset for a DataLoader."""
        return TaskStream(self, start, stop, indices)  # type: ignore[arg-type]


def smallest_keys(keys: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` smallest keys along the last axis, in increasing key order."""
    if k < keys.shape[-1]:
        part = np.argpartition(keys, k - 1, axis=-1)[..., :k]
    else:
        part = np.broadcast_to(np.arange(keys.shape[-1]), keys.shape)
    order = np.argsort(np.take_along_axis(keys, part, axis=-1), axis=-1, kind="stable")
    return np.take_along_axis(part, order, axis=-1)


class TaskStream(IterableDataset):
    """Meta-batches of any task source for ``torch.utils.data.DataLoader``.

    Use with ``batch_size=None``; each item is ``(step, meta_batch)``. With W worker processes,
    worker w produces steps w, w+W, ...; the DataLoader's round-robin then yields them in order,
    so the stream is the same with any number of workers.
    """

    def __init__(self, sampler: TaskSource, start: int = 0, stop: int | None = None,
                 indices: Sequence[int] | None = None):
        self.sampler, self.start, self.stop = sampler, int(start), stop
        self.indices = list(indices) if indices is not None else None

    def __iter__(self) -> Iterator[tuple[int, MetaBatch]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        step = self.start + worker
        while self.stop is None or step < self.stop:
            yield step, self.sampler.meta_batch(step, self.indices)
            step += n_workers


def identity_collate(item):
    """``collate_fn`` for task streams: meta-batches arrive already assembled."""
    return item


class FixedTasks(Sequence[Task]):
    """``n_tasks`` tasks of a sampler, built lazily; task i is sampler task ``(i, 0)``."""

    def __init__(self, sampler: TaskSource, n_tasks: int):
        if n_tasks < 1:
            raise DataError(f"the number of tasks must be positive, not {n_tasks}")
        self.sampler, self.n_tasks = sampler, int(n_tasks)

    def __len__(self) -> int:
        return self.n_tasks

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n_tasks))]
        if not -self.n_tasks <= i < self.n_tasks:
            raise IndexError(i)
        return self.sampler.task(i % self.n_tasks, 0)

    def __iter__(self) -> Iterator[Task]:
        return (self.sampler.task(i, 0) for i in range(self.n_tasks))


class TaskSlice(Sequence):
    """Tasks ``lo..hi-1`` of a task sequence, built only when read (fixed task sets are lazy)."""

    def __init__(self, tasks: Sequence, lo: int, hi: int):
        self.tasks, self.lo, self.hi = tasks, lo, hi

    def __len__(self) -> int:
        return self.hi - self.lo

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return self.tasks[self.lo + i % len(self)]

    def __iter__(self):
        return (self.tasks[i] for i in range(self.lo, self.hi))
