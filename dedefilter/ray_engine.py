"""The filter on Ray Data: ``read_webdataset`` -> scorer actors (``map_batches``) -> Parquet (+ filtered shards).

Ray schedules, streams and retries; dedefilter only supplies the callable that scores a batch. The actors
run :meth:`DeDeFilter.process` (the local stage's decode -> score -> decide) and build rows with
:func:`dedefilter.sink.record_batch`, so the score table has the local job's schema and, on CPU, the
local job's exact scores. Samples without a decodable image become ``error`` rows with the reason, as
locally. Unlike the local reader, Ray's tar reader cannot recover from a truncated archive: the read task
fails (after Ray's retries) and so does the run, loudly; no sample is silently lost either way.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import torch

from .calibration import Threshold
from .job import ledger
from .scoring import Scorer
from .sink import record_batch, schema
from .stage import DeDeFilter, StageConfig

SAMPLE_PREFIX = "sample."  # carries the input sample's fields next to its row, for the filtered shards


def fresh_directory(directory: Path, overwrite: bool) -> None:
    """An empty output directory; an existing non-empty one only with ``overwrite``."""
    if directory.exists() and any(directory.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{directory} is not empty: choose another --out or pass --overwrite")
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)


def require_ray():
    """Import ray, or say which extra installs it."""
    try:
        import ray
        import ray.data
    except ImportError as err:
        raise ImportError("the Ray engine needs Ray Data: pip install 'dedefilter[ray]'") from err
    return ray


class ScoreBatches:
    """``map_batches`` callable (one per actor): an Arrow batch of raw WebDataset samples -> score rows.

    Built once per actor, so the encoder and the DeDe model load once and stay resident.
    """

    def __init__(self, scorer: Scorer, threshold: Threshold | None, stage: StageConfig, keep_samples: bool,
                 threads: int):
        torch.set_num_threads(threads)  # as many as the CPUs the actor reserved: actors must not oversubscribe
        self.filter = DeDeFilter(scorer, threshold, stage)
        self.keep_samples = keep_samples
        self.metadata = {"dedefilter": json.dumps(self.filter.metadata(), sort_keys=True)}

    def __call__(self, batch: pa.Table) -> pa.Table:
        # Raw WebDataset fields are bytes (key and url str); Ray fills a field that a sample lacks with null
        # or NaN, so anything else is an absent field.
        samples = [{name: value for name, value in row.items() if isinstance(value, bytes | str)}
                   for row in batch.to_pylist()]
        outcome = self.filter.process(samples)
        rows = record_batch(**outcome.rows(), model_id=self.filter.scorer.detector.model_id,
                            threshold=self.filter.threshold.value, embed_dim=self.filter.embed_dim)
        table = pa.Table.from_batches([rows])
        if self.keep_samples:
            ordered = outcome.scored + [sample for sample, _ in outcome.failed]
            for name in batch.column_names:
                if name == "__key__" or not name.startswith("__"):
                    kind = pa.string() if name == "__key__" else pa.binary()
                    table = table.append_column(SAMPLE_PREFIX + name, pa.array([s.get(name) for s in ordered], kind))
        return table.replace_schema_metadata(self.metadata)


def kept_samples(rows: pa.Table) -> pa.Table:
    """The kept rows' input samples under their own field names (per block: blocks may differ in fields)."""
    rows = rows.filter(rows["kept"])
    names = [name for name in rows.column_names if name.startswith(SAMPLE_PREFIX)]
    return rows.select(names).rename_columns([name.removeprefix(SAMPLE_PREFIX) for name in names])


@dataclass
class RayResult:
    parquet_dir: Path
    shard_paths: list[str]
    seconds: float
    ledger: dict[str, int]  # rows per status read back from Parquet
    stats: str  # Ray Data's execution summary (per-operator wall and CPU time)

    @property
    def samples_per_s(self) -> float:
        return sum(self.ledger.values()) / self.seconds if self.seconds else 0.0


def filter_shards_ray(urls: list[str], scorer: Scorer, out_dir: str | Path, threshold: Threshold | None = None,
                      stage: StageConfig = StageConfig(), actors: int = 2, cpus_per_actor: float = 1,
                      gpus_per_actor: float = 0, write_shards: bool = True, overwrite: bool = False) -> RayResult:
    """Filter ``urls`` on the connected Ray cluster (``ray.init()`` first, or Ray starts a local one).

    Writes ``out_dir/parquet`` (files of at least ``stage.row_group_size`` rows) and, with ``write_shards``, the kept
    samples to ``out_dir/shards``; ``actors`` scorer actors, each holding one copy of the models. The
    read tasks need CPUs too: keep ``actors * cpus_per_actor`` below the cluster's CPUs, or nothing is read.
    """
    ray = require_ray()
    out_dir = Path(out_dir)
    parquet_dir, shards_dir = out_dir / "parquet", out_dir / "shards"
    fresh_directory(parquet_dir, overwrite)
    if write_shards:
        fresh_directory(shards_dir, overwrite)
    start = time.perf_counter()
    samples = ray.data.read_webdataset(urls, decoder=None)
    scored = samples.map_batches(
        ScoreBatches, fn_constructor_kwargs={"scorer": scorer, "threshold": threshold, "stage": stage,
                                             "keep_samples": write_shards,
                                             "threads": max(1, int(cpus_per_actor))},
        batch_size=stage.batch_size, batch_format="pyarrow", num_cpus=cpus_per_actor, num_gpus=gpus_per_actor,
        compute=ray.data.ActorPoolStrategy(size=actors))
    row_columns = schema(scorer.encoder.embed_dim if stage.store_embeddings else None).names
    if write_shards:
        scored = scored.materialize()  # score once, write twice
        scored.map_batches(kept_samples, batch_format="pyarrow").write_webdataset(str(shards_dir), encoder=None)
        scored = scored.select_columns(row_columns)
    scored.write_parquet(str(parquet_dir), min_rows_per_file=stage.row_group_size)  # not a file per block
    seconds = time.perf_counter() - start
    shard_paths = sorted(str(p) for p in shards_dir.glob("*.tar")) if write_shards else []
    return RayResult(parquet_dir, shard_paths, seconds, ledger(parquet_dir), scored.stats())
