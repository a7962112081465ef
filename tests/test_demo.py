"""The demo end to end at toy sizes: it must keep running, and every figure it reports must be what its
Parquet rows and shard images say, scored as the library scores them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
from scipy.stats import mannwhitneyu

from dedefilter import Detector, Scorer, load_encoder
from dedefilter.data import decode_image
from dedefilter.demo import BACKDOORED, DemoConfig, run_demo
from dedefilter.shards import read_shard
from dedefilter.window import WindowRule, filter_scores


def shard_images(shard_dir: Path) -> dict[str, np.ndarray]:
    return {s["__key__"]: decode_image(s["png"], 32) for p in sorted(shard_dir.glob("*.tar"))
            for s in read_shard(str(p))}


def test_demo_reports_what_its_parquet_and_shards_hold(tmp_path, fmnist_test):
    config = DemoConfig(work_dir=str(tmp_path), results_path=str(tmp_path / "demo.json"),
                        n_test=400, n_aux=256, n_reference=200, epochs=1)
    results = run_demo(config, log=lambda *_: None)
    images = shard_images(tmp_path / "test-shards")
    # ground truth without replaying the demo's RNG: a triggered image differs from the original test image
    truth = {key for key, image in images.items() if (image != fmnist_test[0][int(key.rsplit("-", 1)[1])]).any()}
    assert len(images) == 400 and len(truth) == 20  # 5% of 400
    for name in ("backdoored", "clean"):
        figures = results[name]
        assert figures["detector"] == "trained"
        table = ds.dataset(figures["parquet"]).to_table(columns=["key", "score", "status", "threshold"])
        keys, scores = table["key"].to_pylist(), table["score"].to_numpy()
        positive = np.array([k in truth for k in keys])
        assert sorted(keys) == sorted(images) and (figures["n_triggered"], figures["n_clean"]) == (20, 380)
        assert (figures["kept"], figures["dropped"], figures["errors"]) == tuple(
            table["status"].to_pylist().count(s) for s in ("kept", "dropped", "error"))
        assert figures["threshold"] == table["threshold"][0].as_py()
        assert figures["auroc"] == round(mannwhitneyu(scores[positive], scores[~positive]).statistic / (20 * 380), 4)
        flagged = scores > figures["threshold"]
        assert (figures["tpr_at_threshold"], figures["fpr_at_threshold"]) == \
            (round(flagged[positive].mean(), 4), round(flagged[~positive].mean(), 4))
    # the filter (2 DataLoader workers, batches of 256) recorded each key's paper score as the Scorer scores that
    # image alone, and decided on the window score the library gives the shard's images in their order
    encoder = load_encoder(BACKDOORED)
    detector = Detector.load(tmp_path / f"detector-{BACKDOORED}.pt", encoder.fingerprint)
    assert detector.window.uncalibrated() == WindowRule() and detector.threshold.scale == "window"
    scorer = Scorer(encoder, detector)
    table = ds.dataset(results["backdoored"]["parquet"]).to_table(columns=["key", "score", "paper_score"])
    recorded = {key: (score, paper) for key, score, paper in zip(
        table["key"].to_pylist(), table["score"].to_pylist(), table["paper_score"].to_pylist(), strict=True)}
    some = sorted(images)[::37]
    assert scorer.score_array(np.stack([images[k] for k in some]), some).tolist() == [recorded[k][1] for k in some]
    in_order = list(images)  # one shard of 400, in its order: one window
    window_scores = filter_scores(scorer, np.stack([images[k] for k in in_order]), in_order, detector.window)
    assert window_scores.tolist() == [recorded[k][0] for k in in_order]
    again = run_demo(config, log=lambda *_: None)
    assert again["backdoored"]["detector"] == again["clean"]["detector"] == "loaded from cache"
    assert again["auroc"] == results["auroc"]  # same detector, same images: same figures
    # a detector calibrated by an older version (another window rule) is calibrated again, not used as it is
    detector.with_threshold(detector.threshold, replace(detector.window, collapse_paper_z=0.0)).save(
        tmp_path / f"detector-{BACKDOORED}.pt")
    recalibrated = run_demo(config, log=lambda *_: None)
    assert recalibrated["backdoored"]["detector"] == "loaded from cache, calibrated again"
    assert recalibrated["clean"]["detector"] == "loaded from cache" and recalibrated["auroc"] == results["auroc"]
