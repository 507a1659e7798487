"""N-way K-shot tasks drawn from a :class:`~kshot.data.FewShotDataset`, reproducibly from a seed."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from kshot.data.base import FewShotDataset
from kshot.errors import DataError, DataWarning
from kshot.tasks.base import Task, TaskSource, smallest_keys


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
                            f"so tasks cannot be drawn within one group; drop --within-groups / --test-within-groups")
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
            pool = self._groups[int(smallest_keys(rng.random(len(self._groups)), 1)[0])]
        classes = pool[smallest_keys(rng.random(len(pool)), self.ways)]
        keys = rng.random((self.ways, self._table.shape[1]))
        keys[np.arange(self._table.shape[1])[None, :] >= self._counts[classes][:, None]] = 2.0
        pick = smallest_keys(keys, self.shots + self.queries)
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
