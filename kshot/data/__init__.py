"""Datasets: from bytes on disk (or a generator) to labelled examples grouped by class.

:func:`load_dataset` builds a registered dataset's split by name, which is how configs, the
command line and checkpoints refer to data. Each loader finds its archives through the data
directory and writes caches to the cache directory (see :mod:`kshot.data.archives`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from kshot.data.archives import cache_dir, data_dir
from kshot.data.base import ArrayDataset, ClassSubset, FewShotDataset, LabelledDataset
from kshot.data.folders import ImageFolder
from kshot.data.miniimagenet import MiniImageNet
from kshot.data.multisource import SOURCE_SEPARATOR, MultiSourceDataset
from kshot.data.omniglot import Omniglot
from kshot.data.splits import DEFAULT_FRACTIONS, ClassSplit, natural_key, resolve_split, write_split
from kshot.data.tables import TableDataset, TableFormat, check_feature_columns, find_label_column, read_table
from kshot.data.text import Banking77, Clinc150, TextDataset, TextFeaturiser
from kshot.errors import ConfigError, DataError, DataWarning

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


@register_dataset("miniimagenet")
def _miniimagenet(split: str, image_size: int = 84, data_dir: str | None = None,
                  cache_dir: str | None = None, **_) -> FewShotDataset:
    if image_size != 84:
        warnings.warn(f"mini-ImageNet at {image_size}x{image_size}: the standard is 84x84 "
                      f"(--image-size 84)", DataWarning, stacklevel=3)
    return MiniImageNet(split, image_size=image_size, data_dir=data_dir or None, cache_dir=cache_dir or None)


def _class_split(class_names, split_file: str, split_seed: int, split_fractions) -> tuple[ClassSplit, bool]:
    """The class split, and whether it was drawn now (and is still to be written to ``split_file``,
    once the data has been read whole: a failed start must not leave a split behind)."""
    if not split_file:
        warnings.warn("no split file given: the class split is drawn from split_seed and not "
                      "recorded; pass --split-file to keep it", DataWarning, stacklevel=3)
    drawn = not (split_file and Path(split_file).is_file())
    return resolve_split(class_names, split_file if not drawn else None, seed=split_seed,
                         fractions=split_fractions), drawn and bool(split_file)


def _keep_split(split_file: str, split: ClassSplit, drawn: bool) -> None:
    if drawn:
        write_split(split_file, split)


@register_dataset("folder")
def _folder(split: str, data_path: str = "", split_file: str = "", image_size: int = 28, channels: int = 0,
            invert: bool = False, split_seed: int = 0, split_fractions=DEFAULT_FRACTIONS,
            cache_dir: str | None = None, **_) -> FewShotDataset:
    """Your own images: ``data_path`` holds one sub-folder per class (see kshot.data.folders)."""
    if not data_path:
        raise ConfigError("--dataset folder needs --data-path: a folder with one sub-folder of images per class")
    folder = ImageFolder(data_path, image_size=image_size, channels=channels or None, invert=bool(invert),
                         cache_dir=cache_dir or None)
    classes, drawn = _class_split(folder.class_names, split_file, split_seed, split_fractions)
    subset = _named_subset(folder, classes.classes(split), split, split_file)
    _keep_split(split_file, classes, drawn)
    return subset


@register_dataset("table")
def _table(split: str, data_path: str = "", split_file: str = "", label_column: str = "",
           feature_columns: list | None = None, split_seed: int = 0, split_fractions=DEFAULT_FRACTIONS,
           **_) -> FewShotDataset:
    """Your own table (CSV/Parquet): a label column and numeric features (see kshot.data.tables)."""
    if not data_path:
        raise ConfigError("--dataset table needs --data-path: a CSV or Parquet file with a label column")
    table = read_table(data_path)
    label_column = find_label_column(table, label_column or None)
    features = list(feature_columns) if feature_columns else [c for c in table.names if c != label_column]
    features = check_feature_columns(table, label_column, features)
    names = sorted({str(v) for v in table.columns[label_column]}, key=natural_key)
    classes, drawn = _class_split(names, split_file, split_seed, split_fractions)
    labels = table.columns[label_column].astype(str)
    # Features are scaled with statistics of the meta-training classes only.
    fmt = TableFormat.fit(table, label_column, features, rows=np.isin(labels, classes.train))
    subset = _named_subset(TableDataset(table, table_format=fmt), classes.classes(split), split, split_file)
    _keep_split(split_file, classes, drawn)
    return subset


def _named_subset(dataset: FewShotDataset, classes: list[str], split: str, split_file: str) -> FewShotDataset:
    where = f"split file {split_file}" if split_file else "the drawn class split"
    if not classes:
        raise DataError(f"{where} has no {split} classes; add some to it")
    index = {name: c for c, name in enumerate(dataset.class_names)}
    subset = dataset.subset([index[name] for name in classes])
    subset.description = f"the {split} classes of {where}"  # named in the task sampler's errors
    return subset


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


#: Datasets whose meta-train/val/test classes come from a split file (drawn and written when missing).
SPLIT_FILE_DATASETS = {"folder", "table"}

__all__ = ["ArrayDataset", "Banking77", "ClassSubset", "Clinc150", "DATASETS", "FewShotDataset",
           "ImageFolder", "LabelledDataset", "MiniImageNet", "MultiSourceDataset", "Omniglot",
           "SPLIT_FILE_DATASETS", "TableDataset", "TextDataset", "TextFeaturiser", "cache_dir",
           "data_dir", "load_dataset", "register_dataset"]
