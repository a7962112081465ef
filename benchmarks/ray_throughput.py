"""Ray engine throughput with 1 and 2 scorer actors side by side, on clean shards and on shards that include
broken ones, and Parquet bytes per row.

    nice -n 10 python benchmarks/ray_throughput.py [--images 3000] [--repeats 2] [--out benchmarks/results]

Over WebDataset shards of real Fashion-MNIST test images (250 per shard), with the bundled encoder and a
DeDe model of the paper's size (seeded initial weights; a threshold that keeps every sample: the compute
does not depend on the weights). Two inputs: the clean shards, and the same shards with three broken
(one truncated inside a member, one with a header that fails its checksum, one with an image whose
first 64 bytes are zeroed): dedefilter's reader turns what it cannot read into error rows, and the ledger must
balance. One local Ray of 2 logical CPUs (this machine's cores): each actor reserves one and runs one torch
thread, and reads its shards itself. The runs cycle (clean, 1 actor), (clean, 2), (broken, 1), (broken, 2)
so machine load drifts hit all alike; a first untimed run starts Ray's workers. Each timed run is a whole
``filter_shards_ray`` (start the actors, load the models, read, score, write Parquet; no filtered shards).
The actors return each shard's CPU seconds: samples per actor CPU-second is the rate of one actor on a
core of its own, which a busy machine hides in the wall-clock figures. Parquet bytes per row: the rows
scored once by the local job with embeddings, written as one file (64k-row groups) with and without the
embedding column.

Writes OUT/ray_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import ray
import torch

from dedefilter import DeDeConfig, Detector, Scorer, StageConfig, filter_shards, fixed, load_encoder
from dedefilter.data import fashion_mnist
from dedefilter.encoders import BACKDOORED_ENCODER
from dedefilter.model import DeDeModel
from dedefilter.ray_engine import filter_shards_ray
from dedefilter.shards import write_image_shards


def timing_detector(encoder) -> Detector:
    """A DeDe model of the paper's size with seeded initial weights; its threshold keeps every sample."""
    torch.manual_seed(0)
    model = DeDeModel(DeDeConfig(), encoder.embed_dim).eval()
    return Detector(model, encoder.name, encoder.fingerprint, threshold=fixed(float("inf")))


def break_shards(urls: list[str], directory: Path) -> list[str]:
    """Copies of ``urls`` with three broken: truncated inside a member, a header with a bad checksum,
    an image whose first 64 bytes are zeros (undecodable)."""
    directory.mkdir(parents=True, exist_ok=True)
    broken = []
    for i, url in enumerate(urls):
        data = bytearray(Path(url).read_bytes())
        with tarfile.open(url) as archive:
            members = archive.getmembers()
            middle = next(m for m in members[len(members) // 2:] if m.name.endswith(".png"))  # an image
        if i == 1:
            data = data[:middle.offset_data + middle.size // 2]
        elif i == len(urls) // 2:
            data[middle.offset + 100] ^= 0xFF  # inside the header: its checksum fails
        elif i == len(urls) - 2:
            data[middle.offset_data:middle.offset_data + 64] = bytes(64)  # the PNG signature and header: undecodable
        broken.append(str(directory / Path(url).name))
        Path(broken[-1]).write_bytes(data)
    return broken


def parquet_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.parquet"))


def bytes_per_row(urls: list[str], scorer: Scorer, work: Path) -> dict:
    """Score once with embeddings (local job), then write the rows as one file with and without them."""
    result = filter_shards(urls, scorer, work / "local", stage=StageConfig(store_embeddings=True), num_workers=0,
                           write_shards=False, progress=False)
    table = ds.dataset(str(result.parquet_dir), format="parquet").to_table()
    sizes = {}
    for name, rows in (("with_embeddings", table), ("without_embeddings", table.drop_columns(["embedding"]))):
        pq.write_table(rows, work / f"{name}.parquet", row_group_size=65_536)
        sizes[name] = round((work / f"{name}.parquet").stat().st_size / table.num_rows, 1)
    return {"rows": table.num_rows, "embed_dim": scorer.encoder.embed_dim, **sizes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(1)  # this process only writes shards and, at the end, the Parquet-size pass
    images, labels = fashion_mnist("test")
    encoder = load_encoder(BACKDOORED_ENCODER)
    scorer = Scorer(encoder, timing_detector(encoder))
    stage = StageConfig(batch_size=args.batch_size)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        n = args.images
        urls = write_image_shards(work / "in", images[:n], [f"fmnist-test-{i:05d}" for i in range(n)], labels[:n],
                                  shard_size=250)
        inputs = {"clean": urls, "broken": break_shards(urls, work / "broken")}
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        filter_shards_ray(urls[:1], scorer, work / "warmup", stage=stage, actors=1, write_shards=False, progress=False)
        runs = []
        for repeat in range(args.repeats):
            for shards in inputs:
                for actors in (1, 2):
                    out = work / f"ray-{shards}-{actors}-{repeat}"
                    result = filter_shards_ray(inputs[shards], scorer, out, stage=stage, actors=actors,
                                               write_shards=False, progress=False)
                    job, done = result.job, result.shard_stats
                    rows = sum(job.ledger.values())
                    cpu = sum(stats["cpu_seconds"] for stats in done)
                    runs.append({"shards": shards, "actors": actors, "repeat": repeat, "rows": rows, **job.ledger,
                                 "balanced": job.balanced, "seconds": round(job.seconds, 2),
                                 "samples_per_s": round(rows / job.seconds, 1),
                                 "per_actor_samples_per_s": round(rows / job.seconds / actors, 1),
                                 "actor_busy_seconds": round(sum(stats["seconds"] for stats in done), 2),
                                 "actor_cpu_seconds": round(cpu, 2),
                                 "samples_per_actor_cpu_s": round(rows / cpu, 1),
                                 "actors_used": len({stats["actor"] for stats in done}),
                                 "parquet_bytes_per_row": round(parquet_bytes(job.parquet_dir) / rows, 1)})
                    print(json.dumps(runs[-1]), flush=True)
        ray.shutdown()
        sizes = bytes_per_row(urls, scorer, work)
    summary = {}
    for shards in ("clean", "broken"):
        for actors in (1, 2):
            mine = [r for r in runs if r["shards"] == shards and r["actors"] == actors]
            for name in ("samples_per_s", "per_actor_samples_per_s", "samples_per_actor_cpu_s"):
                summary[f"{shards}_{actors}_actors_{name}_median"] = round(float(np.median([r[name] for r in mine])), 1)
        summary[f"{shards}_speedup_2_vs_1"] = round(summary[f"{shards}_2_actors_samples_per_s_median"] /
                                                    summary[f"{shards}_1_actors_samples_per_s_median"], 2)
    summary["all_balanced"] = all(r["balanced"] for r in runs)
    record = {"images": args.images, "batch_size": args.batch_size, "encoder": encoder.name,
              "dede_config": "paper size (DeDeConfig())", "cpu_count": os.cpu_count(),
              "loadavg_before": [round(x, 2) for x in load_before],
              "loadavg_after": [round(x, 2) for x in os.getloadavg()], "ray_num_cpus": 2,
              "runs": runs, "summary": summary, "parquet_bytes_per_row": sizes,
              "command": "python benchmarks/ray_throughput.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ray_throughput.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({"summary": summary, "parquet_bytes_per_row": sizes}, indent=2))


if __name__ == "__main__":
    main()
