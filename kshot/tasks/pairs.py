"""Balanced same/different pairs of examples, the training data of Siamese networks.

A pair batch holds ``h`` triplets (anchor, positive, negative): the positive is another example
of the anchor's class, the negative an example of another class. Read as pairs, that is ``h``
same-class pairs ``(anchor, positive)`` and ``h`` different-class pairs ``(anchor, negative)``:
balanced by construction, and no example is ever paired with itself. The same batch serves
pair losses (Koch et al.'s cross-entropy, the contrastive loss) and the triplet-margin loss, and
each anchor is embedded once for both of its pairs.

Like :class:`~kshot.tasks.TaskSampler`, pair batch ``(step, index)`` is a pure function of
``(seed, step, index)``, including its random distortions: training on pairs resumes exactly
and splits across processes exactly as training on tasks does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kshot.data.base import FewShotDataset
from kshot.errors import ConfigError, DataError
from kshot.tasks.base import TaskSource

AUGMENTATIONS = ("none", "affine")


@dataclass
class PairBatch:
    """``h`` triplets. Shapes: ``anchor``, ``positive``, ``negative`` ``[h, ...]``;
    ``anchor_class``, ``negative_class`` ``[h]`` (the dataset's class indices)."""

    anchor: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor
    anchor_class: torch.Tensor
    negative_class: torch.Tensor

    def __len__(self) -> int:
        """Number of pairs (twice the number of triplets)."""
        return 2 * len(self.anchor)

    @property
    def first(self) -> torch.Tensor:
        """First inputs of the ``2h`` pairs ``[2h, ...]``: each anchor twice."""
        return torch.cat([self.anchor, self.anchor])

    @property
    def second(self) -> torch.Tensor:
        """Second inputs ``[2h, ...]``: the positives, then the negatives."""
        return torch.cat([self.positive, self.negative])

    @property
    def same(self) -> torch.Tensor:
        """Targets ``[2h]``: 1.0 for the same-class pairs (first half), 0.0 for the others."""
        h = len(self.anchor)
        return torch.cat([torch.ones(h), torch.zeros(h)]).to(self.anchor.device)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PairBatch":
        return PairBatch(*(t.to(device, non_blocking=non_blocking)
                           for t in (self.anchor, self.positive, self.negative)),
                         self.anchor_class, self.negative_class)


class PairSampler(TaskSource):
    """Draws balanced pair batches from a dataset, reproducibly from a seed.

    The anchor's class is uniform over the classes with at least two examples, the anchor and
    positive are two distinct examples of it, and the negative's class is uniform over the
    other classes (of the anchor's group with ``within_groups``: a character of the same
    alphabet, the harder negatives a within-alphabet test asks to tell apart).

    Args:
        dataset: any :class:`FewShotDataset`.
        pairs: pairs per batch, even: ``pairs / 2`` same-class and ``pairs / 2`` different.
        seed: the stream's seed; batch ``(step, index)`` depends on nothing else.
        meta_batch_size: pair batches per outer step (they are split across processes).
        augment: ``none``, or ``affine``: every image gets an independent random affine
            distortion (Koch et al. 2015, section 4.1).
        within_groups: draw each negative from the anchor's group (the dataset's
            :meth:`~kshot.data.base.FewShotDataset.class_groups`).

    Raises:
        DataError: when no class has two examples, or there are fewer than two classes (in one
            group, with ``within_groups``).
    """

    def __init__(self, dataset: FewShotDataset, pairs: int = 128, seed: int = 0,
                 meta_batch_size: int = 1, augment: str = "none", within_groups: bool = False):
        if int(pairs) != pairs or pairs < 2 or pairs % 2:
            raise DataError(f"pairs must be an even integer >= 2 (half same, half different), not {pairs!r}")
        if int(meta_batch_size) != meta_batch_size or meta_batch_size < 1:
            raise DataError(f"meta_batch_size must be an integer >= 1, not {meta_batch_size!r}")
        if augment not in AUGMENTATIONS:
            raise ConfigError(f"unknown augment {augment!r}; choose one of {', '.join(AUGMENTATIONS)}")
        self.dataset, self.pairs, self.seed = dataset, int(pairs), int(seed)
        self.meta_batch_size, self.augment = int(meta_batch_size), augment
        examples = dataset.class_examples()
        self._counts = np.array([len(e) for e in examples], dtype=np.int64)
        self._anchor_classes = np.flatnonzero(self._counts >= 2)
        self._nonempty = np.flatnonzero(self._counts >= 1)
        if len(self._nonempty) < 2:
            raise DataError(f"different-class pairs need at least two classes; this dataset has "
                            f"{len(self._nonempty)} with examples")
        if len(self._anchor_classes) == 0:
            raise DataError("no class has two examples, so no same-class pair can be drawn")
        self._table = np.zeros((len(examples), int(self._counts.max())), dtype=np.int64)
        for c, e in enumerate(examples):
            self._table[c, :len(e)] = e
        self.within_groups = bool(within_groups)
        if self.within_groups:
            self._group_negatives(dataset)

    def _group_negatives(self, dataset: FewShotDataset) -> None:
        """Each class's group, as a row of a padded table of the group's classes with examples,
        and its position in that row; anchors are kept to groups with two such classes."""
        groups = dataset.class_groups()
        if groups is None:
            raise DataError(f"{type(dataset).__name__} does not group its classes (e.g. by alphabet), so "
                            f"negatives cannot be drawn within one group; drop --within-groups")
        groups = np.asarray(groups, dtype=np.int64)
        members = [self._nonempty[groups[self._nonempty] == g] for g in np.unique(groups[self._nonempty])]
        self._members = np.zeros((len(members), max(len(m) for m in members)), dtype=np.int64)
        self._member_counts = np.array([len(m) for m in members], dtype=np.int64)
        self._row = np.full(len(self._counts), -1, dtype=np.int64)
        self._position = np.zeros(len(self._counts), dtype=np.int64)
        for r, m in enumerate(members):
            self._members[r, :len(m)] = m
            self._row[m], self._position[m] = r, np.arange(len(m))
        ok = self._row[self._anchor_classes] >= 0
        ok &= self._member_counts[np.maximum(self._row[self._anchor_classes], 0)] >= 2
        self._anchor_classes = self._anchor_classes[ok]
        if len(self._anchor_classes) == 0:
            raise DataError("no group has two classes with examples (one of them with two), so no "
                            "within-group different-class pair can be drawn; drop --within-groups")

    def __repr__(self) -> str:
        within = ", within groups" if self.within_groups else ""
        return (f"PairSampler({self.pairs} pairs, augment={self.augment}, seed={self.seed}, "
                f"classes={len(self._nonempty)}{within})")

    def rng(self, step: int, index: int = 0) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(step), int(index)])

    def pair_indices(self, step: int, index: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Classes ``[2, h]`` (anchor's, negative's) and example indices ``[3, h]`` (anchor,
        positive, negative) of batch ``(step, index)``."""
        return self._draw(self.rng(step, index))

    def _draw(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        h = self.pairs // 2
        # Uniform doubles only (a bit stream NumPy keeps stable), scaled to integers.
        u = rng.random((5, h))
        anchor_class = self._anchor_classes[_scaled(u[0], len(self._anchor_classes))]
        count = self._counts[anchor_class]
        a = _scaled(u[1], count)
        p = _scaled(u[2], count - 1)
        p += p >= a  # a uniform draw among the class's other examples
        if self.within_groups:
            row, position = self._row[anchor_class], self._position[anchor_class]
            other = _scaled(u[3], self._member_counts[row] - 1)
            negative_class = self._members[row, other + (other >= position)]
        else:
            position = np.searchsorted(self._nonempty, anchor_class)
            other = _scaled(u[3], len(self._nonempty) - 1)
            negative_class = self._nonempty[other + (other >= position)]
        n = _scaled(u[4], self._counts[negative_class])
        examples = np.stack([self._table[anchor_class, a], self._table[anchor_class, p],
                             self._table[negative_class, n]])
        return np.stack([anchor_class, negative_class]), examples

    def pair_batch(self, step: int, index: int = 0) -> PairBatch:
        rng = self.rng(step, index)
        classes, examples = self._draw(rng)
        x = self.dataset.load(examples.reshape(-1))
        if self.augment == "affine":
            x = random_affine(x, rng)  # the same stream, continued
        anchor, positive, negative = x.split(self.pairs // 2)
        return PairBatch(anchor, positive, negative, torch.from_numpy(classes[0]),
                         torch.from_numpy(classes[1]))

    task = pair_batch  # a TaskSource whose tasks are pair batches: meta_batch, stream, iteration


def _scaled(u: np.ndarray, n: np.ndarray | int) -> np.ndarray:
    """Uniform integers in ``[0, n)`` from uniform doubles in ``[0, 1)``."""
    n = np.asarray(n, dtype=np.int64)
    return np.minimum((u * n).astype(np.int64), n - 1)


def random_affine(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Koch et al.'s random affine distortions, one per image.

    Each of rotation (within ±10°), shear (±0.3 on each axis), scale (0.8 to 1.2 on each axis)
    and translation (±2 pixels of a 105-pixel image on each axis, scaled to the image size) is
    applied with probability 1/2.

    Args:
        x: images ``[n, C, H, W]``.
        rng: the source of the random parameters (the caller's, so that they are reproducible).

    Returns:
        The distorted images ``[n, C, H, W]`` (edges extended beyond the border).
    """
    n = len(x)
    u = rng.random((n, 7))
    use = rng.random((n, 4)) < 0.5
    theta = np.where(use[:, 0], (2 * u[:, 0] - 1) * math.radians(10), 0.0)
    shear = np.where(use[:, 1:2], (2 * u[:, 1:3] - 1) * 0.3, 0.0)
    scale = np.where(use[:, 2:3], 0.8 + 0.4 * u[:, 3:5], 1.0)
    shift = np.where(use[:, 3:4], (2 * u[:, 5:7] - 1) * (2 / 105) * 2, 0.0)  # in [-1, 1] units
    cos, sin = np.cos(theta), np.sin(theta)
    rotation = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)
    shearing = np.stack([np.stack([np.ones(n), shear[:, 0]], -1),
                         np.stack([shear[:, 1], np.ones(n)], -1)], -2)
    linear = rotation @ shearing * scale[:, None, :]
    matrix = torch.from_numpy(np.concatenate([linear, shift[:, :, None]], -1)).to(x.dtype)
    grid = F.affine_grid(matrix, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
