"""Filter WebDataset shards inside a multi-process torch job, one process per rank.

    torchrun --standalone --nproc-per-node 2 pipelines/torch_distributed_filter.py \\
        'data/shard-{000000..000009}.tar' --encoder fmnist-badencoder --detector det.pt --out out/
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-endpoint HOST:29500 ...   # several nodes

The filter flags are ``dedefilter filter``'s (``dedefilter.cli.add_filter_flags``; ``--workers`` is
per rank). Rank r filters shards r, r + world, ... (and splits them over its DataLoader workers) into
``out/rank-NNNNN/``; rank 0 prints the ledger summed over all ranks and exits non-zero if it does not
balance. Read all ranks' scores with ``dedefilter.distributed.parquet_dataset(out)``.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch.distributed as dist

from dedefilter.cli import add_filter_flags, filter_setup
from dedefilter.distributed import filter_shards_distributed


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_filter_flags(parser)
    parser.add_argument("--backend", default="gloo", help="process group backend (the ledger is summed on a gloo group)")
    return parser


def main() -> int:
    args = parser().parse_args()
    dist.init_process_group(args.backend)
    try:
        urls, scorer, threshold, stage = filter_setup(args)
        result = filter_shards_distributed(urls, scorer, args.out, threshold, stage, num_workers=args.workers,
                                           write_shards=not args.no_shards, overwrite=args.overwrite,
                                           resume=args.resume)
    finally:
        dist.destroy_process_group()
    if result.rank == 0:
        print(json.dumps({"world_size": result.world_size, "shards": result.shards,
                          "finished_shards": result.finished_shards, "samples": result.markers["samples"],
                          **result.ledger, "balanced": result.balanced}))
    return 0 if result.balanced else 1


if __name__ == "__main__":
    sys.exit(main())
