"""Offline audit of the filter's Parquet scores: statistics, embedding collapse, clusters, selections.

Scoring runs once; an audit reads its Parquet and answers: how many suspects, are they one attack or
noise, which class do they point to, which keys to drop. One module per job:

* ``scores`` — read the score files into compact arrays (record batches, never one big table);
* ``stats`` — counts, score distributions per shard, threshold sensitivity;
* ``collapse`` — kNN collapse, flagged clusters and their collapse regions (the why is in its docstring);
* ``labels`` — labels per key and class names, to name the class a cluster points to;
* ``selection`` — selections (threshold / fraction / cluster / separated regions -> sorted keys + provenance,
  a JSON-lines file);
* ``run`` — the audit: the above in order, written as ``summary.json`` + ``samples.parquet``;
* ``report`` — the audit as one HTML page (matplotlib, extra ``report``; import it explicitly).
"""

from .collapse import Analysis, Graph, Neighbours, analyse, grow_region, neighbourhood_scores, neighbours, unique_rows
from .config import AuditConfig
from .labels import class_names, encode_labels, guess_class_names, labels_from_file, labels_from_shards, name_classes
from .run import AuditResult, audit, write_audit
from .scores import SAMPLES_FILE, STATUSES, Scan, open_scores, scan, score_files
from .selection import KEY_LIST_FORMAT, Selection, read_selection, removal_score, select, select_keys, write_selection
from .stats import drops_above, statistics

__all__ = [
    "KEY_LIST_FORMAT",
    "SAMPLES_FILE",
    "STATUSES",
    "Analysis",
    "AuditConfig",
    "AuditResult",
    "Graph",
    "Neighbours",
    "Scan",
    "Selection",
    "analyse",
    "audit",
    "class_names",
    "drops_above",
    "encode_labels",
    "grow_region",
    "guess_class_names",
    "labels_from_file",
    "labels_from_shards",
    "name_classes",
    "neighbourhood_scores",
    "neighbours",
    "open_scores",
    "read_selection",
    "removal_score",
    "scan",
    "score_files",
    "select",
    "select_keys",
    "statistics",
    "unique_rows",
    "write_audit",
    "write_selection",
]
