"""The filter inside a multi-process torch job (``torchrun``, one process per GPU or node slot).

Each rank runs the local job (:func:`dedefilter.job.filter_shards`) on its share of the shards:
``wds.split_by_node`` gives rank r the shards r, r + world, r + 2 world, ... (``RANK``/``WORLD_SIZE``,
as ``torchrun`` sets them) and ``split_by_worker`` splits those over its DataLoader workers. Every rank
writes into its own ``out_dir/rank-NNNNN/`` (Parquet parts, filtered shards, per-shard stats files), so
ranks never touch one another's files; the ledgers are summed over the process group with one
all-reduce. ``resume`` works per rank, so resume with the same shards and the same world size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow.dataset as ds
import torch
import torch.distributed as dist
from webdataset.utils import pytorch_worker_info

from .calibration import Threshold
from .job import JobResult, filter_shards
from .markers import STATUSES
from .scoring import Scorer
from .stage import StageConfig

MARKER_FIELDS = ("samples", *STATUSES, "rows")


@dataclass
class RankResult:
    rank: int
    world_size: int
    job: JobResult  # this rank's own run (its ``unfinished`` lists the other ranks' shards too)
    shards: int
    finished_shards: int  # shards with a valid stats file, summed over all ranks
    ledger: dict[str, int]  # Parquet rows per status, summed over all ranks
    markers: dict[str, int]  # the shards' stats files, summed over all ranks

    @property
    def balanced(self) -> bool:
        """Every shard finished on some rank, and samples in = kept + dropped + error = Parquet rows."""
        stats = self.markers
        return (self.finished_shards == self.shards and stats["samples"] == stats["rows"] == sum(self.ledger.values())
                and all(stats[name] == self.ledger[name] for name in STATUSES))


def rank_dir(out_dir: str | Path, rank: int) -> Path:
    return Path(out_dir) / f"rank-{rank:05d}"


def parquet_dataset(out_dir: str | Path) -> ds.Dataset:
    """All ranks' score tables as one dataset."""
    return ds.dataset(sorted(str(p) for p in Path(out_dir).glob("rank-*/parquet/*.parquet")), format="parquet")


def filter_shards_distributed(urls: list[str], scorer: Scorer, out_dir: str | Path,
                              threshold: Threshold | None = None, stage: StageConfig = StageConfig(),
                              num_workers: int = 2, write_shards: bool = True, overwrite: bool = False,
                              resume: bool = False) -> RankResult:
    """This rank's share of a multi-process filter job; call it on every rank with the same arguments.

    Needs ``RANK``/``WORLD_SIZE`` in the environment (``torchrun`` sets them) so that DataLoader workers
    split shards the same way; the ledger all-reduce needs ``torch.distributed`` initialised (any backend).
    """
    rank, world_size, _, _ = pytorch_worker_info()
    if world_size > 1 and not dist.is_initialized():
        raise RuntimeError(f"WORLD_SIZE is {world_size} but torch.distributed is not initialised: "
                           "call torch.distributed.init_process_group first")
    job = filter_shards(urls, scorer, rank_dir(out_dir, rank), threshold, stage, num_workers, write_shards,
                        overwrite, resume, progress=False)
    finished = len(urls) - len(job.unfinished)  # this rank's: the others' shards never finish in its directory
    counts = torch.tensor([finished] + [job.ledger[s] for s in STATUSES] + [job.markers[s] for s in MARKER_FIELDS])
    if dist.is_initialized():  # counts live on the CPU: NCCL jobs sum them over a gloo group
        dist.all_reduce(counts, group=None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo"))
    totals = counts.tolist()
    return RankResult(rank, world_size, job, len(urls), totals[0], dict(zip(STATUSES, totals[1:4], strict=True)),
                      dict(zip(MARKER_FIELDS, totals[4:], strict=True)))
