"""Datasets: from bytes on disk (or a generator) to labelled examples grouped by class.

:func:`load_dataset` builds a registered dataset's split by name, which is how configs, the
command line and checkpoints refer to data. Each loader finds its archives through the data
directory and writes caches to the cache directory (see :mod:`kshot.data.archives`).
"""

from __future__ import annotations

from typing import Callable

from kshot.data.archives import cache_dir, data_dir
from kshot.data.base import ArrayDataset, ClassSubset, FewShotDataset, LabelledDataset
from kshot.data.multisource import SOURCE_SEPARATOR, MultiSourceDataset
from kshot.data.omniglot import Omniglot
from kshot.data.text import Banking77, Clinc150, TextDataset, TextFeaturiser
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
    return Omniglot(split, protocol=protocol or "vinyals", image_size=image_size,
                    data_dir=data_dir or None, cache_dir=cache_dir or None)


@register_dataset("clinc150")
def _clinc150(split: str, protocol: str = "", data_dir: str | None = None,
              features: dict | None = None, **_) -> FewShotDataset:
    return Clinc150(split, protocol=protocol or "domains", features=features, data_dir=data_dir or None)


@register_dataset("banking77")
def _banking77(split: str, protocol: str = "", data_dir: str | None = None,
               features: dict | None = None, **_) -> FewShotDataset:
    return Banking77(split, protocol=protocol or "intents", features=features, data_dir=data_dir or None)


def load_dataset(name: str, split: str, **settings) -> FewShotDataset:
    """Split ``split`` (``train``, ``val``, ``test``, ``trainval``) of the dataset ``name``.

    ``a+b`` names a :class:`MultiSourceDataset` of the same split of ``a`` and ``b`` (each with
    its own class split; the settings go to every source)."""
    names = name.split(SOURCE_SEPARATOR)
    unknown = [n for n in names if n not in DATASETS]
    if unknown or len(set(names)) != len(names):
        what = f"unknown dataset {unknown[0]!r}" if unknown else f"dataset {name!r} repeats a source"
        raise ConfigError(f"{what}; choose one of {', '.join(sorted(DATASETS))}, or several "
                          f"joined by {SOURCE_SEPARATOR!r} (e.g. clinc150+banking77)")
    if len(names) == 1:
        return DATASETS[name](split, **settings)
    return MultiSourceDataset({n: DATASETS[n](split, **settings) for n in names})


__all__ = ["ArrayDataset", "Banking77", "ClassSubset", "Clinc150", "DATASETS", "FewShotDataset",
           "LabelledDataset", "MultiSourceDataset", "Omniglot", "TextDataset", "TextFeaturiser",
           "cache_dir", "data_dir", "load_dataset", "register_dataset"]
