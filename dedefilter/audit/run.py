"""The audit itself: scan, statistics and (with embeddings) the collapse analysis, written to a folder."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .collapse import Analysis, analyse
from .config import AuditConfig
from .labels import encode_labels
from .scores import SAMPLES_FILE, STATUSES, Scan, scan
from .stats import statistics

EXAMPLE_KEYS = 5  # per cluster in summary.json and the report
NO_EMBEDDINGS = ("skipped: these scores hold no embeddings, so no collapse clusters were looked for; "
                 "rerun `dedefilter filter --embeddings` to find them")


@dataclass
class AuditResult:
    summary: dict
    data: Scan
    analysis: Analysis | None
    label_code: np.ndarray | None
    label_names: list[str] | None


def example_keys(data: Scan, cluster_row: np.ndarray, n_clusters: int, count: int = EXAMPLE_KEYS) -> list[list[str]]:
    """Each cluster's ``count`` highest-scoring member keys (one sort over the members, no loop over rows)."""
    members = np.flatnonzero(cluster_row >= 0)
    order = members[np.lexsort((-data.score[members], cluster_row[members]))]
    starts = np.searchsorted(cluster_row[order], np.arange(n_clusters))
    keys = data.keys.take(pa.array(order)).to_pylist() if len(order) else []
    ends = np.r_[starts[1:], len(order)]
    return [keys[s:min(e, s + count)] for s, e in zip(starts, ends, strict=True)]


def audit(parquet_dir: str | Path, config: AuditConfig = AuditConfig(),
          labels: dict[str, str] | None = None) -> AuditResult:
    """Statistics, and (when the scores hold embeddings) the collapse analysis.

    Without embeddings the summary's ``clustering`` field says that clustering was skipped and why.
    """
    clock = time.perf_counter()
    seconds = {}

    def lap(name: str) -> None:
        nonlocal clock
        seconds[name] = round(time.perf_counter() - clock, 2)
        clock = time.perf_counter()

    data = scan(parquet_dir, config.batch_rows)
    lap("scan")
    summary = {"parquet": str(parquet_dir), "model_ids": data.model_ids, "config": asdict(config),
               "filter": data.metadata, **statistics(data, config), "seconds": seconds}
    lap("statistics")
    label_code = label_names = None
    if labels:
        label_code, label_names = encode_labels(data.keys, labels)
        summary["labelled_rows"] = int((label_code >= 0).sum())
    analysis = None
    if data.embeddings is None:
        summary["clustering"] = NO_EMBEDDINGS
    else:
        analysis = analyse(data, config, label_code, label_names)
        lap("embedding_analysis")
        for info, keys in zip(analysis.clusters, example_keys(data, analysis.cluster, len(analysis.clusters)),
                              strict=True):
            info["example_keys"] = keys
        summary.update(clustering="done", index=analysis.index, clusters=analysis.clusters,
                       isolated_suspects=int((data.suspect & (analysis.cluster == -1) & data.has_embedding).sum()),
                       separated_rows=int(analysis.separated.sum()))
    return AuditResult(summary, data, analysis, label_code, label_names)


def write_json(path: Path, value: dict) -> None:
    """Write JSON under a hidden name, then rename it into place (a reader never sees half a file)."""
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(temp, path)


def write_audit(result: AuditResult, out_dir: str | Path, row_group: int = 262_144) -> Path:
    """``summary.json`` and ``samples.parquet`` (a row per sample: score, collapse, cluster, region, separated)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "summary.json", result.summary)
    data, a = result.data, result.analysis
    urls = pa.array(data.urls + [None], pa.string())
    columns = {"key": data.keys, "url": urls.take(pa.array(np.where(data.url_code < 0, len(data.urls), data.url_code))),
               "score": pa.array(data.score, from_pandas=True), "suspect": pa.array(data.suspect),
               "status": pa.array(np.array(STATUSES)[data.status])}
    if a is not None:
        columns.update(knn_distance=pa.array(a.knn_distance, from_pandas=True),
                       collapse=pa.array(a.collapse, from_pandas=True),
                       cluster=pa.array(a.cluster), region=pa.array(a.region), separated=pa.array(a.separated))
    provenance = {"scores": str(Path(result.summary["parquet"]).resolve()), "model_ids": data.model_ids}
    table = pa.table(columns).replace_schema_metadata({"dedefilter_audit": json.dumps(provenance)})
    temp = out / f".{SAMPLES_FILE}.tmp-{os.getpid()}"
    pq.write_table(table, temp, row_group_size=row_group)
    os.replace(temp, out / SAMPLES_FILE)
    return out
