"""Training on a sample that may be poisoned: the trimmed second pass (what it gains: docs/BENCHMARKS.md)."""

from __future__ import annotations

import numpy as np
from conftest import SMALL

from dedefilter.training import scorer_of, train_model, train_trimmed


def test_a_trimmed_training_leaves_out_what_the_first_model_draws_worst_and_learns_from_the_rest(encoder,
                                                                                              fmnist_test):
    images, _ = fmnist_test
    sample = images[5000:6000]
    first, _ = train_model(encoder, sample, SMALL, log=lambda *_: None)
    model, record = train_trimmed(encoder, sample, SMALL, trim=0.05, log=lambda *_: None, first=first)
    scores = scorer_of(encoder, first, "cpu").score_array(sample, [f"aux-{i}" for i in range(1000)])
    n = record["n_trimmed"]  # at most 5% strictly above the cut, as every fraction in dedefilter is cut
    worst = np.argsort(-scores, kind="stable")[:n]
    assert record["trim"] == 0.05 and 45 <= n <= 50 and record["n_aux"] == 1000 - n
    assert record["own_error"] < float(np.median(scores[worst]))  # the second model's own error: kept images only
    again, _ = train_model(encoder, np.delete(sample, worst, axis=0), SMALL, log=lambda *_: None)
    assert all(np.array_equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(),
                                                    strict=True))
