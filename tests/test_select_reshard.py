"""select -> reshard guard the user's data: odd keys round-trip, inputs are never overwritten, a missing
shard or key fails the run, a selection carries its provenance (each case was a silent loss before)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dedefilter.cli import main
from dedefilter.shards import read_shard, write_image_shards
from dedefilter.sink import ParquetSink

# keys an attacker can give: spaces at either end, line breaks, a Unicode line separator, a key that
# differs from an innocent one ("k-00 ") only by a trailing space
ODD_KEYS = [" lead", "trail ", "new\nline", "cr\rkey", "  ", "tab\tkey", "uni-\u00e9", "k-00 ", "\r\n", "x\u2028y"]


def shard_keys(paths) -> list[str]:
    return [s["__key__"] for p in paths for s in read_shard(str(p))]


def write_key_list(path, keys) -> None:
    """A key list as `dedefilter select` writes it: JSON lines, one JSON string per key."""
    path.write_text("".join(json.dumps(k) + "\n" for k in keys))


@pytest.fixture
def odd_shards(tmp_path, fmnist_test):
    """20 plain and 10 odd keys in two shards, with scores that flag exactly the odd ones."""
    images, labels = fmnist_test
    keys = [f"k-{i:02d}" for i in range(20)] + ODD_KEYS
    urls = write_image_shards(tmp_path / "in", images[:30].copy(), keys, labels[:30], [{}] * 30, shard_size=15)
    assert shard_keys(urls) == keys  # the tar shards themselves keep every key exactly
    scores = np.r_[np.full(20, 0.1), np.full(10, 0.9)].astype(np.float32)
    with ParquetSink(tmp_path / "scores", "part-0", "model-x", 0.5) as sink:
        sink.write(keys, [urls[i // 15] for i in range(30)], scores, scores > 0.5,
                   ["dropped" if s > 0.5 else "kept" for s in scores], [None] * 30, None)
    return urls, tmp_path / "scores"


def test_odd_keys_round_trip_from_select_through_reshard(odd_shards, tmp_path, capsys):
    urls, scores = odd_shards
    assert main(["select", str(scores), "--threshold", "0.5", "--out", str(tmp_path / "drop.jsonl")]) == 0
    assert main(["reshard", *urls, "--drop-keys", str(tmp_path / "drop.jsonl"), "--out", str(tmp_path / "out")]) == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (counts["removed"], counts["keys_not_found"]) == (10, 0)
    assert shard_keys(sorted((tmp_path / "out").glob("*.tar"))) == [f"k-{i:02d}" for i in range(20)]


def test_a_selection_records_its_provenance_beside_its_keys(odd_shards, tmp_path):
    _, scores = odd_shards
    assert main(["select", str(scores), "--fraction", "0.4", "--out", str(tmp_path / "drop.jsonl")]) == 0
    header, *lines = (tmp_path / "drop.jsonl").read_text().splitlines()
    provenance = json.loads(header)
    assert [json.loads(line) for line in lines] == sorted(ODD_KEYS)
    assert provenance["count"] == 10 and provenance["model_ids"] == ["model-x"]
    # at most 40% of 30 scores above the cut, as `calibrate --contamination` cuts: the 10 at 0.9
    assert provenance["criterion"] == {"fraction": 0.4, "threshold": pytest.approx(0.1)}
    assert provenance["source"] == str(scores.resolve()) and provenance["files"] == ["part-0.parquet"]
    assert provenance["arguments"]["fraction"] == 0.4 and provenance["created"].endswith("Z")


def test_reshard_refuses_an_output_folder_that_is_or_contains_its_inputs(shards, tmp_path, capsys):
    write_key_list(tmp_path / "drop.jsonl", ["img-0001"])
    before = [open(p, "rb").read() for p in shards]
    for out in (tmp_path / "in", tmp_path):  # the shards' own folder, and a folder above it
        assert main(["reshard", *shards, "--drop-keys", str(tmp_path / "drop.jsonl"), "--out", str(out)]) == 2
        assert "the input" in capsys.readouterr().err
    assert [open(p, "rb").read() for p in shards] == before  # inputs untouched


def test_reshard_of_a_missing_shard_fails_and_writes_nothing(shards, tmp_path, capsys):
    write_key_list(tmp_path / "drop.jsonl", ["img-0001"])
    missing = str(tmp_path / "in" / "shard-999999.tar")
    assert main(["reshard", *shards, missing, "--drop-keys", str(tmp_path / "drop.jsonl"),
                 "--out", str(tmp_path / "out")]) == 2
    assert "shard-999999.tar" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_reshard_fails_when_a_listed_key_is_in_no_shard_unless_allowed(shards, tmp_path, capsys):
    write_key_list(tmp_path / "drop.jsonl", ["img-0001", "not-a-key"])
    argv = ["reshard", *shards, "--drop-keys", str(tmp_path / "drop.jsonl"), "--out", str(tmp_path / "out")]
    assert main(argv) != 0
    assert "not-a-key" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing published, no hidden temp files left
    assert main(argv + ["--allow-missing-keys"]) == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (counts["removed"], counts["keys_not_found"], counts["kept"]) == (1, 1, 299)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"shard-{i:06d}.tar" for i in range(3)]


def test_reshard_refuses_a_plain_text_key_list(shards, tmp_path, capsys):
    (tmp_path / "drop.txt").write_text("img-0001\n")  # "one key per line" cannot hold every key
    assert main(["reshard", *shards, "--drop-keys", str(tmp_path / "drop.txt"), "--out", str(tmp_path / "out")]) == 2
    assert "line 1" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_select_refuses_a_non_finite_threshold(odd_shards, tmp_path, capsys):
    _, scores = odd_shards
    with pytest.raises(SystemExit) as exit_info:
        main(["select", str(scores), "--threshold", "nan", "--out", str(tmp_path / "drop.jsonl")])
    assert exit_info.value.code == 2 and "finite" in capsys.readouterr().err
    assert not (tmp_path / "drop.jsonl").exists()


def test_reshard_replaces_earlier_outputs_only_when_told(shards, tmp_path, capsys):
    write_key_list(tmp_path / "drop.jsonl", ["img-0001"])
    argv = ["reshard", *shards, "--drop-keys", str(tmp_path / "drop.jsonl"), "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    (tmp_path / "out" / "mine.txt").write_text("not made by reshard")
    assert main(argv) == 2 and "--overwrite" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0
    assert (tmp_path / "out" / "mine.txt").read_text() == "not made by reshard"  # only its own names replaced
    outputs = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert outputs == ["mine.txt"] + [f"shard-{i:06d}.tar" for i in range(3)]


def test_select_refuses_to_write_into_the_scores_it_reads(odd_shards, capsys):
    _, scores = odd_shards
    assert main(["select", str(scores), "--threshold", "0.5", "--out", str(scores / "drop.parquet")]) == 2
    assert "lies inside the input" in capsys.readouterr().err and not (scores / "drop.parquet").exists()
