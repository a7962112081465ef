"""Ray engine throughput with 1 and 2 scorer actors, side by side in one run, and Parquet bytes per row.

    python benchmarks/ray_throughput.py [--images 3000] [--repeats 2] [--out benchmarks/results]

Over WebDataset shards of real Fashion-MNIST test images (250 per shard, so both actors get blocks),
with the bundled encoder and a DeDe model of the paper's size (seeded initial weights; a threshold
that keeps every sample: the compute does not depend on the weights). One local Ray (``num_cpus`` = 3 logical CPUs: one per actor,
one for the read tasks); each actor is one process with one torch thread. The runs alternate
1, 2, 1, 2, ... actors so machine load drifts hit both alike; a first untimed run starts Ray's
workers. Each timed run is a whole ``filter_shards_ray`` (read, score, write Parquet; no shards), so it
includes the actors' start-up (loading the models). Ray's stats give the scorer operator's summed CPU
seconds: samples per actor CPU-second is the rate of one actor on a core of its own, which a busy
machine hides in the wall-clock figures. Parquet bytes per row: the rows scored once by the local job
with embeddings, written as one file (64k-row groups) with and without the embedding column.

Writes OUT/ray_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import ray
import torch

from dedefilter import DeDeConfig, Detector, Scorer, StageConfig, filter_shards, fixed, load_encoder
from dedefilter.data import fashion_mnist
from dedefilter.model import DeDeModel
from dedefilter.ray_engine import filter_shards_ray
from dedefilter.shards import write_image_shards


def timing_detector(encoder) -> Detector:
    """A DeDe model of the paper's size with seeded initial weights; its threshold keeps every sample."""
    torch.manual_seed(0)
    model = DeDeModel(DeDeConfig(), encoder.embed_dim).eval()
    return Detector(model, encoder.name, encoder.fingerprint, threshold=fixed(float("inf")))


def seconds(text: str) -> float:
    """Ray's duration format (``1.5s``, ``20.1ms``, ``3.0us``) in seconds."""
    value, unit = re.fullmatch(r"([\d.]+)(s|ms|us)", text).groups()
    return float(value) * {"s": 1, "ms": 1e-3, "us": 1e-6}[unit]


def scorer_times(stats: str) -> dict:
    """Summed remote wall and CPU seconds of the operator that holds the scorer actors."""
    section = stats[stats.index("ScoreBatches"):]
    times = {}
    for kind in ("wall", "cpu"):
        total = re.search(rf"Remote {kind} time: .*?, (\S+) total", section).group(1)
        times[f"actor_{kind}_seconds"] = round(seconds(total), 2)
    return times


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
    encoder = load_encoder("fmnist-badencoder")
    scorer = Scorer(encoder, timing_detector(encoder))
    stage = StageConfig(batch_size=args.batch_size)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        n = args.images
        urls = write_image_shards(work / "in", images[:n], [f"fmnist-test-{i:05d}" for i in range(n)], labels[:n],
                                  shard_size=250)
        ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
        filter_shards_ray(urls[:1], scorer, work / "warmup", stage=stage, actors=1, write_shards=False)
        runs = []
        for repeat in range(args.repeats):
            for actors in (1, 2):
                out = work / f"ray-{actors}-{repeat}"
                result = filter_shards_ray(urls, scorer, out, stage=stage, actors=actors, write_shards=False)
                rows = sum(result.ledger.values())
                times = scorer_times(result.stats)
                runs.append({"actors": actors, "repeat": repeat, "rows": rows, "seconds": round(result.seconds, 2),
                             "samples_per_s": round(rows / result.seconds, 1),
                             "per_actor_samples_per_s": round(rows / result.seconds / actors, 1), **times,
                             "samples_per_actor_cpu_s": round(rows / times["actor_cpu_seconds"], 1),
                             "parquet_bytes_per_row": round(parquet_bytes(result.parquet_dir) / rows, 1)})
                print(json.dumps(runs[-1]), flush=True)
        ray.shutdown()
        sizes = bytes_per_row(urls, scorer, work)
    summary = {}
    for actors in (1, 2):
        mine = [r for r in runs if r["actors"] == actors]
        summary[f"{actors}_actors_samples_per_s_median"] = round(float(np.median([r["samples_per_s"] for r in mine])), 1)
        summary[f"{actors}_actors_samples_per_actor_cpu_s_median"] = round(float(
            np.median([r["samples_per_actor_cpu_s"] for r in mine])), 1)
    summary["speedup_2_vs_1"] = round(summary["2_actors_samples_per_s_median"] /
                                      summary["1_actors_samples_per_s_median"], 2)
    record = {"images": args.images, "batch_size": args.batch_size, "encoder": encoder.name,
              "dede_config": "paper size (DeDeConfig())", "cpu_count": os.cpu_count(),
              "loadavg_before": [round(x, 2) for x in load_before],
              "loadavg_after": [round(x, 2) for x in os.getloadavg()],
              "runs": runs, "summary": summary, "parquet_bytes_per_row": sizes,
              "command": "python benchmarks/ray_throughput.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ray_throughput.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({"summary": summary, "parquet_bytes_per_row": sizes}, indent=2))


if __name__ == "__main__":
    main()
