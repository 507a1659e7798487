"""Text datasets seen through a pre-trained encoder: what the learners get as examples.

:class:`EncodedTexts` keeps a text dataset's utterances, class split and released parts, and
replaces its examples by the encoder's outputs, computed once (:mod:`kshot.text.cache`):

* frozen (``top_layers=0``): sentence embeddings, float32 ``[n, dim]``; any flat-input head
  (``identity`` for Prototypical Networks without training, ``mlp`` for the MAML family)
  reads them, and an episode costs only the head.
* top layers trained (``top_layers=k``): the token vectors after the first ``layers - k``
  layers, which the backbone ``text_top`` (:mod:`kshot.text.models`) carries through the last
  ``k`` layers and the pooling. A batch of them is ``[n, T, 1 + dim]``: channel 0 is the
  attention mask (1 for a token, 0 for padding), the rest the token's vector; ``T`` is the
  longest text of the batch (at most the encoder's ``max_length``, the nominal example shape).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from kshot.data.archives import cache_dir as default_cache_dir
from kshot.data.base import FewShotDataset
from kshot.data.multisource import MultiSourceDataset
from kshot.data.text import TextDataset
from kshot.errors import ConfigError, DataError
from kshot.tasks import smallest_keys
from kshot.text.cache import EncodingCache
from kshot.text.encoder import EncoderRecord, SentenceEncoder, files_sha256

_ENCODERS: dict[tuple, SentenceEncoder] = {}


def get_encoder(name_or_path: str, pooling: str = "", normalize: bool | None = None,
                max_length: int = 0) -> SentenceEncoder:
    """A :class:`SentenceEncoder`, built once per process and settings (loading takes seconds)."""
    key = (str(name_or_path), pooling, normalize, int(max_length))
    encoder = _ENCODERS.get(key)
    if encoder is None or encoder.sha256 != files_sha256(encoder.folder):  # files changed on disk
        encoder = _ENCODERS[key] = SentenceEncoder(name_or_path, pooling, normalize, max_length)
    return encoder


def encoder_for_record(record: dict, name_or_path: str | None = None) -> SentenceEncoder:
    """The encoder a checkpoint's record names (or the copy at ``name_or_path``), checked to be it."""
    rec = EncoderRecord.from_dict(record)
    encoder = get_encoder(name_or_path or rec.model, rec.pooling, rec.normalize, rec.max_length)
    encoder.check(rec)
    return encoder


def encoded_shape(encoder: SentenceEncoder, top_layers: int) -> tuple[int, ...]:
    """The shape of one encoded text: a sentence embedding when nothing above the cut is trained,
    else the bottom layers' token vectors with a mask column (``max_length x (1 + dim)``)."""
    if top_layers == 0:
        return (encoder.dim,)
    return (encoder.max_length, 1 + encoder.dim)


def pack_tokens(tokens: torch.Tensor, offsets: torch.Tensor, rows: np.ndarray | Sequence[int],
                length: int = 0) -> torch.Tensor:
    """Ragged token vectors of ``rows`` as one padded batch ``[n, T, 1 + dim]`` (mask first).

    Args:
        tokens, offsets: the ragged store (row ``i`` is ``tokens[offsets[i]:offsets[i+1]]``).
        length: pad to this many tokens (0: the longest of the batch).
    """
    rows = torch.as_tensor(np.asarray(rows, dtype=np.int64))
    starts, lengths = offsets[rows], offsets[rows + 1] - offsets[rows]
    width = int(length) or (int(lengths.max()) if len(rows) else 0)
    out = torch.zeros(len(rows), width, 1 + tokens.shape[1])
    row_of = torch.repeat_interleave(torch.arange(len(rows)), lengths)
    position = torch.arange(int(lengths.sum())) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
    source = starts[row_of] + position
    out[row_of, position, 1:] = tokens[source]
    out[row_of, position, 0] = 1.0
    return out


def take_rows(tokens: torch.Tensor, offsets: torch.Tensor, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``rows`` of a ragged store, as a ragged store of their own."""
    rows_t = torch.as_tensor(np.asarray(rows, dtype=np.int64))
    starts, lengths = offsets[rows_t], offsets[rows_t + 1] - offsets[rows_t]
    new_offsets = torch.zeros(len(rows_t) + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=new_offsets[1:])
    position = torch.arange(int(lengths.sum())) - torch.repeat_interleave(new_offsets[:-1], lengths)
    source = torch.repeat_interleave(starts, lengths) + position
    return tokens[source], new_offsets


class EncodedTexts(FewShotDataset):
    """A :class:`~kshot.data.text.TextDataset` whose examples are a pre-trained encoder's outputs.

    Args:
        source: the texts, their classes (and released parts).
        encoder: the frozen encoder.
        top_layers: 0 for sentence embeddings; ``k`` for the token vectors below the top ``k`` layers.
        cache: where encodings are kept (default: the cache directory's ``text-encodings``).
        within: a larger text dataset holding every text of ``source`` (its ``all`` split): its
            encodings are computed (once) and ``source`` takes its rows, so that the splits of a
            dataset share one cache entry. An encoding is a function of the text alone.
    """

    def __init__(self, source: TextDataset, encoder: SentenceEncoder, top_layers: int = 0,
                 cache: EncodingCache | None = None, progress: bool = True,
                 within: TextDataset | None = None):
        if not isinstance(source, TextDataset):
            raise ConfigError(f"a text encoder reads text datasets (clinc150, banking77), not "
                              f"{type(source).__name__}")
        if not 0 <= int(top_layers) <= encoder.layers:
            raise ConfigError(f"encoder_layers {top_layers}: the encoder has {encoder.layers} layers")
        self.source, self.encoder, self.top_layers = source, encoder, int(top_layers)
        self.texts, self.class_names, self.parts = source.texts, source.class_names, source.parts
        self.labels = source.labels
        self.cache = cache or EncodingCache(default_cache_dir(), progress=progress)
        self._embeddings: torch.Tensor | None = None
        self._ragged: tuple[torch.Tensor, torch.Tensor] | None = None
        self._within: tuple[EncodedTexts, np.ndarray] | None = None
        if within is not None and within is not source:
            row = {t: i for i, t in reversed(list(enumerate(within.texts)))}
            missing = [t for t in self.texts if t not in row]
            if missing:
                raise DataError(f"{len(missing)} texts of the split are not in the dataset it is "
                                f"taken from (e.g. {missing[0][:60]!r})")
            self._within = (EncodedTexts(within, encoder, top_layers, self.cache),
                            np.array([row[t] for t in self.texts], dtype=np.int64))

    # Encoded on first use: a run that never draws from a split (nothing to meta-train) never
    # pays for encoding it.
    @property
    def embeddings(self) -> torch.Tensor:
        """Sentence embeddings of every text ``[n, dim]`` (frozen encoder)."""
        if self.top_layers:
            raise ConfigError("this dataset holds token vectors for the top layers, not embeddings")
        if self._embeddings is None and self._within is not None:
            parent, rows = self._within
            self._embeddings = parent.embeddings[torch.from_numpy(rows)]
        elif self._embeddings is None:
            self._embeddings = self.cache.embeddings(self.encoder, self.texts)
        return self._embeddings

    @property
    def tokens(self) -> torch.Tensor:
        """Token vectors after the frozen layers, ragged ``[total, dim]`` (see :attr:`offsets`)."""
        return self._hidden()[0]

    @property
    def offsets(self) -> torch.Tensor:
        return self._hidden()[1]

    def _hidden(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.top_layers:
            raise ConfigError("this dataset holds sentence embeddings, not token vectors")
        if self._ragged is None and self._within is not None:
            parent, rows = self._within
            self._ragged = take_rows(parent.tokens, parent.offsets, rows)
        elif self._ragged is None:
            self._ragged = self.cache.hidden_states(self.encoder, self.texts, self.cut)
        return self._ragged

    @property
    def cut(self) -> int:
        """Layers run frozen (and cached) below the trained ones."""
        return self.encoder.layers - self.top_layers

    def class_examples(self) -> Sequence[np.ndarray]:
        return self.source.class_examples()

    def class_groups(self) -> np.ndarray | None:
        return self.source.class_groups()

    def load(self, indices: np.ndarray) -> torch.Tensor:
        indices = np.asarray(indices, dtype=np.int64)
        if self.top_layers == 0:
            return self.embeddings[torch.from_numpy(indices)]
        return pack_tokens(self.tokens, self.offsets, indices)

    @property
    def example_shape(self) -> tuple[int, ...]:
        return encoded_shape(self.encoder, self.top_layers)

    def checkpoint_extra(self) -> dict:
        """The encoder (by name and file hash) and where it is cut: new text is encoded the same way."""
        return {"text_encoder": {**self.encoder.record().to_dict(), "top_layers": self.top_layers}}

    def __repr__(self) -> str:
        how = "frozen" if not self.top_layers else f"top {self.top_layers} layers trainable"
        return f"EncodedTexts({self.source!r}, {self.encoder.name}, {how})"


def encode_dataset(data: FewShotDataset, encoder: SentenceEncoder, top_layers: int = 0,
                   cache_root: str | os.PathLike | None = None, progress: bool = True,
                   within: FewShotDataset | None = None) -> FewShotDataset:
    """``data`` (a text dataset, or several as ``a+b``) with the encoder's outputs as examples
    (``within``: the same dataset's ``all`` split, whose one cache entry every split then shares)."""
    cache = EncodingCache(default_cache_dir(cache_root), progress=progress)
    if isinstance(data, MultiSourceDataset):
        wholes = within.sources if isinstance(within, MultiSourceDataset) else [None] * len(data.sources)
        return MultiSourceDataset({name: EncodedTexts(s, encoder, top_layers, cache, within=w)  # type: ignore[arg-type]
                                   for name, s, w in zip(data.names, data.sources, wholes)})
    return EncodedTexts(data, encoder, top_layers, cache, within=within)  # type: ignore[arg-type]


def encode_texts(texts: Sequence[str], record: dict, encoder: SentenceEncoder) -> torch.Tensor:
    """A user's texts as a checkpoint's model takes them: embeddings ``[n, dim]``, or token
    vectors padded to the encoder's ``max_length`` ``[n, max_length, 1 + dim]`` (one shape for
    every file, so support and query batches agree)."""
    top_layers = int(record.get("top_layers", 0))
    if top_layers == 0:
        return encoder.encode(texts)
    tokens, offsets = encoder.hidden_states(texts, encoder.layers - top_layers)
    return pack_tokens(tokens, offsets, np.arange(len(texts)), length=encoder.max_length)


# ----------------------------------------------------------------------------- the released split
@dataclass
class ReleasedTask:
    """The standard intent-detection setting for one seed: every class at once, ``shots``
    labelled utterances of each drawn from the released training part, tested on the whole
    released test part. Indices are the dataset's example indices; labels are class indices."""

    support: np.ndarray
    support_y: np.ndarray
    query: np.ndarray
    query_y: np.ndarray
    seed: int


def released_task(data: FewShotDataset, shots: int, seed: int, train_part: str = "train",
                  test_part: str = "test") -> ReleasedTask:
    """Draw the support set of seed ``seed`` (``shots`` per class from ``train_part``)."""
    parts = getattr(data, "parts", None)
    if parts is None:
        raise DataError(f"{type(data).__name__} does not record the released train/test parts of its "
                        f"texts; the standard setting needs clinc150 or banking77 (split 'all')")
    labels = np.asarray(data.labels, dtype=np.int64)  # type: ignore[attr-defined]
    rng = np.random.default_rng([int(seed), int(shots), 7_519])
    support, support_y = [], []
    for c in range(data.num_classes):
        pool = np.flatnonzero((labels == c) & (parts == train_part))
        if len(pool) < shots:
            raise DataError(f"class {data.class_names[c]!r} has {len(pool)} released {train_part} "
                            f"utterances, fewer than {shots} shots")
        support.append(pool[smallest_keys(rng.random(len(pool)), shots)])
        support_y.append(np.full(shots, c))
    query = np.flatnonzero(parts == test_part)
    if not len(query):
        raise DataError(f"the dataset has no released {test_part} utterances")
    return ReleasedTask(np.concatenate(support), np.concatenate(support_y), query, labels[query], int(seed))


# ----------------------------------------------------------------------------- records
def text_backbone_options(name_or_path: str, layers: int) -> dict:
    """The ``text_top`` arguments that pin the encoder: its name, file hash and reading settings."""
    record = get_encoder(name_or_path).record()
    return {"model": record.model, "sha256": record.sha256, "layers": int(layers), "pooling": record.pooling,
            "normalize": record.normalize, "max_length": record.max_length}


def same_encoder(saved: dict, current: dict | None) -> None:
    """Refuse data encoded otherwise than a checkpoint's model expects (other files, pooling, cut)."""
    if current is None:
        raise ConfigError("the checkpoint's model reads a text encoder's outputs; evaluate it on text "
                          "encoded with that encoder (set text_encoder)")
    differ = sorted(k for k in set(saved) | set(current) if k != "model" and saved.get(k) != current.get(k))
    if differ:
        k = differ[0]
        what = "files (sha256)" if k == "sha256" else k
        raise ConfigError(f"the checkpoint was made with the text encoder {saved.get('model')!r}, but the "
                          f"data is encoded by {current.get('model')!r} with other {what} "
                          f"({saved.get(k)!r} vs {current.get(k)!r}); give the same encoder and settings")
