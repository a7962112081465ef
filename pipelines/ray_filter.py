"""Filter WebDataset shards on a Ray cluster: Ray Data reads, scorer actors score, Parquet (+ kept shards) out.

    python pipelines/ray_filter.py 'data/shard-{000000..000099}.tar' --encoder fmnist-badencoder \\
        --detector det.pt --out out/ --actors 4                   # a local Ray on this machine
    RAY_ADDRESS=auto python pipelines/ray_filter.py ... --actors 64 --gpus-per-actor 1   # a running cluster

Shard paths may be any filesystem Ray Data reads (local, s3://, gs://). Each actor loads the encoder and
the DeDe model once; the output has the local job's schema and scores (docs/SCALE.md).

Resume: Ray retries failed tasks and restarts lost actors within a run, but a run whose driver dies
leaves some blocks written and others not. With ``--slice-shards N`` the shards run in slices of N,
each into ``OUT/slice-NNNNN/`` with a ``_DONE`` marker written after its Parquet is complete; run the
same command again and finished slices are skipped, unfinished ones redone from scratch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import braceexpand
import ray

from dedefilter import Detector, Scorer, StageConfig, load_encoder
from dedefilter.ray_engine import filter_shards_ray


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shards", nargs="+", help="shard paths or brace patterns")
    parser.add_argument("--encoder", required=True)
    parser.add_argument("--detector", required=True, help="a calibrated detector checkpoint")
    parser.add_argument("--out", required=True)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--gpus-per-actor", type=float, default=0.0)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--embeddings", action="store_true", help="store embeddings for audits")
    parser.add_argument("--no-shards", action="store_true", help="Parquet scores only")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--slice-shards", type=int, default=0, help="resumable slices of this many shards")
    args = parser.parse_args()
    urls = [url for pattern in args.shards for url in braceexpand.braceexpand(pattern)]
    encoder = load_encoder(args.encoder)
    scorer = Scorer(encoder, Detector.load(args.detector, encoder.fingerprint))
    ray.init()  # RAY_ADDRESS picks a cluster; without it a local one starts
    stage = StageConfig(batch_size=args.batch_size, store_embeddings=args.embeddings)

    def run(shards: list[str], out: Path, overwrite: bool) -> dict:
        result = filter_shards_ray(shards, scorer, out, stage=stage, actors=args.actors,
                                   cpus_per_actor=args.cpus_per_actor, gpus_per_actor=args.gpus_per_actor,
                                   write_shards=not args.no_shards, overwrite=overwrite)
        return {"parquet": str(result.parquet_dir), "filtered_shards": len(result.shard_paths), **result.ledger,
                "seconds": round(result.seconds, 1)}

    if not args.slice_shards:
        print(json.dumps(run(urls, Path(args.out), args.overwrite)))
        return
    for start in range(0, len(urls), args.slice_shards):
        shards = urls[start:start + args.slice_shards]
        out = Path(args.out) / f"slice-{start // args.slice_shards:05d}"
        marker = out / "_DONE"
        if marker.exists():
            if json.loads(marker.read_text())["shards"] != shards:
                raise SystemExit(f"{marker} was written for other shards: same shard list and --slice-shards, "
                                 "or another --out")
            continue
        summary = run(shards, out, overwrite=True)  # a killed run's partial files are replaced
        marker.write_text(json.dumps({"shards": shards, **summary}))
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
