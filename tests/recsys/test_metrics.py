"""Per-user rating and ranking metrics against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kshot.recsys.metrics import RatingScores, ndcg, user_metrics


def test_ndcg_by_hand():
    true = np.array([3.0, 5.0, 1.0, 4.0])
    predicted = np.array([4.0, 2.0, 3.0, 1.0])  # ranks items 0, 2, 1, 3
    dcg = (2**3 - 1) / math.log2(2) + (2**1 - 1) / math.log2(3) + (2**5 - 1) / math.log2(4)
    ideal = (2**5 - 1) / math.log2(2) + (2**4 - 1) / math.log2(3) + (2**3 - 1) / math.log2(4)
    assert ndcg(predicted, true, 3) == pytest.approx(dcg / ideal)
    assert ndcg(true, true, 3) == 1.0 and ndcg(-true, true, 4) < ndcg(predicted, true, 4)
    # ties keep the task's order; k beyond the list is the whole list
    assert ndcg(np.zeros(2), np.array([1.0, 5.0]), 5) == pytest.approx(
        (1 + 31 / math.log2(3)) / (31 + 1 / math.log2(3)))


def test_errors_clip_to_the_rating_scale():
    m = user_metrics(np.array([6.0, 3.0, 0.0]), np.array([5.0, 4.0, 1.0]))
    assert m["mae"] == pytest.approx(1 / 3) and m["rmse"] == pytest.approx(math.sqrt(1 / 3))
    with pytest.raises(ValueError):
        user_metrics(np.ones(2), np.ones(3))


def test_scores_mean_ci_and_paired_difference():
    a = RatingScores(np.arange(4), np.array([20, 30, 40, 50]), {"mae": np.array([1.0, 0.5, 0.7, 0.9])})
    b = RatingScores(np.arange(4), np.array([20, 30, 40, 50]), {"mae": np.array([1.1, 0.6, 0.8, 1.0])})
    assert a.mean("mae") == pytest.approx(0.775)
    assert a.ci95("mae") == pytest.approx(1.96 * np.std([1.0, 0.5, 0.7, 0.9], ddof=1) / 2)
    diff, ci = a.difference(b, "mae")
    assert diff == pytest.approx(-0.1) and ci == pytest.approx(0.0, abs=1e-12)
    assert a.subset(a.n_ratings <= 30).values["mae"].tolist() == [1.0, 0.5]
