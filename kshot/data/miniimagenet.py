"""mini-ImageNet (Vinyals et al., NeurIPS 2016) with the class split of Ravi & Larochelle
(ICLR 2017): 100 ImageNet classes of 600 colour images, 64 for meta-training, 16 for
meta-validation, 20 for meta-testing, resized to 84x84.

There is no official, checksummed download, so kshot never downloads it. It reads the two forms
in which it is commonly passed around, placed in ``<data dir>/miniimagenet/``:

* **images + CSV** (Ravi & Larochelle): ``images/`` holding the 60,000 JPEGs, and ``train.csv``,
  ``val.csv``, ``test.csv`` with columns ``filename,label`` (label: the ImageNet wnid).
* **pickled arrays**: ``mini-imagenet-cache-{train,val,test}.pkl``, each a dict with
  ``image_data`` (uint8 ``[N, 84, 84, 3]``) and ``class_dict`` (``{wnid: [row indices]}``).
  Pickles can run code when loaded, so they are read with an unpickler that admits only NumPy
  array reconstruction and plain containers, and refuses anything else before it runs.

Either form is converted once to a uint8 array in the cache directory, memory-mapped afterwards.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import pickle
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from kshot.data.archives import cache_dir, data_dir
from kshot.services.files import atomic_path, atomic_write_text, file_lock
from kshot.data.base import FewShotDataset
from kshot.data.folders import decode_images
from kshot.data.images import ImageFormat
from kshot.errors import DataError, DataWarning

SPLITS = ("train", "val", "test", "trainval")
#: Classes per split in Ravi & Larochelle's split.
STANDARD_CLASSES = {"train": 64, "val": 16, "test": 20}
IMAGES_PER_CLASS = 600
FOLDER_NAMES = ("miniimagenet", "mini-imagenet", "mini_imagenet", "MiniImagenet", "mini-ImageNet")
_CACHE_VERSION = 1


# ----------------------------------------------------------------------------- safe unpickling
def _numpy_globals() -> dict[tuple[str, str], object]:
    """The only globals a pickled NumPy array needs, under their NumPy 1 and NumPy 2 names."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # NumPy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    import codecs

    allowed: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        if hasattr(numeric, "_frombuffer"):
            allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    # Python 3 writes bytes in protocol-2 pickles as _codecs.encode(text, "latin1").
    allowed[("_codecs", "encode")] = codecs.encode
    allowed[("collections", "OrderedDict")] = OrderedDict
    # Lists, dicts, tuples and strings have opcodes of their own; these few containers do not.
    for container in (set, frozenset, bytearray):
        allowed[("builtins", container.__name__)] = container
        allowed[("__builtin__", container.__name__)] = container  # Python 2's name
    return allowed


class RefusedPickle(pickle.UnpicklingError):
    """The pickle names something other than NumPy arrays and containers."""


class SafeUnpickler(pickle.Unpickler):
    """Unpickles NumPy arrays and builtin containers; refuses every other global, unexecuted."""

    _allowed = None

    def find_class(self, module: str, name: str):
        if SafeUnpickler._allowed is None:
            SafeUnpickler._allowed = _numpy_globals()
        found = SafeUnpickler._allowed.get((module, name))
        if found is None:
            raise RefusedPickle(f"it refers to {module}.{name}, which is not part of a NumPy array")
        return found

    def persistent_load(self, pid):
        raise RefusedPickle("it uses persistent ids")


def safe_unpickle(path: str | os.PathLike):
    """Load a pickle that may hold only NumPy arrays and builtin containers.

    Raises:
        DataError: the file is unreadable, or refers to anything else (which is never run).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return SafeUnpickler(f, encoding="latin1").load()  # latin1: Python 2 pickles
    except RefusedPickle as e:
        raise DataError(f"refusing to unpickle {path}: {e}; a mini-ImageNet pickle holds only "
                        f"arrays, so this file is not one (or has been tampered with)") from None
    except (pickle.UnpicklingError, OSError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError) as e:
        raise DataError(f"cannot read pickle {path} ({type(e).__name__}: {str(e)[:100]}); "
                        f"truncated download?") from None


# ----------------------------------------------------------------------------- locating
def find_root(root: str | os.PathLike | None = None) -> Path:
    """The folder holding mini-ImageNet in one of its released forms."""
    base = data_dir(root)
    candidates = [base / name for name in FOLDER_NAMES] + [base]
    for folder in candidates:
        if _form(folder) is not None:
            return folder
    raise DataError(
        f"mini-ImageNet not found in {base / FOLDER_NAMES[0]} (nor in {base}). It has no official "
        f"download: put there either the folder images/ with train.csv, val.csv and test.csv "
        f"(Ravi & Larochelle), or mini-imagenet-cache-train.pkl, -val.pkl and -test.pkl; then "
        f"pass --data-dir or set KSHOT_DATA_DIR to the folder above it")


def _form(folder: Path) -> str | None:
    if all((folder / f"mini-imagenet-cache-{s}.pkl").is_file() for s in ("train", "val", "test")):
        return "pickle"
    if (folder / "images").is_dir() and all((folder / f"{s}.csv").is_file() for s in ("train", "val", "test")):
        return "csv"
    return None


def _read_split_csv(path: Path) -> list[tuple[str, str]]:
    """``(filename, wnid)`` rows of one of Ravi & Larochelle's CSV files."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f) if r]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read {path} ({e})") from None
    if not rows or [c.strip().lower() for c in rows[0][:2]] != ["filename", "label"]:
        raise DataError(f"{path} must start with the header 'filename,label' (Ravi & Larochelle's CSV)")
    out = []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise DataError(f"{path} line {line} is not 'filename,label'")
        out.append((row[0].strip(), row[1].strip()))
    if not out:
        raise DataError(f"{path} lists no images")
    return out


# ----------------------------------------------------------------------------- conversion
def _from_csv(folder: Path, split: str, fmt: ImageFormat, progress: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    rows = _read_split_csv(folder / f"{split}.csv")
    classes = sorted({label for _, label in rows})
    index = {c: i for i, c in enumerate(classes)}
    paths = [folder / "images" / name for name, _ in rows]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"{len(missing)} of the {len(paths)} images that {split}.csv lists are not in "
                        f"{folder / 'images'} (e.g. {missing[0].name}); the copy is incomplete")
    images, failures, _ = decode_images(paths, fmt, progress=progress, desc=f"decoding mini-ImageNet {split}")
    if failures:
        i, reason = failures[0]
        raise DataError(f"{len(failures)} mini-ImageNet images cannot be read (e.g. {paths[i].name}: "
                        f"{reason}); the copy is corrupt")
    labels = np.array([index[label] for _, label in rows], dtype=np.int64)
    return images, labels, classes


def _from_pickle(folder: Path, split: str, fmt: ImageFormat) -> tuple[np.ndarray, np.ndarray, list[str]]:
    path = folder / f"mini-imagenet-cache-{split}.pkl"
    data = safe_unpickle(path)
    if not isinstance(data, dict) or "image_data" not in data or "class_dict" not in data:
        raise DataError(f"{path} is not a mini-ImageNet cache (expected a dict with 'image_data' "
                        f"and 'class_dict')")
    images, class_dict = data["image_data"], data["class_dict"]
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(f"'image_data' in {path} must be a uint8 array [N, H, W, 3], not "
                        f"{getattr(images, 'dtype', type(images).__name__)} {getattr(images, 'shape', '')}")
    if not isinstance(class_dict, dict) or not class_dict:
        raise DataError(f"'class_dict' in {path} must map each class to its image indices")
    classes = sorted(str(c) for c in class_dict)
    labels = np.full(len(images), -1, dtype=np.int64)
    for c, name in enumerate(classes):
        rows = np.asarray(class_dict[name] if name in class_dict else class_dict[name.encode()], dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(images)):
            raise DataError(f"class {name} in {path} lists images beyond the {len(images)} it holds")
        labels[rows] = c
    if (labels < 0).any():
        raise DataError(f"{int((labels < 0).sum())} images of {path} belong to no class in 'class_dict'")
    if images.shape[1:3] == (fmt.size, fmt.size) and fmt.channels == 3 and not fmt.invert:
        out = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    else:
        from PIL import Image

        out = np.stack([fmt.array(Image.fromarray(im)) for im in images])
    return out, labels, classes


def build_cache(split: str, image_size: int = 84, root: str | os.PathLike | None = None,
                cache: str | os.PathLike | None = None, progress: bool = True) -> tuple[Path, Path]:
    """Convert one split (``train``, ``val``, ``test``) to ``<cache>/miniimagenet/*.npy`` once."""
    folder = find_root(root)
    form = _form(folder)
    sources = ([folder / f"mini-imagenet-cache-{split}.pkl"] if form == "pickle"
               else [folder / f"{split}.csv", folder / "images"])
    stamp = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in sources]
    key = hashlib.sha256(json.dumps([_CACHE_VERSION, form, stamp]).encode()).hexdigest()[:12]
    base = cache_dir(cache) / "miniimagenet" / f"{split}-{image_size}px-{form}-{key}"
    array_path, index_path = base.with_suffix(".npy"), base.with_suffix(".json")
    if index_path.is_file():
        return array_path, index_path
    with file_lock(base.with_suffix(".lock"), what=f"building the mini-ImageNet {split} cache"):
        if index_path.is_file():
            return array_path, index_path
        fmt = ImageFormat(3, image_size)
        if form == "pickle":
            images, labels, classes = _from_pickle(folder, split, fmt)
        else:
            images, labels, classes = _from_csv(folder, split, fmt, progress)
        with atomic_path(array_path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, images)
        atomic_write_text(index_path, json.dumps({"classes": classes, "labels": labels.tolist(),
                                                  "form": form, "source": str(folder)}))
    return array_path, index_path


# ----------------------------------------------------------------------------- dataset
class MiniImageNet(FewShotDataset):
    """One split of mini-ImageNet as a :class:`FewShotDataset`.

    Args:
        split: ``train`` (64 classes), ``val`` (16), ``test`` (20) or ``trainval`` (80).
        image_size: side of the square images (84, the standard).
        data_dir / cache_dir: see :mod:`kshot.data.archives`.

    Examples load as float32 ``[n, 3, size, size]`` in [0, 1].
    """

    def __init__(self, split: str = "train", image_size: int = 84, data_dir: str | os.PathLike | None = None,
                 cache_dir: str | os.PathLike | None = None, progress: bool = True):
        if split not in SPLITS:
            raise DataError(f"unknown mini-ImageNet split {split!r}; choose one of {', '.join(SPLITS)}")
        if not 8 <= image_size <= 512:
            raise DataError(f"image_size must be between 8 and 512 pixels, not {image_size}")
        self.split, self.image_format = split, ImageFormat(3, image_size)
        parts = ("train", "val") if split == "trainval" else (split,)
        arrays, labels, self.class_names = [], [], []
        for part in parts:
            array_path, index_path = build_cache(part, image_size, data_dir, cache_dir, progress)
            try:
                index = json.loads(index_path.read_text())
                images = np.load(array_path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError, KeyError) as e:
                raise DataError(f"the mini-ImageNet cache {array_path} is unreadable ({e}); delete it") from None
            arrays.append(images)
            labels.append(np.asarray(index["labels"], dtype=np.int64) + len(self.class_names))
            self.class_names += index["classes"]
            standard = STANDARD_CLASSES[part]
            if len(index["classes"]) != standard:
                warnings.warn(f"the mini-ImageNet {part} split here has {len(index['classes'])} classes, "
                              f"not the standard {standard}: results are not comparable with "
                              f"published ones", DataWarning, stacklevel=2)
        self._arrays = arrays
        self._offsets = np.cumsum([0] + [len(a) for a in arrays])
        self.labels = np.concatenate(labels)
        self._examples = [np.flatnonzero(self.labels == c) for c in range(len(self.class_names))]

    def class_examples(self) -> Sequence[np.ndarray]:
        return self._examples

    def load(self, indices: np.ndarray) -> torch.Tensor:
        indices = np.asarray(indices, dtype=np.int64)
        if len(self._arrays) == 1:
            batch = self._arrays[0][indices]
        else:
            part = np.searchsorted(self._offsets, indices, side="right") - 1
            batch = np.empty((len(indices), *self.image_format.shape), dtype=np.uint8)
            for p, array in enumerate(self._arrays):
                sel = part == p
                if sel.any():
                    batch[sel] = array[indices[sel] - self._offsets[p]]
        return torch.from_numpy(np.ascontiguousarray(batch)).float().div_(255.0)
