"""Seeded fuzz: real shards with random corruptions never crash the job or lose a sample silently.

The longer run is ``python benchmarks/fuzz.py`` (same corruptions and checks, hundreds of shards).
"""

from __future__ import annotations

import tarfile

from benchmarks.fuzz import Trial, audit, fuzz
from dedefilter import filter_shards
from dedefilter.shards import write_image_shards


def test_corrupted_shards_balance_and_lose_nothing(tmp_path, scorer, shard_data):
    images, labels, keys = shard_data
    urls = write_image_shards(tmp_path / "clean", images[:40], keys[:40], labels[:40], shard_size=10)
    report = fuzz(urls, scorer, tmp_path, trials=16, seed=7)
    assert report["problems"] == [] and report["balanced"]
    assert set(report["by_kind"]) == {"flip", "truncate", "overwrite", "insert"}
    assert 0 < report["error"] < report["samples_in"] == report["rows"]
    by_hand = report["hand_built"]  # a bad header mid-shard in each of the 4 clean shards of 10 keys
    assert by_hand["bad_header_skip_rows"] == 4 and by_hand["bad_header_balanced"]
    assert by_hand["keys_recovered_after_bad_header"] == by_hand["keys_after_bad_header"] == 4 * 4
    assert all(by_hand[name] for name in by_hand if name.endswith(("_refused", "_unchanged", "_round_trip")))
    assert by_hand["odd_keys_round_trip"] and by_hand["odd_keys_selected"] + by_hand["odd_keys_kept"] == 18


def test_the_audit_catches_a_silently_shortened_shard(tmp_path, scorer, shard_data):
    """The checks have teeth: a shard cut to its first samples plus a clean end-of-archive (what
    tarfile alone makes of a broken header) is flagged."""
    images, labels, keys = shard_data
    urls = write_image_shards(tmp_path / "clean", images[:10], keys[:10], labels[:10], shard_size=10)
    trial = Trial(str(tmp_path / "shortened.tar"), urls[0], "shortened", first_change=0)
    with tarfile.open(urls[0]) as source, tarfile.open(trial.path, "w") as shortened:
        for member in source.getmembers()[:6]:
            shortened.addfile(member, source.extractfile(member))
    result = filter_shards([trial.path], scorer, tmp_path / "out", num_workers=0, progress=False)
    problems = audit([trial], result.parquet_dir, {})
    assert len(problems) == 1 and "7 samples vanished without an error row" in problems[0]
