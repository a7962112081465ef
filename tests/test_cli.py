"""The command line end to end on small real inputs."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.dataset as ds
import pytest

from dedefilter.cli import main


def test_filter_command_writes_parquet_and_shards(tmp_path, detector, shards, capsys):
    detector.save(tmp_path / "det.pt")
    code = main(["filter", *shards, "--encoder", "fmnist-badencoder", "--detector", str(tmp_path / "det.pt"),
                 "--out", str(tmp_path / "out"), "--workers", "2", "--batch-size", "64"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["kept"] + summary["dropped"] == 300 and summary["error"] == 0
    table = ds.dataset(str(tmp_path / "out" / "parquet"), format="parquet").to_table()
    assert table.num_rows == 300
    assert json.loads(table.schema.metadata[b"dedefilter"])["threshold"]["method"] == "fixed"


def test_train_and_calibrate_commands(tmp_path, capsys):
    det = str(tmp_path / "det.pt")
    tiny = ["--epochs", "1", "--dim", "32", "--heads", "2", "--encoder-depth", "1", "--decoder-depth", "1"]
    assert main(["train", "--encoder", "fmnist-badencoder", "--aux", "photos", "--n-aux", "256", "--out", det,
                 "--trim", "0.1", *tiny]) == 0
    assert '"trim": 0.1, "n_trimmed": 25' in capsys.readouterr().out  # trained twice, without the worst-drawn 10%
    assert main(["calibrate", "--detector", det, "--encoder", "fmnist-badencoder",
                 "--reference", "fashion-mnist:test", "--n-reference", "200", "--fpr", "0.05"]) == 0
    assert '"method": "fpr"' in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:  # argparse refuses before any training
        main(["train", "--encoder", "fmnist-badencoder", "--aux", "photos", "--out", det, "--trim", "1"])
    assert refused.value.code == 2 and "must be in [0, 1), got 1" in capsys.readouterr().err


def test_errors_are_messages_not_tracebacks(tmp_path, capsys):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    code = main(["filter", "x.tar", "--encoder", "fmnist-badencoder", "--detector", str(tmp_path / "bad.pt"),
                 "--out", str(tmp_path / "out")])
    assert code == 2
    assert "bad.pt is not a dedefilter detector checkpoint" in capsys.readouterr().err


def test_shards_command_writes_fashion_mnist_with_planted_triggers(tmp_path):
    import webdataset as wds

    assert main(["shards", "--out", str(tmp_path), "--limit", "60", "--shard-size", "25",
                 "--triggered-fraction", "0.1"]) == 0
    samples = list(wds.DataPipeline(wds.SimpleShardList(sorted(map(str, tmp_path.glob("*.tar")))),
                                    wds.tarfile_to_samples()))
    assert [s["__key__"] for s in samples] == [f"fmnist-test-{i:05d}" for i in range(60)]
    meta = [json.loads(s["json"]) for s in samples]
    triggered = [m for m in meta if m["triggered"]]
    assert len(triggered) == 6 and all(m["label"] != 1 for m in triggered)  # never the target class


def test_a_threshold_calibrated_in_bf16_makes_filter_score_in_bf16(tmp_path, detector, shards, capsys):
    det = str(tmp_path / "det.pt")
    detector.save(det)
    assert main(["calibrate", "--detector", det, "--encoder", "fmnist-badencoder", "--n-reference", "200",
                 "--fpr", "0.05", "--precision", "bf16"]) == 0
    threshold = json.loads(capsys.readouterr().out.split(" saved to ")[0].removeprefix("threshold "))
    assert threshold["precision"] == "bf16"

    def run(out: str, *flags: str) -> int:
        return main(["filter", *shards, "--encoder", "fmnist-badencoder", "--detector", det, "--out",
                     str(tmp_path / out), "--workers", "0", "--no-shards", *flags])

    def scores(out: str) -> np.ndarray:
        return ds.dataset(str(tmp_path / out / "parquet")).to_table().sort_by("key")["paper_score"].to_numpy()

    assert run("bf16") == 0  # no flag: the stored threshold's precision
    assert run("mismatch", "--precision", "fp32") == 2
    assert "calibrated on bf16 scores but the scorer runs in fp32" in capsys.readouterr().err
    assert run("fp32", "--precision", "fp32", "--threshold", str(threshold["value"])) == 0
    np.testing.assert_allclose(scores("bf16"), scores("fp32"), rtol=0.03)
    assert not np.array_equal(scores("bf16"), scores("fp32"))
