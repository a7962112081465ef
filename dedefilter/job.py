"""The filter job: WebDataset shards in, filtered shards and Parquet scores out, with DataLoader workers."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow.dataset as ds
import webdataset as wds
from tqdm import tqdm

from .calibration import Threshold
from .scoring import Scorer
from .shards import shard_pipeline
from .stage import Counters, DeDeFilter, StageConfig


@dataclass
class JobResult:
    parquet_dir: Path
    shard_paths: list[str]
    yielded: int
    seconds: float
    ledger: dict[str, int]  # rows per status read back from Parquet
    live_counts: dict[str, int]  # the same, counted by the workers while running

    @property
    def balanced(self) -> bool:
        """Every sample the workers saw has exactly one Parquet row with the same decision."""
        return self.ledger == self.live_counts

    @property
    def samples_per_s(self) -> float:
        return sum(self.ledger.values()) / self.seconds if self.seconds else 0.0


def ledger(parquet_dir: str | Path) -> dict[str, int]:
    """Rows per status (kept / dropped / error) over all published part files."""
    table = ds.dataset(str(parquet_dir), format="parquet").to_table(columns=["status"])
    counts = table.group_by("status").aggregate([("status", "count")]).to_pylist()
    totals = {"kept": 0, "dropped": 0, "error": 0}
    totals.update({row["status"]: row["status_count"] for row in counts})
    return totals


def prepare_output(directory: Path, overwrite: bool) -> None:
    if directory.exists() and any(directory.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{directory} is not empty: choose another --out or pass --overwrite")
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)


def filter_shards(urls: list[str], scorer: Scorer, out_dir: str | Path, threshold: Threshold | None = None,
                  stage: StageConfig = StageConfig(), num_workers: int = 2, write_shards: bool = True,
                  shard_size: int = 10_000, overwrite: bool = False, progress: bool = True) -> JobResult:
    """Stream ``urls`` through the DeDe stage; write ``out_dir/parquet`` and ``out_dir/shards``."""
    out_dir = Path(out_dir)
    parquet_dir, shards_dir = out_dir / "parquet", out_dir / "shards"
    prepare_output(parquet_dir, overwrite)
    stage = replace(stage, parquet_dir=str(parquet_dir))
    counters = Counters()
    pipeline = shard_pipeline(urls, DeDeFilter(scorer, threshold, stage, counters))
    loader = wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers)
    writer = None
    if write_shards:
        prepare_output(shards_dir, overwrite)
        writer = wds.ShardWriter(str(shards_dir / "filtered-%06d.tar"), maxcount=shard_size, verbose=0)
    internal = {stage.score_field, stage.suspect_field}
    yielded, start = 0, time.perf_counter()
    with tqdm(desc="filter", unit=" samples", disable=not progress, smoothing=0.1) as bar:

        def refresh() -> None:
            totals = counters.snapshot()
            bar.set_postfix(totals, refresh=False)
            bar.update(sum(totals.values()) - bar.n)

        for sample in loader:
            yielded += 1
            if writer is not None:
                writer.write({k: v for k, v in sample.items()
                              if k == "__key__" or not (k.startswith("__") or k in internal)})
            if yielded % 256 == 0:
                refresh()
        refresh()
    seconds = time.perf_counter() - start
    if writer is not None:
        writer.close()
    shard_paths = sorted(str(p) for p in shards_dir.glob("*.tar")) if write_shards else []
    result = JobResult(parquet_dir, shard_paths, yielded, seconds, ledger(parquet_dir), counters.snapshot())
    if progress:
        counts = result.ledger
        print(f"ledger: {sum(counts.values())} in = {counts['kept']} kept + {counts['dropped']} dropped "
              f"+ {counts['error']} error ({result.samples_per_s:.0f} samples/s)")
    return result
