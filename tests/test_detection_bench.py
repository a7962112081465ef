"""The detection sweep's arithmetic at toy size (the full run is `python -m benchmarks.detection`)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import detection_methods as methods
from benchmarks.detection import (
    METHODS,
    BenchConfig,
    baseline_scores,
    detector_rows,
    disjoint_classes,
    downstream,
    make_pool,
    make_stream,
    recall_at_budget,
)
from dedefilter.scoring import ScoredBatch
from dedefilter.window import WindowRule, calibrate_scored

ROW_FIELDS = {"attack", "share", "aux", "method", "auroc", "tpr_at_1fpr", "recall_at_2pct", "recall_at_10pct",
              "asr_after", "ca_after", "ca_before", "asr_before"}


class AddOne:
    """A stand-in trigger: every pixel + 1, so a triggered image is told apart by its pixels."""

    def apply(self, images: np.ndarray) -> np.ndarray:
        return images + 1


def toy_pool(n: int = 1000, target: int = 1, shares=(0.001, 0.01, 0.18)):
    rng = np.random.default_rng(0)
    labels = np.arange(2 * n) % 10
    images = rng.integers(0, 200, (2 * n, 2, 2, 3)).astype(np.uint8)
    return images, labels, make_pool(images, labels, AddOne(), target, ("all", "class-disjoint"), max(shares), n, 0)


def test_knn_density_ranks_a_collapsed_group_first():
    rng = np.random.default_rng(0)
    spread = rng.normal(size=(200, 16))
    collapsed = np.ones((20, 16)) + rng.normal(scale=0.01, size=(20, 16))
    density = methods.knn_density(np.concatenate([spread, collapsed]).astype(np.float32), k=5)
    assert set(np.argsort(-density)[:20]) == set(range(200, 220))


def test_downstream_counts_dropped_images_as_neither_correct_nor_successful():
    # four clean images (classes 0, 2, 3, 4) and two triggered ones (classes 2, 3), target class 1
    labels, triggered = np.array([0, 2, 3, 4, 2, 3]), np.array([False] * 4 + [True] * 2)
    predicted = np.array([0, 2, 9, 4, 1, 1])
    assert downstream(predicted, labels, triggered, target=1) == {"clean_accuracy": 0.75, "asr": 1.0,
                                                                  "dropped_triggered": 0.0, "dropped_clean": 0.0}
    kept = np.array([True, False, True, True, False, True])
    assert downstream(predicted, labels, triggered, target=1, kept=kept) == {
        "clean_accuracy": 0.5, "asr": 0.5, "dropped_triggered": 0.5, "dropped_clean": 0.25}


def test_streams_replace_a_nested_draw_in_place_and_keep_every_window():
    images, labels, pool = toy_pool()
    clean = make_stream(pool, "all", 0.0)
    assert not clean.triggered.any() and (clean.rows == np.arange(1000)).all()
    previous = set()
    for share, n in ((0.001, 1), (0.01, 10), (0.18, 180)):
        stream = make_stream(pool, "all", share)
        positions = np.flatnonzero(stream.triggered)
        assert len(positions) == n and previous <= set(positions)  # the draws are nested
        previous = set(positions)
        assert (stream.labels[positions] != 1).all()  # never the target class
        assert (stream.rows[~stream.triggered] == np.arange(1000)[~stream.triggered]).all()  # the rest stays put
        # a triggered row holds the triggered version of the image it replaced, with its source class
        assert (pool.images[stream.rows[positions]] == pool.images[positions] + 1).all()
        assert (pool.labels[stream.rows[positions]] == pool.labels[positions]).all()
    disjoint = make_stream(pool, "class-disjoint", 0.18)
    unseen = disjoint_classes(1)[1]
    assert disjoint_classes(1)[0] == [1, 2, 4, 7, 9] and unseen == [0, 3, 5, 6, 8]
    assert disjoint.triggered.sum() == 180 and np.isin(disjoint.labels[disjoint.triggered], unseen).all()
    assert len(pool.keys) == len(set(pool.keys)) == len(pool.images)  # every image scored once, under its own key


def test_recall_at_budget_counts_the_triggered_images_the_cut_removes():
    scores = np.arange(1001.0)
    triggered = np.zeros(1001, bool)
    triggered[[1000, 990, 975, 500]] = True
    assert recall_at_budget(scores, triggered, 0.02) == 0.5  # the top 20 (981 ... 1000) hold two
    assert recall_at_budget(scores, triggered, 0.10) == 0.75
    assert recall_at_budget(scores, triggered, 0.50) == 0.75  # 500 sits at the cut: kept


def test_detector_rows_score_every_stream_from_one_pool_scoring():
    _, _, pool = toy_pool()
    rng = np.random.default_rng(1)
    n_pool = len(pool.keys)
    # a planted attack: triggered images score high and share a direction in embedding and residual space
    paper = rng.normal(1.0, 0.1, n_pool) + 1.0 * pool.triggered
    embeddings = rng.normal(size=(n_pool, 8)) + 4.0 * pool.triggered[:, None]
    residuals = rng.normal(size=(n_pool, 16)) + 3.0 * pool.triggered[:, None]
    scored = ScoredBatch(paper.astype(np.float32), embeddings.astype(np.float32), residuals.astype(np.float32))
    rule = WindowRule(size=250)
    shares = (0.01, 0.18)
    streams = [make_stream(pool, "all", s) for s in shares]
    consistency = rng.normal(size=n_pool)
    baselines = {("all", s.share): baseline_scores(embeddings[s.rows], consistency[s.rows], rule.size)
                 for s in streams}
    clean = ScoredBatch(rng.normal(1.0, 0.1, 500).astype(np.float32), rng.normal(size=(500, 8)).astype(np.float32),
                        rng.normal(size=(500, 16)).astype(np.float32))  # clean reference images, scored
    clean_reference = {m: rng.normal(size=500) for m in METHODS} | {
        "shipped": calibrate_scored(clean, rule, fpr=0.01, own_error=1.0),
        "paper": calibrate_scored(clean, None, fpr=0.01), "reference_paper_scores": clean.scores}
    predicted = np.where(pool.triggered, 1, pool.labels)  # the backdoor always works, clean images always right
    config = BenchConfig(n_reference=500)

    rows = detector_rows("toy", "id-clean", scored, clean_reference, streams, baselines, predicted, 1, rule, config,
                         detector_error=1.0)
    assert len(rows) == len(shares) * len(METHODS) and all(ROW_FIELDS <= set(r) for r in rows)
    by = {(r["share"], r["method"]): r for r in rows}
    assert not by[0.18, "shipped"]["rule_off"] and by[0.18, "shipped"]["misfit"] == pytest.approx(1.0, abs=0.02)
    for share in shares:
        paper_row = by[share, "paper"]
        assert paper_row["auroc"] == 1.0
        assert paper_row["asr_before"] == 1.0 and paper_row["asr_after"] == 0.0  # every triggered image above 1% FPR
        assert paper_row["ca_before"] == 1.0 and paper_row["ca_after"] >= 0.97
        assert by[share, "knn-sparsity"]["n_triggered"] == round(share * 1000)
    assert by[0.01, "paper"]["recall_at_2pct"] == 1.0
    assert by[0.18, "paper"]["recall_at_2pct"] == pytest.approx(20 / 180, abs=0.01)  # a 2% budget holds 20 of 180
    assert by[0.18, "paper"]["recall_at_10pct"] == pytest.approx(100 / 180, abs=0.01)
    assert by[0.18, "knn-density"]["auroc"] > 0.99  # the planted group is dense in every window
    # the audit over the whole stream takes the planted group whole once it outnumbers the neighbours looked at
    assert by[0.18, "audit"]["separated_triggered"] == by[0.18, "audit"]["separated_rows"] == 180
    assert by[0.01, "audit"]["separated_rows"] == 0  # 10 images: each has a clean one among its 10 neighbours

    self_rows = detector_rows("toy", "self", scored, None, streams, baselines, predicted, 1, rule, config,
                              detector_error=1.0)
    assert len(self_rows) == len(rows) and all(r["self_trained_at"] == 0.01 for r in self_rows)
    # a decoder that draws the stream 4x worse than its own training images: calibration turns the rule off
    unfit = {(r["share"], r["method"]): r for r in detector_rows("toy", "self", scored, None, streams, baselines,
                                                                 predicted, 1, rule, config, detector_error=0.25)}
    for share in shares:
        assert unfit[share, "shipped"]["rule_off"] and unfit[share, "shipped"]["misfit"] > 3.9
        assert {k: v for k, v in unfit[share, "shipped"].items() if k in ROW_FIELDS - {"method"}} == \
            {k: v for k, v in unfit[share, "paper"].items() if k in ROW_FIELDS - {"method"}}  # shipped = paper
    for r in self_rows:  # a 2% budget on the stream's first 500 per-sample scores removes about 2% of the stream
        if r["method"] not in ("paper", "mask-consistency"):
            continue
        dropped = r["dropped_clean"] * (1000 - r["n_triggered"]) + r["dropped_triggered"] * r["n_triggered"]
        assert abs(dropped - 20) <= 12, r
