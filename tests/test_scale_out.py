"""Scale-out engines: a Ray run and a 2-process torch job give the local job's exact score table, hostile
shards included; the Ray engine fits its pool to the cluster, resumes a killed run, and never waits in silence."""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow.dataset as ds
import pytest
import webdataset as wds
from PIL import Image
from test_hostile import png, write_tar

from dedefilter import StageConfig, filter_shards
from dedefilter.distributed import parquet_dataset
from dedefilter.job import JobInterrupted
from dedefilter.shards import write_image_shards
from dedefilter.sink import schema

REPO = Path(__file__).resolve().parents[1]
PYTHONPATH = os.pathsep.join([str(REPO), str(REPO / "tests")])  # this checkout, and tests/hostile_encoders.py


def environment(**extra: str) -> dict[str, str]:
    """For a subprocess: this checkout's dedefilter, one OpenMP thread, and the test cluster's token (if any)."""
    return os.environ | {"PYTHONPATH": PYTHONPATH, "OMP_NUM_THREADS": "1", **extra}


def sorted_rows(dataset: ds.Dataset) -> list[dict]:
    return sorted(dataset.to_table().to_pylist(),
                  key=lambda row: (row["key"] or "", row["url"] or "", row["status"], row["reason"] or ""))


def shard_keys(paths: list[str]) -> list[str]:
    return sorted(s["__key__"] for s in wds.DataPipeline(wds.SimpleShardList(paths), wds.tarfile_to_samples()))


def hostile_shards(directory: Path, images, labels, keys) -> list[str]:
    """The broken shards of tests/test_hostile.py, built with its helpers from ten real images."""
    members = []
    for image, label, key in zip(images, labels, keys, strict=True):
        members += [(f"{key}.png", png(Image.fromarray(image))), (f"{key}.cls", str(label).encode())]
    truncated = write_tar(directory / "truncated.tar", members)
    with tarfile.open(truncated) as archive:
        sixth = archive.getmembers()[10]  # the 6th sample's image
    data = Path(truncated).read_bytes()
    Path(truncated).write_bytes(data[:sixth.offset_data + sixth.size // 2])  # cut inside that member
    checksum = write_tar(directory / "bad-checksum.tar", members)
    damaged = bytearray(Path(checksum).read_bytes())
    damaged[sixth.offset + 100] ^= 0xFF  # inside the 6th sample's header
    Path(checksum).write_bytes(damaged)
    a, a_cls, b, b_cls = members[:4]
    odd = write_tar(directory / "odd.tar", [a, a_cls, b, b_cls, a, a,  # img-0000 again, twice: duplicate keys
                                            ("not-an-image.png", b"\x89PNG this is not a png"),
                                            ("no-image.txt", b"a caption without its image")])
    return [truncated, checksum, odd]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, shard_data):
    """The 300 fixture images as three shards, then a truncated shard, one with a bad header checksum, and one
    with duplicate keys, an undecodable image and a sample without an image."""
    images, labels, keys = shard_data
    directory = tmp_path_factory.mktemp("in")
    shards = write_image_shards(directory, images, keys, labels, shard_size=100)
    return [*shards, *hostile_shards(directory, images[:10], labels[:10], keys[:10])]


@pytest.fixture(scope="module")
def local_rows(tmp_path_factory, scorer, inputs):
    """The local job's score table with embeddings, which every engine must reproduce row for row."""
    result = filter_shards(inputs, scorer, tmp_path_factory.mktemp("local"), stage=StageConfig(store_embeddings=True),
                           num_workers=0, progress=False)
    rows = sorted_rows(ds.dataset(str(result.parquet_dir), format="parquet"))
    assert result.balanced and result.markers["samples"] == len(rows)
    errors = {(Path(row["url"]).name, row["key"]): row["reason"] for row in rows if row["status"] == "error"}
    assert "undecodable image" in errors["odd.tar", "not-an-image"]
    assert "no image field" in errors["odd.tar", "no-image"]
    assert "duplicate key 'img-0000'" in errors["odd.tar", "img-0000"]
    assert any(name == "truncated.tar" for name, _ in errors) and any(name == "bad-checksum.tar" for name, _ in errors)
    return rows


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray of exactly 2 CPUs for the module (as on the 2-core machine of issue 17), whatever the
    machine has; its workers import this checkout, and its token is its own (not ~/.ray/auth_token, which
    other Ray users of the machine may replace)."""
    ray = pytest.importorskip("ray", reason="the Ray engine needs ray: pip install 'dedefilter[ray]'")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("RAY_AUTH_MODE", raising=False)  # ray.init turns token mode on, with the token below
        patch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(16))
        patch.setenv("PYTHONPATH", PYTHONPATH)
        context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        yield ray, context.address_info["address"]
        ray.shutdown()


def wait_for_free_cpus(ray, seconds: float = 60) -> None:
    """Until every CPU of the cluster is free again (a killed driver's actors are gone)."""
    deadline = time.monotonic() + seconds
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, "actors of an earlier run still hold CPUs"
        time.sleep(0.2)


def test_the_pool_is_sized_to_the_cluster_or_refused_naming_the_fix():
    from dedefilter.ray_engine import plan_pool

    two_cpus = {"CPU": 2.0}
    assert plan_pool(2, 1.0, 0.0, two_cpus, shards=10).actors == 2  # issue 17's defaults: reading needs no CPU
    smaller = plan_pool(4, 1.0, 0.0, two_cpus, shards=10)
    assert smaller.actors == 2 and "2 scorer actors of 1 CPUs fit, not the 4 asked; running 2" in smaller.note
    assert plan_pool(4, 0.5, 0.0, two_cpus, shards=10).actors == 4
    assert plan_pool(4, 0.5, 0.0, two_cpus, shards=3).actors == 3 and plan_pool(4, 0.5, 0.0, two_cpus, 3).note is None
    with pytest.raises(ValueError, match="has 2 CPUs and 0 GPUs; one scorer actor reserves 3 CPUs, so none fits .* "
                                         "lower --cpus-per-actor / --gpus-per-actor, or add nodes"):
        plan_pool(2, 3.0, 0.0, two_cpus, shards=10)
    with pytest.raises(ValueError, match="reserves 1 CPUs and 1 GPUs, so none fits"):
        plan_pool(2, 1.0, 1.0, two_cpus, shards=10)
    assert plan_pool(8, 1.0, 0.5, {"CPU": 16.0, "GPU": 2.0}, shards=10).actors == 4


def test_issue_17_command_finishes_on_2_cpus_with_the_defaults(tmp_path, detector, inputs, ray_cluster):
    """`filter ... --engine ray --actors 2 --no-shards` waited forever on 2 CPUs: two actors took both and
    Ray's read task got none."""
    _, address = ray_cluster
    detector.save(tmp_path / "det.pt")
    command = [sys.executable, "-m", "dedefilter.cli", "filter", *inputs[:2], "--encoder", "fmnist-badencoder",
               "--detector", str(tmp_path / "det.pt"), "--out", str(tmp_path / "out"), "--engine", "ray",
               "--actors", "2", "--no-shards"]
    done = subprocess.run(command, env=environment(RAY_ADDRESS=address), capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["samples"] == summary["kept"] + summary["dropped"] + summary["error"] == 200
    assert summary["actors"] == 2 and summary["shards"] == 2


def test_a_pool_that_cannot_fit_is_refused_at_once_before_any_file(tmp_path, detector, inputs, ray_cluster, capsys):
    from dedefilter.cli import main

    detector.save(tmp_path / "det.pt")
    start = time.monotonic()
    assert main(["filter", *inputs[:1], "--encoder", "fmnist-badencoder", "--detector", str(tmp_path / "det.pt"),
                 "--out", str(tmp_path / "out"), "--engine", "ray", "--cpus-per-actor", "3"]) == 2
    assert time.monotonic() - start < 10
    assert ("dedefilter filter: error: the Ray cluster has 2 CPUs and 0 GPUs; one scorer actor reserves 3 CPUs, "
            "so none fits") in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_ray_run_matches_the_local_run_on_hostile_shards(tmp_path, encoder, detector, inputs, local_rows, ray_cluster,
                                                         capsys):
    from dedefilter.cli import main

    detector.save(tmp_path / "det.pt")
    code = main(["filter", *inputs, "--encoder", "fmnist-badencoder", "--detector", str(tmp_path / "det.pt"),
                 "--out", str(tmp_path / "ray"), "--engine", "ray", "--batch-size", "64", "--embeddings"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["samples"] == summary["kept"] + summary["dropped"] + summary["error"] == len(local_rows)
    parquet = ds.dataset(str(tmp_path / "ray" / "parquet"), format="parquet")
    assert parquet.schema.remove_metadata() == schema(encoder.embed_dim)
    assert sorted_rows(parquet) == local_rows
    kept = sorted(row["key"] for row in local_rows if row["kept"])
    assert shard_keys(sorted(map(str, (tmp_path / "ray" / "shards").glob("*.tar")))) == kept
    assert len(list((tmp_path / "ray" / "stats").glob("shard-*.json"))) == len(inputs)  # the local job's markers


def test_two_torch_processes_match_the_local_run(tmp_path, detector, inputs, local_rows):
    detector.save(tmp_path / "det.pt")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(REPO / "pipelines" / "torch_distributed_filter.py"), *inputs, "--encoder", "fmnist-badencoder",
               "--detector", str(tmp_path / "det.pt"), "--out", str(tmp_path / "dist"), "--batch-size", "64",
               "--workers", "1", "--embeddings"]
    done = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary == {"world_size": 2, "shards": len(inputs), "finished_shards": len(inputs),
                       "samples": len(local_rows), "kept": sum(r["kept"] for r in local_rows),
                       "dropped": sum(r["status"] == "dropped" for r in local_rows),
                       "error": sum(r["status"] == "error" for r in local_rows), "balanced": True}
    urls_by_rank = [{row["url"] for row in sorted_rows(ds.dataset(str(tmp_path / "dist" / f"rank-{rank:05d}" /
                                                                    "parquet")))} for rank in (0, 1)]
    assert urls_by_rank == [set(inputs[0::2]), set(inputs[1::2])]  # shards r, r + 2, ...
    assert sorted_rows(parquet_dataset(tmp_path / "dist")) == local_rows
    kept = sorted(row["key"] for row in local_rows if row["kept"])
    assert shard_keys(sorted(map(str, (tmp_path / "dist").glob("rank-*/shards/*.tar")))) == kept


def test_a_killed_ray_run_resumes_to_the_uninterrupted_rows(tmp_path, detector, inputs, local_rows, ray_cluster,
                                                            capsys):
    """SIGKILL the driver once a random number of shards has finished, plus a random delay; ``--resume`` on
    Ray then redoes only the unfinished shards and ends with the uninterrupted run's table."""
    from dedefilter.cli import main

    ray, address = ray_cluster
    rng = np.random.default_rng(17)
    detector.save(tmp_path / "det.pt")
    out = tmp_path / "out"
    flags = [*inputs, "--detector", str(tmp_path / "det.pt"), "--out", str(out), "--engine", "ray",
             "--batch-size", "16", "--embeddings"]
    # the killed run: the bundled encoder's weights slowed down, so a quiet machine does not finish first
    process = subprocess.Popen([sys.executable, "-m", "dedefilter.cli", "filter", *flags,
                                "--encoder", "hostile_encoders:slow_badencoder"],
                               env=environment(RAY_ADDRESS=address), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    finished_before_kill = int(rng.integers(0, len(inputs) - 2))
    deadline = time.monotonic() + 120
    while len(list(out.glob("stats/shard-*.json"))) < finished_before_kill or not (out / "job.json").exists():
        assert process.poll() is None, f"the run ended before the kill: {process.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(rng.uniform(0, 2))
    psutil.Process(process.pid).kill()
    process.communicate(timeout=60)
    assert process.returncode == -9
    wait_for_free_cpus(ray)
    finished = len(list(out.glob("stats/shard-*.json")))
    assert finished < len(inputs)
    capsys.readouterr()
    assert main(["filter", *flags, "--encoder", "fmnist-badencoder", "--resume"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["resumed_shards"] == finished and summary["samples"] == len(local_rows)
    assert sorted_rows(ds.dataset(str(out / "parquet"), format="parquet")) == local_rows
    assert not list(out.glob("*/.*"))  # no hidden temporary files left


def test_the_watchdog_reports_a_stalled_run_then_fails_it(tmp_path, scorer, inputs, ray_cluster, caplog):
    """Another job holds every CPU, so no scorer actor can start: the run says so, then gives up."""
    from dedefilter.ray_engine import Watchdog, filter_shards_ray

    ray, _ = ray_cluster

    @ray.remote(num_cpus=2)
    class Hog:
        def ready(self) -> bool:
            return True

    hog = Hog.remote()
    ray.get(hog.ready.remote())
    try:
        start = time.monotonic()
        with caplog.at_level(logging.WARNING, "dedefilter.ray_engine"), \
                pytest.raises(JobInterrupted, match=r"no shard finished for 3 s \(0 of 2 done, 2 in flight.*"
                                                    r"0 of 2 CPUs .* free.*run the same command with --resume"):
            filter_shards_ray(inputs[:2], scorer, tmp_path / "out", watchdog=Watchdog(report_after=1, fail_after=3),
                              progress=False)
        assert time.monotonic() - start < 30
        assert "no shard finished for 1 s" in caplog.text
    finally:
        ray.kill(hog)
    wait_for_free_cpus(ray)  # the run's own actors were removed, not left waiting for the CPUs


def test_the_torch_pipeline_takes_the_filter_flags_and_runs_a_bf16_calibrated_detector(tmp_path, detector):
    """It declared its own flags, without --precision or --threshold, so a bf16 threshold was refused."""
    import importlib.util
    from dataclasses import replace

    from dedefilter.cli import filter_setup
    from dedefilter.stage import DeDeFilter

    spec = importlib.util.spec_from_file_location("torch_distributed_filter",
                                                  REPO / "pipelines" / "torch_distributed_filter.py")
    pipeline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pipeline)
    detector.with_threshold(replace(detector.threshold, precision="bf16")).save(tmp_path / "bf16.pt")
    common = ["a.tar", "--encoder", "fmnist-badencoder", "--detector", str(tmp_path / "bf16.pt"), "--out", "o"]
    setup = filter_setup(pipeline.parser().parse_args(common + ["--annotate"]))
    assert setup.scorer.precision == "bf16" and not setup.stage.drop
    DeDeFilter(setup.scorer, setup.threshold, setup.stage)  # accepts the bf16 threshold
    setup = filter_setup(pipeline.parser().parse_args(common + ["--threshold", "0.5", "--precision", "fp32"]))
    assert setup.scorer.precision == "fp32" and setup.threshold.value == 0.5


def command_line(process: psutil.Process) -> str:
    """A child's command line, or "" when it exited between the listing and the reading (a Ray worker may)."""
    try:
        return " ".join(process.cmdline())
    except (psutil.NoSuchProcess, FileNotFoundError):
        return ""


def test_a_lost_actor_is_replaced_and_its_shard_redone(tmp_path, detector, inputs, local_rows, ray_cluster, caplog):
    """SIGKILL one scorer actor (as a lost node or the OOM killer would): the run finishes with the same table."""
    import threading

    from dedefilter import Scorer, load_encoder
    from dedefilter.ray_engine import filter_shards_ray

    ray, _ = ray_cluster
    wait_for_free_cpus(ray)
    out = tmp_path / "out"
    slow = Scorer(load_encoder("hostile_encoders:slow_badencoder"), detector)
    results = []
    run = threading.Thread(target=lambda: results.append(filter_shards_ray(
        inputs, slow, out, stage=StageConfig(batch_size=16, store_embeddings=True), write_shards=False,
        progress=False)))
    with caplog.at_level(logging.WARNING, "dedefilter.ray_engine"):
        run.start()
        deadline = time.monotonic() + 120
        while not (actors := [p for p in psutil.Process().children(recursive=True)
                              if "ShardActor" in command_line(p)]) or not list(out.glob("stats/*.json")):
            assert run.is_alive() and time.monotonic() < deadline
            time.sleep(0.05)
        actors[0].kill()
        run.join(timeout=180)
    assert results and results[0].job.balanced
    assert "a scorer actor died filtering" in caplog.text
    assert sorted_rows(ds.dataset(str(out / "parquet"), format="parquet")) == local_rows


def test_an_error_raised_in_the_work_on_ray_names_the_shard_and_is_not_called_an_interruption(
        tmp_path, detector, inputs, ray_cluster, capsys):
    from dedefilter.cli import main

    detector.save(tmp_path / "det.pt")
    code = main(["filter", inputs[0], "--encoder", "hostile_encoders:shape_bug_badencoder", "--detector",
                 str(tmp_path / "det.pt"), "--out", str(tmp_path / "out"), "--engine", "ray", "--actors", "1"])
    err = capsys.readouterr().err
    assert code == 1
    assert f"error: filtering shard 0 ({inputs[0]}) raised RuntimeError on Ray. This is an error in the work" in err
    assert "mat1 and mat2 shapes cannot be multiplied" in err  # the actor's traceback is shown
    assert "--resume to redo the rest" not in err
