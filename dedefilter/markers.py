"""The shard as the unit of work: per-shard outputs, completion markers, and what a resumed run redoes.

Input shard ``i`` of a job writes ``parquet/part-{i:06d}.parquet``, ``shards/filtered-{i:06d}.tar``
(when filtered shards are written) and, last, ``stats/shard-{i:06d}.json``: its stats file, which is
also its completion marker (img2dataset's and datatrove's scheme). Every file is written under a
hidden temporary name and renamed into place, so a reader (``pyarrow.dataset`` skips names starting
with ``.``) never sees a partial file, and a marker is only ever next to complete outputs. A killed run
leaves finished shards with markers and unfinished ones without; ``--resume`` keeps the first and
redoes the second. Scores are a function of (sample, model, seed), so a redone shard gets the same rows.

A job's folder is its own: ``job.json`` (written first) says a filter run made it, and ``--overwrite``
removes only the names a run writes (:func:`made_by_a_run`), refusing a folder without the manifest or
with anything else in it (an output that overlaps an input is refused first: :mod:`dedefilter.guard`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

JOB_FORMAT = "dedefilter-job/1"
STATUSES = ("kept", "dropped", "error")
TEMP = re.compile(r"\..+\.tmp")  # hidden_temp's names


@dataclass(frozen=True)
class Layout:
    """Where a job's outputs live."""

    root: Path

    @property
    def parquet(self) -> Path:
        return self.root / "parquet"

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    @property
    def stats(self) -> Path:
        return self.root / "stats"

    @property
    def manifest(self) -> Path:
        return self.root / "job.json"

    def part_name(self, index: int) -> str:
        return f"part-{index:06d}"

    def part(self, index: int) -> Path:
        return self.parquet / f"{self.part_name(index)}.parquet"

    def tar(self, index: int) -> Path:
        return self.shards / f"filtered-{index:06d}.tar"

    def marker(self, index: int) -> Path:
        return self.stats / f"shard-{index:06d}.json"

    def made(self) -> dict[Path, re.Pattern]:
        """Each folder a run writes to and the file names it writes there (hidden temps included)."""
        return {self.root: re.compile(rf"job\.json|{TEMP.pattern}"),
                self.parquet: re.compile(rf"part-\d+\.parquet|{TEMP.pattern}"),
                self.shards: re.compile(rf"filtered-\d+\.tar|{TEMP.pattern}"),
                self.stats: re.compile(rf"shard-\d+\.json|{TEMP.pattern}")}

    def create(self) -> None:
        for directory in (self.parquet, self.shards, self.stats):
            directory.mkdir(parents=True, exist_ok=True)


def hidden_temp(final: Path) -> Path:
    """A per-process hidden name next to ``final``: readers skip it, and two writers never share it."""
    return final.with_name(f".{final.name}.{os.getpid()}.tmp")


def write_json_atomically(path: Path, value: dict) -> None:
    temp = hidden_temp(path)
    temp.write_text(json.dumps(value, sort_keys=True))
    os.replace(temp, path)


def part_counts(path: Path) -> dict[str, int]:
    """Rows per status in one published part file (read back, so a marker states what is on disk)."""
    counts = pc.value_counts(pq.read_table(path, columns=["status"]).column("status")).to_pylist()
    found = {count["values"]: count["counts"] for count in counts}
    return {name: found.get(name, 0) for name in STATUSES}


def valid_marker(layout: Layout, index: int, url: str, write_shards: bool) -> dict | None:
    """The shard's stats if it finished: the marker parses, names this url, and its outputs are there
    (a shard that could not be read, ``"unread"`` in its stats, has no filtered tar)."""
    try:
        stats = json.loads(layout.marker(index).read_text())
        rows = pq.read_metadata(layout.part(index)).num_rows
    except (OSError, ValueError):
        return None
    complete = (stats.get("url") == url and rows == stats.get("rows")
                and (not write_shards or stats.get("unread") or layout.tar(index).is_file()))
    return stats if complete else None


def clear_shard(layout: Layout, index: int) -> None:
    """Remove whatever an unfinished attempt at a shard left (its marker first, so it is never stale)."""
    for path in (layout.marker(index), layout.part(index), layout.tar(index)):
        path.unlink(missing_ok=True)


def clear_temps(layout: Layout) -> None:
    """Remove the hidden temporary files of killed writers."""
    for directory in layout.made():
        for temp in directory.glob(".*.tmp"):
            temp.unlink(missing_ok=True)


def made_by_a_run(layout: Layout) -> tuple[list[Path], list[Path]]:
    """(the files a filter run writes, everything else) in a job folder; folders are listed in neither."""
    ours, others = [], []
    made = layout.made()
    pending = [layout.root]
    while pending:
        for path in sorted(pending.pop().iterdir()):
            pattern = made.get(path.parent)
            if path.is_dir() and not path.is_symlink() and path in made:
                pending.append(path)
            elif pattern is not None and pattern.fullmatch(path.name) and path.is_file() and not path.is_symlink():
                ours.append(path)
            else:
                others.append(path)
    return ours, others


def is_job_folder(layout: Layout) -> bool:
    """Whether a folder holds a filter job's manifest."""
    try:
        return json.loads(layout.manifest.read_text()).get("format") == JOB_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def remove_job(layout: Layout) -> None:
    """Remove what an earlier filter run wrote in ``layout.root``, and nothing else (``--overwrite``).

    Refused for a folder without a job manifest (not made by ``filter``, so nothing in it is ours to
    delete) and for one holding anything a run does not write: those files are listed, and stay.
    """
    if not is_job_folder(layout):
        raise FileExistsError(f"{layout.root} is not empty and holds no dedefilter job manifest (job.json): "
                              "--overwrite only replaces the output of an earlier `dedefilter filter` run; "
                              "choose another --out (or empty this folder yourself)")
    ours, others = made_by_a_run(layout)
    if others:
        listed = ", ".join(str(path.relative_to(layout.root)) for path in others[:10])
        more = f" and {len(others) - 10} more" if len(others) > 10 else ""
        raise FileExistsError(f"{layout.root} holds files a filter run did not write: {listed}{more}; --overwrite "
                              "removes only a run's own outputs: move them elsewhere, or choose another --out")
    for path in sorted(ours, key=lambda path: path == layout.manifest):  # the manifest last
        path.unlink()
    for directory in (layout.parquet, layout.shards, layout.stats):
        if directory.is_dir():
            directory.rmdir()


def prepare(layout: Layout, manifest: dict, overwrite: bool, resume: bool) -> None:
    """Start a fresh output directory, or check that a resumed one was made by the same job."""
    manifest = json.loads(json.dumps(manifest))  # compare as stored (tuples become lists)
    if resume and layout.manifest.is_file():
        previous = json.loads(layout.manifest.read_text())
        changed = sorted(name for name in manifest.keys() | previous.keys() if manifest.get(name) != previous.get(name))
        if changed:
            raise ValueError(f"cannot resume into {layout.root}: it was made with different {', '.join(changed)}; "
                             "resume with the same shards (same order), detector, threshold and output flags, "
                             "or start over with --overwrite")
    elif layout.root.exists() and any(layout.root.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{layout.root} is not empty: choose another --out, pass --overwrite, "
                                  "or --resume a run that was interrupted")
        remove_job(layout)
    layout.root.mkdir(parents=True, exist_ok=True)
    write_json_atomically(layout.manifest, manifest)  # first: a run killed after this can be resumed
    layout.create()


def summed(markers: list[dict]) -> dict[str, int]:
    """A job's ledger from its shard markers: samples in, kept, dropped, error, rows, passed on."""
    names = ("samples", *STATUSES, "rows", "passed_on")
    return {name: sum(marker[name] for marker in markers) for name in names}
