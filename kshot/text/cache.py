"""Encoder outputs of a list of texts, computed once and kept in the cache directory.

A frozen encoder's embeddings of a dataset never change, so they are computed once and every
episode afterwards costs only the head. An entry is keyed by everything its numbers depend on:
the encoder's files (their SHA-256), its pooling, normalisation, truncation and lower-casing,
where the encoder is cut (sentence embeddings, or token vectors after the first layers), and
the texts themselves, in order. Another model, other settings or one changed text give another
key, so a stale entry is never read.

Entries are safetensors files (tensors only, no code), written atomically under a file lock:
processes that ask for the same entry at once compute it once, and the others read it. Reading
is bounded: a file larger than its texts and encoder can explain, or whose tensors do not have
the shapes the key promises, is not trusted and is computed again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from kshot.services.files import atomic_path, file_lock
from kshot.text.encoder import SentenceEncoder

FORMAT = "kshot-text-encodings/1"
FOLDER = "text-encodings"
_HEADER_SLACK = 1 << 16  # bytes a safetensors header with two tensors and our metadata may take


def texts_sha256(texts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        data = str(text).encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def cache_key(encoder: SentenceEncoder, texts: Sequence[str], cut: int | None) -> str:
    """The entry's name: a hash of the encoder record, the cut (None: sentence embeddings) and the texts."""
    record = encoder.record().to_dict()
    record.pop("model")  # where the files are does not change what they compute
    what = {"format": FORMAT, "encoder": record, "cut": cut, "n": len(texts), "texts": texts_sha256(texts)}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:40]


class EncodingCache:
    """Sentence embeddings or bottom-layer token vectors of text lists, under ``root/text-encodings``.

    Args:
        root: the cache directory (:func:`kshot.data.cache_dir`).
        progress: show a progress bar while computing an entry.

    ``hits`` and ``misses`` count the entries read and computed by this object.
    """

    def __init__(self, root: str | os.PathLike, progress: bool = False):
        self.folder = Path(root) / FOLDER
        self.progress = progress
        self.hits = self.misses = 0

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def embeddings(self, encoder: SentenceEncoder, texts: Sequence[str]) -> torch.Tensor:
        """Sentence embeddings ``[len(texts), dim]``, from the cache or computed and stored."""
        key = cache_key(encoder, texts, None)
        tensors = self._get(key, {"embeddings": (len(texts), encoder.dim)},
                            len(texts) * encoder.dim * 4,
                            lambda: {"embeddings": encoder.encode(texts, progress=self.progress)})
        return tensors["embeddings"]

    def hidden_states(self, encoder: SentenceEncoder, texts: Sequence[str],
                      cut: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token vectors after ``cut`` layers, ragged (see :meth:`SentenceEncoder.hidden_states`)."""
        key = cache_key(encoder, texts, cut)
        most = len(texts) * encoder.max_length
        def compute():
            tokens, offsets = encoder.hidden_states(texts, cut, progress=self.progress)
            return {"tokens": tokens, "offsets": offsets}
        tensors = self._get(key, {"tokens": (None, encoder.dim), "offsets": (len(texts) + 1,)},
                            most * encoder.dim * 4 + (len(texts) + 1) * 8, compute,
                            valid=lambda t: _ragged_ok(t, encoder.max_length))
        return tensors["tokens"], tensors["offsets"]

    # ------------------------------------------------------------------ files
    def _get(self, key: str, shapes: dict, payload: int, compute, valid=None) -> dict[str, torch.Tensor]:
        path = self.path(key)
        with file_lock(self.folder / f"{key}.lock"):
            tensors = self._read(path, key, shapes, payload)
            if tensors is not None and (valid is None or valid(tensors)):
                self.hits += 1
                return tensors
            self.misses += 1
            tensors = compute()
            with atomic_path(path) as tmp:
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                          metadata={"format": FORMAT, "key": key})
            return tensors

    @staticmethod
    def _read(path: Path, key: str, shapes: dict, payload: int) -> dict[str, torch.Tensor] | None:
        """The entry's tensors, or None when it is missing, too large, or not what the key promises."""
        try:
            if path.stat().st_size > payload + _HEADER_SLACK:
                return None
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT or meta.get("key") != key or set(f.keys()) != set(shapes):
                    return None
                tensors = {name: f.get_tensor(name) for name in shapes}
        except (OSError, SafetensorError, ValueError, RuntimeError):
            return None
        for name, shape in shapes.items():
            t = tensors[name]
            dtype = torch.int64 if name == "offsets" else torch.float32
            if t.dtype != dtype or t.dim() != len(shape) or any(s is not None and t.shape[i] != s for i, s in enumerate(shape)):
                return None
        return tensors


def _ragged_ok(tensors: dict[str, torch.Tensor], max_length: int) -> bool:
    """Offsets that start at 0, end at the token count, and give every text 1..max_length tokens."""
    tokens, offsets = tensors["tokens"], tensors["offsets"]
    lengths = offsets[1:] - offsets[:-1]
    return (int(offsets[0]) == 0 and int(offsets[-1]) == len(tokens) and not bool((lengths < 1).any())
            and not bool((lengths > max_length).any()))
