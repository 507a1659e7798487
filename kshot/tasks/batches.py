"""Batches of labelled examples with their dataset-wide labels: the training data of supervised
pre-training (Baseline, Baseline++, RFS), which learns one classifier over all meta-training
classes instead of meta-learning from episodes.

The stream visits the examples in epochs, each a fresh permutation: position ``q`` of the
stream is example ``perm_e[q mod N]`` of epoch ``e = q div N``, with ``perm_e`` the order of
``N`` uniform doubles drawn from ``(seed, e)``. Batch ``(step, index)`` of ``meta_batch_size``
batches per step holds positions ``(step * meta_batch_size + index) * batch_size + j``: a pure
function of ``(seed, step, index)`` like every other task source, so pre-training resumes
exactly and splits across processes (and DataLoader workers) exactly as episodic training does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kshot.data.base import FewShotDataset
from kshot.errors import DataError
from kshot.tasks.base import TaskSource


@dataclass
class LabelledBatch:
    """``x [B, ...]`` examples and ``y [B]`` their classes' indices in the dataset (0..C-1)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "LabelledBatch":
        return LabelledBatch(self.x.to(device, non_blocking=non_blocking), self.y.to(device, non_blocking=non_blocking))


class LabelledBatchSampler(TaskSource):
    """Epochs of shuffled labelled batches from a dataset, reproducibly from a seed.

    Args:
        dataset: any :class:`~kshot.data.FewShotDataset`; its classes are the labels.
        batch_size: examples per batch.
        seed: the stream's seed; batch ``(step, index)`` depends on nothing else.
        meta_batch_size: batches per outer step (they are split across processes).
    """

    def __init__(self, dataset: FewShotDataset, batch_size: int = 16, seed: int = 0, meta_batch_size: int = 1):
        for name, value in (("batch_size", batch_size), ("meta_batch_size", meta_batch_size)):
            if int(value) != value or value < 1:
                raise DataError(f"{name} must be an integer >= 1, not {value!r}")
        if int(seed) != seed or seed < 0:
            raise DataError(f"seed must be a non-negative integer, not {seed!r}")
        self.dataset, self.batch_size = dataset, int(batch_size)
        self.seed, self.meta_batch_size = int(seed), int(meta_batch_size)
        examples = dataset.class_examples()
        self._examples = np.concatenate([np.asarray(e, dtype=np.int64) for e in examples]) if examples else \
            np.zeros(0, np.int64)
        self._labels = np.concatenate([np.full(len(e), c, dtype=np.int64) for c, e in enumerate(examples)]) \
            if examples else np.zeros(0, np.int64)
        if len(self._examples) == 0:
            raise DataError("the dataset holds no examples to pre-train on")
        self.num_classes = len(examples)
        self._orders: dict[int, np.ndarray] = {}

    def __repr__(self) -> str:
        return (f"LabelledBatchSampler({self.batch_size} examples of {self.num_classes} classes, "
                f"seed={self.seed}, {len(self._examples)} examples per epoch)")

    @property
    def examples_per_epoch(self) -> int:
        return len(self._examples)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of the examples in epoch ``epoch``."""
        if epoch not in self._orders:
            keys = np.random.default_rng([self.seed, int(epoch)]).random(len(self._examples))  # uniform doubles only
            if len(self._orders) >= 2:
                self._orders.pop(min(self._orders))
            self._orders[epoch] = np.argsort(keys, kind="stable")
        return self._orders[epoch]

    def batch_positions(self, step: int, index: int = 0) -> np.ndarray:
        """Positions in the dataset's example list of batch ``(step, index)``."""
        start = (int(step) * self.meta_batch_size + int(index)) * self.batch_size
        q = np.arange(start, start + self.batch_size, dtype=np.int64)
        n = len(self._examples)
        epochs, offsets = q // n, q % n
        out = np.empty_like(q)
        for epoch in np.unique(epochs):
            chosen = epochs == epoch
            out[chosen] = self.epoch_order(int(epoch))[offsets[chosen]]
        return out

    def batch(self, step: int, index: int = 0) -> LabelledBatch:
        positions = self.batch_positions(step, index)
        x = self.dataset.load(self._examples[positions])
        return LabelledBatch(x, torch.from_numpy(self._labels[positions].copy()))

    task = batch  # a TaskSource whose tasks are batches: meta_batch, stream and iteration come with it
