"""The filter stage: every sample accounted for, same scores in any worker or batch layout."""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
import torch
import webdataset as wds

from dedefilter import DeDeFilter, StageConfig, filter_shards, ledger
from dedefilter.data import encode_png
from dedefilter.shards import shard_pipeline
from dedefilter.stage import Counters


def read_rows(parquet_dir) -> list[dict]:
    return sorted(ds.dataset(str(parquet_dir), format="parquet").to_table().to_pylist(),
                  key=lambda row: (row["key"] or "", row["url"] or ""))


def test_parquet_is_identical_for_any_workers_and_batch_size(tmp_path, scorer, shards):
    runs = [(0, 64), (2, 64), (0, 100), (2, 100)]
    tables = []
    for workers, batch in runs:
        filter_shards(shards, scorer, tmp_path / f"w{workers}-b{batch}", stage=StageConfig(batch_size=batch),
                      num_workers=workers, progress=False)
        tables.append(read_rows(tmp_path / f"w{workers}-b{batch}" / "parquet"))
    assert all(table == tables[0] for table in tables[1:])
    assert len(tables[0]) == 300


def test_every_key_once_and_kept_rows_equal_yielded_samples(tmp_path, scorer, shards, shard_data):
    result = filter_shards(shards, scorer, tmp_path / "out", num_workers=2, progress=False)
    rows = read_rows(result.parquet_dir)
    assert sorted(row["key"] for row in rows) == sorted(shard_data[2])
    kept_keys = sorted(row["key"] for row in rows if row["status"] == "kept")
    filtered = wds.DataPipeline(wds.SimpleShardList(result.shard_paths), wds.tarfile_to_samples())
    assert sorted(sample["__key__"] for sample in filtered) == kept_keys
    assert result.yielded == len(kept_keys) == result.ledger["kept"]
    assert result.live_counts == result.ledger
    assert result.ledger["dropped"] > 0 and result.ledger["error"] == 0
    dropped = [row for row in rows if row["status"] == "dropped"]
    assert all(row["score"] > row["threshold"] and row["suspect"] for row in dropped)


def test_annotate_mode_keeps_every_field_and_adds_the_score(scorer, shards, shard_data):
    images, _, keys = shard_data
    stage = DeDeFilter(scorer, config=StageConfig(batch_size=32, drop=False))
    samples = list(shard_pipeline(shards, stage))
    assert sorted(s["__key__"] for s in samples) == keys
    first = samples[0]
    assert {"png", "cls", "json", "__key__", "__url__", "dede_score", "dede_suspect"} <= set(first)
    assert json.loads(first["json"]) == {"index": int(first["__key__"].split("-")[1])}
    scores = {s["__key__"]: s["dede_score"] for s in samples}
    expected = scorer.score(images[::10], keys[::10]).scores.tolist()  # the triggered tenth, scored on its own
    assert [scores[key] for key in keys[::10]] == expected
    threshold = scorer.detector.threshold.value
    assert [s["dede_suspect"] for s in samples] == [s["dede_score"] > threshold for s in samples]
    assert 0 < sum(s["dede_suspect"] for s in samples) < 300


def test_stage_runs_on_in_memory_samples_with_compose(scorer, shard_data):
    images, _, keys = shard_data
    samples = [{"__key__": k, "png": encode_png(im), "txt": f"caption {k}"} for k, im in zip(keys[:50], images)]
    stage = DeDeFilter(scorer, config=StageConfig(batch_size=16, drop=False))
    out = list(wds.DataPipeline(lambda: iter(samples)).compose(stage))
    assert [s["__key__"] for s in out] == keys[:50]
    assert [s["txt"] for s in out] == [f"caption {k}" for k in keys[:50]]
    assert [s["dede_score"] for s in out] == scorer.score(images[:50], keys[:50]).scores.tolist()


def truncate_last_member(path) -> str:
    """Cut a shard in the middle of its last member's data."""
    with tarfile.open(path) as archive:
        last = archive.getmembers()[-1]
    cut = last.offset_data + last.size // 2
    Path(path).write_bytes(Path(path).read_bytes()[:cut])
    return last.name.split(".")[0]


def test_truncated_member_and_undecodable_image_become_error_rows(tmp_path, scorer, shards, shard_data):
    truncated_key = truncate_last_member(shards[0])
    with wds.TarWriter(str(tmp_path / "in" / "broken.tar")) as writer:
        writer.write({"__key__": "not-an-image", "png": b"\x89PNG this is not a png"})
        writer.write({"__key__": "no-image", "txt": b"a caption without its image"})
    urls = [*shards, str(tmp_path / "in" / "broken.tar")]
    result = filter_shards(urls, scorer, tmp_path / "out", num_workers=2, progress=False)
    errors = {row["key"]: row["reason"] for row in read_rows(result.parquet_dir) if row["status"] == "error"}
    assert set(errors) == {truncated_key, "not-an-image", "no-image"}
    assert "unreadable tar data" in errors[truncated_key]
    assert "undecodable image" in errors["not-an-image"]
    assert "no image field" in errors["no-image"]
    counts = ledger(result.parquet_dir)
    assert counts["kept"] + counts["dropped"] == 299  # every readable sample of all shards was scored


def pixels_of(images: np.ndarray) -> torch.Tensor:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) float in [0, 1], as ``ToTensor()`` gives them."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


def test_dataloader_wrapper_drops_suspects_from_every_batch_field(scorer, shard_data):
    images, labels, _ = shard_data
    pixels = pixels_of(images)
    dataset = torch.utils.data.TensorDataset(pixels, torch.from_numpy(labels), torch.arange(300))  # index = key
    loader = torch.utils.data.DataLoader(dataset, batch_size=64)
    expected = scorer.score(images, [str(i) for i in range(300)]).scores <= scorer.detector.threshold.value
    assert 0 < expected.sum() < 300
    filtered = list(DeDeFilter(scorer).filter_batches(loader, key_index=2))
    kept_images = torch.cat([batch[0] for batch in filtered])
    kept_labels = torch.cat([batch[1] for batch in filtered])
    assert torch.equal(kept_images, pixels[torch.from_numpy(expected)])
    assert torch.equal(kept_labels, torch.from_numpy(labels)[torch.from_numpy(expected)])


def test_dataloader_wrapper_annotates_and_records(tmp_path, scorer, shard_data):
    images, labels, keys = shard_data
    pixels = pixels_of(images[:40])
    batches = [{"image": pixels[i:i + 16], "label": labels[:40][i:i + 16].tolist(), "__key__": keys[:40][i:i + 16]}
               for i in range(0, 40, 16)]
    config = StageConfig(drop=False, parquet_dir=str(tmp_path / "pq"))
    out = list(DeDeFilter(scorer, config=config).filter_batches(batches, image_index="image"))
    assert sum((b["label"] for b in out), []) == labels[:40].tolist()
    expected = scorer.score(images[:40], keys[:40]).scores
    assert np.array_equal(torch.cat([b["dede_score"] for b in out]).numpy(), expected)
    rows = read_rows(tmp_path / "pq")
    assert [(r["key"], r["score"]) for r in rows] == sorted(zip(keys[:40], expected.tolist(), strict=True))


def test_a_shard_that_cannot_be_read_is_one_error_row_and_the_rest_runs(tmp_path, scorer, shards):
    missing = str(tmp_path / "in" / "a-folder.tar")  # exists, so not refused up front, but cannot be opened
    Path(missing).mkdir()
    result = filter_shards([missing, *shards], scorer, tmp_path / "out", num_workers=0, progress=False)
    errors = [row for row in read_rows(result.parquet_dir) if row["status"] == "error"]
    assert len(errors) == 1
    assert errors[0]["key"] is None and errors[0]["url"] == missing
    assert "Is a directory" in errors[0]["reason"]
    assert result.ledger["kept"] + result.ledger["dropped"] == 300


def test_embeddings_are_stored_on_request_and_null_for_errors(tmp_path, scorer, shard_data, shards):
    images, _, keys = shard_data
    missing = str(tmp_path / "in" / "a-folder.tar")
    Path(missing).mkdir()
    stage = StageConfig(store_embeddings=True)
    result = filter_shards([missing, *shards], scorer, tmp_path / "out", stage=stage, num_workers=0, progress=False)
    table = ds.dataset(str(result.parquet_dir)).to_table()
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), scorer.encoder.embed_dim)
    rows = {row["key"]: row["embedding"] for row in table.select(["key", "embedding"]).to_pylist()}
    assert rows.pop(None) is None  # the missing shard's error row
    expected = scorer.score(images[:5], keys[:5]).embeddings
    assert np.array_equal(np.array([rows[k] for k in keys[:5]], np.float32), expected)


# --- DataLoader batches: the images' range and the samples' keys are checked, never guessed -------------

def keyed_batches(images: np.ndarray, keys: list[str], size: int = 16) -> list[dict]:
    return [{"image": pixels_of(images[i:i + size]), "__key__": keys[i:i + size]} for i in range(0, len(keys), size)]


@pytest.mark.parametrize(("scale", "found"), [
    (lambda x: x * 255, "pixel values range from 0 to 255"),  # ToTensor() forgotten
    (lambda x: x * 2 - 1, "pixel values range from -1 to 1"),  # Normalize((0.5,), (0.5,)) applied first
    (lambda x: x.index_fill(0, torch.tensor([3]), float("nan")), "3072 pixel values are NaN or infinite"),
])
def test_filter_batches_refuses_images_outside_0_1_and_names_the_batch(tmp_path, scorer, shard_data, scale, found):
    images, _, keys = shard_data
    batches = keyed_batches(images[:32], keys[:32])
    batches[1]["image"] = scale(batches[1]["image"])
    stage = DeDeFilter(scorer, config=StageConfig(parquet_dir=str(tmp_path / "pq")))
    with pytest.raises(ValueError, match=re.escape(f"batch 1 (first key 'img-0016'): {found}")):
        list(stage.filter_batches(batches, image_index="image"))
    assert list((tmp_path / "pq").iterdir()) == []  # and the first batch's rows are not published as a whole pass


def test_filter_batches_scores_uint8_images_as_the_shard_path_does(scorer, shard_data):
    images, _, keys = shard_data
    batch = {"image": torch.from_numpy(images[:32]).permute(0, 3, 1, 2), "__key__": keys[:32]}  # PILToTensor()'s
    (out,) = DeDeFilter(scorer, config=StageConfig(drop=False)).filter_batches([batch], image_index="image")
    assert out["dede_score"].tolist() == scorer.score(images[:32], keys[:32]).scores.tolist()


def test_filter_batches_records_each_samples_own_key_through_a_shuffling_loader(tmp_path, scorer, shard_data):
    images, _, keys = shard_data
    dataset = list(zip(pixels_of(images[:64]), keys[:64], strict=True))  # a Dataset of (image, key)
    loader = torch.utils.data.DataLoader(dataset, batch_size=16, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    stage = DeDeFilter(scorer, config=StageConfig(drop=False, parquet_dir=str(tmp_path / "pq")))
    passed = list(stage.filter_batches(loader, key_index=1))
    expected = dict(zip(keys[:64], scorer.score(images[:64], keys[:64]).scores.tolist(), strict=True))
    assert {r["key"]: r["score"] for r in read_rows(tmp_path / "pq")} == expected
    assert {k: s for batch in passed for k, s in zip(batch[1], batch[2].tolist(), strict=True)} == expected
    assert [batch[1] for batch in passed] != [keys[i:i + 16] for i in range(0, 64, 16)]  # it did shuffle


def test_filter_batches_refuses_batches_without_keys(scorer, shard_data):
    images, labels, _ = shard_data
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(pixels_of(images[:32]), torch.from_numpy(labels[:32])), batch_size=16)
    with pytest.raises(ValueError, match=r"batch 0 has no keys at key_index='__key__'.*key_index=2"):
        next(DeDeFilter(scorer).filter_batches(loader))


# --- the Parquet part of a pass: published whole or not at all, and never over another pass's -----------

def test_a_pass_stopped_early_publishes_no_part(tmp_path, scorer, shard_data, caplog):
    images, _, keys = shard_data
    samples = [{"__key__": k, "png": encode_png(im)} for k, im in zip(keys[:48], images, strict=False)]
    stage = DeDeFilter(scorer, config=StageConfig(batch_size=16, drop=False, parquet_dir=str(tmp_path / "pq")))
    for n, _ in enumerate(stage(samples)):
        if n == 20:  # within the second batch: 32 rows recorded
            break
    assert list((tmp_path / "pq").iterdir()) == []  # neither a part nor its hidden temporary file
    assert "part-r00000-w000-p0000.parquet not published, 32 rows discarded: the consumer stopped" in caplog.text


def test_an_error_mid_pass_publishes_no_part(tmp_path, scorer, shard_data, caplog):
    images, _, keys = shard_data

    def failing_loader():
        yield from keyed_batches(images[:32], keys[:32])
        raise OSError("the loader's disk went away")

    stage = DeDeFilter(scorer, config=StageConfig(parquet_dir=str(tmp_path / "pq")))
    with pytest.raises(OSError, match="disk went away"):
        list(stage.filter_batches(failing_loader(), image_index="image"))
    assert list((tmp_path / "pq").iterdir()) == []
    assert "32 rows discarded: OSError: the loader's disk went away" in caplog.text


def test_each_epoch_of_a_worker_publishes_its_own_part(tmp_path, scorer, shards, shard_data):
    stage = DeDeFilter(scorer, config=StageConfig(parquet_dir=str(tmp_path / "pq")))
    loader = wds.WebLoader(shard_pipeline(shards, stage), batch_size=None, num_workers=2)
    for _epoch in range(2):  # each epoch forks new workers: the pass number comes from the directory
        for _ in loader:
            pass
    parts = sorted(path.name for path in (tmp_path / "pq").iterdir())
    assert parts == [f"part-r00000-w{w:03d}-p{p:04d}.parquet" for w in (0, 1) for p in (0, 1)]
    for epoch in ("p0000", "p0001"):
        epoch_rows = ds.dataset([str(tmp_path / "pq" / name) for name in parts if epoch in name]).to_table()
        assert sorted(epoch_rows["key"].to_pylist()) == shard_data[2]


# --- every decision carries a reason, counted per reason ----------------------------------------------

def test_every_drop_carries_its_score_and_the_threshold_and_is_counted_by_reason(tmp_path, scorer, shard_data):
    images, _, keys = shard_data
    samples = [{"__key__": k, "png": encode_png(im)} for k, im in zip(keys[:64], images, strict=False)]
    samples.append({"__key__": "no-image", "txt": b"a caption without its image"})
    counters = Counters()
    stage = DeDeFilter(scorer, config=StageConfig(parquet_dir=str(tmp_path / "pq")), counters=counters)
    passed = list(stage(samples))
    rows = read_rows(tmp_path / "pq")
    dropped = [row for row in rows if row["status"] == "dropped"]
    assert dropped
    for row in dropped:  # e.g. "score 0.2143 > threshold 0.16463083": both exact float32 values
        score, threshold = re.fullmatch(r"score (\S+) > threshold (\S+)", row["reason"]).groups()
        assert (np.float32(score), np.float32(threshold)) == (np.float32(row["score"]), np.float32(row["threshold"]))
    assert [row["reason"] for row in rows if row["status"] == "kept"] == [None] * len(passed)
    assert counters.by_reason() == {"kept": len(passed), "dropped_above_threshold": len(dropped),
                                    "error_input": 1, "error_non_finite_score": 0}
    assert counters.snapshot() == {"kept": len(passed), "dropped": len(dropped), "error": 1}
