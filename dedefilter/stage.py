"""The filter as a pipeline stage: decode -> batch -> score -> decide -> record -> pass on.

:class:`DeDeFilter` is a plain generator stage ``samples -> samples`` for ``wds.DataPipeline`` and
``.compose()``; :meth:`DeDeFilter.filter_batches` does the same for an existing DataLoader or iterable
of image batches. Every sample that enters is either yielded, or recorded as ``dropped`` (with its
score) or as ``error`` (with the reason) in the Parquet sink, one part file per (rank, worker).
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from itertools import islice

import numpy as np
import torch
from webdataset.utils import pytorch_worker_info

from .calibration import Threshold
from .data import decode_image
from .scoring import Scorer
from .sink import ParquetSink, writer_name

log = logging.getLogger(__name__)
NON_FINITE = "non-finite score (the encoder or the DeDe model produced NaN or inf)"
IMAGE_FIELDS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm", "tif", "tiff")


@dataclass(frozen=True)
class StageConfig:
    batch_size: int = 256
    drop: bool = True  # False: pass suspects on, only annotated
    parquet_dir: str | None = None  # None: no Parquet record
    image_fields: tuple[str, ...] = IMAGE_FIELDS
    score_field: str = "dede_score"
    suspect_field: str = "dede_suspect"
    row_group_size: int = 65_536
    store_embeddings: bool = False  # add each sample's encoder embedding to Parquet (for offline audits)


@dataclass
class Decision:
    """What happens to each scored sample of a batch."""

    suspect: np.ndarray
    passed: np.ndarray
    status: list[str]
    reasons: list[str | None]


@dataclass
class Outcome:
    """One batch after decode -> score -> decide; every sample is in ``scored`` or ``failed``."""

    scored: list[dict]
    failed: list[tuple[dict, str]]  # (sample, reason): unreadable, no image, undecodable
    scores: np.ndarray  # (len(scored),)
    embeddings: np.ndarray | None  # (len(scored), D)
    decision: Decision  # for the scored samples

    def rows(self) -> dict:
        """The batch's score-table columns (:func:`dedefilter.sink.record_batch`): scored samples first,
        since the embeddings belong to them, then the failed ones as ``error`` rows."""
        samples = self.scored + [sample for sample, _ in self.failed]
        n_failed = len(self.failed)
        return {
            "keys": [s.get("__key__") for s in samples],
            "urls": [s.get("__url__") for s in samples],
            "scores": np.concatenate([self.scores, np.full(n_failed, np.nan, np.float32)]),
            "suspect": np.concatenate([self.decision.suspect, np.zeros(n_failed, bool)]),
            "status": self.decision.status + ["error"] * n_failed,
            "reasons": self.decision.reasons + [reason for _, reason in self.failed],
            "embeddings": self.embeddings,
        }


def writer_identity() -> tuple[int, int]:
    """(rank, DataLoader worker id) of the calling process, as ``wds.split_by_node`` / ``split_by_worker`` see
    them (``RANK`` or the initialised ``torch.distributed`` group), so each part file is one shard split's."""
    rank, _, worker, _ = pytorch_worker_info()
    return rank, worker


def batched(iterable: Iterable, size: int) -> Iterator[list]:
    iterator = iter(iterable)
    while batch := list(islice(iterator, size)):
        yield batch


class Counters:
    """kept / dropped / error totals shared by all DataLoader workers (forked shared memory), for progress."""

    names = ("kept", "dropped", "error")

    def __init__(self):
        self._values = multiprocessing.Array("q", len(self.names))

    def add(self, kept: int, dropped: int, error: int) -> None:
        with self._values.get_lock():
            for i, n in enumerate((kept, dropped, error)):
                self._values[i] += n

    def snapshot(self) -> dict[str, int]:
        return dict(zip(self.names, self._values[:]))


class DeDeFilter:
    def __init__(self, scorer: Scorer, threshold: Threshold | None = None, config: StageConfig = StageConfig(),
                 counters: Counters | None = None):
        threshold = threshold or scorer.detector.threshold
        if threshold is None:
            raise ValueError("no threshold: calibrate the detector (`dedefilter calibrate`) or pass one")
        if threshold.precision not in (None, scorer.precision):
            raise ValueError(f"the threshold was calibrated on {threshold.precision} scores but the scorer runs in "
                             f"{scorer.precision}: bf16 scores differ from fp32 ones by rounding; calibrate with the "
                             "same precision (`dedefilter calibrate --precision`)")
        self.scorer = scorer
        self.threshold = threshold
        self.config = config
        self.counters = counters

    @property
    def embed_dim(self) -> int | None:
        """Width of the Parquet embedding column; None when embeddings are not stored."""
        return self.scorer.encoder.embed_dim if self.config.store_embeddings else None

    def metadata(self) -> dict:
        """What made the scores (stored with the Parquet schema): config, threshold, encoder, model, stage."""
        detector = self.scorer.detector
        return {"config": asdict(detector.config), "threshold": self.threshold.to_dict(),
                "encoder": detector.encoder_name, "encoder_fingerprint": detector.encoder_fingerprint,
                "model_id": detector.model_id, "stage": asdict(self.config)}

    def _open_sink(self, name: str | None = None) -> ParquetSink | None:
        """The part file ``name`` (default: one per rank and DataLoader worker) in ``parquet_dir``."""
        if self.config.parquet_dir is None:
            return None
        return ParquetSink(self.config.parquet_dir, name or writer_name(*writer_identity()),
                           self.scorer.detector.model_id, self.threshold.value, self.metadata(),
                           self.config.row_group_size, self.embed_dim)

    def __call__(self, samples: Iterable[dict]) -> Iterator[dict]:
        sink = self._open_sink()
        try:
            for batch in batched(samples, self.config.batch_size):
                yield from self._filter(batch, sink)
        finally:
            if sink is not None:
                sink.close()

    def _decode(self, sample: dict) -> np.ndarray:
        if "__error__" in sample:
            raise ValueError(sample["__error__"])
        for field in self.config.image_fields:
            if field in sample:
                data = sample[field]
                break
        else:
            raise ValueError(f"no image field (looked for {', '.join(self.config.image_fields)})")
        return decode_image(data, self.scorer.decode_size)  # once; the scorer cuts both views from it

    def _decide(self, scores: np.ndarray) -> Decision:
        finite = np.isfinite(scores)
        suspect = self.threshold.suspects(scores) & finite
        passed = finite & ~(suspect & self.config.drop)
        status = np.where(passed, "kept", np.where(finite, "dropped", "error")).tolist()
        reasons = [None if ok else NON_FINITE for ok in finite.tolist()]
        return Decision(suspect, passed, status, reasons)

    def process(self, batch: list[dict]) -> Outcome:
        """Decode, score and decide one batch of samples: the engine-independent core of the stage."""
        images, scored, failed = [], [], []
        for sample in batch:
            try:
                images.append(self._decode(sample))
                scored.append(sample)
            except ValueError as err:
                failed.append((sample, str(err)))
                log.warning("skipping %s from %s: %s", sample.get("__key__"), sample.get("__url__"), err)
        scores, embeddings = np.empty(0, np.float32), None
        if scored:
            result = self.scorer.score(np.stack(images), [s["__key__"] for s in scored])
            scores, embeddings = result.scores, result.embeddings
        return Outcome(scored, failed, scores, embeddings, self._decide(scores))

    def _filter(self, batch: list[dict], sink: ParquetSink | None) -> Iterator[dict]:
        outcome = self.process(batch)
        decision = outcome.decision
        if sink is not None:
            sink.write(**outcome.rows())
        if self.counters is not None:
            self.counters.add(decision.status.count("kept"), decision.status.count("dropped"),
                              decision.status.count("error") + len(outcome.failed))
        decisions = zip(outcome.scored, outcome.scores.tolist(), decision.suspect.tolist(), decision.passed.tolist(),
                        strict=True)
        for sample, score, is_suspect, ok in decisions:
            if ok:
                sample[self.config.score_field] = score
                sample[self.config.suspect_field] = is_suspect
                yield sample

    def filter_batches(self, batches: Iterable, image_index: int | str = 0) -> Iterator:
        """Wrap an existing DataLoader or iterable of batches of float images (B, 3, S, S) in [0, 1].

        A batch is a tuple/list (images at ``image_index``) or a dict (images under ``image_index``,
        optional ``"__key__"`` list). Suspects are removed from every tensor/list in the batch (drop
        mode) or the batch gains ``score``/``suspect`` tensors (annotate mode: appended to a tuple,
        added as ``dede_score``/``dede_suspect`` to a dict). Samples without keys are keyed by their
        position in the stream, so scores are reproducible when the order is.
        """
        sink = self._open_sink()
        seen = 0
        try:
            for batch in batches:
                images = batch[image_index]
                n = images.shape[0]
                keys = list(batch.get("__key__", [])) if isinstance(batch, dict) else []
                keys = keys or [str(i) for i in range(seen, seen + n)]
                seen += n
                result = self.scorer.score_pixels(images.float(), keys)
                scores = result.scores
                decision = self._decide(scores)
                if sink is not None:
                    sink.write(keys, [None] * n, scores, decision.suspect, decision.status, decision.reasons,
                               result.embeddings)
                yield self._select(batch, decision.passed, scores, decision.suspect)
        finally:
            if sink is not None:
                sink.close()

    def _select(self, batch, passed: np.ndarray, scores: np.ndarray, suspect: np.ndarray):
        index = torch.from_numpy(np.flatnonzero(passed))

        def take(value):
            if isinstance(value, torch.Tensor):
                return value[index]
            if isinstance(value, (list, tuple)) and len(value) == len(passed):
                return [value[i] for i in index.tolist()]
            return value

        extra = (torch.from_numpy(scores[passed]), torch.from_numpy(suspect[passed]))
        if isinstance(batch, dict):
            selected = {name: take(value) for name, value in batch.items()}
            if not self.config.drop:
                selected[self.config.score_field], selected[self.config.suspect_field] = extra
            return selected
        selected = [take(value) for value in batch]
        return tuple(selected) + (extra if not self.config.drop else ())
