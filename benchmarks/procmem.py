"""Peak memory of a process and all its descendants (DataLoader workers included), read from /proc.

RSS counts the pages a forked worker shares with its parent (torch's libraries, the model) once per
process, so the sum over a tree overstates what the tree uses; PSS splits each shared page between
the processes that map it, so its sum is the tree's real footprint. Both are reported.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from dataclasses import dataclass

PAGE = os.sysconf("SC_PAGE_SIZE")


def descendants(pid: int) -> list[int]:
    """Child, grandchild, ... process ids of ``pid`` (from /proc/PID/task/TID/children)."""
    found, stack = [], [pid]
    while stack:
        parent = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except FileNotFoundError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    children = [int(c) for c in f.read().split()]
            except FileNotFoundError:
                continue
            found += children
            stack += children
    return found


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its children that have exited and been waited for."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def rss_bytes(pid: int) -> int:
    """Resident set size of one process (0 if it has exited)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except (FileNotFoundError, ProcessLookupError):
        return 0


def pss_bytes(pid: int) -> int:
    """Proportional set size of one process (0 if it has exited)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


@dataclass
class TreeMemory:
    rss: int  # sum over the tree, bytes
    pss: int
    processes: int


def tree_memory(pid: int | None = None) -> TreeMemory:
    """Current RSS and PSS summed over ``pid`` (default: this process) and its descendants."""
    pids = [pid or os.getpid()]
    pids += descendants(pids[0])
    return TreeMemory(sum(map(rss_bytes, pids)), sum(map(pss_bytes, pids)), len(pids))


class PeakSampler:
    """Samples :func:`tree_memory` in a background thread and keeps the peaks (use as a context manager)."""

    def __init__(self, interval_s: float = 0.05, pid: int | None = None):
        self.interval_s = interval_s
        self.pid = pid or os.getpid()
        self.peak = TreeMemory(0, 0, 0)
        self.own_cpu_seconds = 0.0  # the sampler thread's own CPU time, to subtract from the process's
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval_s):
                self.own_cpu_seconds = time.thread_time()
                return

    def sample(self) -> None:
        now = tree_memory(self.pid)
        self.peak = TreeMemory(max(self.peak.rss, now.rss), max(self.peak.pss, now.pss),
                               max(self.peak.processes, now.processes))

    def __enter__(self) -> PeakSampler:  # noqa: PYI034 (ParquetSink does the same)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
