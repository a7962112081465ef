"""The filter as a pipeline stage: decode -> batch -> score -> decide -> record -> pass on.

With a window rule (:mod:`dedefilter.window`, stored in the detector) the stage decides per window: up
to ``rule.size`` consecutive samples of one shard are scored, then judged against each other, then
passed on; without one, per batch, on the paper score alone.

The core is pure: :meth:`DeDeFilter.process` decides one batch (or window) of samples (an :class:`Outcome`, which
the Ray engine uses as is) and :meth:`DeDeFilter.filter_batch` adds the samples to pass on. Recording
sits at the edge (:class:`Recorder`: counters and the Parquet sink), so a ``break``, an error or a
second epoch never publishes or overwrites a part. :class:`DeDeFilter` is a plain generator stage
``samples -> samples`` for ``wds.DataPipeline`` and ``.compose()``; :meth:`DeDeFilter.filter_batches`
does the same for an existing DataLoader of image batches. Every sample that enters is either passed
on, or recorded as ``dropped`` or ``error``, each with its reason.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from itertools import islice
from types import TracebackType

import numpy as np
import torch
from webdataset.utils import pytorch_worker_info

from .calibration import Threshold
from .data import decode_image
from .encoders import to_float
from .scoring import ScoredBatch, Scorer
from .sink import ParquetSink, claim_pass, writer_name
from .window import WindowRule, WindowScores, score_window

log = logging.getLogger(__name__)
NON_FINITE = "non-finite score (the encoder or the DeDe model produced NaN or inf)"
IMAGE_FIELDS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm", "tif", "tiff")
# Every decision's reason, as datatrove counts them: "<status>_<reason>".
REASONS = ("dropped_above_threshold", "error_input", "error_non_finite_score")


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
    window_size: int | None = None  # None: the detector's window rule; 0: the paper score alone; N: windows of N


@dataclass
class Decision:
    """What happens to each scored sample of a batch, and why unless it is kept."""

    suspect: np.ndarray
    passed: np.ndarray
    status: list[str]
    reasons: list[str | None]  # "score 0.31 > threshold 0.08" for a drop, NON_FINITE for an error


@dataclass
class Outcome:
    """One batch after decode -> score -> decide; every sample is in ``scored`` or ``failed``."""

    scored: list[dict]  # the samples (for DataLoader batches: ``{"__key__": key}``)
    failed: list[tuple[dict, str]]  # (sample, reason): unreadable, no image, undecodable
    scores: np.ndarray  # (len(scored),): what the decision was made on (the window score, or the paper score)
    embeddings: np.ndarray | None  # (len(scored), D)
    decision: Decision  # for the scored samples
    window: WindowScores | None = None  # the window's parts and collapse test, when a window rule decided

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
            "parts": {"paper_score": self.scores} if self.window is None else
            self.window.parts | {"collapse": self.window.collapse},
        }

    def counts(self) -> dict[str, int]:
        """Samples kept, and dropped or failed per reason (:data:`REASONS`)."""
        finite = np.isfinite(self.scores)
        kept = int(self.decision.passed.sum())
        return {"kept": kept, "dropped_above_threshold": int(finite.sum()) - kept,
                "error_input": len(self.failed), "error_non_finite_score": int((~finite).sum())}

    def slice(self, start: int, stop: int) -> Outcome:
        """The scored samples start:stop (a loader batch of a window), for giving them out."""
        rows = slice(start, stop)
        decision = self.decision
        return Outcome(self.scored[rows], [], self.scores[rows], None,
                       Decision(decision.suspect[rows], decision.passed[rows], decision.status[rows],
                                decision.reasons[rows]))

    def passed_on(self, score_field: str, suspect_field: str) -> list[dict]:
        """The samples to pass on, each annotated with its score and suspect flag."""
        passed = []
        decisions = zip(self.scored, self.scores.tolist(), self.decision.suspect.tolist(),
                        self.decision.passed.tolist(), strict=True)
        for sample, score, is_suspect, ok in decisions:
            if ok:
                sample[score_field] = score
                sample[suspect_field] = is_suspect
                passed.append(sample)
        return passed


def writer_identity() -> tuple[int, int]:
    """(rank, DataLoader worker id) of the calling process, as ``wds.split_by_node`` / ``split_by_worker`` see
    them (``RANK`` or the initialised ``torch.distributed`` group), so each part file is one shard split's."""
    rank, _, worker, _ = pytorch_worker_info()
    return rank, worker


def effective_rule(stored: WindowRule | None, size: int | None) -> WindowRule | None:
    """The window rule a filter runs: the detector's (``size`` None), none (0), or the detector's (else
    the default one) with windows of ``size``."""
    if size is None:
        return stored
    if size == 0:
        return None
    return replace(stored or WindowRule(), size=size)


def windows(samples: Iterable[dict], size: int) -> Iterator[list[dict]]:
    """Up to ``size`` consecutive samples of one source (``__url__``): a shard's samples in its order, so a
    window, and each score in it, is the same whatever worker reads the shard."""
    window: list[dict] = []
    for sample in samples:
        if window and (len(window) == size or sample.get("__url__") != window[0].get("__url__")):
            yield window
            window = []
        window.append(sample)
    if window:
        yield window


def batched(iterable: Iterable, size: int) -> Iterator[list]:
    iterator = iter(iterable)
    while batch := list(islice(iterator, size)):
        yield batch


class Counters:
    """Samples kept, and dropped / failed per reason, shared by all DataLoader workers (forked shared
    memory), for progress."""

    names = ("kept", *REASONS)

    def __init__(self):
        self._values = multiprocessing.Array("q", len(self.names))

    def add(self, counts: Mapping[str, int]) -> None:
        with self._values.get_lock():
            for i, name in enumerate(self.names):
                self._values[i] += counts[name]

    def by_reason(self) -> dict[str, int]:
        """``kept`` and ``<status>_<reason>`` counts, datatrove style."""
        return dict(zip(self.names, self._values[:], strict=True))

    def snapshot(self) -> dict[str, int]:
        """Samples per status: kept, dropped, error."""
        counts = self.by_reason()
        return {status: sum(n for name, n in counts.items() if name.split("_")[0] == status)
                for status in ("kept", "dropped", "error")}


class Recorder:
    """The stage's edge: counts each batch's outcome and writes its rows to one Parquet part.

    A ``with`` block: the part is published when the block ends normally (the input ended) and
    aborted when it ends by an exception, which includes the ``GeneratorExit`` a generator stage gets
    when its consumer stops early (``break``, ``islice``, ``with_epoch``).
    """

    def __init__(self, sink: ParquetSink | None, counters: Counters | None):
        self.sink = sink
        self.counters = counters

    @property
    def rows(self) -> int:
        """Rows written to the part so far."""
        return self.sink.rows if self.sink is not None else 0

    def record(self, outcome: Outcome) -> None:
        if self.sink is not None:
            self.sink.write(**outcome.rows())
        if self.counters is not None:
            self.counters.add(outcome.counts())

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self.sink is not None:
            self.sink.__exit__(kind, error, traceback)


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
        self.window = effective_rule(scorer.detector.window, config.window_size)
        scale = "window" if self.window else "paper"
        if threshold.scale not in (None, scale):
            raise ValueError(f"the threshold is on the {threshold.scale} score's scale but this filter decides on the "
                             f"{scale} score ({'a window rule' if self.window else 'no window rule'}): calibrate "
                             f"with the same window setting (`dedefilter calibrate --window`) or pass a threshold")
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
                "window": self.window.to_dict() if self.window else None, "encoder": detector.encoder_name,
                "encoder_fingerprint": detector.encoder_fingerprint,
                "model_id": detector.model_id, "stage": asdict(self.config)}

    def recorder(self, part: str | None = None) -> Recorder:
        """Where one pass over an input records: the part file ``part`` in ``parquet_dir`` (default: the
        calling rank and DataLoader worker's next free pass, ``part-r{rank}-w{worker}-p{pass}``, so a
        second epoch never overwrites the first's part), and the counters."""
        sink = None
        if self.config.parquet_dir is not None:
            name = part or claim_pass(self.config.parquet_dir, writer_name(*writer_identity()))
            sink = ParquetSink(self.config.parquet_dir, name, self.scorer.detector.model_id, self.threshold.value,
                               self.metadata(), self.config.row_group_size, self.embed_dim)
        return Recorder(sink, self.counters)

    def __call__(self, samples: Iterable[dict], recorder: Recorder | None = None) -> Iterator[dict]:
        """Filter a stream of samples, recording every one in ``recorder`` (default: :meth:`recorder`),
        whose part is published once ``samples`` ends, and only then."""
        groups = windows(samples, self.window.size) if self.window else batched(samples, self.config.batch_size)
        with recorder or self.recorder() as record:
            for group in groups:
                passed, outcome = self.filter_batch(group)
                record.record(outcome)
                yield from passed

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
        reasons = np.where(finite, None, NON_FINITE).astype(object)
        dropped = finite & ~passed
        threshold = np.float32(self.threshold.value)  # as the Parquet threshold column stores it
        reasons[dropped] = [f"score {score} > threshold {threshold}" for score in scores[dropped]]
        return Decision(suspect, passed, status, reasons.tolist())

    def _score(self, pixels: torch.Tensor, keys: list[str]) -> ScoredBatch:
        """Paper scores and embeddings (and residuals when a window rule will judge them)."""
        return self.scorer.score_pixels(pixels, keys, residuals=self.window is not None)

    def _outcome(self, scored: list[dict], failed: list[tuple[dict, str]], batches: list[ScoredBatch]) -> Outcome:
        """Decide on scored batches that together make one batch or window."""
        if not scored:
            return Outcome(scored, failed, np.empty(0, np.float32), None, self._decide(np.empty(0, np.float32)))
        embeddings = np.concatenate([b.embeddings for b in batches])
        paper = np.concatenate([b.scores for b in batches])
        if self.window is None:
            return Outcome(scored, failed, paper, embeddings, self._decide(paper))
        judged = score_window(paper, embeddings, np.concatenate([b.residuals for b in batches]), self.window)
        return Outcome(scored, failed, judged.score, embeddings, self._decide(judged.score), judged)

    def process(self, batch: list[dict]) -> Outcome:
        """Decode, score and decide one batch (or window) of samples: the engine-independent core of the stage.

        Decoded and scored ``batch_size`` samples at a time, so a window's memory is its scores,
        embeddings and residuals, not its decoded images."""
        scored, failed, batches = [], [], []
        for part in batched(batch, self.config.batch_size):
            images, decoded = [], []
            for sample in part:
                try:
                    images.append(self._decode(sample))
                    decoded.append(sample)
                except ValueError as err:
                    failed.append((sample, str(err)))
                    log.warning("skipping %s from %s: %s", sample.get("__key__"), sample.get("__url__"), err)
            if decoded:
                batches.append(self._score(to_float(np.stack(images)), [s["__key__"] for s in decoded]))
                scored += decoded
        return self._outcome(scored, failed, batches)

    def filter_batch(self, batch: list[dict]) -> tuple[list[dict], Outcome]:
        """The samples of ``batch`` to pass on (annotated with score and suspect flag), and the outcome that
        records every sample of it: the one batch filter that the stage, the filter job and engines share."""
        outcome = self.process(batch)
        return outcome.passed_on(self.config.score_field, self.config.suspect_field), outcome

    def filter_batches(self, batches: Iterable, image_index: int | str = 0,
                       key_index: int | str = "__key__") -> Iterator:
        """Wrap an existing DataLoader (or any iterable) of image batches.

        A batch is a tuple/list or a dict. Its images, at ``image_index``, are (B, 3, S, S): float in
        [0, 1], or uint8 in 0-255, which is converted to [0, 1] (divided by 255, as shards are decoded).
        Anything else (floats outside [0, 1], NaN, other dtypes) is refused with a ValueError: the
        detector was trained on [0, 1] images and would score the rest as suspects.

        Each sample's key is at ``key_index``: a dict's ``"__key__"`` list by default; for a tuple batch,
        the position of a list of strings or a tensor of integer ids (e.g. the dataset index, returned by
        the Dataset with each item). A key seeds the sample's score masks and names its Parquet row, so it
        must travel with the sample through any shuffling; batches without keys are refused.

        Suspects are removed from every tensor/list in the batch (drop mode) or the batch gains
        ``score``/``suspect`` tensors (annotate mode: appended to a tuple, added as ``dede_score``/
        ``dede_suspect`` to a dict). The Parquet part of a pass is published when ``batches`` ends.

        With a window rule, batches are held until they hold ``rule.size`` samples (or the loader ends),
        then judged together and given out in their order: a window is whole batches in the loader's
        order, so its scores are reproducible when that order is (no shuffling, or a seeded sampler).
        """
        held: list[tuple] = []  # (batch, its samples, its scores) not yet given out
        with self.recorder() as record:
            for number, batch in enumerate(batches):
                keys = batch_keys(batch, key_index, f"batch {number}")
                where = f"batch {number}" + (f" (first key {keys[0]!r})" if keys else "")
                pixels = unit_pixels(batch[image_index], where)
                if len(pixels) != len(keys):
                    raise ValueError(f"{where}: {len(pixels)} images but {len(keys)} keys at key_index={key_index!r}")
                held.append((batch, [{"__key__": key} for key in keys], self._score(pixels, keys)))
                if self.window is None or sum(len(samples) for _, samples, _ in held) >= self.window.size:
                    yield from self._give_out(held, record)
                    held = []
            if held:
                yield from self._give_out(held, record)

    def _give_out(self, held: list[tuple], record: Recorder) -> Iterator:
        """Decide held loader batches together (one batch, or one window) and give each out filtered."""
        outcome = self._outcome([s for _, samples, _ in held for s in samples], [], [scored for *_, scored in held])
        record.record(outcome)
        start = 0
        for batch, samples, _ in held:
            yield self._select(batch, outcome.slice(start, start + len(samples)))
            start += len(samples)

    def _select(self, batch, outcome: Outcome):
        passed, scores, suspect = outcome.decision.passed, outcome.scores, outcome.decision.suspect
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


def batch_keys(batch, key_index: int | str, where: str) -> list[str]:
    """The keys of a DataLoader batch, as strings (integer ids become their decimal form)."""
    try:
        keys = batch[key_index]
    except (KeyError, IndexError, TypeError):
        keys = None
    if keys is None:
        raise ValueError(f"{where} has no keys at key_index={key_index!r}: a dict batch needs a '__key__' list, a "
                         "tuple batch the position of its keys (e.g. return the dataset index with each item and "
                         "pass key_index=2 for (image, label, index)); keys seed the scores and name the Parquet "
                         "rows, so positions in a shuffled stream would mean nothing")
    keys = keys.tolist() if isinstance(keys, torch.Tensor | np.ndarray) else list(keys)
    wrong = next((key for key in keys if not isinstance(key, str | int) or isinstance(key, bool)), None)
    if wrong is not None:
        raise ValueError(f"{where}: keys at key_index={key_index!r} must be strings or integer ids, found "
                         f"{type(wrong).__name__} {wrong!r}")
    return [str(key) for key in keys]


def unit_pixels(images, where: str) -> torch.Tensor:
    """Float images in [0, 1] from a DataLoader batch; uint8 ones are divided by 255, anything else refused.

    One pass of ``aminmax`` over the batch: NaN and out-of-range values are caught before they score.
    """
    images = torch.as_tensor(images)
    if images.dtype == torch.uint8:
        return images.float().div_(255)  # the shard path's conversion (encoders.to_float): the same scores
    if not images.is_floating_point():
        raise ValueError(f"{where}: images are {images.dtype}; the filter takes float images in [0, 1] or uint8 "
                         "images in 0-255")
    images = images.float()
    if images.numel():
        low, high = torch.aminmax(images)
        if not bool((low >= 0) & (high <= 1)):  # NaN fails both
            non_finite = int((~torch.isfinite(images)).sum())
            found = (f"{non_finite} pixel values are NaN or infinite" if non_finite else
                     f"pixel values range from {float(low):.4g} to {float(high):.4g}")
            raise ValueError(f"{where}: {found}, but the filter takes float images in [0, 1] (or uint8 in 0-255): "
                             "divide 0-255 floats by 255, map [-1, 1] with (x + 1) / 2, filter before "
                             "Normalize(), or clamp(0, 1) an interpolation's overshoot")
    return images
