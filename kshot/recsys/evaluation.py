"""Scoring rating predictors on fixed user tasks: per-user metrics, the users with the fewest
ratings apart, and the table that compares methods on the same users.

A *rating predictor* is any function ``task -> predicted ratings of its query items [q]``; it may
use the task's support ratings (a learner adapting, a matrix factorisation fitted with them) but
never its query ratings. :func:`adapted_predictor` makes one of a kshot learner: ``adapt`` on
the support set (through its inner loop), then predict the query items.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from kshot.learners.base import Learner
from kshot.recsys.metrics import ERRORS, METRICS, RatingScores, user_metrics
from kshot.recsys.users import RatingTask, UserTasks

RatingPredictor = Callable[[RatingTask], np.ndarray]
#: The users with the fewest ratings: this fraction of the evaluated users, reported apart.
FEWEST_FRACTION = 0.25


def adapted_predictor(learner: Learner, device: str | torch.device = "cpu") -> RatingPredictor:
    """Adapt ``learner`` to each task's support ratings, predict its query ratings."""
    def predict(task: RatingTask) -> np.ndarray:
        task = task.to(device)
        with torch.no_grad():  # gradient learners enable gradients for their inner loop themselves
            predictor = learner.adapt(task.support_x, task.support_y, 0)
            return predictor(task.query_x).reshape(-1).float().cpu().numpy()
    return predict


def score_users(predict: RatingPredictor, tasks: UserTasks, progress: bool = False,
                desc: str = "users") -> RatingScores:
    """Per-user metrics of ``predict`` on every task of ``tasks``."""
    values: dict[str, list[float]] = {m: [] for m in METRICS}
    for task in tqdm(tasks, total=len(tasks), desc=desc, disable=not progress, leave=False):
        predicted = np.asarray(predict(task)).reshape(-1)
        for name, value in user_metrics(predicted, task.query_y.reshape(-1).numpy()).items():
            values[name].append(value)
    ids = tasks.ratings.data.user_ids[tasks.users]
    return RatingScores(ids, tasks.rating_counts(), {k: np.array(v) for k, v in values.items()})


def fewest_ratings(scores: RatingScores, fraction: float = FEWEST_FRACTION) -> tuple[np.ndarray, int]:
    """Mask of the users with the fewest ratings (at most the ``fraction`` quantile of the
    users' rating counts), and that count."""
    threshold = int(np.quantile(scores.n_ratings, fraction, method="lower"))
    return scores.n_ratings <= threshold, threshold


@dataclass
class RatingReport:
    """Methods scored on the same users with the same support size.

    Attributes:
        shots: support ratings per user.
        scores: method name -> its per-user scores (all on the same users).
        description: which users, in words.
    """

    shots: int
    scores: dict[str, RatingScores] = field(default_factory=dict)
    description: str = ""

    def fewest(self) -> tuple[dict[str, RatingScores], int]:
        """Every method's scores on the users with the fewest ratings, and the count bound."""
        first = next(iter(self.scores.values()))
        mask, threshold = fewest_ratings(first)
        return {name: s.subset(mask) for name, s in self.scores.items()}, threshold

    def summary(self) -> dict:
        fewest, threshold = self.fewest()
        return {"shots": self.shots, "description": self.description,
                "all_users": {name: s.summary() for name, s in self.scores.items()},
                "fewest_ratings": {"max_ratings": threshold,
                                   **{name: s.summary() for name, s in fewest.items()}}}

    def lines(self) -> list[str]:
        """A plain-text table: one row per method, MAE, RMSE, nDCG@3, nDCG@5 (± 95% CI)."""
        width = max([len(n) for n in self.scores] + [6])
        header = f"{'method':<{width}}  " + "  ".join(f"{m.upper():>15}" for m in METRICS)
        out = [header]
        fewest, threshold = self.fewest()
        groups = [("all users", self.scores), (f"users with at most {threshold} ratings", fewest)]
        for title, group in groups:
            n = next(iter(group.values())).n_users
            out.append(f"-- {title} ({n}) --")
            for name, s in group.items():
                out.append(f"{name:<{width}}  " + "  ".join(f"{s.cell(m):>15}" for m in METRICS))
        return out

    def __str__(self) -> str:
        return "\n".join(([self.description] if self.description else []) + self.lines())


def evaluate_rating_learner(learner: Learner, tasks: UserTasks, device: str | torch.device = "cpu",
                            progress: bool = False, name: str | None = None) -> RatingReport:
    """What ``kshot eval`` reports for a rating model: the learner adapted to each user."""
    was_training = learner.training
    learner.eval()
    try:
        scores = score_users(adapted_predictor(learner, device), tasks, progress=progress)
    finally:
        learner.train(was_training)
    return RatingReport(tasks.shots, {name or f"{learner.algo} (adapted)": scores}, tasks.describe())


def better(metric: str, a: float, b: float) -> bool:
    """Whether value ``a`` of ``metric`` is better than ``b``."""
    return a < b if metric in ERRORS else a > b
