"""Filter WebDataset shards inside a multi-process torch job, one process per rank.

    torchrun --standalone --nproc-per-node 2 pipelines/torch_distributed_filter.py \\
        'data/shard-{000000..000009}.tar' --encoder fmnist-badencoder --detector det.pt --out out/
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-endpoint HOST:29500 ...   # several nodes

Rank r filters shards r, r + world, ... (and splits them over its DataLoader workers) into
``out/rank-NNNNN/``; rank 0 prints the ledger summed over all ranks and exits non-zero if it does not
balance. Read all ranks' scores with ``dedefilter.distributed.parquet_dataset(out)``.
"""

from __future__ import annotations

import argparse
import json
import sys

import braceexpand
import torch.distributed as dist

from dedefilter import Detector, Scorer, StageConfig, load_encoder
from dedefilter.distributed import filter_shards_distributed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shards", nargs="+", help="shard paths or brace patterns")
    parser.add_argument("--encoder", required=True)
    parser.add_argument("--detector", required=True, help="a calibrated detector checkpoint")
    parser.add_argument("--out", required=True)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers per rank")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--backend", default="gloo", help="process group backend (the ledger is summed on a gloo group)")
    parser.add_argument("--embeddings", action="store_true", help="store embeddings for audits")
    parser.add_argument("--no-shards", action="store_true", help="Parquet scores only")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--overwrite", action="store_true")
    again.add_argument("--resume", action="store_true", help="same shards and world size as the interrupted run")
    args = parser.parse_args()
    urls = [url for pattern in args.shards for url in braceexpand.braceexpand(pattern)]
    dist.init_process_group(args.backend)
    try:
        encoder = load_encoder(args.encoder)
        scorer = Scorer(encoder, Detector.load(args.detector, encoder.fingerprint))
        result = filter_shards_distributed(urls, scorer, args.out, stage=StageConfig(batch_size=args.batch_size, store_embeddings=args.embeddings),
                                           num_workers=args.workers, write_shards=not args.no_shards,
                                           overwrite=args.overwrite, resume=args.resume)
    finally:
        dist.destroy_process_group()
    if result.rank == 0:
        print(json.dumps({"world_size": result.world_size, "shards": result.shards,
                          "finished_shards": result.finished_shards, "samples": result.markers["samples"],
                          **result.ledger, "balanced": result.balanced}))
    return 0 if result.balanced else 1


if __name__ == "__main__":
    sys.exit(main())
