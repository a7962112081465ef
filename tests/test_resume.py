"""Shard-level resume: a run killed at any moment and resumed ends with the uninterrupted run's rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow.dataset as ds
import pytest

import dedefilter
from dedefilter import filter_shards
from dedefilter.cli import main
from dedefilter.shards import write_image_shards

N_SHARDS = 6
N = 120  # samples


def read_rows(parquet_dir) -> list[dict]:
    return sorted(ds.dataset(str(parquet_dir), format="parquet").to_table().to_pylist(), key=lambda row: row["key"])


@pytest.fixture(scope="module")
def job(tmp_path_factory, shard_data, detector):
    """Six shards of 20 real images and the detector saved to a file."""
    images, labels, keys = shard_data
    directory = tmp_path_factory.mktemp("job")
    urls = write_image_shards(directory / "in", images[:N], keys[:N], labels[:N], shard_size=N // N_SHARDS)
    detector.save(directory / "det.pt")
    return urls, directory / "det.pt"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, job, scorer):
    """The rows of an uninterrupted run."""
    urls, _ = job
    result = filter_shards(urls, scorer, tmp_path_factory.mktemp("reference"), num_workers=0, progress=False)
    assert result.balanced
    return read_rows(result.parquet_dir)


def filter_args(urls, detector_path, out, encoder: str = "fmnist-badencoder") -> list[str]:
    return ["filter", *urls, "--encoder", encoder, "--detector", str(detector_path), "--out", str(out),
            "--workers", "2", "--batch-size", "8"]


def kill_at_random_point(args: list[str], out: Path, rng: np.random.Generator, target: str) -> tuple[int, str]:
    """Run the CLI in a subprocess and SIGKILL its main process or one DataLoader worker once a random
    number of shards has finished, plus a random delay; returns (exit code, stderr)."""
    root = Path(dedefilter.__file__).parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(Path(__file__).parent)]))
    process = subprocess.Popen([sys.executable, "-m", "dedefilter.cli", *args], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    main_process = psutil.Process(process.pid)
    finished_before_kill = int(rng.integers(0, N_SHARDS - 2))
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None, f"the run ended before the kill: {process.stderr.read()}"
        assert time.monotonic() < deadline
        workers = main_process.children()
        if len(workers) == 2 and len(list(out.glob("stats/shard-*.json"))) >= finished_before_kill:
            break
        time.sleep(0.005)
    time.sleep(rng.uniform(0, 0.3))
    victim = main_process if target == "main" else workers[int(rng.integers(2))]
    victim.kill()
    _, stderr = process.communicate(timeout=60)
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, "DataLoader workers outlived the killed run"
    return process.returncode, stderr


@pytest.mark.parametrize("target", ["main", "worker"])
def test_killed_run_resumes_to_the_uninterrupted_rows(tmp_path, job, reference, target, capsys):
    urls, detector_path = job
    for seed in range(3):
        out = tmp_path / f"out-{target}-{seed}"
        # the killed run uses the same weights slowed down (a quiet machine would finish before the kill);
        # the resumed run the bundled encoder itself
        slow = filter_args(urls, detector_path, out, encoder="hostile_encoders:slow_badencoder")
        code, stderr = kill_at_random_point(slow, out,
                                            np.random.default_rng([seed, target == "main"]), target)
        if target == "main":
            assert code == -9
        else:
            assert code == 1 and "run the same command with --resume" in stderr
        finished = len(list(out.glob("stats/shard-*.json")))
        assert finished < N_SHARDS
        assert len(read_rows(out / "parquet")) <= N  # whatever is visible is complete Parquet
        capsys.readouterr()
        assert main([*filter_args(urls, detector_path, out), "--resume"]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert summary["resumed_shards"] == finished and summary["samples"] == N
        rows = read_rows(out / "parquet")
        assert len({row["key"] for row in rows}) == len(rows) == N
        assert rows == reference


def test_resume_redoes_shards_without_a_marker_and_removes_their_leftovers(tmp_path, job, reference, scorer):
    urls, _ = job
    out = tmp_path / "out"
    filter_shards(urls, scorer, out, num_workers=0, progress=False)
    (out / "stats" / "shard-000001.json").unlink()  # killed after publishing its part, before its marker
    (out / "stats" / "shard-000004.json").unlink()
    (out / "parquet" / "part-000004.parquet").unlink()
    (out / "parquet" / ".part-000004.parquet.tmp").write_bytes(b"PAR1 half a file")  # killed mid-write
    result = filter_shards(urls, scorer, out, num_workers=0, progress=False, resume=True)
    assert result.resumed == N_SHARDS - 2 and result.balanced
    assert sum(result.live_counts.values()) == 2 * N // N_SHARDS  # only the two redone shards were scored
    assert read_rows(out / "parquet") == reference
    assert not list(out.glob("*/.*"))


def test_resume_refuses_another_job_and_a_full_directory_needs_a_flag(tmp_path, job, scorer):
    urls, _ = job
    out = tmp_path / "out"
    filter_shards(urls[:3], scorer, out, num_workers=0, progress=False)
    with pytest.raises(ValueError, match="made with different urls"):
        filter_shards(urls, scorer, out, num_workers=0, progress=False, resume=True)
    with pytest.raises(FileExistsError, match="--resume a run that was interrupted"):
        filter_shards(urls, scorer, out, num_workers=0, progress=False)


def test_resume_of_a_finished_run_scores_nothing(tmp_path, job, scorer):
    urls, _ = job
    first = filter_shards(urls, scorer, tmp_path / "out", num_workers=0, progress=False)
    again = filter_shards(urls, scorer, tmp_path / "out", num_workers=0, progress=False, resume=True)
    assert again.resumed == N_SHARDS and sum(again.live_counts.values()) == 0
    assert again.balanced and again.markers == first.markers and again.ledger == first.ledger


def test_the_cli_exits_1_when_the_ledger_does_not_balance(tmp_path, job, scorer, capsys):
    urls, detector_path = job
    out = tmp_path / "out"
    filter_shards(urls, scorer, out, num_workers=0, progress=False)
    stray = out / "parquet" / "part-stray.parquet"  # rows no shard's stats file accounts for
    stray.write_bytes((out / "parquet" / "part-000002.parquet").read_bytes())
    assert main([*filter_args(urls, detector_path, out), "--resume"]) == 1
    captured = capsys.readouterr()
    assert "ledger: 120 in = " in captured.out and "NOT BALANCED" in captured.out
    assert "dedefilter filter: error: ledger does not balance" in captured.err
