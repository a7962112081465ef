"""The demo end to end at toy sizes: the main job must keep running."""

from __future__ import annotations

import json

from dedefilter.demo import DemoConfig, run_demo


def test_demo_runs_end_to_end_and_reports_every_figure(tmp_path, fmnist_test):
    config = DemoConfig(work_dir=str(tmp_path), results_path=str(tmp_path / "demo.json"),
                        n_test=400, n_aux=256, n_reference=200, epochs=1)
    results = run_demo(config, log=lambda *_: None)
    assert json.loads((tmp_path / "demo.json").read_text()) == results
    for name in ("backdoored", "clean"):
        figures = results[name]
        assert figures["n_triggered"] == 20 and figures["n_clean"] == 380
        assert figures["kept"] + figures["dropped"] == 400 and figures["errors"] == 0
        assert 0.0 <= figures["auroc"] <= 1.0 and figures["detector"] == "trained"
    assert {"auroc", "tpr_at_1pct_fpr", "threshold", "tpr_at_threshold", "fpr_at_threshold", "n_clean",
            "n_triggered", "kept", "dropped", "samples_per_s"} <= set(results)
    assert run_demo(config, log=lambda *_: None)["backdoored"]["detector"] == "loaded from cache"
