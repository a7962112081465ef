"""Filter WebDataset shards on a Ray cluster: the shard is the unit of work, scorer actors filter whole shards.

    python pipelines/ray_filter.py 'data/shard-{000000..000099}.tar' --encoder fmnist-badencoder \\
        --detector det.pt --out out/ --actors 4                   # a local Ray on this machine
    RAY_ADDRESS=HEAD:6379 python pipelines/ray_filter.py ... --actors 64 --gpus-per-actor 1   # a running cluster
    python pipelines/ray_filter.py ... --resume                   # after a crash: redo only unfinished shards

``dedefilter filter --engine ray`` under another name, with the same flags and messages:
the local job's output layout, rows and ledger, per-shard stats files, ``--resume``, and a pool sized
to the cluster (docs/SCALE.md). Shard paths and ``--out`` must mean the same on every node (a shared
filesystem, or any url ``webdataset.gopen`` reads, e.g. ``pipe:aws s3 cp s3://bucket/shard.tar -``).
"""

from __future__ import annotations

import sys

from dedefilter.cli import main

if __name__ == "__main__":
    sys.exit(main(["filter", "--engine", "ray", *sys.argv[1:]]))
