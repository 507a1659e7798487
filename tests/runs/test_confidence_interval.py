"""The reported interval is the normal-approximation 95% confidence interval of the mean,
checked against Python's own statistics module (no NumPy, no kshot)."""

from __future__ import annotations

import math
import random
import statistics

import numpy as np
import pytest

from kshot.runs.evaluate import EvalResult, confidence_interval


def independent_ci95(values: list[float]) -> float:
    """z_{0.975} * sample standard deviation / sqrt(n), from the standard library alone."""
    z = statistics.NormalDist().inv_cdf(0.975)  # 1.95996...
    return z * statistics.stdev(values) / math.sqrt(len(values))


@pytest.mark.parametrize("n", [2, 7, 600, 1000])
def test_confidence_interval_matches_an_independent_computation(n):
    rng = random.Random(n)
    values = [rng.random() < 0.8 for _ in range(n)] if n >= 600 else [rng.uniform(0, 1) for _ in range(n)]
    values = [float(v) for v in values]
    ours = confidence_interval(values)
    # kshot rounds z to 1.96, as the few-shot literature does: a relative difference of 2e-5.
    assert ours == pytest.approx(independent_ci95(values), rel=5e-5)
    result = EvalResult(np.array(values), np.array(values))
    assert result.ci95 == ours and result.loss_ci95 == ours
    assert result.mean == pytest.approx(statistics.fmean(values), abs=1e-12)


def test_known_values():
    # Accuracies 0.5 and 1.0: sample sd = sqrt(0.125), so the half-width is 1.96 * 0.3536 / sqrt(2).
    assert confidence_interval([0.5, 1.0]) == pytest.approx(1.96 * math.sqrt(0.125) / math.sqrt(2), rel=1e-12)
    assert confidence_interval([0.7] * 600) == 0.0
    assert math.isnan(confidence_interval([0.7]))
