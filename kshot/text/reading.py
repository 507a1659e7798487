"""A user's utterances for ``kshot adapt``: labelled CSV files and files of queries.

* Support: a CSV file with a header naming a text column (``text``, ``utterance``, ``sentence``
  or ``query``) and a label column (``label``, ``intent``, ``category`` or ``class``).
* Queries: such a CSV (the label column is optional; with it, accuracy is reported), or any
  other file read as plain text, one utterance per line (blank lines skipped).

Files are untrusted: at most 64 MiB and 1,000,000 rows are read, every utterance is cut to
10,000 characters, rows without text are skipped and reported. Names are the 1-based row (CSV)
or line (text file) numbers, as ``kshot adapt`` writes them in its predictions.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from kshot.errors import DataError
from kshot.text.data import encode_texts, encoded_shape, encoder_for_record
from kshot.text.encoder import SentenceEncoder

TEXT_COLUMNS = ("text", "utterance", "sentence", "query")
LABEL_COLUMNS = ("label", "intent", "category", "class")
MAX_BYTES = 64 << 20
MAX_ROWS = 1_000_000
MAX_CHARS = 10_000


@dataclass
class Utterances:
    """Texts read from a file: ``names[i]`` is the row or line of ``texts[i]``; ``labels`` (class
    names) or None; ``skipped`` pairs a row with why it was left out."""

    texts: list[str]
    names: list[str]
    labels: list[str] | None
    skipped: list[tuple[str, str]]


def _read_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise DataError(f"--{what} {path}: no such file; give a CSV file"
                        f"{' (text,label)' if what == 'support' else ' or a text file, one utterance per line'}")
    if path.stat().st_size > MAX_BYTES:
        raise DataError(f"--{what} {path} is larger than {MAX_BYTES >> 20} MiB; split it")
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"--{what} {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise DataError(f"cannot read --{what} {path} ({e.strerror or e})") from None


def _column(header: list[str], names: tuple[str, ...]) -> int | None:
    lowered = [h.strip().lower() for h in header]
    for name in names:
        if name in lowered:
            return lowered.index(name)
    return None


def read_csv(path: str | os.PathLike, what: str = "support", need_labels: bool = True) -> Utterances:
    """Utterances (and labels) from a CSV file with a header."""
    path = Path(path).expanduser()
    rows = csv.reader(io.StringIO(_read_text(path, what), newline=""))
    try:
        header = next(rows, None)
        if header is None:
            raise DataError(f"--{what} {path} is empty")
        text_at, label_at = _column(header, TEXT_COLUMNS), _column(header, LABEL_COLUMNS)
        if text_at is None or (need_labels and label_at is None):
            raise DataError(f"--{what} {path} needs a header with a text column ({', '.join(TEXT_COLUMNS)})"
                            f"{' and a label column (' + ', '.join(LABEL_COLUMNS) + ')' if need_labels else ''}; "
                            f"found {header[:6]}")
        texts, names, labels, skipped = [], [], [], []
        for number, row in enumerate(rows, start=1):
            if number > MAX_ROWS:
                raise DataError(f"--{what} {path} has more than {MAX_ROWS} rows; split it")
            text = row[text_at].strip() if text_at < len(row) else ""
            label = row[label_at].strip() if label_at is not None and label_at < len(row) else ""
            if not text or (label_at is not None and not label):
                skipped.append((str(number), "no text" if not text else "no label"))
                continue
            texts.append(text[:MAX_CHARS])
            names.append(str(number))
            labels.append(label)
    except csv.Error as e:
        raise DataError(f"--{what} {path} is not a readable CSV file ({e})") from None
    if not texts:
        raise DataError(f"--{what} {path} holds no utterances")
    return Utterances(texts, names, labels if label_at is not None else None, skipped)


def read_lines(path: str | os.PathLike, what: str = "query") -> Utterances:
    """Utterances from a plain text file, one per line."""
    path = Path(path).expanduser()
    lines = _read_text(path, what).splitlines()
    if len(lines) > MAX_ROWS:
        raise DataError(f"--{what} {path} has more than {MAX_ROWS} lines; split it")
    kept = [(str(i), line.strip()[:MAX_CHARS]) for i, line in enumerate(lines, start=1) if line.strip()]
    if not kept:
        raise DataError(f"--{what} {path} holds no utterances")
    return Utterances([t for _, t in kept], [n for n, _ in kept], None, [])


def read_utterances(path: str | os.PathLike, what: str) -> Utterances:
    """Support: a labelled CSV. Queries: a CSV (labels optional) or a text file, one per line."""
    path = Path(path).expanduser()
    if what == "support":
        return read_csv(path, what, need_labels=True)
    if path.suffix.lower() == ".csv":
        return read_csv(path, what, need_labels=False)
    return read_lines(path, what)


class TextInputFormat:
    """How ``kshot adapt`` turns a user's utterance files into a text model's inputs.

    Args:
        encoder: the encoder the model was trained on (checked against ``record`` by the caller).
        top_layers: 0 for sentence embeddings; ``k`` for token vectors below the top ``k`` layers.
    """

    def __init__(self, encoder: SentenceEncoder, top_layers: int = 0):
        self.encoder, self.top_layers = encoder, int(top_layers)

    @classmethod
    def from_record(cls, record: dict, name_or_path: str | None = None) -> "TextInputFormat":
        """The format a checkpoint's ``extra["text_encoder"]`` records (the encoder found at
        ``name_or_path`` instead of the recorded place, when given; its files must be the same)."""
        return cls(encoder_for_record(record, name_or_path), int(record.get("top_layers", 0)))

    @property
    def shape(self) -> tuple[int, ...]:
        return encoded_shape(self.encoder, self.top_layers)

    def describe(self) -> str:
        how = "sentence embeddings" if not self.top_layers else f"token vectors for its top {self.top_layers} layers"
        return f"utterances through {self.encoder.name} ({how})"

    def read(self, path: str | os.PathLike, what: str) -> tuple[torch.Tensor, Utterances]:
        """The utterances of ``path`` (``what``: support or query) and the model's inputs for them."""
        utterances = read_utterances(path, what)
        record = {"top_layers": self.top_layers}
        return encode_texts(utterances.texts, record, self.encoder), utterances
