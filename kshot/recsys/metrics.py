"""Rating and ranking metrics of one user's query set, and their means ± 95% CI over users.

For each test user (a task), with predicted ratings ``p`` and true ratings ``r`` of their query
items:

* ``mae = mean |p - r|`` and ``rmse = sqrt(mean (p - r)^2)``, per user;
* ``ndcg@k``: the query items ranked by predicted rating (highest first; ties keep the task's
  order), ``DCG@k = sum_{i=1..k} (2^{r_(i)} - 1) / log2(i + 1)`` with ``r_(i)`` the true rating of
  the item ranked i-th, divided by the DCG@k of the ideal ranking (by true rating). This is the
  exponential gain of MeLU and MAMO (Dong et al., KDD 2020).

Every user weighs the same: figures are means over users of per-user values, and the interval
is ``1.96 * std / sqrt(n_users)`` (as kshot reports accuracies over tasks). Predictions are
clipped to the rating scale [1, 5] before scoring, for every method alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

METRICS = ("mae", "rmse", "ndcg@3", "ndcg@5")
#: Lower is better for these; higher for the others.
ERRORS = ("mae", "rmse")
RATING_SCALE = (1.0, 5.0)


def dcg(ratings: np.ndarray, k: int) -> float:
    """Discounted cumulative gain of the first ``k`` ``ratings`` in ranked order."""
    top = np.asarray(ratings, dtype=np.float64)[:k]
    return float(((2.0 ** top - 1) / np.log2(np.arange(2, len(top) + 2))).sum())


def ndcg(predicted: np.ndarray, true: np.ndarray, k: int) -> float:
    """nDCG@k of ranking the items by ``predicted`` (ties keep their order), graded by ``true``."""
    predicted, true = np.asarray(predicted, dtype=np.float64), np.asarray(true, dtype=np.float64)
    ideal = dcg(np.sort(true)[::-1], k)
    if ideal == 0:
        return float("nan")
    order = np.argsort(-predicted, kind="stable")
    return dcg(true[order], k) / ideal


def user_metrics(predicted: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """MAE, RMSE, nDCG@3 and nDCG@5 of one user's query predictions (clipped to 1-5)."""
    predicted = np.clip(np.asarray(predicted, dtype=np.float64).reshape(-1), *RATING_SCALE)
    true = np.asarray(true, dtype=np.float64).reshape(-1)
    if predicted.shape != true.shape or not len(true):
        raise ValueError(f"{len(predicted)} predictions for {len(true)} query ratings")
    error = predicted - true
    return {"mae": float(np.abs(error).mean()), "rmse": float(np.sqrt((error ** 2).mean())),
            "ndcg@3": ndcg(predicted, true, 3), "ndcg@5": ndcg(predicted, true, 5)}


def ci95(values: Sequence[float] | np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if len(values) < 2:
        return float("nan")
    return float(1.96 * values.std(ddof=1) / math.sqrt(len(values)))


@dataclass
class RatingScores:
    """Per-user metrics of one method on a set of users.

    Attributes:
        users: the users' ids in the release ``[n]``.
        n_ratings: each user's number of ratings ``[n]``.
        values: metric name -> per-user values ``[n]``.
    """

    users: np.ndarray
    n_ratings: np.ndarray
    values: dict[str, np.ndarray]

    @property
    def n_users(self) -> int:
        return len(self.users)

    def mean(self, metric: str) -> float:
        return float(np.nanmean(self.values[metric]))

    def ci95(self, metric: str) -> float:
        return ci95(self.values[metric])

    def subset(self, mask: np.ndarray) -> "RatingScores":
        return RatingScores(self.users[mask], self.n_ratings[mask], {k: v[mask] for k, v in self.values.items()})

    def summary(self) -> dict:
        out: dict = {"users": self.n_users}
        for metric in self.values:
            out[metric] = self.mean(metric)
            out[f"{metric}_ci95"] = self.ci95(metric)
        return out

    def difference(self, other: "RatingScores", metric: str) -> tuple[float, float]:
        """Mean and 95% CI of ``self - other`` over the same users (a paired comparison)."""
        if not np.array_equal(self.users, other.users):
            raise ValueError("a paired difference needs the same users in the same order")
        diff = self.values[metric] - other.values[metric]
        return float(np.nanmean(diff)), ci95(diff)

    def cell(self, metric: str, digits: int = 4) -> str:
        return f"{self.mean(metric):.{digits}f} ± {self.ci95(metric):.{digits}f}"
