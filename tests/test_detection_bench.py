"""The detection benchmark's arithmetic on hand-made inputs (the full run is `python -m benchmarks.detection`)."""

from __future__ import annotations

import numpy as np
import torch

from benchmarks import detection_methods as methods
from benchmarks.detection import (
    BenchConfig,
    Stream,
    by_poison_share,
    detection_metrics,
    downstream,
)
from dedefilter.metrics import auprc, auroc


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


def test_residual_spectrum_finds_a_pattern_many_residuals_share():
    rng = np.random.default_rng(0)
    clean, reference = rng.normal(size=(400, 64)), rng.normal(size=(200, 64))
    pattern = np.zeros(64)
    pattern[:4] = 2.0  # a small trigger: a few pixels the decoder never draws, the same in every triggered image
    triggered = rng.normal(size=(80, 64)) + pattern
    stream_scores, reference_scores = methods.residual_spectrum(np.concatenate([clean, triggered]), reference, k=1)
    assert auroc(stream_scores, np.r_[np.zeros(400, bool), np.ones(80, bool)]) > 0.95
    assert np.mean(stream_scores[:400] > np.quantile(reference_scores, 0.99)) < 0.05  # calibrated on clean


def test_poison_share_streams_keep_every_clean_image_and_the_share_of_triggered():
    rng = np.random.default_rng(0)
    n_clean, n_triggered = 297, 60
    triggered = np.r_[np.zeros(n_clean, bool), np.ones(n_triggered, bool)]
    stream = Stream(torch.zeros(len(triggered), 3, 4, 4), [str(i) for i in range(len(triggered))], triggered,
                    rng.integers(0, 10, len(triggered)), torch.zeros(50, 3, 4, 4), [f"r{i}" for i in range(50)])

    def pair(dim: int) -> tuple[np.ndarray, np.ndarray]:  # (stream, reference) embeddings or residuals
        return rng.normal(size=(len(triggered), dim)).astype(np.float32), rng.normal(size=(50, dim)).astype(np.float32)

    scores = (rng.normal(size=len(triggered)) + 3 * triggered, rng.normal(size=50))
    shares = by_poison_share(scores, (rng.normal(size=len(triggered)), rng.normal(size=50)), pair(8), pair(16),
                             rng.integers(0, 10, len(triggered)), stream, 0, BenchConfig())
    assert {share: row["n_triggered"] for share, row in shares.items()} == {"1%": 3, "3%": 9}
    assert shares["3%"]["dede"]["auroc"] > 0.9  # the per-sample score still separates the few triggered ones
