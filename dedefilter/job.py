"""The filter job: WebDataset shards in, filtered shards and Parquet scores out, with DataLoader workers.

The input shard is the unit of work (:mod:`dedefilter.markers`): a worker reads one shard through the
DeDe stage, publishes its Parquet part and filtered tar, and writes its stats file last. The ledger
sums the stats files (samples in = kept + dropped + error) and checks them against the Parquet rows;
``resume=True`` redoes only the shards without a stats file (and those that could not be read).

Nothing is lost silently: a missing local input, or an output folder that overlaps an input, stops the
job before any work; a shard that cannot be read at run time is an error row and is listed in
:attr:`JobResult.unread`; a worker that dies (:class:`JobInterrupted`) and an error raised while
filtering a shard (:class:`JobFailed`, naming the shard) are told apart.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.dataset as ds
import webdataset as wds
from tqdm import tqdm

from .calibration import Threshold
from .guard import is_local, refuse_overlap
from .markers import (
    JOB_FORMAT,
    STATUSES,
    Layout,
    clear_shard,
    clear_temps,
    hidden_temp,
    part_counts,
    prepare,
    summed,
    valid_marker,
    write_json_atomically,
)
from .scoring import Scorer
from .shards import read_shard, require_shards, unreadable
from .stage import Counters, DeDeFilter, StageConfig

PR_SET_PDEATHSIG = 1
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


class JobInterrupted(RuntimeError):
    """A worker died mid-run (killed, out of memory): the finished shards stay for a resumed run."""


class JobFailed(RuntimeError):
    """Filtering a shard raised an error (a bug, a tensor out of memory): rerunning alone will not help.

    ``detail`` is the traceback of the original error (from the worker that raised it).
    """

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail


class ShardFailed(Exception):
    """An error raised while filtering one shard, named by that shard (crosses the DataLoader as text)."""


def failures_named(work, tasks: Iterable[dict]) -> Iterator[dict]:
    """Run ``work`` task by task, so an error raised inside it says which shard it was filtering."""
    for task in tasks:
        try:
            yield from work([task])
        except Exception as err:
            raise ShardFailed(f"filtering shard {task['index']} ({task['url']}) raised "
                              f"{type(err).__name__}: {err}") from err


@dataclass
class JobResult:
    parquet_dir: Path
    shard_paths: list[str]
    yielded: int  # samples passed on into the filtered shards, over all finished shards
    seconds: float
    ledger: dict[str, int]  # rows per status read back from Parquet
    live_counts: dict[str, int]  # rows per status counted by the workers during this run
    markers: dict[str, int]  # the shards' stats files summed: samples, kept, dropped, error, rows, passed_on
    shards: int
    resumed: int  # shards an earlier run had finished, skipped
    unfinished: list[str]  # urls of shards without a valid stats file after the run
    duplicate_keys: int  # keys scored in more than one shard (repeats within a shard are error rows)
    unread: list[str] = field(default_factory=list)  # shards of which nothing could be read (an error row each)

    @property
    def balanced(self) -> bool:
        """Every shard finished, and samples in = kept + dropped + error = Parquet rows, status by status."""
        stats = self.markers
        return (not self.unfinished and stats["samples"] == stats["rows"] == sum(self.ledger.values())
                and all(stats[name] == self.ledger[name] for name in STATUSES))

    @property
    def samples_per_s(self) -> float:
        return sum(self.live_counts.values()) / self.seconds if self.seconds else 0.0

    def describe(self) -> str:
        """The ledger in one line, as the command prints it."""
        stats = self.markers
        return (f"ledger: {stats['samples']} in = {stats['kept']} kept + {stats['dropped']} dropped + "
                f"{stats['error']} error; {self.shards} shards ({self.resumed} finished before"
                f"{f', {len(self.unread)} could not be read' if self.unread else ''}); "
                f"{'balanced' if self.balanced else 'NOT BALANCED'} ({self.samples_per_s:.0f} samples/s)")


def ledger(parquet_dir: str | Path) -> dict[str, int]:
    """Rows per status (kept / dropped / error) over all published part files."""
    table = ds.dataset(str(parquet_dir), format="parquet").to_table(columns=["status"])
    counts = table.group_by("status").aggregate([("status", "count")]).to_pylist()
    totals = dict.fromkeys(STATUSES, 0)
    totals.update({row["status"]: row["status_count"] for row in counts})
    return totals


def duplicate_keys(parquet_dir: str | Path) -> int:
    """Keys scored (kept or dropped) in more than one row: the same key in several shards."""
    table = ds.dataset(str(parquet_dir), format="parquet").to_table(columns=["key"],
                                                                    filter=pc.field("status") != "error")
    counts = table.group_by("key").aggregate([("key", "count")])["key_count"]
    return int(pc.sum(pc.greater(counts, 1)).as_py() or 0)


def set_up_worker(parent: int, _worker_id: int) -> None:
    """DataLoader ``worker_init_fn`` of the filter job's workers."""
    die_with_parent(parent)
    keep_freed_memory()


def die_with_parent(parent: int) -> None:
    """(Linux) The worker is killed with the main process, so no orphan keeps writing a shard while a resumed
    run redoes it.

    Workers keep torch's one thread: more threads in a worker forked from a process whose OpenMP pool
    already ran can deadlock (seen here as a hung resumed run).
    """
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the main process died before prctl took effect
        os._exit(1)


def keep_freed_memory() -> bool:
    """(glibc) Keep the memory a process frees in its heap for the next chunk, instead of handing every large
    tensor back to the system and faulting fresh zeroed pages in at the next (glibc's defaults; the encoder's
    activations are MBs per chunk): ResNet-18 took 114-118 ms per chunk of 16 in an encoder-only loader's workers
    instead of 124-126 (docs/BENCHMARKS.md). Memory stays bounded by the process's peak use. False where there
    is no glibc ``mallopt``."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    # glibc's largest mmap threshold on 64-bit (allocations below it come from the heap); trim only beyond 1 GiB
    return bool(mallopt(M_MMAP_THRESHOLD, 32 * 2 ** 20)) and bool(mallopt(M_TRIM_THRESHOLD, 2 ** 30))


class ShardWork:
    """The work of one DataLoader worker: ``{"index", "url"}`` tasks in, one stats dict per finished shard out."""

    def __init__(self, stage: DeDeFilter, layout: Layout, write_shards: bool):
        self.stage = stage
        self.layout = layout
        self.write_shards = write_shards

    def __call__(self, tasks: Iterable[dict]) -> Iterator[dict]:
        for task in tasks:
            yield self.filter_shard(task["index"], task["url"])

    def filter_shard(self, index: int, url: str) -> dict:
        """Filter one input shard into its part file and filtered tar, then write its stats file (last)."""
        start = time.perf_counter()
        config, layout = self.stage.config, self.layout
        internal = {config.score_field, config.suspect_field}
        read = 0
        unread = False

        def counted(samples: Iterable[dict]) -> Iterator[dict]:
            nonlocal read, unread
            for sample in samples:
                read += 1
                unread = unread or unreadable(sample)
                yield sample

        recorder = self.stage.recorder(layout.part_name(index))
        temp_tar = hidden_temp(layout.tar(index))
        writer = wds.TarWriter(str(temp_tar)) if self.write_shards else None
        passed = 0
        for sample in self.stage(counted(read_shard(url)), recorder):  # publishes the part at the shard's end
            passed += 1
            if writer is not None:
                writer.write({k: v for k, v in sample.items()
                              if k == "__key__" or not (k.startswith("__") or k in internal)})
        if writer is not None:
            writer.close()
            if unread:  # no tar for a shard that could not be read
                temp_tar.unlink()
            else:
                os.replace(temp_tar, layout.tar(index))
        stats = {"url": url, "index": index, "samples": read, "rows": recorder.rows, "passed_on": passed,
                 **part_counts(layout.part(index)), "seconds": round(time.perf_counter() - start, 3),
                 **({"unread": True} if unread else {})}
        write_json_atomically(layout.marker(index), stats)
        return stats


def open_job(urls: list[str], scorer: Scorer, out_dir: str | Path, threshold: Threshold | None, stage: StageConfig,
             write_shards: bool, overwrite: bool, resume: bool,
             counters: Counters | None = None) -> tuple[Layout, DeDeFilter, list[dict]]:
    """Start (or check and resume) a job's output directory and list the shards still to filter, their
    leftovers removed: the part of a job every engine (local, torch, Ray) shares, so they all resume each other's runs.

    Missing local shards and an ``out_dir`` that overlaps an input are refused before anything is written;
    ``overwrite`` replaces only an earlier run's output (:func:`dedefilter.markers.remove_job`); a shard
    that could not be read is redone on ``resume``."""
    require_shards(urls)
    refuse_overlap(out_dir, [url for url in urls if is_local(url)])
    layout = Layout(Path(out_dir))
    stage = replace(stage, parquet_dir=str(layout.parquet))
    dede = DeDeFilter(scorer, threshold, stage, counters)
    outputs = {k: v for k, v in asdict(stage).items() if k not in ("batch_size", "parquet_dir", "row_group_size")}
    prepare(layout, {"format": JOB_FORMAT, "urls": list(urls), "model_id": scorer.detector.model_id,
                     "threshold": dede.threshold.to_dict(), "stage": outputs, "write_shards": write_shards},
            overwrite, resume)
    tasks = [{"index": i, "url": url} for i, url in enumerate(urls)
             if not (marker := valid_marker(layout, i, url, write_shards)) or marker.get("unread")]
    for task in tasks:
        clear_shard(layout, task["index"])
    clear_temps(layout)
    return layout, dede, tasks


def job_result(layout: Layout, urls: list[str], write_shards: bool, seconds: float, live_counts: dict[str, int],
               resumed: int) -> JobResult:
    """The ledger of a job's directory after a run: its shards' stats files and the Parquet rows read back."""
    markers = [valid_marker(layout, i, url, write_shards) for i, url in enumerate(urls)]
    return JobResult(
        parquet_dir=layout.parquet, shard_paths=sorted(str(p) for p in layout.shards.glob("*.tar")),
        yielded=sum(m["passed_on"] for m in markers if m), seconds=seconds, ledger=ledger(layout.parquet),
        live_counts=live_counts, markers=summed([m for m in markers if m]), shards=len(urls),
        resumed=resumed, unfinished=[url for url, m in zip(urls, markers, strict=True) if not m],
        duplicate_keys=duplicate_keys(layout.parquet),
        unread=[url for url, m in zip(urls, markers, strict=True) if m and m.get("unread")])


@contextmanager
def sample_progress(counters: Counters, shards: int, finished: int, enabled: bool):
    """A bar of samples filtered so far (from the workers' shared counters, refreshed twice a second),
    with shards finished beside it; yields the function to call when a shard finishes."""
    with tqdm(desc="filter", unit=" samples", disable=not enabled) as bar:
        done = [finished]
        stop = threading.Event()

        def refresh() -> None:
            counts = counters.snapshot()
            bar.n = sum(counts.values())
            bar.set_postfix(counts | {"shards": f"{done[0]}/{shards}"})

        def shard_finished() -> None:
            done[0] += 1
            refresh()

        def poll() -> None:
            while not stop.wait(0.5):
                refresh()

        poller = threading.Thread(target=poll, daemon=True)
        if enabled:
            poller.start()
        try:
            yield shard_finished
        finally:
            stop.set()
            if enabled:
                poller.join()
                refresh()


def filter_shards(urls: list[str], scorer: Scorer, out_dir: str | Path, threshold: Threshold | None = None,
                  stage: StageConfig = StageConfig(), num_workers: int = 2, write_shards: bool = True,
                  overwrite: bool = False, resume: bool = False, progress: bool = True) -> JobResult:
    """Stream ``urls`` through the DeDe stage; write ``out_dir/{parquet,shards,stats}`` one input shard at a time.

    ``resume``: keep the shards an interrupted run of the same job finished (their stats files exist)
    and redo the rest, so the output ends as if the run had never stopped. Refusals: see :func:`open_job`.
    """
    counters = Counters()
    layout, dede, tasks = open_job(urls, scorer, out_dir, threshold, stage, write_shards, overwrite, resume, counters)
    start = time.perf_counter()
    if tasks:
        pipeline = wds.DataPipeline(partial(iter, tasks), wds.split_by_node, wds.split_by_worker,
                                    partial(failures_named, ShardWork(dede, layout, write_shards)))
        loader = wds.WebLoader(pipeline, batch_size=None, num_workers=min(num_workers, len(tasks)),
                               worker_init_fn=partial(set_up_worker, os.getpid()))

        def finished() -> int:
            return sum(1 for i, url in enumerate(urls) if valid_marker(layout, i, url, write_shards))

        try:
            shards = iter(loader)  # the workers start here, before the progress thread
            with sample_progress(counters, len(urls), len(urls) - len(tasks), progress) as shard_finished:
                for _ in shards:
                    shard_finished()
        except ShardFailed as err:  # raised here (no workers), or re-raised by the DataLoader as its text
            detail = ("".join(traceback.format_exception(err.__cause__)) if err.__cause__ is not None
                      else str(err).partition("\n")[2])
            raise JobFailed(f"{str(err).rpartition(f'{ShardFailed.__name__}: ')[2].strip()}. This is an error in the "
                            "work, not an interrupted run: fix its cause (for an out-of-memory error, a smaller "
                            f"--batch-size or fewer --workers), then run the same command with --resume to keep "
                            f"the {finished()} finished shards", detail) from err
        except RuntimeError as err:
            raise JobInterrupted(f"the filter run stopped ({err}): a worker died (killed, or out of memory). The "
                                 f"{finished()} finished shards are kept: run the same command with --resume to redo "
                                 f"the rest. Until then, hidden temporary files of the unfinished shards (names like "
                                 f".part-000003.parquet.<pid>.tmp) stay in {layout.root}; --resume or --overwrite "
                                 "removes them") from err
    result = job_result(layout, urls, write_shards, time.perf_counter() - start, counters.snapshot(),
                        resumed=len(urls) - len(tasks))
    if progress:
        print(result.describe())
    return result
