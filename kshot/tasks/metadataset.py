"""Meta-Dataset-style tasks: variable ways and shots, drawn from several sources at once.

Triantafillou et al., "Meta-Dataset: A Dataset of Datasets for Learning to Learn from Few
Examples" (ICLR 2020), section 3.2 and appendix, train and test on episodes whose number of
classes, shots per class and class balance all vary, drawn one source at a time from many
datasets. Fixed N-way K-shot training makes a learner good at exactly that shape of task; the
paper's episodes are the realistic alternative. For one episode from a split with classes C:

1. **ways** ``N ~ U{min_ways, ..., min(max_ways, |C|)}`` (5 and 50), classes uniformly without
   replacement among classes with at least 2 examples;
2. **queries per class** ``q = min(max_queries, min_c floor(n_c / 2))`` (10), where ``n_c`` is
   the number of examples of class ``c``: balanced, and never more than half of any class;
3. **support set size** ``|S| = min(max_support, sum_c ceil(beta * min(max_support_per_class,
   n_c - q))``, ``beta ~ U(0, 1]`` (500 and 100);
4. **shots per class** ``k_c = min(floor(R_c * (|S| - N)) + 1, n_c - q)`` with
   ``R_c = exp(a_c) n_c / sum_c' exp(a_c') n_c'``, ``a_c ~ U[log 1/2, log 2)``: roughly in
   proportion to class sizes, perturbed, and at least one shot per class.

Every bound above is an :class:`EpisodeBounds` field with the paper's value as default.
:class:`MultiSourceSampler` first picks a source per task (uniformly, as the paper's training
on all sources does, or in proportion to the sources' numbers of classes), then draws the task
from that source's classes only. Like :class:`~kshot.tasks.TaskSampler`, task ``(step, i)`` is
a pure function of ``(seed, step, i)``, and the samplers offer the same interface
(``task``, ``meta_batch``, ``stream``, ``example_shape``), so the trainer uses them unchanged.
Tasks of different shapes cannot be stacked; learners take them one by one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from kshot.data.base import FewShotDataset
from kshot.data.multisource import MultiSourceDataset
from kshot.errors import ConfigError, DataError
from kshot.tasks.base import Task, TaskSource, smallest_keys
from kshot.tasks.episodes import TaskSampler

#: How a multi-source sampler picks the source of each task.
SOURCE_WEIGHTS = ("uniform", "classes")


@dataclass(frozen=True)
class EpisodeBounds:
    """The limits of Meta-Dataset's episode sampler (defaults: the paper's values)."""

    min_ways: int = 5
    max_ways: int = 50
    max_queries: int = 10  # per class
    max_support: int = 500  # examples in the whole support set
    max_support_per_class: int = 100  # a class's largest contribution to the support-size draw
    min_log_weight: float = math.log(0.5)
    max_log_weight: float = math.log(2.0)

    def __post_init__(self):
        if not 1 <= self.min_ways <= self.max_ways:
            raise ConfigError(f"episode bounds need 1 <= min_ways <= max_ways, not "
                              f"{self.min_ways} and {self.max_ways}")
        if self.max_support < self.max_ways:
            raise ConfigError(f"max_support ({self.max_support}) must allow one shot for each of "
                              f"max_ways ({self.max_ways}) classes")
        if self.max_queries < 1 or self.max_support_per_class < 1:
            raise ConfigError("max_queries and max_support_per_class must be at least 1")
        if not self.min_log_weight <= self.max_log_weight:
            raise ConfigError("min_log_weight must not exceed max_log_weight")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Episode:
    """The composition of one episode, with the random draws that produced it.

    ``classes [N]`` are dataset class indices; ``shots [N]`` support examples per class;
    ``queries`` per class; ``examples`` holds, per class, ``shots[c]`` support then ``queries``
    query example indices. ``beta``, ``support_size`` (the drawn bound ``|S|``) and
    ``log_weights [N]`` are kept so that the draw can be checked against the paper's rules.
    """

    classes: np.ndarray
    shots: np.ndarray
    queries: int
    examples: list[np.ndarray]
    beta: float
    support_size: int
    log_weights: np.ndarray

    @property
    def ways(self) -> int:
        return len(self.classes)


def _check_int(name: str, value, low: int) -> int:
    if int(value) != value or value < low:
        raise DataError(f"{name} must be an integer >= {low}, not {value!r}")
    return int(value)


class VariableTaskSampler(TaskSource):
    """Meta-Dataset episodes (variable ways, shots and class balance) from one dataset.

    Args:
        dataset: any :class:`FewShotDataset`; classes with fewer than 2 examples are skipped.
        seed: the stream's seed; episode ``(step, index)`` depends on nothing else.
        meta_batch_size: tasks per meta-batch.
        bounds: the sampler's limits (default: the paper's).

    Raises:
        DataError: when fewer than ``bounds.min_ways`` classes have 2 examples or more.
    """

    def __init__(self, dataset: FewShotDataset, seed: int = 0, meta_batch_size: int = 1,
                 bounds: EpisodeBounds | None = None):
        self.dataset = dataset
        self.seed = int(seed)
        self.meta_batch_size = _check_int("meta_batch_size", meta_batch_size, 1)
        self.bounds = bounds or EpisodeBounds()
        self._examples = [np.asarray(e, dtype=np.int64) for e in dataset.class_examples()]
        self._counts = np.array([len(e) for e in self._examples], dtype=np.int64)
        self._eligible = np.flatnonzero(self._counts >= 2)
        if len(self._eligible) < self.bounds.min_ways:
            raise DataError(f"Meta-Dataset episodes need at least {self.bounds.min_ways} classes "
                            f"with 2 or more examples; this dataset has {len(self._eligible)} "
                            f"(of {len(self._counts)} classes)")

    def __repr__(self) -> str:
        b = self.bounds
        return (f"VariableTaskSampler({b.min_ways}..{min(b.max_ways, len(self._eligible))} ways, "
                f"support <= {b.max_support}, queries <= {b.max_queries}, seed={self.seed}, "
                f"classes={len(self._eligible)})")

    @property
    def max_ways(self) -> int:
        """The largest number of ways this dataset allows."""
        return min(self.bounds.max_ways, len(self._eligible))

    def rng(self, step: int, index: int = 0) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(step), int(index)])

    def episode(self, step: int, index: int = 0) -> Episode:
        """The composition and example indices of episode ``(step, index)``."""
        b = self.bounds
        rng = self.rng(step, index)
        # Only uniform doubles are drawn, as in TaskSampler: NumPy keeps that stream stable.
        low, high = b.min_ways, self.max_ways
        ways = low + min(int(rng.random() * (high - low + 1)), high - low)
        classes = self._eligible[smallest_keys(rng.random(len(self._eligible)), ways)]
        counts = self._counts[classes]
        queries = int(min(b.max_queries, (counts // 2).min()))
        remaining = counts - queries
        beta = 1.0 - rng.random()  # U(0, 1]: every class contributes at least one
        contributions = np.ceil(beta * np.minimum(b.max_support_per_class, remaining))
        support_size = int(min(b.max_support, contributions.sum()))
        log_weights = b.min_log_weight + (b.max_log_weight - b.min_log_weight) * rng.random(ways)
        weights = np.exp(log_weights) * counts
        shares = weights / weights.sum()
        shots = np.minimum(np.floor(shares * (support_size - ways)).astype(np.int64) + 1, remaining)
        examples = []
        for c, k in zip(classes, shots):
            pick = smallest_keys(rng.random(self._counts[c]), int(k) + queries)
            examples.append(self._examples[c][pick])
        return Episode(classes=classes, shots=shots, queries=queries, examples=examples,
                       beta=float(beta), support_size=support_size, log_weights=log_weights)

    def task(self, step: int, index: int = 0) -> Task:
        ep = self.episode(step, index)
        support = np.concatenate([e[:k] for e, k in zip(ep.examples, ep.shots)])
        query = np.concatenate([e[k:] for e, k in zip(ep.examples, ep.shots)])
        x = self.dataset.load(np.concatenate([support, query]))
        labels = np.arange(ep.ways)
        return Task(support_x=x[:len(support)], support_y=torch.from_numpy(np.repeat(labels, ep.shots)),
                    query_x=x[len(support):], query_y=torch.from_numpy(np.repeat(labels, ep.queries)),
                    classes=torch.from_numpy(ep.classes))


class MultiSourceSampler(TaskSource):
    """Tasks from a :class:`MultiSourceDataset`, each from the classes of one source.

    Args:
        dataset: the sources.
        make_sampler: ``(source_dataset, seed) -> sampler`` builds the sampler of one source
            (e.g. a :class:`VariableTaskSampler` or a :class:`~kshot.tasks.TaskSampler`); its
            tasks' class indices are mapped back to the union's.
        seed: the stream's seed; each source's sampler gets a seed derived from it.
        meta_batch_size: tasks per meta-batch.
        weights: ``uniform`` (each source equally often, as Meta-Dataset trains), ``classes``
            (in proportion to each source's number of classes), or one weight per source.
    """

    def __init__(self, dataset: MultiSourceDataset,
                 make_sampler: Callable[[FewShotDataset, int], TaskSource | TaskSampler],
                 seed: int = 0, meta_batch_size: int = 1,
                 weights: str | Sequence[float] = "uniform"):
        if not isinstance(dataset, MultiSourceDataset):
            raise DataError(f"a multi-source sampler needs a MultiSourceDataset, not {type(dataset).__name__}")
        self.dataset = dataset
        self.seed = int(seed)
        self.meta_batch_size = _check_int("meta_batch_size", meta_batch_size, 1)
        self.probabilities = source_probabilities(dataset, weights)
        self._subsets = [dataset.subset(dataset.source_classes(s).tolist())
                         for s in range(dataset.num_sources)]
        self.samplers = []
        for s, subset in enumerate(self._subsets):
            try:
                self.samplers.append(make_sampler(subset, derived_seed(self.seed, s)))
            except DataError as e:
                raise DataError(f"source {dataset.names[s]!r}: {e}") from None
        self._class_maps = [torch.as_tensor(sub.classes, dtype=torch.int64) for sub in self._subsets]
        self._cumulative = np.cumsum(self.probabilities)

    def __repr__(self) -> str:
        parts = ", ".join(f"{n} p={p:.2f}: {s!r}" for n, p, s in
                          zip(self.dataset.names, self.probabilities, self.samplers))
        return f"MultiSourceSampler({parts})"

    def source(self, step: int, index: int = 0) -> int:
        """The source of task ``(step, index)``."""
        u = np.random.default_rng([self.seed, int(step), int(index)]).random()
        return int(min(np.searchsorted(self._cumulative, u, side="right"), len(self.samplers) - 1))

    def task(self, step: int, index: int = 0) -> Task:
        s = self.source(step, index)
        task = self.samplers[s].task(step, index)
        task.classes = self._class_maps[s][task.classes]
        return task


def derived_seed(seed: int, source: int) -> int:
    """A seed for source ``source`` of a stream seeded ``seed`` (independent of the others)."""
    return int(np.random.SeedSequence([int(seed), int(source), 0x6D64]).generate_state(1)[0])


def source_probabilities(dataset: MultiSourceDataset, weights: str | Sequence[float]) -> np.ndarray:
    """How often each source is picked: ``uniform``, ``classes``, or explicit weights."""
    n = dataset.num_sources
    if isinstance(weights, str):
        if weights == "uniform":
            w = np.ones(n)
        elif weights == "classes":
            w = np.array([d.num_classes for d in dataset.sources], dtype=np.float64)
        else:
            raise ConfigError(f"unknown source weighting {weights!r}; choose one of "
                              f"{', '.join(SOURCE_WEIGHTS)}")
    else:
        w = np.asarray(list(weights), dtype=np.float64)
        if w.shape != (n,) or not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
            raise ConfigError(f"source weights must be {n} non-negative numbers, not all zero; "
                              f"got {list(weights)}")
    return w / w.sum()
