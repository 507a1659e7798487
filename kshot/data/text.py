"""Few-shot text classification: intent datasets as :class:`~kshot.data.FewShotDataset` s.

Utterances become fixed-size float vectors through a :class:`TextFeaturiser`: hashed, signed
counts of word n-grams and byte n-grams (Weinberger et al. 2009, "feature hashing"), log-scaled
and L2-normalised. It has no vocabulary and no fitted state, so it is a pure function of its few
settings: two datasets featurised with the same settings share one input space (and so one
backbone), and a checkpoint that records the settings featurises new text exactly as in
training. No pretrained model is involved; ``mlp`` (or any flat-input backbone) learns the
embedding.

Datasets (class splits are disjoint sets of intents; every utterance of an intent is pooled,
since the released example-level splits mean nothing once classes are disjoint):

* ``clinc150`` (Larson et al., EMNLP 2019; ``data_full.json`` + ``domains.json``): 150 intents in
  10 domains, 150 utterances each (100/20/30 released train/val/test pooled); out-of-scope
  queries are left out. Protocol ``domains`` splits by domain, so test intents come from domains
  never seen in training: train = banking, credit_cards, home, auto_and_commute, utility,
  small_talk (90 intents); val = work, meta (30); test = travel, kitchen_and_dining (30).
* ``banking77`` (Casanueva et al., 2020; ``train.csv`` + ``test.csv``): 77 fine-grained banking
  intents, 75 to 227 utterances each (released train and test pooled). Protocol ``intents``:
  a seeded split of the sorted intent names into 47 train / 15 val / 15 test intents.
"""

from __future__ import annotations

import csv
import json
import os
import re
import zlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from kshot.data.archives import RemoteFile, find_archive
from kshot.data.base import FewShotDataset
from kshot.errors import DataError

SPLITS = ("train", "val", "test", "trainval", "all")

_TOKEN_BREAK = re.compile(r"[^\w']+")
_MASK32 = np.uint64(0xFFFFFFFF)
# Distinct seeds put word n-grams of each order and byte n-grams of each length in
# independent hash families, so "ab" the bigram and "ab" the 2-byte gram never collide by design.
_WORD_SEED = 0x5BD1E995
_BYTE_SEED = 0x1B873593


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser on uint64 arrays holding 32-bit values: avalanches bits."""
    h = h & _MASK32
    h ^= h >> np.uint64(16)
    h = (h * np.uint64(0x85EBCA6B)) & _MASK32
    h ^= h >> np.uint64(13)
    h = (h * np.uint64(0xC2B2AE35)) & _MASK32
    h ^= h >> np.uint64(16)
    return h


def normalise(text: str) -> str:
    """Lower case, typographic apostrophes made plain, anything but word characters a space."""
    return " ".join(_TOKEN_BREAK.sub(" ", text.lower().replace("\u2019", "'")).split())


@dataclass
class SparseRows:
    """Rows of a sparse matrix in CSR form: ``indices[indptr[i]:indptr[i+1]]`` of row ``i``."""

    indptr: np.ndarray  # int64 [n + 1]
    indices: np.ndarray  # int64 [nnz]
    values: np.ndarray  # float32 [nnz]
    dim: int

    def __len__(self) -> int:
        return len(self.indptr) - 1

    def dense(self, rows: np.ndarray | Sequence[int] | None = None) -> torch.Tensor:
        """Rows ``rows`` (default: all) as a dense float32 tensor ``[len(rows), dim]``."""
        rows = np.arange(len(self)) if rows is None else np.asarray(rows, dtype=np.int64)
        starts, stops = self.indptr[rows], self.indptr[rows + 1]
        lengths = stops - starts
        # Built in NumPy (one thread): small tensor ops spread over busy cores only wait.
        out = np.zeros((len(rows), self.dim), dtype=np.float32)
        # Positions of every stored entry of the selected rows, without a Python loop.
        row_of = np.repeat(np.arange(len(rows)), lengths)
        offset = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        where = starts[row_of] + offset
        out[row_of, self.indices[where]] = self.values[where]
        return torch.from_numpy(out)


@dataclass(frozen=True)
class TextFeaturiser:
    """Text to a fixed-size vector: hashed word and byte n-gram counts, no vocabulary.

    Args:
        dim: length of the feature vector (number of hash buckets).
        word_ngrams: word n-grams of orders 1..word_ngrams (0: none).
        char_ngrams: byte n-gram lengths ``(shortest, longest)`` over the normalised text with a
            space at each end, so short grams see word boundaries (``(0, 0)``: none).
        sublinear_tf: ``sign(c) * log(1 + |c|)`` of each bucket's signed count ``c``, which keeps
            a repeated word from dominating; else the raw signed counts.

    Each n-gram adds +1 or -1 (a second hash bit) to its bucket, so colliding n-grams cancel on
    average rather than pile up; each vector is then scaled to unit length.
    """

    dim: int = 4096
    word_ngrams: int = 2
    char_ngrams: tuple[int, int] = (3, 5)
    sublinear_tf: bool = True

    kind = "hashed-ngrams/1"  # recorded in checkpoints; bump it if the featurisation changes

    def __post_init__(self):
        if not 16 <= int(self.dim) <= 1 << 22:
            raise DataError(f"text feature dim must be between 16 and 4194304, not {self.dim}")
        lo, hi = (int(v) for v in self.char_ngrams)
        if not (lo == hi == 0 or 1 <= lo <= hi <= 16):
            raise DataError(f"char_ngrams must be (shortest, longest) with 1 <= shortest <= "
                            f"longest <= 16, or (0, 0) for none; not {tuple(self.char_ngrams)}")
        if not 0 <= int(self.word_ngrams) <= 8:
            raise DataError(f"word_ngrams must be between 0 and 8, not {self.word_ngrams}")
        if self.word_ngrams == 0 and hi == 0:
            raise DataError("the text featuriser needs word n-grams or char n-grams (or both)")
        object.__setattr__(self, "dim", int(self.dim))
        object.__setattr__(self, "word_ngrams", int(self.word_ngrams))
        object.__setattr__(self, "char_ngrams", (lo, hi))

    def to_dict(self) -> dict:
        return {"kind": self.kind, **asdict(self), "char_ngrams": list(self.char_ngrams)}

    @classmethod
    def from_dict(cls, data: dict | None) -> "TextFeaturiser":
        """Settings from a checkpoint or a config's ``extra``; missing keys take the defaults."""
        data = dict(data or {})
        kind = data.pop("kind", cls.kind)
        if kind != cls.kind:
            raise DataError(f"text features of kind {kind!r} are not supported by this version "
                            f"of kshot (it makes {cls.kind!r})")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DataError(f"unknown text feature settings {unknown}; known: {sorted(known)}")
        if "char_ngrams" in data:
            grams = data["char_ngrams"]
            if not isinstance(grams, (list, tuple)) or len(grams) != 2:
                raise DataError(f"char_ngrams must be a pair [shortest, longest], not {grams!r}")
            data["char_ngrams"] = tuple(grams)
        try:
            return cls(**data)
        except (TypeError, ValueError) as e:
            raise DataError(f"bad text feature settings {data}: {e}") from None

    # ------------------------------------------------------------------ featurisation
    def sparse(self, texts: Sequence[str]) -> SparseRows:
        """Featurise ``texts`` into sparse rows (vectorised over the whole corpus)."""
        normalised = [normalise(t) for t in texts]
        rows, keys = [np.zeros(0, np.int64)], [np.zeros(0, np.uint64)]
        if self.word_ngrams:
            r, k = self._word_keys(normalised)
            rows.append(r)
            keys.append(k)
        if self.char_ngrams[1]:
            r, k = self._byte_keys(normalised)
            rows.append(r)
            keys.append(k)
        return self._aggregate(np.concatenate(rows), np.concatenate(keys), len(texts))

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """Featurise ``texts``: float32 ``[len(texts), dim]``."""
        return self.sparse(texts).dense()

    def _word_keys(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        tokens = [text.split() for text in texts]
        row = np.repeat(np.arange(len(texts), dtype=np.int64), [len(t) for t in tokens])
        vocab: dict[str, int] = {}
        ids = np.fromiter((vocab.setdefault(w, len(vocab)) for t in tokens for w in t),
                          dtype=np.int64, count=len(row))
        word_hash = np.fromiter((zlib.crc32(w.encode("utf-8")) for w in vocab), dtype=np.uint64,
                                count=len(vocab))
        h = word_hash[ids]
        out_rows, out_keys = [], []
        # An n-gram's key chains its words' hashes: key_n[p] = mix(key_{n-1}[p], h[p + n - 1]).
        key = h.copy()
        valid = np.ones(len(h), dtype=bool)
        for n in range(1, self.word_ngrams + 1):
            if n > 1:
                key = _fmix32(key[:-1] * np.uint64(0x9E3779B1) + h[n - 1:])
                valid = valid[:-1] & (row[n - 1:] == row[:len(row) - n + 1])
            out_rows.append(row[:len(key)][valid])
            out_keys.append(_fmix32(key[valid] ^ np.uint64(_WORD_SEED + n)))
        return np.concatenate(out_rows), np.concatenate(out_keys)

    def _byte_keys(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        encoded = [f" {t} ".encode("utf-8") for t in texts]
        lengths = np.array([len(b) for b in encoded], dtype=np.int64)
        data = np.frombuffer(b"".join(encoded), dtype=np.uint8).astype(np.uint64)
        row = np.repeat(np.arange(len(texts), dtype=np.int64), lengths)
        lo, hi = self.char_ngrams
        out_rows, out_keys = [], []
        key = np.zeros(len(data), dtype=np.uint64)
        for n in range(1, hi + 1):
            # Rolling polynomial hash of the n bytes starting at each position (mod 2**32).
            key = (key[:len(data) - n + 1] * np.uint64(0x01000193) + data[n - 1:]) & _MASK32
            if n >= lo:
                inside = row[:len(key)] == row[n - 1:]
                out_rows.append(row[:len(key)][inside])
                out_keys.append(_fmix32(key[inside] ^ np.uint64(_BYTE_SEED + n)))
        return np.concatenate(out_rows), np.concatenate(out_keys)

    def _aggregate(self, rows: np.ndarray, keys: np.ndarray, n_rows: int) -> SparseRows:
        bucket = (keys % np.uint64(self.dim)).astype(np.int64)
        sign = np.where(_fmix32(keys ^ np.uint64(0xA5A5A5A5)) >> np.uint64(31), -1.0, 1.0)
        cell = rows * self.dim + bucket
        order = np.argsort(cell, kind="stable")
        cell = cell[order]
        starts = np.flatnonzero(np.r_[True, cell[1:] != cell[:-1]]) if len(cell) else np.zeros(0, np.int64)
        cells = cell[starts]
        counts = np.add.reduceat(sign[order], starts) if len(cell) else np.zeros(0)
        keep = counts != 0  # colliding grams of opposite sign cancel exactly
        cells, counts = cells[keep], counts[keep]
        values = np.sign(counts) * np.log1p(np.abs(counts)) if self.sublinear_tf else counts
        row_of = cells // self.dim
        norms = np.sqrt(np.bincount(row_of, weights=values ** 2, minlength=n_rows))
        values = values / np.maximum(norms[row_of], 1e-12)
        indptr = np.zeros(n_rows + 1, dtype=np.int64)
        np.cumsum(np.bincount(row_of, minlength=n_rows), out=indptr[1:])
        return SparseRows(indptr, (cells % self.dim).astype(np.int64), values.astype(np.float32),
                          self.dim)


# ----------------------------------------------------------------------------- dataset
class TextDataset(FewShotDataset):
    """Labelled texts, featurised once; loads are dense float32 ``[n, dim]`` rows.

    Args:
        texts: the utterances.
        labels: class index of each text, in 0..len(class_names)-1.
        class_names: one name per class.
        featuriser: how texts become vectors (default: :class:`TextFeaturiser` ()).
    """

    def __init__(self, texts: Sequence[str], labels: Sequence[int] | np.ndarray,
                 class_names: Sequence[str], featuriser: TextFeaturiser | None = None,
                 parts: Sequence[str] | None = None):
        labels = np.asarray(labels, dtype=np.int64)
        if len(texts) != len(labels):
            raise DataError(f"{len(texts)} texts but {len(labels)} labels")
        if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
            raise DataError(f"labels must be class indices in 0..{len(class_names) - 1}")
        self.texts = list(texts)
        self.labels = labels
        self.class_names = list(class_names)
        #: The released part (``train``, ``val``, ``test``) each text comes from, where known.
        self.parts = None if parts is None else np.asarray(parts, dtype=str)
        self.text_featuriser = featuriser or TextFeaturiser()
        self._features: SparseRows | None = None
        order = np.argsort(labels, kind="stable")
        bounds = np.searchsorted(labels[order], np.arange(len(self.class_names) + 1))
        self._examples = [order[bounds[c]:bounds[c + 1]] for c in range(len(self.class_names))]

    @property
    def features(self) -> SparseRows:
        """The hashed features of every text, computed on first use (a pre-trained encoder
        reading :attr:`texts` instead never needs them)."""
        if self._features is None:
            self._features = self.text_featuriser.sparse(self.texts)
        return self._features

    def class_examples(self) -> Sequence[np.ndarray]:
        return self._examples

    def load(self, indices: np.ndarray) -> torch.Tensor:
        return self.features.dense(np.asarray(indices, dtype=np.int64))

    @property
    def example_shape(self) -> tuple[int, ...]:
        return (self.text_featuriser.dim,)

    def checkpoint_extra(self) -> dict:
        """The featuriser's settings: new text is featurised exactly as in training."""
        return {"text_features": self.text_featuriser.to_dict()}


def _check_split(split: str, name: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown {name} split {split!r}; choose one of {', '.join(SPLITS)}")


def _grouped(pairs: Sequence[tuple[str, str, str]],
             classes: Sequence[str]) -> tuple[list[str], np.ndarray, list[str]]:
    """Texts of ``classes``, their labels (index into ``classes``) and released parts, in file order."""
    index = {c: i for i, c in enumerate(classes)}
    kept = [(t, index[c], part) for t, c, part in pairs if c in index]
    return ([t for t, _, _ in kept], np.array([c for _, c, _ in kept], dtype=np.int64),
            [part for _, _, part in kept])


# ----------------------------------------------------------------------------- CLINC150
CLINC_URL = "https://raw.githubusercontent.com/clinc/oos-eval/master/data/"
# No checksums are published for these files; they are checked by content instead.
CLINC_FILES = {"data": RemoteFile("data_full.json", CLINC_URL + "data_full.json"),
               "domains": RemoteFile("domains.json", CLINC_URL + "domains.json")}
CLINC_DOMAIN_SPLITS = {
    "train": ("banking", "credit_cards", "home", "auto_and_commute", "utility", "small_talk"),
    "val": ("work", "meta"),
    "test": ("travel", "kitchen_and_dining"),
}
CLINC_PROTOCOLS = ("domains",)


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read {path} as JSON ({str(e).splitlines()[0][:100]}); "
                        f"is it the released file?") from None


class Clinc150(TextDataset):
    """One class split of CLINC150 (see the module docstring).

    Args:
        split: ``train``, ``val``, ``test``, ``trainval`` or ``all`` (150 intents).
        protocol: ``domains`` (the only one: splits are unions of whole domains).
        features: :class:`TextFeaturiser` settings (a dict, or the featuriser itself).
        data_dir: where ``clinc150/data_full.json`` and ``clinc150/domains.json`` are.
        download: fetch missing files from the authors' repository.
    """

    def __init__(self, split: str = "train", protocol: str = "domains",
                 features: TextFeaturiser | dict | None = None,
                 data_dir: str | os.PathLike | None = None, download: bool = True):
        _check_split(split, "CLINC150")
        if protocol not in CLINC_PROTOCOLS:
            raise DataError(f"unknown CLINC150 protocol {protocol!r}; choose one of "
                            f"{', '.join(CLINC_PROTOCOLS)}")
        paths = {k: find_archive(f, "clinc150", data_dir, download_missing=download)
                 for k, f in CLINC_FILES.items()}
        data, domains = _read_json(paths["data"]), _read_json(paths["domains"])
        if not isinstance(data, dict) or not all(k in data for k in ("train", "val", "test")):
            raise DataError(f"{paths['data']} lacks the train/val/test lists of CLINC150's data_full.json")
        if not isinstance(domains, dict) or sorted(len(v) for v in domains.values()) != [15] * 10:
            raise DataError(f"{paths['domains']} is not CLINC150's domains.json "
                            f"(expected 10 domains of 15 intents)")
        try:
            pairs = [(str(t), str(c), part) for part in ("train", "val", "test") for t, c in data[part]]
        except (TypeError, ValueError):
            raise DataError(f"{paths['data']}: items must be [text, intent] pairs") from None
        intents = sorted({c for _, c, _ in pairs})
        listed = sorted(i for v in domains.values() for i in v)
        if intents != listed:
            raise DataError(f"{paths['data']} and {paths['domains']} disagree on the intents "
                            f"({len(intents)} vs {len(listed)}); are they from the same release?")
        missing = [d for names in CLINC_DOMAIN_SPLITS.values() for d in names if d not in domains]
        if missing:
            raise DataError(f"{paths['domains']} lacks the domains {missing}")
        chosen = {"trainval": ("train", "val"), "all": ("train", "val", "test")}.get(split, (split,))
        self.domains = [d for part in chosen for d in CLINC_DOMAIN_SPLITS[part]]
        classes = [intent for d in self.domains for intent in sorted(domains[d])]
        texts, labels, parts = _grouped(pairs, classes)
        if isinstance(features, TextFeaturiser):
            featuriser = features
        else:
            featuriser = TextFeaturiser.from_dict(features)
        self.split, self.protocol = split, protocol
        self.intent_domain = {i: d for d in self.domains for i in domains[d]}
        super().__init__(texts, labels, classes, featuriser, parts)


# ----------------------------------------------------------------------------- BANKING77
BANKING_URL = "https://raw.githubusercontent.com/PolyAI-LDN/task-specific-datasets/master/banking_data/"
BANKING_FILES = {part: RemoteFile(f"{part}.csv", BANKING_URL + f"{part}.csv") for part in ("train", "test")}
BANKING_PROTOCOLS = ("intents",)
#: Intents per class split of the ``intents`` protocol, and the seed that assigns them.
BANKING_SPLIT_SIZES = {"train": 47, "val": 15, "test": 15}
BANKING_SPLIT_SEED = 77


def banking_intent_split(intents: Sequence[str], seed: int = BANKING_SPLIT_SEED) -> dict[str, list[str]]:
    """The seeded train/val/test split of BANKING77's intents (same on every machine)."""
    names = sorted(intents)
    order = np.argsort(np.random.default_rng(seed).random(len(names)), kind="stable")
    shuffled = [names[i] for i in order]
    n_train, n_val = BANKING_SPLIT_SIZES["train"], BANKING_SPLIT_SIZES["val"]
    return {"train": sorted(shuffled[:n_train]), "val": sorted(shuffled[n_train:n_train + n_val]),
            "test": sorted(shuffled[n_train + n_val:])}


class Banking77(TextDataset):
    """One class split of BANKING77 (see the module docstring).

    Args:
        split: ``train`` (47 intents), ``val`` (15), ``test`` (15), ``trainval`` or ``all`` (77).
        protocol: ``intents`` (the only one: a seeded split of the intents).
        features: :class:`TextFeaturiser` settings (a dict, or the featuriser itself).
        data_dir: where ``banking77/train.csv`` and ``banking77/test.csv`` are.
        download: fetch missing files from the authors' repository.
    """

    def __init__(self, split: str = "train", protocol: str = "intents",
                 features: TextFeaturiser | dict | None = None,
                 data_dir: str | os.PathLike | None = None, download: bool = True):
        _check_split(split, "BANKING77")
        if protocol not in BANKING_PROTOCOLS:
            raise DataError(f"unknown BANKING77 protocol {protocol!r}; choose one of "
                            f"{', '.join(BANKING_PROTOCOLS)}")
        pairs: list[tuple[str, str, str]] = []
        for part, remote in BANKING_FILES.items():
            path = find_archive(remote, "banking77", data_dir, download_missing=download)
            try:
                with open(path, newline="", encoding="utf-8") as f:
                    reader = csv.DictReader(f)
                    if reader.fieldnames is None or not {"text", "category"} <= set(reader.fieldnames):
                        raise DataError(f"{path} must be a CSV file with columns text,category "
                                        f"(found {reader.fieldnames})")
                    pairs += [(row["text"], row["category"], part) for row in reader]
            except (OSError, UnicodeDecodeError, csv.Error) as e:
                raise DataError(f"cannot read {path} ({str(e).splitlines()[0][:100]})") from None
        intents = sorted({c for _, c, _ in pairs})
        if len(intents) != 77:
            raise DataError(f"BANKING77 files hold {len(intents)} intents, expected 77 "
                            f"(incomplete or different files?)")
        by_split = banking_intent_split(intents)
        chosen = {"trainval": ("train", "val"), "all": ("train", "val", "test")}.get(split, (split,))
        classes = [c for part in chosen for c in by_split[part]]
        texts, labels, parts = _grouped(pairs, classes)
        if isinstance(features, TextFeaturiser):
            featuriser = features
        else:
            featuriser = TextFeaturiser.from_dict(features)
        self.split, self.protocol = split, protocol
        super().__init__(texts, labels, classes, featuriser, parts)
