"""Metrics and thresholds on hand-made scores whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from dedefilter import fixed, for_contamination, for_false_positive_rate
from dedefilter.metrics import auroc, rates_at_threshold, tpr_at_fpr


def test_auroc_of_known_rankings():
    positive = np.array([0, 0, 0, 1, 1], bool)
    assert auroc(np.array([1, 2, 3, 4, 5]), positive) == 1.0
    assert auroc(np.array([5, 4, 3, 2, 1]), positive) == 0.0
    assert auroc(np.array([1, 1, 1, 1, 1]), positive) == 0.5
    # positives at ranks 3 and 5 of 5: pairs won = (2 + 3) of 6
    assert auroc(np.array([1, 2, 4, 3, 5]), positive) == pytest.approx(5 / 6)


def test_tpr_at_fpr_and_rates():
    negatives = np.arange(100, dtype=float)  # 0..99
    positives = np.array([50.5, 98.5, 99.5, 120.0])
    scores = np.concatenate([negatives, positives])
    positive = np.r_[np.zeros(100, bool), np.ones(4, bool)]
    # 1% FPR: at most one negative above the threshold -> threshold 99 -> positives 99.5 and 120
    assert tpr_at_fpr(scores, positive, 0.01) == 0.5
    assert rates_at_threshold(scores, positive, 98.0) == (0.75, 0.01)


def test_thresholds_leave_the_promised_share_above():
    clean = np.arange(1000, dtype=float)
    by_fpr = for_false_positive_rate(clean, 0.01)
    assert (clean > by_fpr.value).mean() <= 0.01
    assert (clean > by_fpr.value).sum() == 9
    assert by_fpr.method == "fpr" and by_fpr.n_reference == 1000
    by_contamination = for_contamination(np.r_[clean, [np.nan]], 0.05)
    assert (clean > by_contamination.value).sum() == 49
    assert fixed(3.5).suspects(np.array([3.0, 3.5, 4.0])).tolist() == [False, False, True]


def test_threshold_arguments_are_checked():
    with pytest.raises(ValueError, match="fraction"):
        for_false_positive_rate(np.arange(10.0), 0.0)
    with pytest.raises(ValueError, match="no finite scores"):
        for_contamination(np.array([np.nan]), 0.1)
