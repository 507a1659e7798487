"""Verification: is a pair of examples of the same class? ROC curve, equal-error rate, AUC.

A verifier gives each pair a score (higher: more likely the same class) and calls a pair "same"
when the score reaches a threshold. Moving the threshold trades false accepts (different pairs
called same: the false-positive rate) against false rejects (same pairs called different: the
false-negative rate); the ROC curve is that trade-off, and the equal-error rate (EER) is where
the two rates are equal, the usual single figure of a verifier. The calibrated threshold is the
one at the EER point of held-out pairs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kshot.services.files import atomic_write_text
from kshot.errors import DataError


def roc_curve(scores, same) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ROC curve of a verifier that calls a pair same when ``score >= threshold``.

    Args:
        scores: ``[n]`` pair scores, higher meaning more likely the same class.
        same: ``[n]`` truth, 1 (or True) for same-class pairs.

    Returns:
        ``fpr``, ``tpr``, ``thresholds``, each ``[m + 1]`` for ``m`` distinct scores, from
        (0, 0) at threshold +inf down to (1, 1) at the lowest score.

    Raises:
        DataError: when the pairs are not all finite, or lack one of the two kinds.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    same = np.asarray(same).reshape(-1).astype(bool)
    if len(scores) != len(same):
        raise DataError(f"{len(scores)} scores but {len(same)} labels")
    if not np.isfinite(scores).all():
        raise DataError("verification scores must be finite (is the model diverged?)")
    n_same, n_diff = int(same.sum()), int((~same).sum())
    if n_same == 0 or n_diff == 0:
        raise DataError(f"an ROC curve needs same and different pairs; got {n_same} and {n_diff}")
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_same = scores[order], same[order]
    # The last position of each run of equal scores: one ROC point per distinct threshold.
    ends = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(scores) - 1]
    tp = np.cumsum(sorted_same)[ends]
    fp = (ends + 1) - tp
    fpr = np.r_[0.0, fp / n_diff]
    tpr = np.r_[0.0, tp / n_same]
    thresholds = np.r_[np.inf, sorted_scores[ends]]
    return fpr, tpr, thresholds


def area_under_curve(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Area under the ROC curve: the chance that a random same pair outscores a random
    different one (ties counting one half)."""
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def equal_error_rate(fpr: np.ndarray, tpr: np.ndarray, thresholds: np.ndarray) -> tuple[float, float]:
    """The equal-error rate and a threshold that operates at it.

    Returns:
        ``(eer, threshold)``: the rate where the ROC curve crosses FPR = FNR (interpolated
        between its two nearest points), and the threshold, between two observed scores, of
        the observed point closest to that crossing.
    """
    gap = fpr - (1 - tpr)  # rises from -1 at (0, 0) to +1 at (1, 1)
    i = int(np.argmax(gap >= 0))
    if i == 0:  # cannot happen for a curve from roc_curve, whose gap starts at -1
        return float(fpr[0]), float(thresholds[0])
    t = -gap[i - 1] / (gap[i] - gap[i - 1])
    eer = float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))
    k = i if abs(gap[i]) <= abs(gap[i - 1]) else i - 1
    # Point k calls same every score >= thresholds[k]; any value in the gap down to the next
    # lower score makes the same calls, and its middle is the safest choice for new pairs.
    if k == 0:
        return eer, float(thresholds[1] + 1.0)
    if k == len(thresholds) - 1:  # every pair called same: the lowest score itself will do
        return eer, float(thresholds[k])
    return eer, float((thresholds[k] + thresholds[k + 1]) / 2)


@dataclass
class VerificationReport:
    """ROC, EER and AUC of a verifier on held-out pairs, and the threshold calibrated on them.

    ``score`` names what the scores are (e.g. ``log-odds of same``), so the threshold can be read.
    """

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray
    eer: float
    threshold: float
    auc: float
    pairs: int
    score: str = "score"
    split: str = "val"
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_scores(cls, scores, same, score: str = "score", split: str = "val") -> "VerificationReport":
        fpr, tpr, thresholds = roc_curve(scores, same)
        eer, threshold = equal_error_rate(fpr, tpr, thresholds)
        return cls(fpr, tpr, thresholds, eer, threshold, area_under_curve(fpr, tpr),
                   len(np.asarray(scores).reshape(-1)), score, split)

    def accuracy(self, scores, same, threshold: float | None = None) -> float:
        """Fraction of pairs called right at ``threshold`` (default: the calibrated one)."""
        threshold = self.threshold if threshold is None else threshold
        called = np.asarray(scores, dtype=np.float64) >= threshold
        return float((called == np.asarray(same).astype(bool)).mean())

    def summary(self) -> dict:
        return {"split": self.split, "pairs": self.pairs, "eer": self.eer, "auc": self.auc,
                "threshold": self.threshold, "score": self.score, **self.extra}

    def write(self, run_dir: str | Path, name: str = "verification") -> None:
        """``<name>.json`` (the summary and the ROC points) and ``roc.png`` in ``run_dir``."""
        from kshot.services.plots import plot_roc

        run_dir = Path(run_dir)
        record = {**self.summary(), "roc": {"fpr": self.fpr.tolist(), "tpr": self.tpr.tolist()}}
        atomic_write_text(run_dir / f"{name}.json", json.dumps(record) + "\n")
        plot_roc({f"{self.split} pairs ({self.pairs})": self}, run_dir / "roc.png")

    def __str__(self) -> str:
        return (f"EER {100 * self.eer:.2f} %, AUC {self.auc:.4f} on {self.pairs} {self.split} pairs "
                f"(threshold {self.threshold:.4g}, {self.score})")
