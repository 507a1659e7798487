"""The standard intent-detection setting: every intent at once, a few labelled utterances each.

Intent-detection papers (Casanueva et al. 2020 on BANKING77 and CLINC150, and those after them)
do not draw 5-way episodes: a detector is given ``K`` (10, or 30) labelled utterances of *every*
intent from the released training set and tested on the whole released test set. Each seed draws
another support set; the figure is the mean test accuracy over seeds, with a 95% confidence
interval from Student's t (a handful of seeds is too few for the normal approximation).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from kshot.data.base import FewShotDataset
from kshot.errors import ConfigError
from kshot.learners.base import Learner
from kshot.text.data import released_task

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom.
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)


def t_interval(values: Sequence[float] | np.ndarray) -> float:
    """Half-width of the 95% confidence interval of the mean of ``values`` (Student's t)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float("nan")
    t = _T95[len(values) - 2] if len(values) - 1 <= len(_T95) else 1.96
    return float(t * values.std(ddof=1) / math.sqrt(len(values)))


@dataclass
class IntentResult:
    """Test accuracy of each seed's support set, and the seconds adaptation and prediction took."""

    accuracies: np.ndarray
    seeds: list[int]
    ways: int
    shots: int
    queries: int
    adapt_seconds: np.ndarray = field(default_factory=lambda: np.zeros(0))
    predict_seconds: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def mean(self) -> float:
        return float(self.accuracies.mean())

    @property
    def ci95(self) -> float:
        return t_interval(self.accuracies)

    def summary(self) -> dict:
        return {"acc": self.mean, "acc_ci95": self.ci95, "seeds": list(self.seeds), "ways": self.ways,
                "shots": self.shots, "queries": self.queries, "per_seed": self.accuracies.tolist(),
                "adapt_seconds": float(self.adapt_seconds.mean()) if len(self.adapt_seconds) else None,
                "predict_seconds": float(self.predict_seconds.mean()) if len(self.predict_seconds) else None}

    def __str__(self) -> str:
        return (f"{100 * self.mean:.2f} ± {100 * self.ci95:.2f} % over {len(self.seeds)} seeds "
                f"({self.ways}-way {self.shots}-shot, {self.queries} test utterances)")


def evaluate_released(learner: Learner, data: FewShotDataset, shots: int, seeds: Sequence[int],
                      device: str | torch.device = "cpu", chunk: int = 1024,
                      progress: bool = False) -> IntentResult:
    """Adapt ``learner`` to each seed's support set (``shots`` per intent of the released
    training part of ``data``) and score it on the released test part.

    Times are of the learner alone: ``data`` holds the encoder's outputs already (cached).
    """
    if not seeds:
        raise ConfigError("the standard setting needs at least one seed")
    was_training = learner.training
    learner.eval().to(device)
    accs, adapt_s, predict_s = [], [], []
    queries = 0
    try:
        for seed in tqdm(list(seeds), desc=f"{data.num_classes}-way {shots}-shot", disable=not progress,
                         leave=False):
            task = released_task(data, shots, seed)
            support_x = data.load(task.support).to(device)
            support_y = torch.as_tensor(task.support_y).to(device)
            t0 = time.perf_counter()
            with torch.no_grad():  # learners that take gradient steps turn them on themselves
                predictor = learner.adapt(support_x, support_y, data.num_classes)
            t1 = time.perf_counter()
            correct = 0
            with torch.no_grad():
                for start in range(0, len(task.query), chunk):
                    rows = task.query[start:start + chunk]
                    predicted = predictor.logits(data.load(rows).to(device)).argmax(-1).cpu().numpy()
                    correct += int((predicted == task.query_y[start:start + chunk]).sum())
            t2 = time.perf_counter()
            accs.append(correct / len(task.query))
            adapt_s.append(t1 - t0)
            predict_s.append(t2 - t1)
            queries = len(task.query)
    finally:
        learner.train(was_training)
    return IntentResult(np.array(accs), [int(s) for s in seeds], data.num_classes, int(shots), queries,
                        np.array(adapt_s), np.array(predict_s))
