"""Labelled examples grouped by class: the one thing a task sampler needs from a dataset.

A :class:`FewShotDataset` answers two questions: which examples belong to each class
(:meth:`class_examples`), and what those examples are (:meth:`load`, batched, so that a whole
task is gathered in one call). Everything else (archives, folders, tables, rotations) is the
business of the concrete datasets in this package.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Sequence

import numpy as np
import torch

from kshot.data.images import ImageFormat
from kshot.errors import DataError


class FewShotDataset(ABC):
    """Examples grouped by class.

    Subclasses provide :meth:`class_examples` and :meth:`load`; example indices are whatever
    integers the subclass chooses, as long as :meth:`load` understands them.
    """

    #: One human-readable name per class, in class order.
    class_names: list[str]
    #: How image files map to this dataset's examples (None for non-image data). Saved in
    #: checkpoints so that ``kshot adapt`` can read a user's files the way the model expects.
    image_format: ImageFormat | None = None

    @abstractmethod
    def class_examples(self) -> Sequence[np.ndarray]:
        """Example indices of each class: ``result[c]`` is an int64 array for class ``c``."""

    @abstractmethod
    def load(self, indices: np.ndarray) -> torch.Tensor:
        """The examples at ``indices`` as one batch (images: float32 ``[n, C, H, W]`` in [0, 1])."""

    def class_groups(self) -> np.ndarray | None:
        """Group of each class (Omniglot: its alphabet) as int64 ``[num_classes]``, or None.

        Lets a sampler draw all of a task's classes from one group (within-alphabet tasks, as
        Lake et al. 2015 and Koch et al. 2015 test), which is harder than classes drawn at random.
        """
        return None

    def checkpoint_extra(self) -> dict:
        """What a checkpoint must record to read new inputs the way this dataset reads its own
        (``kshot adapt`` uses it): the image format, or a table's columns and scaling."""
        return {"image_format": self.image_format.to_dict()} if self.image_format is not None else {}

    @property
    def num_classes(self) -> int:
        return len(self.class_examples())

    def __len__(self) -> int:
        return int(sum(len(e) for e in self.class_examples()))

    @property
    def example_shape(self) -> tuple[int, ...]:
        """Shape of one loaded example, e.g. ``(1, 28, 28)``."""
        first = next(e for e in self.class_examples() if len(e))
        return tuple(self.load(first[:1]).shape[1:])

    def subset(self, classes: Sequence[int]) -> "FewShotDataset":
        """The same examples restricted to ``classes`` (renumbered 0..len(classes)-1)."""
        return ClassSubset(self, classes)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(classes={self.num_classes}, examples={len(self)})"


class ClassSubset(FewShotDataset):
    """A view of some classes of another dataset; loads go straight to the parent."""

    def __init__(self, parent: FewShotDataset, classes: Sequence[int]):
        classes = [int(c) for c in classes]
        bad = [c for c in classes if not 0 <= c < parent.num_classes]
        if bad:
            raise DataError(f"class indices {bad[:5]} are out of range for a dataset of "
                            f"{parent.num_classes} classes")
        self.parent = parent
        self.classes = classes
        examples = parent.class_examples()
        self._examples = [examples[c] for c in classes]
        self.class_names = [parent.class_names[c] for c in classes]
        self.image_format = parent.image_format

    def class_examples(self) -> Sequence[np.ndarray]:
        return self._examples

    def class_groups(self) -> np.ndarray | None:
        groups = self.parent.class_groups()
        return None if groups is None else np.asarray(groups)[self.classes]

    def load(self, indices: np.ndarray) -> torch.Tensor:
        return self.parent.load(indices)

    def checkpoint_extra(self) -> dict:
        return self.parent.checkpoint_extra()


class ArrayDataset(FewShotDataset):
    """Examples held in one in-memory tensor (uint8 images are scaled to [0, 1] on load)."""

    def __init__(self, data: torch.Tensor | np.ndarray, labels: Sequence[int] | np.ndarray,
                 class_names: Sequence[str] | None = None):
        data = torch.as_tensor(data)
        labels = np.asarray(labels, dtype=np.int64)
        if len(data) != len(labels):
            raise DataError(f"{len(data)} examples but {len(labels)} labels")
        if labels.size and labels.min() < 0:
            raise DataError("labels must be non-negative class indices")
        n_classes = int(labels.max()) + 1 if labels.size else 0
        self.data = data
        self.labels = labels
        order = np.argsort(labels, kind="stable")
        bounds = np.searchsorted(labels[order], np.arange(n_classes + 1))
        self._examples = [order[bounds[c]:bounds[c + 1]] for c in range(n_classes)]
        self.class_names = list(class_names) if class_names is not None else [str(c) for c in range(n_classes)]
        if len(self.class_names) != n_classes:
            raise DataError(f"{len(self.class_names)} class names for {n_classes} classes")

    def class_examples(self) -> Sequence[np.ndarray]:
        return self._examples

    def load(self, indices: np.ndarray) -> torch.Tensor:
        x = self.data[torch.as_tensor(np.asarray(indices, dtype=np.int64))]
        if x.dtype == torch.uint8:
            return x.float().div_(255.0)
        return x


class LabelledDataset(FewShotDataset):
    """Adapts any map-style dataset whose items are ``(example, label)`` pairs.

    The labels are read from ``dataset.targets`` or ``dataset.labels`` when the dataset has
    them, otherwise by indexing every item once.
    """

    def __init__(self, dataset: Any, labels: Sequence[int] | None = None,
                 class_names: Sequence[str] | None = None):
        if labels is None:
            labels = getattr(dataset, "targets", None)
            if labels is None:
                labels = getattr(dataset, "labels", None)
        if labels is None:
            labels = [int(dataset[i][1]) for i in range(len(dataset))]
        labels = np.asarray(labels, dtype=np.int64)
        self.dataset = dataset
        classes = np.unique(labels)
        remap = {int(c): i for i, c in enumerate(classes)}
        self.labels = np.array([remap[int(c)] for c in labels], dtype=np.int64)
        self._examples = [np.flatnonzero(self.labels == i) for i in range(len(classes))]
        self.class_names = list(class_names) if class_names is not None else [str(int(c)) for c in classes]

    def class_examples(self) -> Sequence[np.ndarray]:
        return self._examples

    def load(self, indices: np.ndarray) -> torch.Tensor:
        items = [self.dataset[int(i)] for i in indices]
        xs = [item[0] if isinstance(item, (tuple, list)) else item for item in items]
        return torch.stack([torch.as_tensor(x) for x in xs])
