"""Meta-train / meta-val / meta-test class splits of a user's own data.

Few-shot results mean something only when the classes tested on were never trained on, and
they can be compared only when everyone tests on the same classes. So the split is a file:
either the user writes one (JSON ``{"train": [...], "val": [...], "test": [...]}``, or CSV with
columns ``class,split``), or kshot draws one from a seed and given fractions and writes it,
and every later run that names the same file reads it back instead of drawing again.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from kshot.services.files import atomic_write_text
from kshot.errors import DataError

SPLIT_NAMES = ("train", "val", "test")
#: The proportions of mini-ImageNet's classes (64 / 16 / 20 of 100).
DEFAULT_FRACTIONS = (0.64, 0.16, 0.20)


def natural_key(name: str) -> list:
    """Sort key that puts ``class2`` before ``class10``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


@dataclass
class ClassSplit:
    """Disjoint lists of class names for meta-training, meta-validation and meta-testing."""

    train: list[str]
    val: list[str]
    test: list[str]
    #: How the split was made (seed, fractions), for the record; empty for a user's own file.
    origin: dict = field(default_factory=dict)

    def __post_init__(self):
        seen: dict[str, str] = {}
        for part in SPLIT_NAMES:
            names = [str(n) for n in getattr(self, part)]
            setattr(self, part, names)
            for name in names:
                if name in seen:
                    where = "twice in" if seen[name] == part else f"in both {seen[name]} and"
                    raise DataError(f"class {name!r} is listed {where} {part}; meta-train, "
                                    f"meta-val and meta-test classes must be disjoint")
                seen[name] = part

    def classes(self, split: str) -> list[str]:
        """Class names of ``split`` (``train``, ``val``, ``test``, or ``trainval``)."""
        if split == "trainval":
            return self.train + self.val
        if split not in SPLIT_NAMES:
            raise DataError(f"unknown split {split!r}; choose train, val, test or trainval")
        return list(getattr(self, split))

    def to_dict(self) -> dict:
        out: dict = {part: getattr(self, part) for part in SPLIT_NAMES}
        if self.origin:
            out["origin"] = self.origin
        return out

    def check_against(self, class_names: Sequence[str], source: str) -> None:
        """Every class the split names must exist in the data."""
        known = set(class_names)
        missing = [n for part in SPLIT_NAMES for n in getattr(self, part) if n not in known]
        if missing:
            shown = ", ".join(repr(m) for m in missing[:3])
            raise DataError(f"{source} names {len(missing)} classes that the data does not have "
                            f"(e.g. {shown}); fix the split file or delete it to draw a new one")


def draw_split(class_names: Sequence[str], fractions: Sequence[float] = DEFAULT_FRACTIONS,
               seed: int = 0) -> ClassSplit:
    """Draw a split of ``class_names`` with the given train/val/test ``fractions``.

    The result depends only on the set of names, the fractions and the seed (not on the order
    the file system lists folders in).
    """
    fractions = [float(f) for f in fractions]
    if len(fractions) != 3 or min(fractions) < 0 or sum(fractions) <= 0:
        raise DataError(f"split fractions must be three non-negative numbers (train, val, test), "
                        f"not {list(fractions)}")
    total = sum(fractions)
    fractions = [f / total for f in fractions]
    names = sorted(set(class_names), key=natural_key)
    n = len(names)
    counts = [0, int(round(n * fractions[1])), int(round(n * fractions[2]))]
    for i in (1, 2):  # a split asked for gets at least one class
        if fractions[i] > 0 and counts[i] == 0:
            counts[i] = 1
    counts[0] = n - counts[1] - counts[2]
    if fractions[0] > 0 and counts[0] < 1:
        raise DataError(f"{n} classes are too few to split into meta-train, meta-val and "
                        f"meta-test classes; add classes or write a split file by hand")
    # Uniform doubles only (a stream NumPy keeps stable across versions), as in kshot.tasks.
    order = np.argsort(np.random.default_rng(seed).random(n), kind="stable")
    shuffled = [names[i] for i in order]
    parts = (shuffled[:counts[0]], shuffled[counts[0]:counts[0] + counts[1]],
             shuffled[counts[0] + counts[1]:])
    return ClassSplit(*(sorted(p, key=natural_key) for p in parts),
                      origin={"seed": int(seed), "fractions": fractions, "classes": n})


def read_split(path: str | os.PathLike) -> ClassSplit:
    """A split from a JSON (``{"train": [...], ...}``) or CSV (``class,split`` rows) file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split file {path} not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read split file {path} ({e})") from None
    if path.suffix.lower() == ".csv":
        return _split_from_csv(text, path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"split file {path} is not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(data, dict) or not any(k in data for k in SPLIT_NAMES):
        raise DataError(f"split file {path} must be a JSON object with lists 'train', 'val' "
                        f"and 'test' of class names")
    parts = {}
    for part in SPLIT_NAMES:
        names = data.get(part, [])
        if not isinstance(names, list):
            raise DataError(f"'{part}' in split file {path} must be a list of class names")
        parts[part] = names
    origin = data.get("origin") if isinstance(data.get("origin"), dict) else {}
    return ClassSplit(parts["train"], parts["val"], parts["test"], origin=origin)


def _split_from_csv(text: str, path: Path) -> ClassSplit:
    rows = list(csv.reader(text.splitlines()))
    header = [h.strip().lower() for h in rows[0]] if rows else []
    if "class" not in header or "split" not in header:
        raise DataError(f"split file {path} must have the columns 'class' and 'split'")
    ci, si = header.index("class"), header.index("split")
    parts: dict[str, list[str]] = {p: [] for p in SPLIT_NAMES}
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        part = row[si].strip().lower() if len(row) > si else ""
        if part not in parts:
            raise DataError(f"{path} line {line}: split must be train, val or test, not {part!r}")
        parts[part].append(row[ci].strip())
    return ClassSplit(parts["train"], parts["val"], parts["test"])


def write_split(path: str | os.PathLike, split: ClassSplit) -> Path:
    path = Path(path)
    atomic_write_text(path, json.dumps(split.to_dict(), indent=2) + "\n")
    return path


def resolve_split(class_names: Sequence[str], split_file: str | os.PathLike | None = None,
                  seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> ClassSplit:
    """The split recorded in ``split_file``, or a new one drawn and written there.

    Args:
        class_names: every class of the data.
        split_file: where the split is kept; read when present, written when not. ``None``
            draws a split without recording it.
        seed / fractions: how a new split is drawn.
    """
    if split_file and Path(split_file).is_file():
        split = read_split(split_file)
        split.check_against(class_names, f"split file {split_file}")
        return split
    split = draw_split(class_names, fractions, seed)
    if split_file:
        write_split(split_file, split)
    return split
