"""Read a filter's Parquet scores (or an audit's ``samples.parquet``) into compact arrays.

Streams record batches (``pyarrow.dataset``) and keeps only the compact columns and the embedding
matrix, never one big table, so an audit of millions of rows fits in memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

STATUSES = ("kept", "dropped", "error")
SAMPLES_FILE = "samples.parquet"  # an audit folder's per-sample table
SCAN_COLUMNS = ("key", "url", "score", "status", "suspect", "threshold")  # what `scan` needs of a filter's rows


@dataclass
class Scan:
    """The compact columns of a score directory, one entry per row in dataset order."""

    keys: pa.Array
    urls: list[str]
    url_code: np.ndarray  # int32 index into urls, -1 where null
    score: np.ndarray  # float32, NaN for errors
    status: np.ndarray  # int8 index into STATUSES
    suspect: np.ndarray  # bool
    thresholds: list[float]
    embeddings: np.ndarray | None  # (rows, D) float32, zeros where missing
    has_embedding: np.ndarray  # bool
    metadata: dict
    model_ids: list[str]

    def __len__(self) -> int:
        return len(self.score)

    @classmethod
    def from_arrays(cls, keys: list[str], scores: np.ndarray, threshold: float, embeddings: np.ndarray) -> Scan:
        """Scores held in memory (one run's, no Parquet), as a filter with ``threshold`` would have written them."""
        suspect = np.asarray(scores) > threshold
        return cls(pa.array(keys, pa.string()), [], np.full(len(keys), -1, np.int32),
                   np.asarray(scores, np.float32), suspect.astype(np.int8), suspect, [float(threshold)],
                   np.ascontiguousarray(embeddings, np.float32), np.ones(len(keys), bool), {}, [])


def score_files(path: str | Path) -> list[Path]:
    """The Parquet files a score path names: a file, an audit folder's ``samples.parquet``, or a folder's parts.

    Hidden names (a writer's temporary ``.part-*``) are never read, so a half-written file is never seen.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no Parquet scores at {path}: give the filter's parquet folder (OUT/parquet), "
                                "an audit folder, or a .parquet file")
    if path.is_file():
        return [path]
    if (path / SAMPLES_FILE).is_file():
        return [path / SAMPLES_FILE]
    files = sorted(p for p in path.glob("*.parquet") if p.is_file() and not p.name.startswith((".", "_")))
    if not files:
        hint = f" (did you mean {path / 'parquet'}?)" if (path / "parquet").is_dir() else ""
        raise FileNotFoundError(f"{path} holds no .parquet files{hint}: give the filter's parquet folder "
                                "(OUT/parquet) or an audit folder")
    return files


def open_scores(path: str | Path, columns: tuple[str, ...] = ("key", "score")) -> ds.Dataset:
    """The score files as one dataset, refused with the missing column names when it lacks ``columns``."""
    files = score_files(path)
    dataset = ds.dataset([str(f) for f in files], format="parquet")
    missing = [c for c in columns if c not in dataset.schema.names]
    if missing:
        raise ValueError(f"{path} is not a dedefilter score table: it lacks the column(s) {missing} "
                         f"(it has {dataset.schema.names}); give the Parquet folder `dedefilter filter` wrote")
    return dataset


def scan(path: str | Path, batch_rows: int = 65_536, embeddings: bool = True) -> Scan:
    """Read a score directory batch by batch into compact arrays (never one big table)."""
    dataset = open_scores(path, SCAN_COLUMNS)
    n = dataset.count_rows()
    names = dataset.schema.names
    dim = dataset.schema.field("embedding").type.list_size if embeddings and "embedding" in names else None
    emb = np.zeros((n, dim), np.float32) if dim else None
    has_emb = np.zeros(n, bool)
    score, status = np.empty(n, np.float32), np.empty(n, np.int8)
    suspect, url_code = np.empty(n, bool), np.empty(n, np.int32)
    keys, url_ids, thresholds, model_ids = [], {}, set(), set()
    columns = list(SCAN_COLUMNS) + (["model_id"] if "model_id" in names else []) + (["embedding"] if dim else [])
    row = 0
    for batch in dataset.to_batches(columns=columns, batch_size=batch_rows):
        m = batch.num_rows
        s = slice(row, row + m)
        keys.append(batch.column("key"))
        encoded = batch.column("url").dictionary_encode()
        mapping = np.array([url_ids.setdefault(u, len(url_ids)) for u in encoded.dictionary.to_pylist()] + [-1],
                           np.int32)
        url_code[s] = mapping[encoded.indices.fill_null(len(mapping) - 1).to_numpy()]
        score[s] = batch.column("score").fill_null(np.nan).to_numpy()
        status[s] = pc.index_in(batch.column("status"), value_set=pa.array(STATUSES)).fill_null(2).to_numpy()
        suspect[s] = batch.column("suspect").fill_null(False).to_numpy(zero_copy_only=False)
        thresholds.update(pc.unique(batch.column("threshold").drop_null()).to_pylist())
        if "model_id" in names:
            model_ids.update(pc.unique(batch.column("model_id").drop_null()).to_pylist())
        if dim:
            column = batch.column("embedding")
            flat = np.asarray(column.values)[column.offset * dim:(column.offset + m) * dim]
            emb[s] = flat.reshape(m, dim)
            has_emb[s] = column.is_valid().to_numpy(zero_copy_only=False)
        row += m
    metadata = (pq.read_schema(dataset.files[0]).metadata or {}).get(b"dedefilter", b"{}")
    key_array = pa.concat_arrays([k.combine_chunks() if isinstance(k, pa.ChunkedArray) else k for k in keys]) \
        if keys else pa.array([], pa.string())
    return Scan(key_array, list(url_ids), url_code, score, status, suspect, sorted(thresholds), emb, has_emb,
                json.loads(metadata), sorted(model_ids))
