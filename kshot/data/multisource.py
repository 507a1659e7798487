"""Several datasets as one: the classes of every source side by side, each source kept apart.

Meta-Dataset (Triantafillou et al., ICLR 2020) trains one model on tasks from many datasets,
each with its own class split; a task's classes always come from a single source. A
:class:`MultiSourceDataset` is the union that the rest of kshot sees as one
:class:`~kshot.data.FewShotDataset` (class ``c`` of source ``s`` is class ``offsets[s] + c``),
and that task samplers ask which classes belong to which source.

Sources share a backbone, so their examples must have one shape and one form: the same
:class:`~kshot.data.images.ImageFormat` for images, the same text featuriser for text.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from kshot.data.base import FewShotDataset
from kshot.errors import DataError

#: Separates source names in a dataset name: ``clinc150+banking77``.
SOURCE_SEPARATOR = "+"


class MultiSourceDataset(FewShotDataset):
    """The union of ``sources`` (name -> dataset); example indices carry their source.

    Args:
        sources: at least one named dataset, all with the same example shape.

    Raises:
        DataError: when the sources' examples differ in shape, image format or text featuriser.
    """

    def __init__(self, sources: Mapping[str, FewShotDataset]):
        if not sources:
            raise DataError("a multi-source dataset needs at least one source")
        self.names = list(sources)
        self.sources = [sources[n] for n in self.names]
        shapes = {n: tuple(d.example_shape) for n, d in zip(self.names, self.sources)}
        if len(set(shapes.values())) > 1:
            raise DataError(f"sources give examples of different shapes {shapes}; they cannot "
                            f"share a backbone (use one image size / one text featuriser)")
        for attr in ("image_format", "text_featuriser"):
            values = {n: getattr(d, attr, None) for n, d in zip(self.names, self.sources)}
            if len(set(values.values())) > 1:
                raise DataError(f"sources differ in {attr} ({values}); give them the same one")
        forms = [d.checkpoint_extra() for d in self.sources]
        if any(f != forms[0] for f in forms[1:]):  # e.g. tables with other columns or scaling
            raise DataError(f"sources read their inputs differently ({dict(zip(self.names, forms))}); "
                            f"they cannot share one model")
        self.image_format = self.sources[0].image_format
        self.text_featuriser = getattr(self.sources[0], "text_featuriser", None)
        self._shape = next(iter(shapes.values()))
        counts = [d.num_classes for d in self.sources]
        #: First union class index of each source; source s owns offsets[s]..offsets[s+1]-1.
        self.class_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        # Example index = position in a source * n_sources + source: decodable without a search.
        n = len(self.sources)
        self._examples = [e.astype(np.int64) * n + s
                          for s, d in enumerate(self.sources) for e in d.class_examples()]
        self.class_names = [f"{name}/{c}" for name, d in zip(self.names, self.sources)
                            for c in d.class_names]

    @property
    def num_sources(self) -> int:
        return len(self.sources)

    def source_classes(self, source: int) -> np.ndarray:
        """Union class indices of source ``source``."""
        return np.arange(self.class_offsets[source], self.class_offsets[source + 1])

    def source_of_class(self, classes: np.ndarray | Sequence[int]) -> np.ndarray:
        return np.searchsorted(self.class_offsets, np.asarray(classes), side="right") - 1

    def class_examples(self) -> Sequence[np.ndarray]:
        return self._examples

    def load(self, indices: np.ndarray) -> torch.Tensor:
        indices = np.asarray(indices, dtype=np.int64)
        n = len(self.sources)
        source, local = indices % n, indices // n
        present = np.unique(source)
        if len(present) == 1:  # the usual case: a task from one source
            return self.sources[int(present[0])].load(local)
        out = torch.empty(len(indices), *self._shape)
        for s in present.tolist():
            sel = source == s
            out[torch.from_numpy(sel)] = self.sources[s].load(local[sel])
        return out

    @property
    def example_shape(self) -> tuple[int, ...]:
        return self._shape

    def checkpoint_extra(self) -> dict:
        """How the sources read their inputs (one form for all, checked when built)."""
        return self.sources[0].checkpoint_extra()

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}: {d.num_classes}" for n, d in zip(self.names, self.sources))
        return f"MultiSourceDataset({parts} classes)"
