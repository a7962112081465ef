"""The detection benchmark's arithmetic on hand-made inputs (the full run is `python -m benchmarks.detection`)."""

from __future__ import annotations

import numpy as np
import torch

from benchmarks import detection_methods as methods
from benchmarks.detection import BenchConfig, Stream, detection_metrics, downstream
from dedefilter.metrics import auprc


def test_auprc_of_known_rankings():
    positive = np.array([True, False, True, False])
    assert auprc(np.array([4, 3, 2, 1]), positive) == (1 / 1 + 2 / 3) / 2
    assert auprc(np.array([1, 2, 3, 4]), positive) == (1 / 2 + 2 / 4) / 2
    assert auprc(np.array([1, 1, 1, 1]), positive) == (1 / 3 + 2 / 4) / 2  # ties: negatives first


def test_knn_density_ranks_a_collapsed_group_first():
    rng = np.random.default_rng(0)
    spread = rng.normal(size=(200, 16))
    collapsed = np.ones((20, 16)) + rng.normal(scale=0.01, size=(20, 16))
    density = methods.knn_density(np.concatenate([spread, collapsed]).astype(np.float32), k=5)
    assert set(np.argsort(-density)[:20]) == set(range(200, 220))


def stream_of(labels: np.ndarray, triggered: np.ndarray) -> Stream:
    return Stream(torch.zeros(len(labels), 3, 32, 32), [str(i) for i in range(len(labels))], triggered, labels,
                  torch.zeros(0, 3, 32, 32), [])


def test_downstream_counts_dropped_images_as_neither_correct_nor_successful():
    # four clean images (classes 0, 2, 3, 4) and two triggered ones (classes 2, 3), target class 1
    stream = stream_of(np.array([0, 2, 3, 4, 2, 3]), np.array([False] * 4 + [True] * 2))
    predicted = np.array([0, 2, 9, 4, 1, 1])
    assert downstream(predicted, stream, target=1) == {"clean_accuracy": 0.75, "asr": 1.0,
                                                       "dropped_triggered": 0.0, "dropped_clean": 0.0}
    kept = np.array([True, False, True, True, False, True])
    assert downstream(predicted, stream, target=1, kept=kept) == {"clean_accuracy": 0.5, "asr": 0.5,
                                                                  "dropped_triggered": 0.5, "dropped_clean": 0.25}


def test_detection_metrics_threshold_from_the_clean_reference():
    stream = stream_of(np.array([0, 0, 0, 0, 2, 3]), np.array([False] * 4 + [True] * 2))
    scores = np.array([0.1, 0.2, 0.3, 0.9, 0.8, 1.0])
    reference = np.linspace(0, 1, 101)  # threshold at 1% FPR: 0.99; at 20% FPR: 0.8
    metrics = detection_metrics(scores, reference, stream, BenchConfig(target_fpr=0.01, filter_fpr=0.2))
    assert metrics["auroc"] == 0.875
    assert metrics["threshold_tpr"] == 0.5 and metrics["threshold_fpr"] == 0.0
    assert metrics["per_class_auroc"] == {"Pullover": 0.75, "Dress": 1.0}
    assert metrics["_removed"].tolist() == [False, False, False, True, False, True]  # > 0.8


def test_neighbours_lift_an_attacks_quiet_members_above_a_loud_clean_outlier():
    rng = np.random.default_rng(0)
    clean, reference = (rng.normal(size=(n, 16)).astype(np.float32) - 1 for n in (200, 50))
    collapsed = (np.ones((20, 16)) + rng.normal(scale=0.01, size=(20, 16))).astype(np.float32)
    own = np.r_[rng.uniform(0, 1, 200), np.full(15, 3.0), np.full(5, 0.5)]  # five triggered images score low
    own[0] = 1.5  # a clean image that is just hard to reconstruct: alone, it outscores the quiet five
    stream_scores, reference_scores = methods.with_neighbours((own, rng.uniform(0, 1, 50)),
                                                              np.concatenate([clean, collapsed]), reference, k=10)
    assert (stream_scores[215:] > stream_scores[0]).all() and (stream_scores[215:] > reference_scores.max()).all()
