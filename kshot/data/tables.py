"""A user's own table: one row per example, a label column and numeric feature columns.

CSV is read with the standard library; Parquet needs ``pyarrow`` (``pip install kshot[tables]``).
Features are standardised (zero mean, unit variance) with statistics of the meta-training
classes only, so nothing about the test classes leaks into training. The column names and
statistics form a :class:`TableFormat`, saved in checkpoints, so that ``kshot adapt`` reads a new
table exactly as the training table was read, matching columns by name.
"""

from __future__ import annotations

import csv
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from kshot.data.base import FewShotDataset
from kshot.data.splits import natural_key
from kshot.errors import DataError, DataWarning

#: Label column names tried, in order, when none is given.
LABEL_COLUMNS = ("label", "class", "category", "target", "y")
#: Cells read as a missing number. A label is missing only when empty: "none" or "na" can be a
#: class (MovieLens has an occupation called "none").
_MISSING = {"", "na", "nan", "n/a", "null", "none", "?"}
#: Duplicated rows named in a warning (the rest are counted).
_SHOWN = 3


@dataclass
class Table:
    """Columns of a table as string or numeric arrays, in file order."""

    columns: dict[str, np.ndarray]
    path: Path
    lines: list[int] | None = None  # the file line of each data row (text tables)

    @property
    def names(self) -> list[str]:
        return list(self.columns)

    def row_name(self, i: int) -> str:
        """Data row ``i`` (0-based) as kshot names it everywhere, the predictions CSV included:
        counted from 1 after the header, with the file's line number for text tables."""
        line = self.lines[i] if self.lines is not None and i < len(self.lines) else None
        return f"row {i + 1}" + (f" (line {line})" if line is not None else "")

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0


def read_table(path: str | os.PathLike) -> Table:
    """Read a CSV (``.csv``, ``.tsv``, ``.txt``) or Parquet (``.parquet``, ``.pq``) file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"table {path} not found")
    if path.suffix.lower() in (".parquet", ".pq"):
        return _read_parquet(path)
    return _read_csv(path)


def _read_csv(path: Path) -> Table:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            sample = f.read(65536)
            f.seek(0)
            delimiter = "\t" if path.suffix.lower() == ".tsv" or ("\t" in sample and "," not in sample) else ","
            reader = csv.reader(f, delimiter=delimiter)
            rows, lines = [], []
            for row in reader:
                if any(cell.strip() for cell in row):  # blank lines are skipped
                    rows.append(row)
                    lines.append(reader.line_num)
    except UnicodeDecodeError:
        raise DataError(f"{path} is not a UTF-8 text table (is it a Parquet or Excel file? "
                        f"kshot reads CSV and Parquet)") from None
    except (OSError, csv.Error) as e:
        raise DataError(f"cannot read table {path} ({e})") from None
    if len(rows) < 2:
        raise DataError(f"table {path} needs a header row and at least one data row")
    header = [h.strip() for h in rows[0]]
    if len(set(header)) != len(header):
        dup = next(h for h in header if header.count(h) > 1)
        raise DataError(f"table {path} has the column {dup!r} twice")
    where = Table({}, path, lines=lines[1:])
    for i, row in enumerate(rows[1:]):
        if len(row) != len(header):
            raise DataError(f"{path} {where.row_name(i)} has {len(row)} cells but the header has "
                            f"{len(header)} columns")
    cells = np.array(rows[1:], dtype=object)
    return Table({name: np.array([c.strip() for c in cells[:, i]], dtype=str)
                  for i, name in enumerate(header)}, path, lines=lines[1:])


def _read_parquet(path: Path) -> Table:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading Parquet ({path.name}) needs pyarrow: pip install 'kshot[tables]', "
                        f"or save the table as CSV") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds
        raise DataError(f"cannot read Parquet file {path} ({str(e).splitlines()[0][:120]})") from None
    columns = {}
    for name in table.column_names:
        values = table.column(name).to_numpy(zero_copy_only=False)
        if values.dtype.kind in "biuf":
            columns[name] = values.astype(np.float64)
        else:
            columns[name] = np.array(["" if v is None else str(v) for v in values], dtype=str)
    return Table(columns, path)


def numeric_column(table: Table, name: str) -> np.ndarray:
    """Column ``name`` as float64; a non-number or a missing value is a DataError naming the row."""
    values = table.columns[name]
    try:
        out = values.astype(np.float64)  # fast path; the loop below only explains failures
    except ValueError:
        out = np.empty(len(values), dtype=np.float64)
        for i, cell in enumerate(values):
            if cell.lower() in _MISSING:
                out[i] = np.nan
                continue
            try:
                out[i] = float(cell)
            except ValueError:
                raise DataError(f"column {name!r} of {table.path} is not numeric ({table.row_name(i)}: "
                                f"{cell[:40]!r}); drop it, encode it as numbers, or choose the "
                                f"feature columns") from None
    missing = np.flatnonzero(~np.isfinite(out))
    if len(missing):
        raise DataError(f"column {name!r} of {table.path} has {len(missing)} missing or infinite "
                        f"values (first at {table.row_name(int(missing[0]))}); fill them in or drop those rows")
    return out


def find_label_column(table: Table, label_column: str | None = None) -> str:
    if label_column:
        if label_column not in table.columns:
            raise DataError(f"table {table.path} has no column {label_column!r} (its columns: "
                            f"{', '.join(table.names[:8])}{', ...' if len(table.names) > 8 else ''})")
        return label_column
    for name in LABEL_COLUMNS:
        for column in table.names:
            if column.lower() == name:
                return column
    raise DataError(f"table {table.path} has none of the label columns {', '.join(LABEL_COLUMNS)}; "
                    f"name the column that holds the classes (label_column)")


def check_feature_columns(table: Table, label_column: str, features: Sequence[str]) -> list[str]:
    """The feature columns asked for, all of them in ``table`` and none of them the label."""
    features = [str(f) for f in features]
    unknown = [f for f in features if f not in table.columns]
    if unknown:
        raise DataError(f"table {table.path} has no column {unknown[0]!r} (asked for as a feature; its "
                        f"columns: {', '.join(table.names[:8])}{', ...' if len(table.names) > 8 else ''})")
    if label_column in features:
        raise DataError(f"the label column {label_column!r} of {table.path} cannot also be a feature column")
    if not features:
        raise DataError(f"table {table.path} has no feature columns besides {label_column!r}")
    return features


def duplicate_rows(x: np.ndarray) -> list[tuple[int, int]]:
    """``(row, earlier row)`` for every row of ``x [n, F]`` that repeats an earlier one exactly."""
    first: dict[bytes, int] = {}
    found = []
    for i, row in enumerate(np.ascontiguousarray(x)):
        key = row.tobytes()
        if key in first:
            found.append((i, first[key]))
        else:
            first[key] = i
    return found


def warn_duplicates(table: Table, x: np.ndarray) -> int:
    """Warn, counting them, about rows whose features repeat an earlier row's: a task can then
    hold a row as support and its copy as query, which inflates accuracy. Returns the count."""
    found = duplicate_rows(x)
    if found:
        shown = "; ".join(f"{table.row_name(i)} = {table.row_name(j)}" for i, j in found[:_SHOWN])
        more = f"; and {len(found) - _SHOWN} more" if len(found) > _SHOWN else ""
        warnings.warn(f"{len(found)} of the {len(x)} rows of {table.path} repeat an earlier row's features "
                      f"exactly ({shown}{more}): a task may hold a row as support and its copy as query, "
                      f"which inflates accuracy; drop the duplicates", DataWarning, stacklevel=3)
    return len(found)


@dataclass
class TableFormat:
    """How a table maps to model inputs: which columns, scaled how. Saved in checkpoints."""

    label_column: str
    features: list[str]
    mean: list[float]
    std: list[float]

    def to_dict(self) -> dict:
        return {"label_column": self.label_column, "features": self.features, "mean": self.mean,
                "std": self.std}

    @classmethod
    def from_dict(cls, data: dict) -> "TableFormat":
        return cls(str(data["label_column"]), [str(f) for f in data["features"]],
                   [float(m) for m in data["mean"]], [float(s) for s in data["std"]])

    @classmethod
    def fit(cls, table: Table, label_column: str, features: Sequence[str], rows: np.ndarray | None = None) -> "TableFormat":
        """Standardisation statistics of ``features`` over ``rows`` (default: all rows)."""
        x = np.stack([numeric_column(table, f) for f in features], axis=1)
        if rows is not None:
            x = x[rows]
        std = x.std(axis=0)
        std[std < 1e-12] = 1.0  # a constant column stays constant rather than dividing by zero
        return cls(label_column, list(features), x.mean(axis=0).tolist(), std.tolist())

    def features_of(self, table: Table) -> torch.Tensor:
        """Standardised features ``[rows, F]`` of ``table``, its columns matched by name."""
        missing = [f for f in self.features if f not in table.columns]
        if missing:
            raise DataError(f"table {table.path} lacks {len(missing)} of the {len(self.features)} "
                            f"feature columns the model was trained on (e.g. {missing[0]!r})")
        x = np.stack([numeric_column(table, f) for f in self.features], axis=1)
        x = (x - np.asarray(self.mean)) / np.asarray(self.std)
        return torch.from_numpy(x.astype(np.float32))

    def labels_of(self, table: Table) -> list[str] | None:
        """The label column's values, or None when the table has no such column."""
        if self.label_column not in table.columns:
            return None
        labels = [str(v) for v in table.columns[self.label_column]]
        empty = [i for i, v in enumerate(labels) if not v.strip()]
        if empty:
            raise DataError(f"{table.path} {table.row_name(empty[0])} has no label in column "
                            f"{self.label_column!r}{f' (and {len(empty) - 1} more rows)' if len(empty) > 1 else ''}; "
                            f"label them or drop them")
        return labels


class TableDataset(FewShotDataset):
    """Rows of a table as examples ``[F]`` (float32, standardised), grouped by their label.

    Args:
        table: a :class:`Table` or the path of a CSV/Parquet file.
        label_column: the column of class names (default: the first of ``LABEL_COLUMNS`` found).
        feature_columns: the feature columns (default: every other column; all must be numeric).
        table_format: reuse these columns and statistics (default: fit them on all rows; the
            registered ``table`` dataset fits them on the meta-training classes only).
    """

    def __init__(self, table: Table | str | os.PathLike, label_column: str | None = None,
                 feature_columns: Sequence[str] | None = None, table_format: TableFormat | None = None):
        if not isinstance(table, Table):
            table = read_table(table)
        self.table = table
        if table_format is None:
            label_column = find_label_column(table, label_column)
            features = list(feature_columns) if feature_columns else [c for c in table.names if c != label_column]
            features = check_feature_columns(table, label_column, features)
            table_format = TableFormat.fit(table, label_column, features)
        self.table_format = table_format
        self.x = table_format.features_of(table)
        self.duplicates = warn_duplicates(table, self.x.numpy())
        labels = table_format.labels_of(table)
        if labels is None:
            raise DataError(f"table {table.path} has no label column {table_format.label_column!r}")
        self.class_names = sorted(set(labels), key=natural_key)
        index = {name: c for c, name in enumerate(self.class_names)}
        self.labels = np.array([index[v] for v in labels], dtype=np.int64)
        self._examples = [np.flatnonzero(self.labels == c) for c in range(len(self.class_names))]

    def class_examples(self) -> Sequence[np.ndarray]:
        return self._examples

    def load(self, indices: np.ndarray) -> torch.Tensor:
        return self.x[torch.as_tensor(np.asarray(indices, dtype=np.int64))]

    def checkpoint_extra(self) -> dict:
        return {"table_format": self.table_format.to_dict()}

    def __repr__(self) -> str:
        return (f"TableDataset({str(self.table.path)!r}, classes={self.num_classes}, rows={len(self)}, "
                f"features={len(self.table_format.features)})")
