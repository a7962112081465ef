"""A filter run never deletes what it did not write, never writes where it reads, fails on missing input,
and tells a dead worker from an error in the work (issue 15: items 1, 4, 9, 10 and the progress bar).

The tar reader's resynchronisation after a damaged header (item 5) is in tests/test_hostile.py.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from dedefilter import Scorer, filter_shards
from dedefilter.cli import main


def tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def detector_file(tmp_path, detector):
    detector.save(tmp_path / "det.pt")
    return str(tmp_path / "det.pt")


def run_filter(shards: list[str], detector_file: str, out, *flags: str) -> int:
    return main(["filter", *shards, "--encoder", "fmnist-badencoder", "--detector", detector_file,
                 "--out", str(out), "--workers", "0", *flags])


# --- item 1: --overwrite removes only what a filter run wrote; outputs never overlap inputs ---------

def test_overwrite_refuses_a_folder_no_filter_run_made(tmp_path, shards, scorer):
    folder = tmp_path / "datasets"
    (folder / "raw").mkdir(parents=True)
    (folder / "raw" / "labels.csv").write_text("key,label\n")
    (folder / "notes.txt").write_text("my notes")
    before = tree(folder)
    with pytest.raises(FileExistsError, match="holds no dedefilter job manifest"):
        filter_shards(shards, scorer, folder, num_workers=0, progress=False, overwrite=True)
    assert tree(folder) == before


def test_overwrite_replaces_a_runs_outputs_but_refuses_files_it_did_not_write(tmp_path, shards, scorer):
    out = tmp_path / "out"
    first = filter_shards(shards[:1], scorer, out, num_workers=0, progress=False)
    (out / "README.txt").write_text("what this run was for")
    (out / "parquet" / "my-analysis.parquet").write_bytes(b"not the run's")
    before = tree(out)
    with pytest.raises(FileExistsError, match=r"did not write: README.txt, parquet/my-analysis.parquet;"):
        filter_shards(shards, scorer, out, num_workers=0, progress=False, overwrite=True)
    assert tree(out) == before
    (out / "README.txt").unlink()
    (out / "parquet" / "my-analysis.parquet").unlink()
    (out / "shards" / ".filtered-000007.tar.4242.tmp").write_bytes(b"a killed writer's leftover")
    again = filter_shards(shards, scorer, out, num_workers=0, progress=False, overwrite=True)
    assert again.balanced and again.markers["samples"] == 300 and first.markers["samples"] == 100
    assert not list(out.rglob(".*")), "--overwrite leaves no hidden temporary file behind"


@pytest.mark.parametrize("where", ["the inputs' folder", "an input file", "inside an input"])
def test_an_out_that_overlaps_an_input_is_refused_with_or_without_overwrite(tmp_path, shards, detector_file,
                                                                            where, capsys):
    folder = Path(shards[0]).parent
    inputs = shards
    if where == "inside an input":  # an input path that is a folder (a local dataset directory as a "shard")
        inputs = [*shards, str(tmp_path / "folder.tar")]
        (tmp_path / "folder.tar").mkdir()
    out = {"the inputs' folder": folder, "an input file": Path(shards[1]),
           "inside an input": tmp_path / "folder.tar" / "out"}[where]
    before = tree(folder)
    for flags in ([], ["--overwrite"]):
        assert run_filter(inputs, detector_file, out, *flags) == 2
        err = capsys.readouterr().err
        assert "an output never overlaps its inputs" in err and f"--out {out} " in err
    assert tree(folder) == before and not (folder / "job.json").exists()


# --- item 4: a missing input is a failed run ----------------------------------------------------

def test_missing_shards_fail_before_any_work(tmp_path, shards, detector_file, capsys):
    pattern = str(tmp_path / "typo" / "shard-{000000..000002}.tar")
    assert run_filter([shards[0], pattern], detector_file, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith("dedefilter filter: error: 3 of 4 input shards do not exist: ")
    assert str(tmp_path / "typo" / "shard-000002.tar") in err
    assert not (tmp_path / "out").exists()


def test_a_shard_that_cannot_be_read_at_run_time_fails_the_run_and_resume_reads_it(tmp_path, shards,
                                                                                   detector_file, capsys):
    vanished = tmp_path / "in" / "replaced-by-a-folder.tar"  # exists (passes the up-front check), cannot be opened
    vanished.mkdir()
    urls = [shards[0], str(vanished)]
    out = tmp_path / "out"
    assert run_filter(urls, detector_file, out) == 1
    captured = capsys.readouterr()
    assert "1 of 2 input shards could not be read: " + str(vanished) in captured.err
    assert "ledger: 101 in = " in captured.out and "1 could not be read" in captured.out
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["filtered-000000.tar"]  # no empty tar for it
    vanished.rmdir()
    shutil.copy(shards[1], vanished)
    assert run_filter(urls, detector_file, out, "--resume") == 0
    assert '"samples": 200' in capsys.readouterr().out
    assert len(list((out / "shards").iterdir())) == 2


# --- item 9 and 10: a dead worker and an error in the work are told apart -------------------------

def test_an_error_raised_in_the_work_names_the_shard_and_is_not_called_an_interruption(
        tmp_path, shards, detector_file, monkeypatch, capsys):
    def shape_bug(self, pixels, keys, residuals=False):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (256x64 and 65x64)")

    monkeypatch.setattr(Scorer, "score_pixels", shape_bug)
    assert run_filter(shards[1:2], detector_file, tmp_path / "out", "--workers", "1") == 1
    err = capsys.readouterr().err
    assert (f"error: filtering shard 0 ({shards[1]}) raised RuntimeError: mat1 and mat2 shapes cannot be "
            "multiplied (256x64 and 65x64). This is an error in the work, not an interrupted run") in err
    assert "in shape_bug" in err  # the worker's traceback is shown
    assert "a worker died" not in err


def test_a_killed_worker_is_an_interruption_and_names_the_temporary_files_it_left(
        tmp_path, shards, detector_file, monkeypatch, capsys):
    def killed(self, pixels, keys, residuals=False):
        if torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)

    monkeypatch.setattr(Scorer, "score_pixels", killed)
    out = tmp_path / "out"
    assert run_filter(shards[:1], detector_file, out, "--workers", "1") == 1
    err = capsys.readouterr().err
    assert "a worker died (killed, or out of memory)" in err and "run the same command with --resume" in err
    assert f"hidden temporary files of the unfinished shards (names like .part-000003.parquet.<pid>.tmp) stay in {out}" in err
    assert "--resume or --overwrite removes them" in err


# --- the progress bar counts samples ------------------------------------------------------------

def test_the_progress_bar_counts_samples(tmp_path, shards, scorer, capsys):
    filter_shards(shards[:2], scorer, tmp_path / "out", num_workers=0)
    bar = capsys.readouterr().err.split("\r")[-1]
    assert bar.startswith("filter: 200 samples") and "shards=2/2" in bar
