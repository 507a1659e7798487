"""ROC curve, AUC and equal-error rate against brute-force definitions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kshot.errors import DataError
from kshot.learners.verification import VerificationReport, area_under_curve, equal_error_rate, roc_curve


def _rates(scores, same, threshold):
    called = scores >= threshold
    return called[~same].mean(), called[same].mean()  # fpr, tpr


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_matches_the_definition_at_every_threshold(seed):
    rng = np.random.default_rng(seed)
    same = rng.random(300) < 0.4
    scores = np.round(rng.normal(same * 1.0, 1.0), 1)  # rounding makes ties
    fpr, tpr, thresholds = roc_curve(scores, same)
    assert len(thresholds) == len(np.unique(scores)) + 1
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert (np.diff(thresholds) < 0).all()
    for f, t, th in zip(fpr, tpr, thresholds):
        assert (f, t) == pytest.approx(_rates(scores, same, th))


def test_auc_is_the_chance_a_same_pair_outscores_a_different_one():
    rng = np.random.default_rng(4)
    same = rng.random(200) < 0.5
    scores = np.round(rng.normal(same * 0.8, 1.0), 1)
    pos, neg = scores[same], scores[~same]
    wins = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert area_under_curve(*roc_curve(scores, same)[:2]) == pytest.approx(wins)


def test_equal_error_rate_and_its_threshold():
    # Perfect separation: no errors at a threshold between the two groups.
    same = np.array([1, 1, 1, 0, 0, 0], dtype=bool)
    eer, threshold = equal_error_rate(*roc_curve([5, 4, 3, 2, 1, 0], same))
    assert eer == 0 and 2 < threshold < 3
    # Inverted scores: every decision is wrong at the crossing.
    assert equal_error_rate(*roc_curve([0, 1, 2, 3, 4, 5], same))[0] == pytest.approx(1.0)
    # One error of each kind among four pairs each: EER 1/4, reached exactly.
    scores = np.array([0.9, 0.8, 0.7, 0.3, 0.6, 0.2, 0.1, 0.05])
    same = np.array([1, 1, 1, 1, 0, 0, 0, 0], dtype=bool)
    eer, threshold = equal_error_rate(*roc_curve(scores, same))
    assert eer == pytest.approx(0.25)
    fpr, tpr = _rates(scores, same, threshold)
    assert fpr == pytest.approx(0.25) and 1 - tpr == pytest.approx(0.25)
    # Many random pairs: the calibrated threshold's two error rates straddle the EER closely.
    rng = np.random.default_rng(5)
    same = rng.random(4000) < 0.5
    scores = rng.normal(same * 1.5, 1.0)
    eer, threshold = equal_error_rate(*roc_curve(scores, same))
    fpr, tpr = _rates(scores, same, threshold)
    assert abs(fpr - eer) < 0.01 and abs((1 - tpr) - eer) < 0.01
    assert 0.2 < eer < 0.25  # two unit normals 1.5 apart cross at 0.75: Phi(-0.75) = 0.227


def test_bad_scores_are_refused():
    with pytest.raises(DataError, match="same and different"):
        roc_curve([1.0, 2.0], [1, 1])
    with pytest.raises(DataError, match="finite"):
        roc_curve([1.0, float("nan")], [1, 0])
    with pytest.raises(DataError, match="labels"):
        roc_curve([1.0, 2.0, 3.0], [1, 0])


def test_report_writes_its_summary_and_plot(tmp_path):
    rng = np.random.default_rng(6)
    same = rng.random(500) < 0.5
    scores = rng.normal(same * 2.0, 1.0)
    report = VerificationReport.from_scores(scores, same, score="log-odds of same")
    assert report.accuracy(scores, same) == pytest.approx(1 - report.eer, abs=0.02)
    report.write(tmp_path)
    record = json.loads((tmp_path / "verification.json").read_text())
    assert record["pairs"] == 500 and record["eer"] == pytest.approx(report.eer)
    assert len(record["roc"]["fpr"]) == len(report.fpr)
    assert (tmp_path / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "EER" in str(report)
