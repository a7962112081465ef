"""Detection metrics on scores where higher means more suspect (numpy only, ties handled)."""

from __future__ import annotations

import numpy as np


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a random positive > score of a random negative), ties 1/2."""
    scores = np.asarray(scores, np.float64)
    positive = np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs both positive and negative samples")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores))
    # average rank for ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts - 1) / 2 + 1
    ranks[order] = np.repeat(average, counts)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auprc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Average precision: the mean, over positives, of the precision at that positive's rank (ties
    broken pessimistically: a tied negative ranks first)."""
    scores = np.asarray(scores, np.float64)
    positive = np.asarray(positive, bool)
    if not positive.any():
        raise ValueError("AUPRC needs positive samples")
    order = np.lexsort((positive, -scores))  # by descending score, negatives first among ties
    hits = positive[order]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].mean())


def tpr_at_fpr(scores: np.ndarray, positive: np.ndarray, fpr: float) -> float:
    """Share of positives above the threshold that lets at most ``fpr`` of the negatives through."""
    scores = np.asarray(scores, np.float64)
    positive = np.asarray(positive, bool)
    threshold = np.quantile(scores[~positive], 1 - fpr, method="higher")
    return float((scores[positive] > threshold).mean())


def rates_at_threshold(scores: np.ndarray, positive: np.ndarray, threshold: float) -> tuple[float, float]:
    """(true-positive rate, false-positive rate) of the rule ``score > threshold``."""
    flagged = np.asarray(scores) > threshold
    positive = np.asarray(positive, bool)
    return float(flagged[positive].mean()), float(flagged[~positive].mean())


def auroc_per_source_class(scores: np.ndarray, triggered: np.ndarray, labels: np.ndarray,
                           class_names: tuple[str, ...]) -> dict[str, float]:
    """AUROC of the triggered images of each source class against every clean image (rounded to 4 places):
    where a look-alike source class hides from the score."""
    scores, triggered, labels = np.asarray(scores), np.asarray(triggered, bool), np.asarray(labels)
    per_class = {}
    for c, name in enumerate(class_names):
        source = triggered & (labels == c)
        if source.any():
            keep = source | ~triggered
            per_class[name] = round(auroc(scores[keep], source[keep]), 4)
    return per_class
