"""The demo end to end at toy sizes: it must keep running, and every figure it reports must be what its
Parquet rows and shard images say, scored as the library scores them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
from scipy.stats import mannwhitneyu

from dedefilter import Detector, Scorer, load_encoder
from dedefilter.data import decode_image
from dedefilter.demo import BACKDOORED, DemoConfig, run_demo
from dedefilter.shards import read_shard


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
    # the filter (2 DataLoader workers, batches of 256) scored each key as the Scorer scores that image alone
    encoder = load_encoder(BACKDOORED)
    scorer = Scorer(encoder, Detector.load(tmp_path / f"detector-{BACKDOORED}.pt", encoder.fingerprint))
    table = ds.dataset(results["backdoored"]["parquet"]).to_table(columns=["key", "score"])
    some = table["key"].to_pylist()[::37]
    assert np.array_equal(scorer.score_array(np.stack([images[k] for k in some]), some),
                          table["score"].to_numpy()[::37])
    again = run_demo(config, log=lambda *_: None)
    assert again["backdoored"]["detector"] == again["clean"]["detector"] == "loaded from cache"
    assert again["auroc"] == results["auroc"]  # same detector, same images: same figures
