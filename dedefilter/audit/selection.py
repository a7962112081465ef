"""Selections: "score once, select many" (datacomp). A selection is a sorted key list plus its provenance.

The key-list file is JSON lines: the first line a JSON object with the provenance (what was selected,
from which scores and models, when, how many), then one JSON string per key. JSON string escapes make
every key round-trip exactly, spaces, ``\\n``, ``\\r`` and Unicode line separators included (keys are
attacker-controlled; "one key per line, stripped" lost 4 of 10 such keys). JSON lines rather than
Parquet: readable with ``head`` or ``jq``, writable by any tool (``jq -R . keys.txt``), streamed line by
line, and the provenance travels inside the same file, so it cannot be separated from its keys.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from ..calibration import upper_quantile
from .scores import open_scores, score_files

KEY_LIST_FORMAT = "dedefilter-key-list/1"
MEMBERS = {"region": "region", "flagged": "cluster"}  # --members -> the audit column that holds the cluster id


@dataclass(frozen=True)
class Selection:
    keys: list[str]  # sorted
    provenance: dict = field(default_factory=dict)


def model_ids(dataset: ds.Dataset) -> list[str]:
    """The models that made these scores: the ``model_id`` column, or an audit table's metadata."""
    if "model_id" in dataset.schema.names:
        return sorted(pc.unique(dataset.to_table(columns=["model_id"])["model_id"].drop_null()).to_pylist())
    stored = (pq.read_schema(dataset.files[0]).metadata or {}).get(b"dedefilter_audit")
    return json.loads(stored).get("model_ids", []) if stored else []


def removal_score(score: np.ndarray, separated: np.ndarray) -> np.ndarray:
    """The order ``select --separated`` removes in, as one score: rows of a separated collapse region
    (collapse.py) above every other row, each group in its own score order (ties stay ties)."""
    lift = np.nanmax(score) - np.nanmin(score) + 1 if len(score) else 0
    return np.where(separated, score + lift, score)


def select(path: str | Path, threshold: float | None = None, fraction: float | None = None,
           cluster: int | None = None, members: str = "region", separated: bool = False) -> Selection:
    """Keys to drop, sorted, with provenance: scores above ``threshold``, the top ``fraction``, or one cluster.

    ``path`` is a filter's Parquet directory or an audit directory (needed for ``cluster`` and ``separated``);
    ``members`` = ``region`` (the cluster's whole collapse region) or ``flagged`` (its flagged seeds).
    ``separated`` adds every separated collapse region: alone, those regions; with ``threshold``, their rows
    and the scores above it; with ``fraction``, at most that fraction of the rows, the regions first (by
    their own scores if they alone are more), then the highest other scores.
    """
    given = {name: v for name, v in (("threshold", threshold), ("fraction", fraction), ("cluster", cluster))
             if v is not None}
    if len(given) > 1 or not (given or separated):
        raise ValueError(f"select by exactly one of threshold, fraction or cluster, or by separated regions "
                         f"(got {list(given) or 'none'})")
    if separated and cluster is not None:
        raise ValueError("separated regions are selected whole: combine them with a threshold or a fraction, "
                         "not a cluster")
    if threshold is not None and not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold} (NaN would select nothing)")
    dataset = open_scores(path)
    criterion = dict(given)
    needed = [MEMBERS.get(members)] if cluster is not None else ["separated"] if separated else []
    if needed and needed[0] not in dataset.schema.names:
        if needed[0] is None:
            raise ValueError(f"members must be 'region' or 'flagged', not {members!r}")
        raise ValueError(f"{path} holds no clusters: select a cluster or separated regions from an audit "
                         "directory (`dedefilter audit` on scores made with `filter --embeddings`)")
    if cluster is not None:
        keys = dataset.to_table(columns=["key"], filter=ds.field(needed[0]) == cluster)["key"].to_pylist()
        criterion["members"] = members
    else:
        if separated:
            criterion["separated"] = True
        if fraction is not None:
            table = dataset.to_table(columns=["key", "score", *needed], filter=pc.is_finite(ds.field("score")))
            scores = table["score"].to_numpy()
            if separated:  # one lift for the whole table, so that the cut means the same in every row
                scores = removal_score(scores, table["separated"].to_numpy())
            threshold = upper_quantile(scores, fraction)  # where `calibrate --contamination` cuts
            criterion["threshold"] = threshold
            keys = table["key"].filter(pa.array(scores > threshold)).to_pylist()
        else:
            chosen = None if threshold is None else ds.field("score") > threshold
            if separated:
                chosen = ds.field("separated") if chosen is None else chosen | ds.field("separated")
            keys = [k for batch in dataset.to_batches(columns=["key"], filter=chosen)
                    for k in batch.column("key").to_pylist()]
    if any(k is None for k in keys):
        keys = [k for k in keys if k is not None]  # a shard that could not be opened has no key to drop
    provenance = {"format": KEY_LIST_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "source": str(Path(path).resolve()), "files": [f.name for f in score_files(path)],
                  "model_ids": model_ids(dataset), "criterion": criterion, "count": len(keys)}
    return Selection(sorted(keys), provenance)


def select_keys(path: str | Path, threshold: float | None = None, fraction: float | None = None,
                cluster: int | None = None, members: str = "region", separated: bool = False) -> list[str]:
    """``select(...).keys``: the sorted key list alone."""
    return select(path, threshold, fraction, cluster, members, separated).keys


def write_selection(selection: Selection, path: str | Path) -> Path:
    """Write the key list (JSON lines, provenance first) under a hidden name, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    lines = [json.dumps(selection.provenance, sort_keys=True)] + [json.dumps(k) for k in selection.keys]
    try:
        temp.write_text("\n".join(lines) + "\n", encoding="ascii")  # json.dumps escapes all but printable ASCII
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path


def read_selection(path: str | Path) -> Selection:
    """Read a key list: an optional provenance object on the first line, then one JSON string per line."""
    provenance, keys = {}, []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):  # binary lines end at b"\n" only, never at \r or U+2028
            if not raw.strip():
                continue  # no key is written as a blank line ("" is the empty key)
            try:
                value = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                value = ValueError
            if number == 1 and isinstance(value, dict):
                provenance = value
            elif isinstance(value, str):
                keys.append(value)
            else:
                raise ValueError(f"{path}, line {number}: {raw[:60]!r} is not a JSON string. A key list is JSON "
                                 "lines, one JSON string per key (`dedefilter select` writes them); convert a "
                                 "one-key-per-line file with `jq -R . keys.txt > keys.jsonl`")
    return Selection(keys, provenance)
