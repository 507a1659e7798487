"""A user's own images: one sub-folder per class, any common format, any size.

::

    my_data/
      cat/    001.jpg  002.png  ...
      dog/    a.jpeg   b.webp   ...

Every image is converted to one :class:`~kshot.data.images.ImageFormat` (channels, side,
inversion): the user's choice, the checkpoint's (``kshot adapt``), or inferred (channels from
the majority of the images). A folder is decoded once into a uint8 array kept in the cache
directory, keyed by the folder's listing (names, sizes, modification times) and the format, so
later runs start at once and an edited folder is decoded afresh.

Bad input is reported, not crashed on: unreadable images are skipped with a warning that counts
and names them; an empty class folder, or one whose images are all unreadable, is an error that
names the class.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from kshot.data.archives import cache_dir as resolve_cache_dir
from kshot.services.files import atomic_path, atomic_write_text, file_lock
from kshot.services.processes import worker_pool
from kshot.data.base import FewShotDataset
from kshot.data.images import IMAGE_SUFFIXES, ImageFormat
from kshot.data.splits import natural_key
from kshot.errors import DataError, DataWarning

_CACHE_VERSION = 2  # 2: images of either polarity read alike where the format inverts
#: Files read to guess the channels of a folder whose format is not given.
_CHANNEL_SAMPLE = 400
#: Below this many images, decoding stays in this process.
_PARALLEL_FROM = 1500
#: Unreadable files named in a warning (the rest are counted).
_SHOWN = 3


def is_image_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


def _visible(entries) -> list[Path]:
    return sorted((p for p in entries if not p.name.startswith(".")), key=lambda p: natural_key(p.name))


def _require_dir(root: Path, what: str) -> None:
    if not root.exists():
        raise DataError(f"{what} {root} not found")
    if not root.is_dir():
        raise DataError(f"{what} {root} is not a folder; give a folder with one sub-folder per class")


def scan_class_folders(root: str | os.PathLike, what: str = "image folder") -> list[tuple[str, list[Path]]]:
    """``(class name, image files)`` for each sub-folder of ``root``, in natural order.

    Raises:
        DataError: ``root`` is missing, has no sub-folders, or a class folder holds no images.
    """
    root = Path(root)
    _require_dir(root, what)
    classes = [p for p in _visible(root.iterdir()) if p.is_dir()]
    if not classes:
        loose = [p for p in root.iterdir() if is_image_file(p)]
        hint = (f" (it holds {len(loose)} images directly: put each class's images in a "
                f"sub-folder named after the class)") if loose else ""
        raise DataError(f"{what} {root} has no class sub-folders{hint}")
    out = []
    for folder in classes:
        entries = _visible(folder.iterdir())
        images = [p for p in entries if is_image_file(p)]
        if not images:
            raise DataError(f"class folder {folder.name!r} in {root} holds no images"
                            f"{_why_empty(entries)}; add images or remove the folder")
        out.append((folder.name, images))
    return out


def _why_empty(entries: Sequence[Path]) -> str:
    subdirs = [p for p in entries if p.is_dir()]
    others = [p for p in entries if p.is_file()]
    if subdirs:
        return (f" but has sub-folders (e.g. {subdirs[0].name!r}): classes must be the folders "
                f"directly inside the folder given")
    if others:
        return (f", only {len(others)} files of other kinds (e.g. {others[0].name!r}; readable: "
                f"{', '.join(IMAGE_SUFFIXES)})")
    return " (it is empty)"


def infer_channels(paths: Sequence[Path]) -> int:
    """1 if most of the images are grey (or palette images of grey shades), else 3."""
    from PIL import Image

    if len(paths) > _CHANNEL_SAMPLE:
        paths = [paths[i] for i in np.linspace(0, len(paths) - 1, _CHANNEL_SAMPLE).astype(int)]
    votes: Counter = Counter()
    for path in paths:
        try:
            with Image.open(path) as image:  # reads the header only
                votes[_channels_of(image)] += 1
        except Exception:  # noqa: BLE001 - unreadable files are reported when decoded
            continue
    if not votes:
        return 3
    return 1 if votes[1] > votes[3] else 3


def _channels_of(image) -> int:
    if image.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return 1
    if image.mode in ("P", "PA"):
        palette = np.asarray(image.getpalette() or [], dtype=np.int64).reshape(-1, 3)
        return 1 if len(palette) and bool((palette == palette[:, :1]).all()) else 3
    return 3


def _decode_chunk(args: tuple[list[str], dict]) -> tuple[np.ndarray, list[tuple[int, str]], list[int]]:
    """Decode files into ``[n, C, S, S]`` uint8; failures come back as (position, reason), and the
    positions of the images that were inverted."""
    paths, fmt_dict = args
    fmt = ImageFormat.from_dict(fmt_dict)
    out = np.zeros((len(paths), *fmt.shape), dtype=np.uint8)
    failed, inverted = [], []
    for i, path in enumerate(paths):
        try:
            out[i], flipped = fmt.read_array_and_inverted(path)
            if flipped:
                inverted.append(i)
        except DataError as e:
            failed.append((i, str(e).split(": ", 1)[-1]))
        except Exception as e:  # noqa: BLE001 - a decoder bug on one file must not end the run
            failed.append((i, f"{type(e).__name__}: {e}"[:120]))
    return out, failed, inverted


def decode_images(paths: Sequence[Path], fmt: ImageFormat, workers: int | None = None,
                  progress: bool = False, desc: str = "decoding images"
                  ) -> tuple[np.ndarray, list[tuple[int, str]], list[int]]:
    """Decode image files to uint8 ``[n, C, S, S]`` and list the unreadable ones.

    Returns:
        (images, failures, inverted): failed images are left as zeros; ``failures`` holds
        ``(position in paths, reason)``; ``inverted`` the positions of the images that had a light
        ground and were inverted (only where ``fmt.invert``).
    """
    from tqdm.auto import tqdm

    names = [str(p) for p in paths]
    workers = workers or min(os.cpu_count() or 1, 8)
    if workers <= 1 or len(names) < _PARALLEL_FROM:
        chunks = [np.arange(len(names))]
    else:
        chunks = np.array_split(np.arange(len(names)), workers * 8)
    images = np.zeros((len(names), *fmt.shape), dtype=np.uint8)
    failures: list[tuple[int, str]] = []
    inverted: list[int] = []
    jobs = [([names[i] for i in c], fmt.to_dict()) for c in chunks]
    with tqdm(total=len(names), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        if len(chunks) == 1:
            results = map(_decode_chunk, jobs)
            pool = None
        else:
            pool = worker_pool(workers)
            results = pool.map(_decode_chunk, jobs)
        try:
            for chunk, (array, failed, flipped) in zip(chunks, results):
                images[chunk] = array
                failures += [(int(chunk[i]), reason) for i, reason in failed]
                inverted += [int(chunk[i]) for i in flipped]
                bar.update(len(chunk))
        finally:
            if pool is not None:
                pool.shutdown()
    return images, failures, inverted


def warn_skipped(skipped: Sequence[tuple[str, str]], total: int, where: str | os.PathLike) -> None:
    """One warning that counts the unreadable images and names the first few."""
    if not skipped:
        return
    shown = "; ".join(f"{name} ({reason})" for name, reason in skipped[:_SHOWN])
    more = f"; and {len(skipped) - _SHOWN} more" if len(skipped) > _SHOWN else ""
    warnings.warn(f"skipped {len(skipped)} unreadable image{'s' if len(skipped) != 1 else ''} "
                  f"of {total} in {where}: {shown}{more}", DataWarning, stacklevel=3)


class ImageFolder(FewShotDataset):
    """A folder of class sub-folders of images as a :class:`FewShotDataset`.

    Args:
        root: the folder; each sub-folder is a class, named after the folder.
        image_size: side of the square images (default: 28 for grey images, 84 for colour).
        channels: 1 (grey) or 3 (colour); default: what most of the images are.
        invert: use the negative of the images (as Omniglot models expect: bright strokes).
        image_format: the whole format at once (overrides the three above).
        cache_dir: where the decoded array is kept (see :mod:`kshot.data.archives`).
        cache: keep the decoded array in the cache directory (False: decode into memory only).
        progress: show a progress bar while decoding.

    Examples load as float32 ``[n, C, S, S]`` in [0, 1]. ``files`` lists each example's path
    relative to ``root``; ``skipped`` lists the unreadable files as ``(path, reason)``.
    """

    def __init__(self, root: str | os.PathLike, image_size: int | None = None, channels: int | None = None,
                 invert: bool = False, image_format: ImageFormat | None = None,
                 cache_dir: str | os.PathLike | None = None, cache: bool = True, progress: bool = True):
        self.root = Path(root).expanduser()
        self._cache_root = cache_dir
        listing = scan_class_folders(self.root)
        paths = [p for _, files in listing for p in files]
        if image_format is None:
            channels = channels or infer_channels(paths)
            image_format = ImageFormat(channels, image_size or (28 if channels == 1 else 84), invert)
        self.image_format = image_format
        names = [name for name, _ in listing]
        labels = np.concatenate([np.full(len(files), c, dtype=np.int64) for c, (_, files) in enumerate(listing)])
        relative = [p.relative_to(self.root).as_posix() for p in paths]
        if cache:
            images, failures, inverted = self._cached_decode(paths, relative, progress)
        else:
            images, failures, inverted = decode_images(paths, image_format, progress=progress)
        bad = np.zeros(len(paths), dtype=bool)
        bad[[i for i, _ in failures]] = True
        self.skipped = [(relative[i], reason) for i, reason in sorted(failures)]
        warn_skipped(self.skipped, len(paths), self.root)
        for c, name in enumerate(names):
            if bad[labels == c].all():
                first = int(np.flatnonzero(labels == c)[0])
                reason = dict(failures)[first]
                raise DataError(f"none of the {int((labels == c).sum())} images of class {name!r} in "
                                f"{self.root} could be read (e.g. {relative[first]}: {reason}); "
                                f"replace them or remove the folder")
        keep = np.flatnonzero(~bad)
        flipped = np.zeros(len(paths), dtype=bool)
        flipped[inverted] = True
        #: Per example: whether its file had a light ground and was inverted (``invert`` formats).
        self.inverted = flipped[keep]
        self._images = images if not bad.any() else images[keep]
        self.labels = labels[keep]
        self.files = [relative[i] for i in keep]
        self.class_names = names
        self._examples = [np.flatnonzero(self.labels == c) for c in range(len(names))]

    def _cached_decode(self, paths: list[Path], relative: list[str], progress: bool):
        """Decode once; later constructions memory-map the cached array."""
        listing = []
        for p, rel in zip(paths, relative):
            st = p.stat()
            listing.append([rel, st.st_size, st.st_mtime_ns])
        key = hashlib.sha256(json.dumps([_CACHE_VERSION, self.image_format.to_dict(), str(self.root.resolve()),
                                         listing]).encode()).hexdigest()[:24]
        base = resolve_cache_dir(self._cache_root) / "folders" / key
        array_path, index_path = base.with_suffix(".npy"), base.with_suffix(".json")
        if not index_path.is_file():
            with file_lock(base.with_suffix(".lock"), what=f"decoding {self.root} into the cache"):
                if not index_path.is_file():
                    images, failures, inverted = decode_images(paths, self.image_format, progress=progress,
                                                               desc=f"decoding {self.root.name}")
                    with atomic_path(array_path) as tmp:
                        with open(tmp, "wb") as f:
                            np.save(f, images)
                    # The index is written last: its presence means the array is complete.
                    atomic_write_text(index_path, json.dumps({"root": str(self.root), "files": len(paths),
                                                              "failures": failures, "inverted": inverted}))
        try:
            index = json.loads(index_path.read_text())
            failures = [(int(i), str(r)) for i, r in index["failures"]]
            inverted = [int(i) for i in index.get("inverted", [])]
            images = np.load(array_path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"the cache of {self.root} at {base}.* is unreadable ({e}); delete it") from None
        if images.shape != (len(paths), *self.image_format.shape):
            raise DataError(f"the cache {array_path} does not match {self.root}; delete it")
        return images, failures, inverted

    def class_examples(self) -> Sequence[np.ndarray]:
        return self._examples

    def load(self, indices: np.ndarray) -> torch.Tensor:
        indices = np.asarray(indices, dtype=np.int64)
        return torch.from_numpy(np.ascontiguousarray(self._images[indices])).float().div_(255.0)

    def __repr__(self) -> str:
        return (f"ImageFolder({str(self.root)!r}, classes={self.num_classes}, examples={len(self)}, "
                f"format={self.image_format})")


@dataclass
class ImageSet:
    """Images read from a folder for prediction. Shapes: ``x [n, C, S, S]``.

    ``labels`` holds each image's class name when the folder had class sub-folders, else None;
    ``inverted`` says of each image whether it had a light ground and was inverted (``invert``
    formats).
    """

    x: torch.Tensor
    files: list[str]
    labels: list[str] | None
    skipped: list[tuple[str, str]]
    inverted: np.ndarray | None = None


def read_labelled_images(root: str | os.PathLike, image_format: ImageFormat) -> ImageSet:
    """Every image of a class-per-sub-folder ``root``, decoded in memory (no cache)."""
    folder = ImageFolder(root, image_format=image_format, cache=False, progress=False)
    x = folder.load(np.arange(len(folder)))
    return ImageSet(x, folder.files, [folder.class_names[c] for c in folder.labels], folder.skipped,
                    folder.inverted)


def read_query_images(root: str | os.PathLike | Sequence[str | os.PathLike], image_format: ImageFormat) -> ImageSet:
    """Query images: loose images or class sub-folders (labelled) in a folder, or image files.

    ``root`` is a folder, one image file, or a list of image files (named as given).

    Raises:
        DataError: the folder or a file is missing, holds no images, or mixes both layouts.
    """
    if not isinstance(root, (str, os.PathLike)) or Path(root).expanduser().is_file():
        files = [Path(p).expanduser() for p in ([root] if isinstance(root, (str, os.PathLike)) else root)]
        for path in files:
            if not path.exists():
                raise DataError(f"query image {path} not found")
            if not is_image_file(path):
                raise DataError(f"query {path} is neither a folder nor an image file "
                                f"({', '.join(IMAGE_SUFFIXES)})")
        return _read_loose(files, [str(p) for p in files], "the query files", image_format)
    root = Path(root).expanduser()
    _require_dir(root, "query folder")
    entries = _visible(root.iterdir())
    loose = [p for p in entries if is_image_file(p)]
    labelled = [p for p in entries if p.is_dir() and any(is_image_file(q) for q in p.iterdir())]
    if loose and labelled:
        raise DataError(f"query folder {root} holds both images and class sub-folders "
                        f"(e.g. {loose[0].name!r} and {labelled[0].name!r}/); use one layout: "
                        f"unlabelled images directly in it, or one sub-folder per class")
    if labelled:
        return read_labelled_images(root, image_format)
    if not loose:
        raise DataError(f"query folder {root} holds no images{_why_empty(entries)}")
    return _read_loose(loose, [p.name for p in loose], root, image_format)


def _read_loose(paths: list[Path], names: list[str], where, image_format: ImageFormat) -> ImageSet:
    images, failures, inverted = decode_images(paths, image_format)
    bad = {i for i, _ in failures}
    skipped = [(names[i], reason) for i, reason in sorted(failures)]
    warn_skipped(skipped, len(names), where)
    keep = [i for i in range(len(names)) if i not in bad]
    if not keep:
        raise DataError(f"none of the {len(names)} images in {where} could be read "
                        f"(e.g. {skipped[0][0]}: {skipped[0][1]})")
    x = torch.from_numpy(images[keep]).float().div_(255.0)
    flipped = np.zeros(len(names), dtype=bool)
    flipped[inverted] = True
    return ImageSet(x, [names[i] for i in keep], None, skipped, flipped[keep])
