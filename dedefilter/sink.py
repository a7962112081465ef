"""Parquet sink: one row for every sample that enters the filter, one part file per writer.

A writer (rank, DataLoader worker) writes ``.part-*.parquet.tmp`` — hidden, so ``pyarrow.dataset``
readers never see it — in row groups of ``row_group_size``, and renames it to ``part-*.parquet`` on
:meth:`ParquetSink.close`, which its owner calls only once its input ended; a writer stopped early
(a ``break``, an error) calls :meth:`ParquetSink.abort` instead, so no partial part is ever published.
Memory stays bounded by one row group whatever the run's length.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .window import PARTS

log = logging.getLogger(__name__)
COLUMNS = [
    pa.field("key", pa.string()),
    pa.field("url", pa.string()),
    pa.field("score", pa.float32()),
    pa.field("threshold", pa.float32()),
    pa.field("suspect", pa.bool_()),
    pa.field("kept", pa.bool_()),
    pa.field("status", pa.string()),  # "kept", "dropped" or "error"
    pa.field("reason", pa.string()),  # why a sample is an error or was dropped; null when kept
    pa.field("model_id", pa.string()),
    # the paper score; the other parts of a window-level score (dedefilter.window), null when it alone decides
    *(pa.field(name, pa.float32()) for name in PARTS),
    pa.field("collapse", pa.bool_()),  # the window's collapse test
]


def schema(embed_dim: int | None = None) -> pa.Schema:
    """The score table's schema; ``embed_dim`` adds the encoder embedding as a fixed-size float32 list
    (null for error rows), so audits need no encoder."""
    if embed_dim is None:
        return pa.schema(COLUMNS)
    return pa.schema(COLUMNS + [pa.field("embedding", pa.list_(pa.float32(), embed_dim))])


SCHEMA = schema()


def embedding_column(embeddings: np.ndarray | None, rows: int, dim: int) -> pa.Array:
    """(k, dim) embeddings for the first k of ``rows`` rows, null for the rest."""
    values = np.zeros((rows, dim), np.float32)
    valid = np.zeros(rows, bool)
    if embeddings is not None and len(embeddings):
        values[:len(embeddings)] = embeddings
        valid[:len(embeddings)] = True
    flat = pa.array(values.reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, dim, mask=pa.array(~valid))


def part_column(values: np.ndarray | None, rows: int, dtype: pa.DataType) -> pa.Array:
    """A window part (or the collapse flag) for the first k of ``rows`` rows, null for the rest and
    for every row when there is none."""
    if values is None:
        return pa.nulls(rows, dtype)
    mask = np.arange(rows) >= len(values)
    padded = np.zeros(rows, values.dtype)
    padded[:len(values)] = values
    return pa.array(padded, dtype, mask=mask)


def record_batch(keys: Sequence[str | None], urls: Sequence[str | None], scores: np.ndarray,
                 suspect: np.ndarray, status: Sequence[str], reasons: Sequence[str | None], *, model_id: str,
                 threshold: float, embeddings: np.ndarray | None = None, embed_dim: int | None = None,
                 parts: dict[str, np.ndarray] | None = None, table_schema: pa.Schema | None = None) -> pa.RecordBatch:
    """One batch of decisions as score-table rows: shared by :class:`ParquetSink` and the Ray engine, so
    every engine writes the same columns and types. ``parts`` (each for the first rows, like embeddings)
    are the window-level parts and ``"collapse"``."""
    n = len(keys)
    parts = parts or {}
    columns = [
        pa.array(keys, pa.string()),
        pa.array(urls, pa.string()),
        pa.array(np.asarray(scores, np.float32), pa.float32(), from_pandas=True),
        pa.array(np.full(n, threshold, np.float32), pa.float32()),
        pa.array(np.asarray(suspect, bool)),
        pa.array(np.asarray(status) == "kept"),
        pa.array(status, pa.string()),
        pa.array(reasons, pa.string()),
        pa.array([model_id] * n, pa.string()),
        *(part_column(parts.get(name), n, pa.float32()) for name in PARTS),
        part_column(parts.get("collapse"), n, pa.bool_()),
    ]
    if embed_dim is not None:
        columns.append(embedding_column(embeddings, n, embed_dim))
    return pa.RecordBatch.from_arrays(columns, schema=table_schema or schema(embed_dim))


def writer_name(rank: int, worker: int) -> str:
    return f"part-r{rank:05d}-w{worker:03d}"


def part_path(directory: Path, name: str) -> Path:
    return directory / f"{name}.parquet"


def temp_path(directory: Path, name: str) -> Path:
    return directory / f".{name}.parquet.tmp"


def claim_pass(directory: str | Path, stem: str) -> str:
    """``{stem}-p{n:04d}`` for the first pass ``n`` whose part is neither published nor being written.

    The name is claimed by creating its hidden temporary file exclusively, so a second pass over the
    input (the next epoch, or another run into the same directory) never overwrites an earlier pass's part.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    n = 0
    while True:
        name = f"{stem}-p{n:04d}"
        n += 1
        try:
            os.close(os.open(temp_path(directory, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:  # another writer's pass in progress, or a killed one's leftover
            continue
        if not part_path(directory, name).exists():  # checked after the claim: a publish cannot slip in between
            return name
        temp_path(directory, name).unlink()


class ParquetSink:
    def __init__(self, directory: str | Path, name: str, model_id: str, threshold: float,
                 metadata: dict | None = None, row_group_size: int = 65_536, embed_dim: int | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.final_path = part_path(self.directory, name)
        self.temp_path = temp_path(self.directory, name)
        self.model_id = model_id
        self.threshold = np.float32(threshold)
        self.row_group_size = row_group_size
        self.embed_dim = embed_dim
        table_schema = schema(embed_dim).with_metadata({"dedefilter": json.dumps(metadata or {}, sort_keys=True)})
        self._writer = pq.ParquetWriter(self.temp_path, table_schema)
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self.rows = 0

    def write(self, keys: Sequence[str | None], urls: Sequence[str | None], scores: np.ndarray,
              suspect: np.ndarray, status: Sequence[str], reasons: Sequence[str | None],
              embeddings: np.ndarray | None = None, parts: dict[str, np.ndarray] | None = None) -> None:
        """Record one batch of decisions (columns of equal length; scores NaN where unknown).

        ``embeddings`` (rows, D) and window ``parts`` belong to the first rows (the scored samples); later
        rows get null.
        """
        if len(keys) == 0:
            return
        batch = record_batch(keys, urls, scores, suspect, status, reasons, model_id=self.model_id,
                             threshold=float(self.threshold), embeddings=embeddings, embed_dim=self.embed_dim,
                             parts=parts, table_schema=self._writer.schema)
        self._pending.append(batch)
        self._pending_rows += len(keys)
        self.rows += len(keys)
        if self._pending_rows >= self.row_group_size:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._writer.write_table(pa.Table.from_batches(self._pending), row_group_size=self.row_group_size)
            self._pending, self._pending_rows = [], 0

    def close(self) -> Path:
        """Flush, close and publish the part file under its final name: call it once the input ended."""
        if self._writer is not None:
            self._flush()
            self._writer.close()
            self._writer = None
            os.replace(self.temp_path, self.final_path)
        return self.final_path

    def abort(self, why: str) -> None:
        """Discard the unpublished part (its hidden temporary file): the input did not end, so its rows
        are not the whole input's, and a reader must not mistake them for it."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self.temp_path.unlink(missing_ok=True)
            log.warning("%s not published, %d rows discarded: %s", self.final_path, self.rows, why)

    def __enter__(self) -> ParquetSink:
        return self

    def __exit__(self, kind, error, _traceback) -> None:
        """Publish when the block ended normally; abort on an exception (``GeneratorExit`` included)."""
        if kind is None:
            self.close()
        else:
            self.abort(stop_reason(kind, error))


def stop_reason(kind: type[BaseException], error: BaseException | None) -> str:
    """Why a writer stopped before its input ended, for the log."""
    if issubclass(kind, GeneratorExit):
        return "the consumer stopped before the input ended (a break, islice, with_epoch, or garbage collection)"
    return f"{kind.__name__}: {error}"
