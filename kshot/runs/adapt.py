"""Adapt a trained learner to a user's own classes, and predict: what ``kshot adapt`` does.

The checkpoint says how its training data was read (``extra["image_format"]`` for images,
``extra["table_format"]`` for tables), so a user's files are read the same way: images of any
format and size are converted to the model's channels and side, table columns are matched by
name and scaled with the training statistics. Then, for any learner::

    learner = kshot.load_learner("runs/quick")
    reader = InputReader.from_checkpoint("runs/quick")
    support = reader.read_support("my_support/")            # one sub-folder per class
    model = AdaptedModel(learner, support.x, support.labels)  # learner.adapt(...) inside
    model.predict(reader.read_query("my_queries/").x)         # -> class names

:func:`adapt_and_predict` does all of it and returns :class:`Predictions` (written as CSV).
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from kshot.data.folders import read_labelled_images, read_query_images
from kshot.data.images import ImageFormat
from kshot.data.splits import natural_key
from kshot.data.tables import TableFormat, read_table
from kshot.errors import CheckpointError, ConfigError, DataError, DataWarning
from kshot.learners.base import Learner
from kshot.runs.build import learner_from_checkpoint
from kshot.text import TextInputFormat, frozen_text_learner, get_encoder
from kshot.services.files import atomic_write_text
from kshot.services.checkpoint import Checkpoint, load_checkpoint


@dataclass
class Inputs:
    """Examples read for adaptation or prediction. Shapes: ``x [n, ...]``.

    ``names`` identifies each example (a file path relative to the folder, or a table row
    number); ``labels`` holds class names, or None when the examples are unlabelled;
    ``inverted`` says of each image whether it had a light ground and was inverted for the model.
    """

    x: torch.Tensor
    names: list[str]
    labels: list[str] | None
    skipped: list[tuple[str, str]]
    kind: str  # "file" or "row"
    inverted: np.ndarray | None = None


class InputReader:
    """Reads a user's files the way a checkpoint's training data was read.

    Args:
        image_format: read folders of images in this format, or
        table_format: read CSV/Parquet tables with these columns and scaling, or
        text_format: read utterance files (CSV, or one per line) through a text encoder.
    """

    def __init__(self, image_format: ImageFormat | None = None, table_format: TableFormat | None = None,
                 text_format: TextInputFormat | None = None):
        if sum(f is not None for f in (image_format, table_format, text_format)) != 1:
            raise ValueError("give exactly one of image_format, table_format and text_format")
        self.image_format, self.table_format, self.text_format = image_format, table_format, text_format

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint | str | os.PathLike,
                        text_encoder: str | None = None) -> "InputReader":
        """The reader of a checkpoint's inputs (``text_encoder``: where its text encoder is now,
        if not where the checkpoint says; its files must be the same)."""
        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
        extra = ckpt.extra or {}
        if "text_encoder" in extra:
            return cls(text_format=TextInputFormat.from_record(extra["text_encoder"], text_encoder))
        try:
            if "image_format" in extra:
                return cls(image_format=ImageFormat.from_dict(extra["image_format"]))
            if "table_format" in extra:
                return cls(table_format=TableFormat.from_dict(extra["table_format"]))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"the checkpoint's record of its input format is malformed ({e})") from None
        dataset = (ckpt.config or {}).get("dataset", "unknown data")
        raise CheckpointError(f"the checkpoint (trained on {dataset}) records neither an image format "
                              f"nor table columns, so kshot cannot tell how to read new inputs for it; "
                              f"retrain it with this version of kshot")

    @property
    def input_shape(self) -> tuple[int, ...]:
        if self.text_format is not None:
            return self.text_format.shape
        if self.image_format is not None:
            return self.image_format.shape
        return (len(self.table_format.features),)  # type: ignore[union-attr]

    def describe(self) -> str:
        if self.text_format is not None:
            return self.text_format.describe()
        if self.image_format is not None:
            f = self.image_format
            return (f"{'grey' if f.channels == 1 else 'colour'} {f.size}x{f.size} images"
                    f"{', light strokes on a dark ground (images with a light ground inverted)' if f.invert else ''}")
        return f"table rows of {len(self.table_format.features)} features"  # type: ignore[union-attr]

    def _check_kind(self, path: Path, what: str) -> None:
        if self.image_format is not None and path.is_file() and what == "support":
            raise DataError(f"--support {path} is a file, but support images need their class: give a "
                            f"folder with one sub-folder of images per class")
        if self.table_format is not None and path.is_dir():
            raise DataError(f"--{what} {path} is a folder, but this checkpoint was trained on a table: "
                            f"give a CSV or Parquet file with the columns it was trained on")

    def read_support(self, path: str | os.PathLike, shots: int | None = None) -> Inputs:
        """Labelled examples: a folder of class sub-folders, or a table with the label column.

        Args:
            shots: keep the first ``shots`` examples of each class (a class with fewer is an error).
        """
        path = Path(path).expanduser()
        if self.text_format is not None:
            inputs = self._read_text(path, "support")
            return take_shots(inputs, shots, path) if shots else inputs
        self._check_kind(path, "support")
        if self.image_format is not None:
            images = read_labelled_images(path, self.image_format)
            inputs = Inputs(images.x, images.files, images.labels, images.skipped, "file", images.inverted)
        else:
            inputs = self._read_table(path, "support")
            if inputs.labels is None:
                raise DataError(f"support table {path} has no label column "
                                f"{self.table_format.label_column!r}")  # type: ignore[union-attr]
        return take_shots(inputs, shots, path) if shots else inputs

    def read_query(self, path: str | os.PathLike | Sequence[str | os.PathLike]) -> Inputs:
        """Examples to classify: a folder of loose images or class sub-folders, image files (one,
        or a list), or a table (label column optional)."""
        if not isinstance(path, (str, os.PathLike)):
            paths = [Path(p) for p in path]
            if len(paths) != 1:
                if self.image_format is None:
                    raise DataError("give one query table")
                images = read_query_images(paths, self.image_format)
                return Inputs(images.x, images.files, images.labels, images.skipped, "file", images.inverted)
            path = paths[0]
        path = Path(path).expanduser()
        if self.text_format is not None:
            return self._read_text(path, "query")
        self._check_kind(path, "query")
        if self.image_format is not None:
            images = read_query_images(path, self.image_format)
            return Inputs(images.x, images.files, images.labels, images.skipped, "file", images.inverted)
        return self._read_table(path, "query")

    def _read_text(self, path: Path, what: str) -> Inputs:
        x, utterances = self.text_format.read(path, what)  # type: ignore[union-attr]
        return Inputs(x, utterances.names, utterances.labels, utterances.skipped, "row")

    def _read_table(self, path: Path, what: str) -> Inputs:
        if not path.exists():
            raise DataError(f"{what} table {path} not found")
        table = read_table(path)
        fmt = self.table_format
        assert fmt is not None
        # Rows are named by their number, counted from 1 after the header, as in kshot's errors.
        return Inputs(fmt.features_of(table), [str(i + 1) for i in range(len(table))],
                      fmt.labels_of(table), [], "row")


def take_shots(inputs: Inputs, shots: int, where: Path) -> Inputs:
    """The first ``shots`` examples of each class, in name order."""
    assert inputs.labels is not None
    counts: dict[str, int] = {}
    for label in inputs.labels:
        counts[label] = counts.get(label, 0) + 1
    short = sorted((n for n, c in counts.items() if c < shots), key=natural_key)
    if short:
        raise DataError(f"--shots {shots}: class {short[0]!r} in {where} has only {counts[short[0]]} "
                        f"readable examples{f' (and {len(short) - 1} more classes are short)' if len(short) > 1 else ''}; "
                        f"add examples or lower --shots")
    seen: dict[str, int] = {}
    keep = []
    for i, label in enumerate(inputs.labels):
        seen[label] = seen.get(label, 0) + 1
        if seen[label] <= shots:
            keep.append(i)
    return Inputs(inputs.x[keep], [inputs.names[i] for i in keep], [inputs.labels[i] for i in keep],
                  inputs.skipped, inputs.kind, None if inputs.inverted is None else inputs.inverted[keep])


class AdaptedModel:
    """A learner adapted to a support set of named classes.

    Predictions are non-transductive whatever protocol the learner was trained with: each
    query's probabilities depend on the support set and that query alone, never on the other
    files or on ``batch_size`` (learners with batch norm on the batch normalise queries by the
    support set's statistics).

    Args:
        learner: any trained :class:`~kshot.learners.Learner`.
        support_x: support examples ``[n, ...]``.
        support_labels: the class name of each support example; classes are numbered in
            natural order of their names.
        device: where to compute.
        batch_size: query examples per forward pass.
    """

    def __init__(self, learner: Learner, support_x: torch.Tensor, support_labels: Sequence[str],
                 device: str | torch.device = "cpu", batch_size: int = 256):
        if len(support_x) != len(support_labels):
            raise DataError(f"{len(support_x)} support examples but {len(support_labels)} labels")
        if len(support_x) == 0:
            raise DataError("the support set is empty")
        self.class_names = sorted(set(support_labels), key=natural_key)
        index = {name: c for c, name in enumerate(self.class_names)}
        self.input_shape = tuple(support_x.shape[1:])
        self.device, self.batch_size = torch.device(device), int(batch_size)
        self.learner = learner.to(self.device).eval()
        support_y = torch.tensor([index[n] for n in support_labels], dtype=torch.int64)
        self.support_counts = {n: int((support_y == c).sum()) for c, n in enumerate(self.class_names)}
        # Learners that adapt by gradient steps turn gradients on themselves.
        with torch.no_grad(), self.learner.inference(transductive=False):
            self.predictor = self.learner.adapt(support_x.to(self.device), support_y.to(self.device),
                                                len(self.class_names))

    @property
    def ways(self) -> int:
        return len(self.class_names)

    def _check(self, x: torch.Tensor) -> None:
        if tuple(x.shape[1:]) != self.input_shape:
            raise DataError(f"query examples have shape {tuple(x.shape[1:])} but the model was "
                            f"adapted to examples of shape {self.input_shape}; read them with the "
                            f"same InputReader (it converts images to the model's format)")

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Probabilities ``[n, ways]`` over :attr:`class_names`."""
        self._check(x)
        out = []
        with torch.no_grad():
            for start in range(0, len(x), self.batch_size):
                batch = x[start:start + self.batch_size].to(self.device)
                probabilities = self.predictor.predict_proba(batch).float().cpu()
                if probabilities.shape[-1] != self.ways:  # never a row that does not fit the header
                    raise ConfigError(f"{self.learner.algo} scored {probabilities.shape[-1]} classes for a support "
                                      f"set of {self.ways}; this learner cannot adapt to {self.ways} classes")
                out.append(probabilities)
        return torch.cat(out) if out else torch.zeros(0, self.ways)

    def predict(self, x: torch.Tensor) -> list[str]:
        """The predicted class name of each example."""
        return [self.class_names[i] for i in self.predict_proba(x).argmax(-1).tolist()]


@dataclass
class Predictions:
    """One row per query example: its name, predicted class, and each class's probability."""

    names: list[str]
    class_names: list[str]
    probabilities: np.ndarray  # [n, ways]
    true_labels: list[str] | None
    kind: str = "file"
    inverted: np.ndarray | None = None  # per query image: inverted for the model (light ground)

    @property
    def predicted(self) -> list[str]:
        return [self.class_names[i] for i in self.probabilities.argmax(-1)]

    @property
    def correct(self) -> int | None:
        if self.true_labels is None:
            return None
        return sum(p == t for p, t in zip(self.predicted, self.true_labels))

    @property
    def accuracy(self) -> float | None:
        correct = self.correct
        return None if correct is None else correct / max(len(self.names), 1)

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        header = [self.kind, "predicted"] + (["true"] if self.true_labels is not None else [])
        writer.writerow(header + [f"p({name})" for name in self.class_names])
        for i, name in enumerate(self.names):
            row = [name, self.class_names[int(self.probabilities[i].argmax())]]
            if self.true_labels is not None:
                row.append(self.true_labels[i])
            writer.writerow(row + [f"{p:.6f}" for p in self.probabilities[i]])
        return out.getvalue()

    def write_csv(self, path: str | os.PathLike) -> Path:
        """Write the CSV atomically: the file appears whole or not at all."""
        path = Path(path)
        if path.is_dir():
            raise DataError(f"--out {path} is a folder; give a file name such as {path / 'predictions.csv'}")
        try:
            atomic_write_text(path, self.to_csv())
        except OSError as e:
            raise DataError(f"cannot write the predictions to {path} ({e.strerror or e})") from None
        return path


def warn_query_copies(support: Inputs, query: Inputs) -> int:
    """Warn, counting them, about query examples that are exact copies of support examples (the
    same file twice, a table row repeated): predicting them says nothing about new inputs."""
    index = {}
    for name, row in zip(support.names, support.x.reshape(len(support.x), -1).numpy()):
        index.setdefault(row.tobytes(), name)
    copies = [(name, index[row.tobytes()]) for name, row in zip(query.names, query.x.reshape(len(query.x), -1).numpy())
              if row.tobytes() in index]
    if copies:
        what = "rows" if query.kind == "row" else "images"
        shown = "; ".join(f"{query.kind} {q} = support {query.kind} {s}" for q, s in copies[:3])
        more = f"; and {len(copies) - 3} more" if len(copies) > 3 else ""
        warnings.warn(f"{len(copies)} of the {len(query.names)} query {what} are exact copies of support "
                      f"{what} ({shown}{more}); their predictions (and accuracy) say little about new "
                      f"inputs", DataWarning, stacklevel=3)
    return len(copies)


def adapt_and_predict(checkpoint: str | os.PathLike | None, support: str | os.PathLike,
                      query: str | os.PathLike | Sequence[str | os.PathLike],
                      shots: int | None = None, device: str | torch.device = "cpu",
                      batch_size: int = 256, text_encoder: str | None = None,
                      algo: str = "protonet") -> tuple[AdaptedModel, Inputs, Predictions]:
    """Adapt the checkpoint's learner to ``support`` and classify ``query``.

    Without a checkpoint, ``text_encoder`` (a Hugging Face model folder or hub name) classifies
    utterances with nothing trained: ``algo`` ``protonet`` (cosine prototypes of the frozen
    sentence embeddings) or ``finetune`` (a logistic-regression head fitted on them).

    Returns:
        (the adapted model, the support inputs, the predictions for the query examples)
    """
    if checkpoint is None:
        if not text_encoder:
            raise ConfigError("give a checkpoint, or --text-encoder to classify utterances with a "
                              "pre-trained encoder and no training")
        reader = InputReader(text_format=TextInputFormat(get_encoder(text_encoder)))
        learner = frozen_text_learner(algo)
    else:
        ckpt = load_checkpoint(checkpoint)
        learner = learner_from_checkpoint(ckpt)  # checks the checkpoint's records before reading inputs by them
        reader = InputReader.from_checkpoint(ckpt, text_encoder)
    support_in = reader.read_support(support, shots)
    query_in = reader.read_query(query)
    warn_query_copies(support_in, query_in)
    model = AdaptedModel(learner, support_in.x, support_in.labels or [], device, batch_size)
    if query_in.labels is not None:
        unknown = sorted(set(query_in.labels) - set(model.class_names), key=natural_key)
        if unknown:
            raise DataError(f"query class {unknown[0]!r} is not one of the support classes "
                            f"({', '.join(model.class_names[:6])}{', ...' if model.ways > 6 else ''}); "
                            f"name the query sub-folders after support classes")
    probabilities = model.predict_proba(query_in.x).numpy()
    return model, support_in, Predictions(query_in.names, model.class_names, probabilities,
                                          query_in.labels, query_in.kind, query_in.inverted)


@dataclass
class PolicyAdaptation:
    """What ``kshot adapt`` did for a policy: the task, the return before and after each step,
    and where the adapted policy was saved."""

    task: dict
    returns: list[float]
    path: Path | None

    @property
    def steps(self) -> int:
        return len(self.returns) - 1


def adapt_policy(checkpoint: str | os.PathLike, task: dict | str, *, steps: int | None = None,
                 episodes: int | None = None, seed: int = 0, out: str | os.PathLike | None = None) -> PolicyAdaptation:
    """Adapt a trained policy to one task of its environment family, and save the adapted policy.

    Args:
        checkpoint: a policy checkpoint (``kshot.rl``) or its run directory.
        task: the task parameter, a dict or its JSON (``{"goal": [0.3, -0.2]}`` for nav2d,
            ``{"velocity": 1.5}``, ``{"direction": -1}``).
        steps: policy-gradient steps (default: the checkpoint's test steps); each on
            ``episodes`` fresh episodes (default: the training number).
        seed: seed of the episodes' random draws.
        out: where to save the adapted policy (a checkpoint ``kshot eval`` and ``adapt`` read).

    Returns:
        The :class:`PolicyAdaptation`; its last return is measured on fresh episodes of the
        adapted policy.
    """
    import json

    from kshot.config import config_from_dict
    from kshot.errors import ConfigError
    from kshot.rl import POLICY_LEARNERS, env_family
    from kshot.services.checkpoint import save_checkpoint

    ckpt = load_checkpoint(checkpoint)
    if ckpt.learner.get("algo") not in POLICY_LEARNERS:
        raise ConfigError(f"{checkpoint} holds a {ckpt.learner.get('algo')!r} learner, not a policy; adapt it "
                          f"with --support and --query")
    if isinstance(task, str):
        try:
            task = json.loads(task)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--task must be JSON, like '{{\"goal\": [0.3, -0.2]}}' ({e.msg})") from None
    if steps is not None and (int(steps) != steps or steps < 1):
        raise ConfigError(f"--steps must be an integer >= 1, not {steps!r}")
    if episodes is not None and (int(episodes) != episodes or episodes < 1):
        raise ConfigError(f"--episodes must be an integer >= 1, not {episodes!r}")
    config = config_from_dict(ckpt.config)
    family = env_family(config.dataset, "test", horizon=config.horizon)
    env_task = family.user_task(task, seed=seed)  # type: ignore[arg-type]
    learner = learner_from_checkpoint(ckpt)
    adapted = learner.adapt(env_task, steps=steps, episodes=episodes)
    path = None
    if out is not None:
        learner.load_state_dict(adapted.state_dict())
        path = save_checkpoint(out, learner, config=ckpt.config,
                               extra={**ckpt.extra, "adapted_to": env_task.params, "adapted_steps": len(adapted.returns) - 1,
                                      "returns": adapted.returns, "adapted_from": str(checkpoint)})
    return PolicyAdaptation(env_task.params, adapted.returns, path)
