"""The filter job on a Ray cluster: the shard is the unit of work, filtered by a pool of scorer actors.

Each actor runs the local job's shard work (:class:`dedefilter.job.ShardWork`: dedefilter's own tar
reader, the DeDe stage, a Parquet part and a filtered tar per input shard, its stats file last), so a
Ray run writes the local job's layout, rows and ledger; broken tar members become ``error`` rows with
their reasons as locally, and ``resume`` redoes only the shards without a stats file, whichever engine
ran the others. The driver sizes the pool to the cluster before starting it (an actor that cannot be
placed would wait forever), hands each idle actor one shard at a time, and a watchdog reports a run
in which no shard finishes, then fails it.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from .calibration import Threshold
from .job import JobFailed, JobInterrupted, JobResult, ShardWork, job_result, keep_freed_memory, open_job
from .markers import STATUSES, Layout
from .scoring import Scorer
from .stage import DeDeFilter, StageConfig

log = logging.getLogger(__name__)
RETRIES = 2  # a shard whose actor died (its node was lost, it was killed for memory) is redone this often


def require_ray():
    """Import ray, or say which extra installs it."""
    try:
        import ray
    except ImportError as err:
        raise ImportError("the Ray engine needs Ray: pip install 'dedefilter[ray]'") from err
    return ray


@dataclass(frozen=True)
class PoolPlan:
    actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    note: str | None = None  # why the pool is smaller than asked, when it is


def plan_pool(actors: int, cpus_per_actor: float, gpus_per_actor: float, resources: dict[str, float],
              shards: int) -> PoolPlan:
    """As many actors as asked, as fit on the cluster (``ray.cluster_resources()``) at once, and as there are
    shards to do: the fewest. Shards are read inside the actors, so reading needs no CPUs of its own.

    Raises ValueError, naming the fix, when not even one actor fits.
    """
    if cpus_per_actor <= 0 or gpus_per_actor < 0:
        raise ValueError(f"--cpus-per-actor must be above 0 and --gpus-per-actor at least 0, "
                         f"got {cpus_per_actor:g} and {gpus_per_actor:g}")
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    fit = math.floor(cpus / cpus_per_actor + 1e-6)  # Ray counts fractional resources in 1e-4 steps
    if gpus_per_actor:
        fit = min(fit, math.floor(gpus / gpus_per_actor + 1e-6))
    cluster = f"the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs"
    one = f"{cpus_per_actor:g} CPUs" + (f" and {gpus_per_actor:g} GPUs" if gpus_per_actor else "")
    if fit < 1:
        raise ValueError(f"{cluster}; one scorer actor reserves {one}, so none fits and the run would wait forever: "
                         "lower --cpus-per-actor / --gpus-per-actor, or add nodes to the cluster "
                         "(`ray start --address HEAD:6379` on each, docs/SCALE.md)")
    note = None
    if fit < actors:
        note = (f"{cluster}: {fit} scorer actors of {one} fit, not the {actors} asked; running {fit} "
                "(pass --actors to choose, or add nodes)")
    return PoolPlan(max(1, min(actors, fit, shards)), cpus_per_actor, gpus_per_actor, note)


@dataclass(frozen=True)
class Watchdog:
    """When no shard has finished for ``report_after`` seconds, say so (and why it may be); after
    ``fail_after`` seconds (None: never) fail the run, keeping the finished shards for ``--resume``."""

    report_after: float = 60.0
    fail_after: float | None = 1800.0


class ShardActor:
    """One scorer actor: loads the encoder and the DeDe model once, then filters whole shards."""

    def __init__(self, dede: DeDeFilter, layout: Layout, write_shards: bool, threads: int, device: str, cwd: str):
        os.chdir(cwd)  # relative shard and output paths mean what they mean to the driver (a shared filesystem)
        torch.set_num_threads(threads)  # the CPUs it reserved: actors must not oversubscribe a node
        keep_freed_memory()  # as the local job's workers (its docstring says why)
        if device != "cpu":
            scorer = Scorer(dede.scorer.encoder, dede.scorer.detector, device=device, precision=dede.scorer.precision)
            dede = DeDeFilter(scorer, dede.threshold, dede.config)
        self.work = ShardWork(dede, layout, write_shards)

    def filter_shard(self, index: int, url: str) -> dict:
        """The shard's stats (as in its stats file), plus this actor's process id and CPU seconds for it."""
        cpu = time.process_time()
        stats = self.work.filter_shard(index, url)
        return stats | {"actor": os.getpid(), "cpu_seconds": round(time.process_time() - cpu, 3)}


@dataclass
class RayResult:
    job: JobResult  # the job's ledger, as the local engine reports it
    plan: PoolPlan
    shard_stats: list[dict] = field(default_factory=list)  # the shards filtered in this run, as the actors returned them


def filter_shards_ray(urls: list[str], scorer: Scorer, out_dir: str | Path, threshold: Threshold | None = None,
                      stage: StageConfig = StageConfig(), actors: int = 2, cpus_per_actor: float = 1.0,
                      gpus_per_actor: float = 0.0, write_shards: bool = True, overwrite: bool = False,
                      resume: bool = False, watchdog: Watchdog = Watchdog(), progress: bool = True) -> RayResult:
    """Filter ``urls`` on the connected Ray cluster (``ray.init(address=...)`` first, else a local one starts)
    into ``out_dir``, laid out as the local job's (:func:`dedefilter.filter_shards`).

    ``resume``: keep the shards an interrupted run of the same job finished, by any engine, and redo the rest.
    """
    ray = require_ray()
    if not ray.is_initialized():
        ray.init()  # joins the cluster named by RAY_ADDRESS, else starts a local one
    plan = plan_pool(actors, cpus_per_actor, gpus_per_actor, ray.cluster_resources(), len(urls))  # before any file
    if plan.note:
        log.warning(plan.note)
    layout, dede, tasks = open_job(urls, scorer, out_dir, threshold, stage, write_shards, overwrite, resume)
    plan = replace(plan, actors=max(1, min(plan.actors, len(tasks))))  # a resumed run may have few shards left
    start = time.perf_counter()
    shard_stats: list[dict] = []
    live = dict.fromkeys(STATUSES, 0)
    if tasks:
        actor_class = ray.remote(ShardActor).options(num_cpus=cpus_per_actor, num_gpus=gpus_per_actor)
        shared = ray.put(dede)  # serialised once, not once per actor

        def spawn():
            return actor_class.remote(shared, layout, write_shards, max(1, int(cpus_per_actor)),
                                      "cuda" if gpus_per_actor else "cpu", os.getcwd())

        with tqdm(total=len(urls), initial=len(urls) - len(tasks), desc="filter (ray)", unit=" shards",
                  disable=not progress) as bar:
            for stats in run_pool(ray, spawn, plan.actors, tasks, watchdog):
                shard_stats.append(stats)
                live = {name: live[name] + stats[name] for name in STATUSES}
                bar.set_postfix(live, refresh=False)
                bar.update()
    result = job_result(layout, urls, write_shards, time.perf_counter() - start, live, resumed=len(urls) - len(tasks))
    if progress:
        print(result.describe())
    return RayResult(result, plan, shard_stats)


def run_pool(ray, spawn, actors: int, tasks: list[dict], watchdog: Watchdog):
    """Start ``actors`` actors with ``spawn()`` and give each idle one the next shard; yield each finished shard's
    stats. A lost actor (its node died, it was killed for memory) is replaced and its shard redone, up to
    ``RETRIES`` times per shard; a shard that fails in the filter itself stops the run, naming it. The actors
    are removed however the run ends."""
    queue = deque(tasks)
    running: dict = {}  # task reference -> (actor, task)
    retries = {task["index"]: 0 for task in tasks}
    pool = []
    total, finished = len(tasks), 0

    def submit(actor) -> None:
        if queue:
            task = queue.popleft()
            running[actor.filter_shard.remote(task["index"], task["url"])] = (actor, task)

    try:
        for _ in range(actors):
            pool.append(spawn())
            submit(pool[-1])
        last = time.monotonic()
        while running:
            waited = time.monotonic() - last
            wait = watchdog.report_after if watchdog.fail_after is None else min(
                watchdog.report_after, max(0.0, watchdog.fail_after - waited))
            ready, _ = ray.wait(list(running), num_returns=1, timeout=wait)
            if not ready:
                stall(ray, time.monotonic() - last, finished, total, running, watchdog)
                continue
            actor, task = running.pop(ready[0])
            try:
                stats = ray.get(ready[0])
            except ray.exceptions.RayActorError as err:
                if retries[task["index"]] == RETRIES:
                    raise JobInterrupted(f"shard {task['url']}: its actor died {RETRIES + 1} times ({err}); the "
                                         "finished shards are kept: run the same command with --resume to redo "
                                         "the rest") from err
                retries[task["index"]] += 1
                log.warning("a scorer actor died filtering %s (%s); redoing the shard on a new one", task["url"], err)
                pool.append(spawn())
                queue.appendleft(task)
                submit(pool[-1])
                continue
            except ray.exceptions.RayTaskError as err:  # the work raised: a bug or an OOM, not a lost actor
                raise JobFailed(f"filtering shard {task['index']} ({task['url']}) raised "
                                f"{type(err.cause).__name__ if err.cause is not None else 'an error'} on Ray. This is an "
                                "error in the work, not an interrupted run: fix its cause (for an out-of-memory error, "
                                f"a smaller --batch-size or fewer --actors), then run the same command with --resume "
                                f"to keep the {finished} finished shards", str(err)) from err
            except ray.exceptions.RayError as err:
                raise JobInterrupted(f"shard {task['url']} failed on Ray ({type(err).__name__}: {err}); the finished "
                                     "shards are kept: run the same command with --resume to redo the rest") from err
            finished += 1
            last = time.monotonic()
            submit(actor)
            yield stats
    finally:
        for actor in pool:
            ray.kill(actor)


def stall(ray, waited: float, finished: int, total: int, running: dict, watchdog: Watchdog) -> None:
    """Say that no shard has finished for ``waited`` seconds, and what the cluster has free; past the
    watchdog's limit, fail the run."""
    free, cluster = ray.available_resources(), ray.cluster_resources()
    message = (f"no shard finished for {waited:.0f} s ({finished} of {total} done, {len(running)} in flight, e.g. "
               f"{next(iter(running.values()))[1]['url']}); the cluster has {free.get('CPU', 0):g} of "
               f"{cluster.get('CPU', 0):g} CPUs and {free.get('GPU', 0):g} of {cluster.get('GPU', 0):g} GPUs free: "
               "if the actors wait for resources other jobs hold, see `ray status`")
    if watchdog.fail_after is not None and waited >= watchdog.fail_after:
        raise JobInterrupted(f"{message}. Gave up after {watchdog.fail_after:g} s (--stall-limit); the finished "
                             "shards are kept: run the same command with --resume to redo the rest")
    log.warning(message)
