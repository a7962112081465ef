"""Scale-out engines: a Ray Data run and a 2-process torch job give the local job's exact score table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import webdataset as wds

from dedefilter import StageConfig, filter_shards
from dedefilter.distributed import parquet_dataset
from dedefilter.shards import write_image_shards
from dedefilter.sink import schema

REPO = Path(__file__).resolve().parents[1]


def sorted_rows(dataset: ds.Dataset) -> list[dict]:
    return sorted(dataset.to_table().to_pylist(), key=lambda row: (row["key"] or "", row["url"] or ""))


def shard_keys(paths: list[str]) -> list[str]:
    return sorted(s["__key__"] for s in wds.DataPipeline(wds.SimpleShardList(paths), wds.tarfile_to_samples()))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, shard_data):
    """The 300 fixture images as three shards, plus a shard of a broken image and a sample without one."""
    images, labels, keys = shard_data
    directory = tmp_path_factory.mktemp("in")
    shards = write_image_shards(directory, images, keys, labels, shard_size=100)
    with wds.TarWriter(str(directory / "broken.tar")) as writer:
        writer.write({"__key__": "not-an-image", "png": b"\x89PNG this is not a png"})
        writer.write({"__key__": "no-image", "txt": b"a caption without its image"})
    return [*shards, str(directory / "broken.tar")]


@pytest.fixture(scope="module")
def local_rows(tmp_path_factory, scorer, inputs):
    """The local job's score table with embeddings, which every engine must reproduce row for row."""
    result = filter_shards(inputs, scorer, tmp_path_factory.mktemp("local"), stage=StageConfig(store_embeddings=True),
                           num_workers=0, progress=False)
    rows = sorted_rows(ds.dataset(str(result.parquet_dir), format="parquet"))
    assert len(rows) == 302 and result.ledger["error"] == 2
    return rows


def test_ray_run_matches_the_local_run(tmp_path, encoder, detector, inputs, local_rows):
    ray = pytest.importorskip("ray", reason="the Ray engine needs ray: pip install 'dedefilter[ray]'")
    from dedefilter.cli import main

    detector.save(tmp_path / "det.pt")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:  # 2 actors of half a CPU each leave a CPU for Ray's read tasks
        code = main(["filter", *inputs, "--encoder", "fmnist-badencoder", "--detector", str(tmp_path / "det.pt"),
                     "--out", str(tmp_path / "ray"), "--engine", "ray", "--actors", "2", "--cpus-per-actor", "0.5",
                     "--batch-size", "64", "--embeddings"])
    finally:
        ray.shutdown()
    assert code == 0
    parquet = ds.dataset(str(tmp_path / "ray" / "parquet"), format="parquet")
    assert parquet.schema.remove_metadata() == schema(encoder.embed_dim)  # plain Arrow types: no Ray tensor type
    assert sorted_rows(parquet) == local_rows
    errors = {row["key"]: row["reason"] for row in local_rows if row["status"] == "error"}
    assert "undecodable image" in errors["not-an-image"] and "no image field" in errors["no-image"]
    kept = sorted(row["key"] for row in local_rows if row["kept"])
    assert shard_keys(sorted(map(str, (tmp_path / "ray" / "shards").glob("*.tar")))) == kept


def test_two_torch_processes_match_the_local_run(tmp_path, detector, inputs, local_rows):
    detector.save(tmp_path / "det.pt")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(REPO / "pipelines" / "torch_distributed_filter.py"), *inputs, "--encoder", "fmnist-badencoder",
               "--detector", str(tmp_path / "det.pt"), "--out", str(tmp_path / "dist"), "--batch-size", "64",
               "--workers", "1", "--embeddings"]
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                        "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary == {"world_size": 2, "shards": 4, "finished_shards": 4, "samples": 302,
                       "kept": sum(r["kept"] for r in local_rows),
                       "dropped": sum(r["status"] == "dropped" for r in local_rows), "error": 2, "balanced": True}
    urls_by_rank = [{row["url"] for row in sorted_rows(ds.dataset(str(tmp_path / "dist" / f"rank-{rank:05d}" /
                                                                    "parquet")))} for rank in (0, 1)]
    assert urls_by_rank == [{inputs[0], inputs[2]}, {inputs[1], inputs[3]}]  # shards r, r + 2, ...
    assert sorted_rows(parquet_dataset(tmp_path / "dist")) == local_rows
    kept = sorted(row["key"] for row in local_rows if row["kept"])
    assert shard_keys(sorted(map(str, (tmp_path / "dist").glob("rank-*/shards/*.tar")))) == kept
