"""Evaluation on fixed tasks: accuracy as mean ± 95% confidence interval over tasks.

The interval is the normal approximation used throughout the few-shot literature,
``1.96 * std(task accuracies) / sqrt(n_tasks)``: over 600+ tasks it is accurate, and papers
report it so, which makes figures comparable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from kshot.learners.base import Learner
from kshot.tasks import Task


@dataclass
class EvalResult:
    """Per-task accuracies (and losses) and their summary.

    For regression tasks the accuracies are NaN and the loss (MSE) is the figure to report.
    ``metrics`` holds further per-task values (e.g. losses at each inner step of a
    gradient-based learner), summarised by their means.
    """

    accuracies: np.ndarray
    losses: np.ndarray
    metrics: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n_tasks(self) -> int:
        return len(self.accuracies)

    @property
    def mean(self) -> float:
        return float(self.accuracies.mean())

    @property
    def ci95(self) -> float:
        return confidence_interval(self.accuracies)

    @property
    def loss(self) -> float:
        return float(self.losses.mean())

    @property
    def loss_ci95(self) -> float:
        return confidence_interval(self.losses)

    @property
    def is_regression(self) -> bool:
        return bool(np.isnan(self.accuracies).all()) and self.n_tasks > 0

    def summary(self) -> dict:
        return {"acc": self.mean, "acc_ci95": self.ci95, "loss": self.loss, "loss_ci95": self.loss_ci95,
                "tasks": self.n_tasks, **{k: float(np.mean(v)) for k, v in self.metrics.items()}}

    def __str__(self) -> str:
        if self.is_regression:
            return f"MSE {self.loss:.4f} ± {self.loss_ci95:.4f} over {self.n_tasks} tasks"
        return f"{100 * self.mean:.2f} ± {100 * self.ci95:.2f} % over {self.n_tasks} tasks"


def confidence_interval(values: Sequence[float] | np.ndarray, z: float = 1.96) -> float:
    """Half-width of the 95% confidence interval of the mean of ``values``."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float("nan")
    return float(z * values.std(ddof=1) / math.sqrt(len(values)))


def evaluate(learner: Learner, tasks: Iterable[Task], device: str | torch.device = "cpu",
             progress: bool = False, desc: str = "evaluating", trace: bool = False) -> EvalResult:
    """Adapt ``learner`` to each task's support set and score it on the task's queries.

    The learner is put in eval mode for the duration (batch norm uses its running statistics
    where it keeps them) and restored afterwards. With ``trace``, predictors that can say how
    adaptation went (gradient-based learners: support and query loss at each inner step) add
    those figures to the result's ``metrics``.
    """
    was_training = learner.training
    learner.eval()
    accs, losses = [], []
    traced: dict[str, list[float]] = {}
    total = len(tasks) if hasattr(tasks, "__len__") else None  # type: ignore[arg-type]
    try:
        for task in tqdm(tasks, total=total, desc=desc, disable=not progress, leave=False):
            task = task.to(device)
            with torch.no_grad():
                # adapt() enables gradients itself where it needs them (gradient-based learners).
                predictor = learner.adapt(task.support_x, task.support_y, task.ways)
                logits = predictor.logits(task.query_x)
                losses.append(learner.query_loss(logits, task.query_y).item())
                accs.append(learner.query_accuracy(logits, task.query_y))
                if trace and hasattr(predictor, "trace"):
                    for k, v in predictor.trace(task.query_x, task.query_y).items():
                        traced.setdefault(k, []).append(v)
    finally:
        learner.train(was_training)
    return EvalResult(np.array(accs, dtype=np.float64), np.array(losses),
                      {k: np.array(v) for k, v in traced.items() if len(v) == len(losses)})
