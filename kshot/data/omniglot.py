"""Omniglot (Lake, Salakhutdinov and Tenenbaum, Science 2015): 1,623 handwritten characters
from 50 alphabets, 20 drawings each, released as ``images_background.zip`` (30 alphabets, 964
characters) and ``images_evaluation.zip`` (20 alphabets, 659 characters).

Both archives are decoded once into a cached uint8 array (strokes bright on a dark ground,
resized with Lanczos filtering, 28x28 by default), so that later loads take milliseconds.

Splits (character level; each protocol also offers ``trainval`` = train + val):

* ``vinyals`` (Vinyals et al. 2016, as distributed with Snell et al. 2017): all 1,623
  characters pooled; 1,200 for meta-training, of which the 172 characters of 5 background
  alphabets are held out for meta-validation (1,028 train / 172 val), and the 423 characters of
  12 evaluation alphabets for meta-test. Each character becomes 4 classes by rotating it by
  0/90/180/270 degrees (4,112 / 688 / 1,692 classes).
* ``lake`` (Lake et al. 2015): background alphabets for training (the same 5 alphabets held
  out for validation: 792 / 172 characters), the 659 evaluation characters for test; no
  rotations unless asked for.
"""

from __future__ import annotations

import io
import os
import re
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from kshot.data.archives import RemoteFile, cache_dir, check_declared_sizes, find_archive, open_zip, read_member
from kshot.data.base import FewShotDataset
from kshot.data.images import ImageFormat
from kshot.errors import DataError
from kshot.services.files import atomic_path, file_lock
from kshot.services.processes import worker_pool

_BASE_URL = "https://github.com/brendenlake/omniglot/raw/master/python/"
ARCHIVES = {
    "background": RemoteFile("images_background.zip", _BASE_URL + "images_background.zip",
                             md5="68d2efa1b9178cc56df9314c21c6e718"),
    "evaluation": RemoteFile("images_evaluation.zip", _BASE_URL + "images_evaluation.zip",
                             md5="6b91aef0f799c5bb55b94e3f2daec811"),
}
#: What each official archive holds: alphabets, characters, drawings per character.
EXPECTED = {"background": (30, 964), "evaluation": (20, 659)}
DRAWINGS = 20
#: A drawing is a 105x105 1-bit PNG of a few hundred bytes; a member declaring more is refused unread.
MAX_DRAWING_BYTES = 1 << 20
ROTATIONS = (0, 90, 180, 270)

VALIDATION_ALPHABETS = ("Armenian", "Bengali", "Early_Aramaic", "Hebrew", "Mkhedruli_(Georgian)")
VINYALS_TEST_ALPHABETS = (
    "Gurmukhi", "Keble", "Malayalam", "Manipuri", "Mongolian", "Old_Church_Slavonic_(Cyrillic)",
    "Oriya", "Sylheti", "Syriac_(Serto)", "Tengwar", "Tibetan", "ULOG")
SPLITS = ("train", "val", "test", "trainval")
PROTOCOLS = ("vinyals", "lake")

_CACHE_VERSION = 1
_MEMBER = re.compile(r"^images_(background|evaluation)/([^/]+)/character(\d{2})/(\d{4})_(\d{2})\.png$")


# ----------------------------------------------------------------------------- decoding
def _scan(path: Path, part: str) -> list[tuple[str, str, int]]:
    """Check an archive by its contents and list its drawings as (member, alphabet, character)."""
    with open_zip(path) as zf:
        check_declared_sizes(zf, MAX_DRAWING_BYTES)
        names = zf.namelist()
    drawings: dict[tuple[str, int], list[str]] = {}
    for name in names:
        if name.endswith("/"):
            continue
        m = _MEMBER.match(name)
        if m is None or m.group(1) != part:
            raise DataError(f"{path} does not have the layout of Omniglot's images_{part}.zip "
                            f"(unexpected member {name[:80]!r}); is it the right archive?")
        drawings.setdefault((m.group(2), int(m.group(3))), []).append(name)
    n_alphabets = len({a for a, _ in drawings})
    want_alphabets, want_chars = EXPECTED[part]
    short = [f"{a}/character{c:02d}" for (a, c), d in drawings.items() if len(d) != DRAWINGS]
    if n_alphabets != want_alphabets or len(drawings) != want_chars or short:
        detail = f"; e.g. {short[0]} has not {DRAWINGS} drawings" if short else ""
        raise DataError(f"{path} holds {n_alphabets} alphabets and {len(drawings)} characters, "
                        f"expected {want_alphabets} and {want_chars}{detail} (incomplete archive?)")
    out = []
    for (alphabet, char) in sorted(drawings):
        for name in sorted(drawings[(alphabet, char)]):
            out.append((name, alphabet, char))
    return out


def _decode_chunk(args: tuple[str, list[str], int]) -> np.ndarray:
    from PIL import Image

    path, names, size = args
    out = np.empty((len(names), size, size), dtype=np.uint8)
    with zipfile.ZipFile(path) as zf:
        for i, name in enumerate(names):
            try:
                with Image.open(io.BytesIO(read_member(zf, name, MAX_DRAWING_BYTES))) as img:
                    img = img.convert("L")
                    if img.size != (size, size):
                        img = img.resize((size, size), Image.Resampling.LANCZOS)
                    out[i] = 255 - np.asarray(img, dtype=np.uint8)  # ink bright, ground dark
            except DataError:
                raise
            except Exception as e:  # noqa: BLE001 - any decoder failure means a corrupt archive
                raise DataError(f"cannot decode {name} in {path}: {e}") from None
    return out


def _decode(path: Path, names: list[str], size: int, workers: int) -> np.ndarray:
    if workers <= 1 or len(names) < 2000:
        return _decode_chunk((str(path), names, size))
    chunks = np.array_split(np.arange(len(names)), workers * 4)
    jobs = [(str(path), [names[i] for i in c], size) for c in chunks]
    with worker_pool(workers) as pool:
        return np.concatenate(list(pool.map(_decode_chunk, jobs)))


def build_cache(root: str | os.PathLike | None = None, cache: str | os.PathLike | None = None,
                image_size: int = 28, download: bool = True, workers: int | None = None,
                progress: bool = True) -> Path:
    """Decode both archives into ``<cache>/omniglot/omniglot-<size>px.npz`` (once)."""
    target = cache_dir(cache) / "omniglot" / f"omniglot-{image_size}px-v{_CACHE_VERSION}.npz"
    if target.is_file():
        return target
    with file_lock(target.with_suffix(".lock"), what=f"building the Omniglot cache {target}"):
        if target.is_file():  # another process built it while we waited
            return target
        parts = []
        for part in ("background", "evaluation"):
            path = find_archive(ARCHIVES[part], "omniglot", root, download_missing=download,
                                progress=progress)
            parts.append((part, path, _scan(path, part)))
        workers = workers or min(os.cpu_count() or 1, 8)
        images, alphabets, characters, archive = [], [], [], []
        for part, path, members in parts:
            images.append(_decode(path, [m for m, _, _ in members], image_size, workers))
            for _, alphabet, char in members[::DRAWINGS]:
                alphabets.append(alphabet)
                characters.append(char)
                archive.append(part)
        with atomic_path(target) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, images=np.concatenate(images), alphabet=np.array(alphabets),
                         character=np.array(characters, dtype=np.int16), archive=np.array(archive))
    return target


# ----------------------------------------------------------------------------- dataset
class Omniglot(FewShotDataset):
    """One split of Omniglot as a :class:`FewShotDataset`.

    Args:
        split: ``train``, ``val``, ``test`` or ``trainval``.
        protocol: ``vinyals`` (pooled characters, rotations) or ``lake`` (background/evaluation).
        image_size: side of the square images, 28 by default.
        rotations: add the 90/180/270-degree rotations of every character as new classes;
            defaults to True for ``vinyals`` and False for ``lake``.
        data_dir / cache_dir: see :mod:`kshot.data.archives`.
        download: fetch a missing archive from the official source (checked by MD5).

    Examples load as float32 ``[n, 1, size, size]`` in [0, 1], strokes bright.
    """

    def __init__(self, split: str = "train", protocol: str = "vinyals", image_size: int = 28,
                 rotations: bool | None = None, data_dir: str | os.PathLike | None = None,
                 cache_dir: str | os.PathLike | None = None, download: bool = True,
                 progress: bool = True):
        if split not in SPLITS:
            raise DataError(f"unknown Omniglot split {split!r}; choose one of {', '.join(SPLITS)}")
        if protocol not in PROTOCOLS:
            raise DataError(f"unknown Omniglot protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
        if not 8 <= image_size <= 105:
            raise DataError(f"image_size must be between 8 and 105 pixels, not {image_size}")
        path = build_cache(data_dir, cache_dir, image_size, download=download, progress=progress)
        try:
            with np.load(path, allow_pickle=False) as z:
                images, alphabet, character, archive = (z["images"], z["alphabet"], z["character"],
                                                        z["archive"])
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            raise DataError(f"the Omniglot cache {path} is unreadable ({e}); delete it to rebuild") from None
        self.split, self.protocol, self.image_size = split, protocol, image_size
        self.rotations = (protocol == "vinyals") if rotations is None else bool(rotations)
        self.image_format = ImageFormat(channels=1, size=image_size, invert=True)
        self.images = torch.from_numpy(images).unsqueeze(1)  # [N, 1, H, W] uint8
        self.characters = select_characters(alphabet, archive, split, protocol)
        names = [f"{alphabet[c]}/character{character[c]:02d}" for c in self.characters]
        rot = ROTATIONS if self.rotations else (0,)
        n = len(self.images)
        base = np.arange(DRAWINGS, dtype=np.int64)
        # Example index = rotation_index * n + drawing index: one integer carries both.
        self._examples = [k * n + c * DRAWINGS + base for c in self.characters for k in range(len(rot))]
        self.class_names = [f"{name}/rot{r:03d}" if self.rotations else name for name in names for r in rot]
        # Group = alphabet, numbered in the order of all 50 alphabets' names (a rotated
        # character stays in its alphabet).
        alphabet_ids = np.searchsorted(np.unique(alphabet), alphabet[self.characters])
        self._groups = np.repeat(alphabet_ids.astype(np.int64), len(rot))

    def class_examples(self) -> Sequence[np.ndarray]:
        return self._examples

    def class_groups(self) -> np.ndarray:
        """Alphabet of each class (an index into the sorted names of Omniglot's 50 alphabets)."""
        return self._groups

    def load(self, indices: np.ndarray) -> torch.Tensor:
        indices = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        k, drawing = indices // len(self.images), indices % len(self.images)
        x = self.images[drawing].float().div_(255.0)
        for quarter in k.unique().tolist():
            if quarter:
                sel = k == quarter
                x[sel] = torch.rot90(x[sel], quarter, dims=(-2, -1))
        return x


def select_characters(alphabet: np.ndarray, archive: np.ndarray, split: str,
                      protocol: str) -> np.ndarray:
    """Character indices (into the cache's character order) of one split."""
    alphabet = np.asarray(alphabet)
    background = np.asarray(archive) == "background"
    val = np.isin(alphabet, VALIDATION_ALPHABETS)
    if protocol == "vinyals":
        test = np.isin(alphabet, VINYALS_TEST_ALPHABETS)
    else:
        test = ~background
    masks = {"train": ~test & ~val, "val": val, "test": test, "trainval": ~test}
    return np.flatnonzero(masks[split])
