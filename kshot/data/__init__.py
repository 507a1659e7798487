"""Datasets: from bytes on disk (or a generator) to labelled examples grouped by class.

:func:`load_dataset` builds a registered dataset's split by name, which is how configs, the
command line and checkpoints refer to data. Each loader finds its archives through the data
directory and writes caches to the cache directory (see :mod:`kshot.data.archives`).
"""

from __future__ import annotations

from typing import Callable

from kshot.data.archives import cache_dir, data_dir
from kshot.data.base import ArrayDataset, ClassSubset, FewShotDataset, LabelledDataset
from kshot.data.omniglot import Omniglot
from kshot.errors import ConfigError

#: name -> loader(split, **settings) -> FewShotDataset
DATASETS: dict[str, Callable[..., FewShotDataset]] = {}


def register_dataset(name: str):
    def wrap(fn: Callable[..., FewShotDataset]) -> Callable[..., FewShotDataset]:
        DATASETS[name] = fn
        return fn
    return wrap


@register_dataset("omniglot")
def _omniglot(split: str, protocol: str = "vinyals", image_size: int = 28, data_dir: str | None = None,
              cache_dir: str | None = None, **_) -> FewShotDataset:
    return Omniglot(split, protocol=protocol, image_size=image_size, data_dir=data_dir or None,
                    cache_dir=cache_dir or None)


def load_dataset(name: str, split: str, **settings) -> FewShotDataset:
    """Split ``split`` (``train``, ``val``, ``test``, ``trainval``) of the dataset ``name``."""
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {', '.join(sorted(DATASETS))}")
    return DATASETS[name](split, **settings)


__all__ = ["ArrayDataset", "ClassSubset", "DATASETS", "FewShotDataset", "LabelledDataset", "Omniglot",
           "cache_dir", "data_dir", "load_dataset", "register_dataset"]
