"""Thresholds: the score above which a sample is a suspect.

Three ways to pick one, each stored with how it was made (and on which score's scale: the paper score,
or the window score of :mod:`dedefilter.window`) so new data gets the same cut:
a target false-positive rate on clean reference scores, an expected contamination fraction of the
scored data itself, or a fixed value.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Threshold:
    value: float
    method: str  # "fpr", "contamination" or "fixed"
    parameter: float | None = None
    n_reference: int = 0
    precision: str | None = None  # the DeDe model's precision when the scores were computed; None: not measured
    scale: str | None = "paper"  # "paper": reconstruction errors; "window": window scores (z units); None: any

    def suspects(self, scores: np.ndarray) -> np.ndarray:
        return scores > self.value

    def to_dict(self) -> dict:
        return asdict(self)


def upper_quantile(scores: np.ndarray, fraction: float) -> float:
    """The cut that leaves at most ``fraction`` of the finite scores strictly above it (``score > cut``).

    The one fraction rule: ``calibrate --contamination``, the audit's sensitivity table and
    ``select --fraction`` all cut here, so the same fraction drops the same samples everywhere.
    """
    scores = np.asarray(scores, dtype=np.float64)
    scores = scores[np.isfinite(scores)]
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    if scores.size == 0:
        raise ValueError("no finite scores to calibrate on")
    # the value that leaves at most `fraction` of the scores strictly above it
    return float(np.quantile(scores, 1 - fraction, method="higher"))


def for_false_positive_rate(clean_scores: np.ndarray, fpr: float, scale: str = "paper") -> Threshold:
    """At most ``fpr`` of the clean reference scores exceed the threshold."""
    return Threshold(upper_quantile(clean_scores, fpr), "fpr", fpr, int(np.size(clean_scores)), scale=scale)


def for_contamination(scores: np.ndarray, fraction: float, scale: str = "paper") -> Threshold:
    """Flag the top ``fraction`` of the given (possibly poisoned) scores."""
    return Threshold(upper_quantile(scores, fraction), "contamination", fraction, int(np.size(scores)), scale=scale)


def fixed(value: float, scale: str | None = None) -> Threshold:
    return Threshold(float(value), "fixed", scale=scale)
