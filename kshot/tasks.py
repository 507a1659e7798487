"""Few-shot tasks: N-way K-shot episodes drawn from a :class:`~kshot.data.FewShotDataset`.

A task is a support set (K labelled examples of each of N classes) and a query set (Q other
examples of the same classes), labels renumbered 0..N-1 in the order the classes were drawn.

Task ``(step, index)`` of a sampler is a pure function of ``(seed, step, index)``: the same
seed gives the same tasks on any machine, in any process, in any order. That one property gives
reproducible runs, exact resumption after an interruption (start again at the step after the
last checkpoint), DataLoader workers that agree with the main process, and distributed ranks
that split a meta-batch of exactly the tasks a single process would have drawn.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from kshot.data.base import FewShotDataset
from kshot.errors import DataError, DataWarning

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

    dataset: FewShotDataset
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


class TaskSampler(TaskSource):
    """Draws N-way K-shot tasks with Q queries per class, reproducibly from a seed.

    Args:
        dataset: any :class:`FewShotDataset` (or labelled data wrapped in one).
        ways: classes per task (N).
        shots: labelled support examples per class (K).
        queries: query examples per class (Q); support and query never share an example.
        seed: the stream's seed; task ``(step, index)`` depends on nothing else.
        meta_batch_size: tasks per meta-batch, for :meth:`meta_batch` and iteration.
        within_groups: draw all of a task's classes from one group of the dataset's
            :meth:`~kshot.data.FewShotDataset.class_groups` (Omniglot: one alphabet), the group
            chosen uniformly among those with enough classes.

    Raises:
        DataError: when the dataset has fewer than ``ways`` classes with at least
            ``shots + queries`` examples each (in one group, with ``within_groups``).
    """

    def __init__(self, dataset: FewShotDataset, ways: int, shots: int, queries: int, seed: int = 0,
                 meta_batch_size: int = 1, within_groups: bool = False):
        for name, value, low in (("ways", ways, 1), ("shots", shots, 1), ("queries", queries, 0),
                                 ("meta_batch_size", meta_batch_size, 1)):
            if int(value) != value or value < low:
                raise DataError(f"{name} must be an integer >= {low}, not {value!r}")
        self.dataset, self.ways, self.shots, self.queries = dataset, int(ways), int(shots), int(queries)
        if int(seed) != seed or seed < 0:
            raise DataError(f"seed must be a non-negative integer, not {seed!r}")
        self.seed, self.meta_batch_size = int(seed), int(meta_batch_size)
        examples = dataset.class_examples()
        counts = np.array([len(e) for e in examples], dtype=np.int64)
        need = self.shots + self.queries
        self._eligible = np.flatnonzero(counts >= need)
        if len(counts) < self.ways:
            what = getattr(dataset, "description", "a dataset")
            raise DataError(f"cannot draw {self.ways}-way tasks from {what} of {len(counts)} "
                            f"classes; use --ways {len(counts)} or fewer")
        short = np.flatnonzero(counts < need)
        if len(short):
            names = getattr(dataset, "class_names", None) or [str(c) for c in range(len(counts))]
            listed = ", ".join(f"{names[c]!r} ({counts[c]})" for c in short[np.argsort(counts[short], kind="stable")][:3])
            more = f" and {len(short) - 3} more" if len(short) > 3 else ""
            if len(self._eligible) < self.ways:
                raise DataError(f"{self.shots} shots + {self.queries} queries need {need} examples per "
                                f"class, but only {len(self._eligible)} of {len(counts)} classes have "
                                f"that many (too few: {listed}{more}); lower --shots or --queries, "
                                f"or add examples")
            warnings.warn(f"{len(short)} of {len(counts)} classes have fewer than {need} examples "
                          f"({self.shots} shots + {self.queries} queries) and are never drawn: "
                          f"{listed}{more}", DataWarning, stacklevel=2)
        # A padded [classes, max_count] table lets one vectorised draw pick every class's examples.
        width = int(counts.max())
        self._table = np.zeros((len(counts), width), dtype=np.int64)
        for c, e in enumerate(examples):
            self._table[c, :len(e)] = e
        self._counts = counts
        self.within_groups = bool(within_groups)
        self._groups = self._group_members(dataset) if self.within_groups else []

    def _group_members(self, dataset: FewShotDataset) -> list[np.ndarray]:
        """Eligible classes of each group that has at least ``ways`` of them."""
        groups = dataset.class_groups()
        if groups is None:
            raise DataError(f"{type(dataset).__name__} does not group its classes (e.g. by alphabet), "
                            f"so tasks cannot be drawn within one group; drop --test-within-groups")
        of_eligible = np.asarray(groups)[self._eligible]
        members = [self._eligible[of_eligible == g] for g in np.unique(of_eligible)]
        usable = [m for m in members if len(m) >= self.ways]
        if not usable:
            largest = max((len(m) for m in members), default=0)
            raise DataError(f"no group has {self.ways} classes with {self.shots + self.queries} examples "
                            f"(the largest has {largest}); lower --ways, or draw tasks across groups")
        return usable

    def __repr__(self) -> str:
        within = f", within {len(self._groups)} groups" if self.within_groups else ""
        return (f"TaskSampler({self.ways}-way {self.shots}-shot, {self.queries} queries, "
                f"seed={self.seed}, classes={len(self._eligible)}{within})")

    def rng(self, step: int, index: int = 0) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(step), int(index)])

    def task_indices(self, step: int, index: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Class indices ``[N]`` and example indices ``[N, K+Q]`` of task ``(step, index)``."""
        rng = self.rng(step, index)
        # Only uniform doubles are drawn (a bit stream NumPy keeps stable across versions);
        # choices are the k smallest of iid keys, which is a uniform draw without replacement.
        pool = self._eligible
        if self.within_groups:
            pool = self._groups[int(_smallest(rng.random(len(self._groups)), 1)[0])]
        classes = pool[_smallest(rng.random(len(pool)), self.ways)]
        keys = rng.random((self.ways, self._table.shape[1]))
        keys[np.arange(self._table.shape[1])[None, :] >= self._counts[classes][:, None]] = 2.0
        pick = _smallest(keys, self.shots + self.queries)
        return classes, np.take_along_axis(self._table[classes], pick, axis=-1)

    def task(self, step: int, index: int = 0) -> Task:
        classes, examples = self.task_indices(step, index)
        k = self.shots
        flat = np.concatenate([examples[:, :k].reshape(-1), examples[:, k:].reshape(-1)])
        x = self.dataset.load(flat)
        n_support = self.ways * k
        labels = torch.arange(self.ways)
        return Task(support_x=x[:n_support], support_y=labels.repeat_interleave(k),
                    query_x=x[n_support:], query_y=labels.repeat_interleave(self.queries),
                    classes=torch.from_numpy(classes))



def _smallest(keys: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` smallest keys along the last axis, in increasing key order."""
    if k < keys.shape[-1]:
        part = np.argpartition(keys, k - 1, axis=-1)[..., :k]
    else:
        part = np.broadcast_to(np.arange(keys.shape[-1]), keys.shape)
    order = np.argsort(np.take_along_axis(keys, part, axis=-1), axis=-1, kind="stable")
    return np.take_along_axis(part, order, axis=-1)


class TaskStream(IterableDataset):
    """Meta-batches of a :class:`TaskSampler` for ``torch.utils.data.DataLoader``.

    Use with ``batch_size=None``; each item is ``(step, meta_batch)``. With W worker processes,
    worker w produces steps w, w+W, ...; the DataLoader's round-robin then yields them in order,
    so the stream is the same with any number of workers.
    """

    def __init__(self, sampler: TaskSampler, start: int = 0, stop: int | None = None,
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


def fixed_tasks(dataset: FewShotDataset, ways: int, shots: int, queries: int,
                n_tasks: int = 1000, seed: int = EVAL_SEED, within_groups: bool = False) -> "FixedTasks":
    """A fixed, seeded set of evaluation tasks: the same tasks on every machine, every time.

    From a multi-source dataset (``a+b``), each task's classes come from one source."""
    from kshot.data.multisource import MultiSourceDataset

    if isinstance(dataset, MultiSourceDataset):
        if within_groups:
            raise DataError("within-group tasks are not available from a multi-source dataset; "
                            "evaluate on each source separately")
        from kshot.metadataset import task_sampler

        return FixedTasks(task_sampler(dataset, "fixed", ways, shots, queries, seed=seed), n_tasks)
    return FixedTasks(TaskSampler(dataset, ways, shots, queries, seed=seed,
                                  within_groups=within_groups), n_tasks)


class FixedTasks(Sequence[Task]):
    """``n_tasks`` tasks of a sampler, built lazily; task i is sampler task ``(i, 0)``."""

    def __init__(self, sampler: TaskSampler, n_tasks: int):
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
