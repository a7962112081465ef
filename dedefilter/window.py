"""Window-level scoring: each sample judged against the other samples of its window of the stream.

The paper score (reconstruction error) looks at one sample, and some clean images are simply hard to draw.
With clean reference images (``calibrate`` at a false-positive rate) a sample's error is also measured
against what the decoder does on the clean images the encoder embeds like it (its *excess* error: log of
its error over the median error of its k nearest reference images): a hard clean image sits among hard
ones, but a triggered image is embedded like the attacker's target, whose clean images the decoder draws
well. This needs no window and works at any poison share; a reference sampled from the data itself
(``calibrate`` with a removal budget) may hold triggered images as their own neighbours, so it is not used.

When a window holds many triggered images, a backdoor leaves traces only a set of samples shows: the
encoder maps them near one target embedding (a *collapse*), so a triggered image's neighbours are
triggered too and their mean error z-score (neighbour pooling) is high; and the decoder never draws a
trigger (the embedding describes the target, not the patch), so every triggered image leaves the same
pattern in its reconstruction residual, a top principal direction of the window's residuals in which they
stand out together (spectral signatures, Tran et al. 2018).

The collapse test counts the samples that stand out in the residual spectrum. When enough do, are each
other's neighbours, and two of three kinds of evidence hold (they sit in one tight spot of the embedding
space; the decoder fails on them; they are many and most of what stands out), the window is scored by
neighbour pooling plus the spectrum; otherwise by the paper score (plus the excess error when there is a
clean reference), on the fixed scales calibration measured on the reference images, so a sample's score in
a quiet window does not depend on its window; with few triggered images the window's parts only add noise.
Neighbourhood sparsity (simplified LOF, Huang et al., ICLR 2025: a lone triggered image sits far from the
crowd its neighbours belong to) is computed and recorded too, but does not decide: added to the paper
score it helped a weak detector and hurt a strong one (docs/BENCHMARKS.md). The two scores have tails of
different weight, so :func:`calibrate` shifts the collapsed one to meet the quiet one at the cut's quantile
of the reference windows: one threshold serves both.

Each window part is a robust z-score within the window (median and IQR, so a poisoned minority cannot drag
it); the quiet score's parts keep the calibration's scales. A window is a deterministic slice of the input
(the stage cuts ``size`` consecutive samples of one shard), so a sample's score depends on its window,
never on the worker, batch or order; memory is bounded by ``size`` samples' embeddings and residuals.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from functools import cache
from typing import TYPE_CHECKING

import numpy as np
import scipy.linalg
from threadpoolctl import ThreadpoolController

from .calibration import Threshold, for_contamination, for_false_positive_rate, upper_quantile

if TYPE_CHECKING:
    from .scoring import ScoredBatch, Scorer

log = logging.getLogger(__name__)

PARTS = ("paper_score", "paper_z", "excess_z", "sparsity_z", "pooled_z", "spectrum_z")
BLOCK = 1024  # rows of the similarity matrix held at once


@dataclass(frozen=True, eq=False)
class CleanReference:
    """Clean reference images' embeddings (R, D) and paper scores (R,): what error the decoder makes on clean
    images the encoder embeds alike. Set by :func:`calibrate` at a false-positive rate, stored in the detector."""

    embeddings: np.ndarray
    scores: np.ndarray

    def __post_init__(self):
        embeddings, scores = np.asarray(self.embeddings, np.float32), np.asarray(self.scores, np.float32)
        if embeddings.ndim != 2 or scores.shape != (len(embeddings),) or len(scores) < 2:
            raise ValueError(f"a clean reference needs (R, D) embeddings and (R,) scores, R >= 2: "
                             f"{embeddings.shape}, {scores.shape}")
        if not (np.isfinite(embeddings).all() and np.isfinite(scores).all() and (scores > 0).all()):
            raise ValueError("a clean reference needs finite embeddings and finite positive scores")
        object.__setattr__(self, "embeddings", embeddings)
        object.__setattr__(self, "scores", scores)
        centre = embeddings.astype(np.float64).mean(0)
        object.__setattr__(self, "_centre", centre)
        object.__setattr__(self, "_unit", self.unit(embeddings))

    def unit(self, embeddings: np.ndarray) -> np.ndarray:
        """Embeddings centred on the reference's mean and scaled to unit length (float32): a fixed geometry,
        so a sample's neighbours do not depend on what else is scored with it."""
        return unit_rows(embeddings, self._centre).astype(np.float32)

    def excess(self, paper_scores: np.ndarray, embeddings: np.ndarray, k: int, own: bool = False) -> np.ndarray:
        """log(paper score / median paper score of the k nearest reference images); ``own``: the samples are
        the reference images themselves (their unit rows are already held), each left out of its own
        neighbours. A partial sort of one float32
        similarity block: ~10x cheaper than sorting it, and the median needs only which k are nearest."""
        k = min(k, len(self.scores) - 1)
        unit = self._unit if own else self.unit(embeddings)
        expected = np.empty(len(unit))
        for start in range(0, len(unit), BLOCK):
            rows = np.arange(start, min(start + BLOCK, len(unit)))
            similarity = unit[rows] @ self._unit.T
            if own:
                similarity[np.arange(len(rows)), rows] = -np.inf
            nearest_k = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
            expected[rows] = np.median(self.scores[nearest_k], axis=1)
        paper_scores = np.asarray(paper_scores, np.float64)
        return np.log(np.maximum(paper_scores, 1e-30)) - np.log(expected)


@dataclass(frozen=True)
class WindowRule:
    """How the shipped score is made; stored in the detector checkpoint and the Parquet metadata.

    The values were chosen on the demo attack's streams (benchmarks/results/detection.json says which attack
    was held out until they were frozen); the collapse test's paper z and bulk conditions on the detection
    sweep's first two draws of the streams, with a third held out; "two of three" and the fixed scale of quiet
    windows on the first draw, with two attacks and a fourth draw held out; the excess error (its k, its median,
    its plain sum with the paper score, a clean reference only) on the first draw, with the attack
    drupe-patch-trouser and the fourth draw held out; the misfit limit on five attacks' detectors, with
    drupe-patch-trouser's and the fourth draw's out-of-distribution cells held out (docs/BENCHMARKS.md)."""

    size: int = 1000  # samples per window (the memory bound); a shard's tail may be shorter
    k: int = 16  # neighbours for pooling and sparsity (Huang et al. use 16)
    reference_k: int = 8  # clean reference images whose median error is a sample's expected error
    directions: int = 3  # top principal directions of the residuals searched for a shared pattern
    outlier: float = 4.0  # a sample stands out in a direction beyond this many robust standard deviations
    collapse_count: int = 4  # this many outstanding samples that are each other's neighbours make a collapse
    # ... if two of three hold: one tight spot (their unit embeddings' mean is at least collapse_resultant long
    # and their median k-th neighbour distance at most collapse_density of the window's); the decoder fails on
    # them (their median paper z is at least collapse_paper_z); bulk (at least collapse_bulk of them, and at
    # least collapse_bulk_share of the samples standing out in the spectrum)
    collapse_resultant: float = 0.85
    collapse_density: float = 0.75
    collapse_paper_z: float = 3.0
    collapse_bulk: int = 30
    collapse_bulk_share: float = 0.7
    min_size: int = 64  # a smaller window gets the quiet score
    # Every part builds on the decoder's errors. Calibration turns the rule off (the paper score alone decides)
    # when the decoder draws the reference images more than max_misfit times worse than its own training images
    # (:func:`misfit`): it was trained on other data (photos for Fashion-MNIST: 4.0-5.8x, where in-distribution,
    # class-disjoint and self-trained decoders measured 1.00-1.14x), and the parts amplify its mistakes.
    max_misfit: float = 2.0
    # Set by calibration (:func:`calibrate`). The quiet score is the paper score on the reference images' robust
    # scale, (score - paper_median) / paper_scale, plus, with a clean reference, the excess error on its scale
    # (excess_median, excess_scale: the reference images' own, each left out of its neighbours). The collapse
    # shift is added to a collapsed window's score so that its clean reference quantile at the cut's level meets
    # the quiet score's (tails of different weight).
    paper_median: float = 0.0
    paper_scale: float = 1.0
    excess_median: float = 0.0
    excess_scale: float = 1.0
    collapse_shift: float = 0.0
    reference: CleanReference | None = field(default=None, compare=False, repr=False)  # stored beside the rule

    def __post_init__(self):
        if self.size < self.min_size or self.k < 1 or self.directions < 1 or self.collapse_count < 1:
            raise ValueError(f"a window needs size >= min_size ({self.min_size}), k, directions and "
                             f"collapse_count >= 1: {self}")

    def to_dict(self) -> dict:
        """The settings (the reference's arrays are stored in the detector checkpoint, not here)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "reference"}

    def uncalibrated(self) -> WindowRule:
        """The rule without what :func:`calibrate` sets."""
        return replace(self, paper_median=0.0, paper_scale=1.0, excess_median=0.0, excess_scale=1.0,
                       collapse_shift=0.0, reference=None)


@dataclass
class WindowScores:
    """The shipped score of each sample of one window, the parts it was made of, and the collapse test."""

    score: np.ndarray  # (N,) float32
    parts: dict[str, np.ndarray]  # name -> (N,) float32, see PARTS
    collapse: np.ndarray  # (N,) bool: did the collapse test fire on the sample's window


def robust_scale(values: np.ndarray) -> tuple[float, float]:
    """(median, IQR / 1.349): a centre and spread that a minority of outliers cannot drag."""
    low, median, high = np.quantile(np.asarray(values, np.float64), [0.25, 0.5, 0.75])
    scale = (high - low) / 1.349
    return float(median), float(scale if scale > 0 else 1.0)


def robust_z(values: np.ndarray) -> np.ndarray:
    """(x - median) / (IQR / 1.349): a z-score that a minority of outliers cannot drag."""
    median, scale = robust_scale(values)
    return (np.asarray(values, np.float64) - median) / scale


def unit_rows(embeddings: np.ndarray, centre: np.ndarray | None = None) -> np.ndarray:
    """Embeddings centred (on ``centre``, else on the window's own mean) and scaled to unit length (cosine
    geometry)."""
    embeddings = np.asarray(embeddings, np.float64)
    centred = embeddings - (embeddings.mean(0) if centre is None else centre)
    return centred / np.maximum(np.linalg.norm(centred, axis=1, keepdims=True), 1e-12)


def nearest(embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Cosine distances (N, k) and indices (N, k) of each sample's k nearest others in the window,
    nearest first; exact, float64, ties broken by index, so every machine finds the same neighbours."""
    unit = unit_rows(embeddings)
    n = len(unit)
    k = min(k, n - 1)
    distances, ids = np.empty((n, k)), np.empty((n, k), np.int64)
    for start in range(0, n, BLOCK):
        rows = np.arange(start, min(start + BLOCK, n))
        distance = 1 - unit[rows] @ unit.T
        distance[np.arange(len(rows)), rows] = np.inf  # not its own neighbour
        order = smallest(distance, k)
        ids[rows] = order
        distances[rows] = np.take_along_axis(distance, order, axis=1)
    return distances, ids


def smallest(values: np.ndarray, k: int) -> np.ndarray:
    """Column indices of each row's ``k`` smallest values, smallest first, ties broken by index: the first ``k``
    of a stable argsort, ~2x faster at 1,000 columns (a partition, then a sort of ``k`` per row)."""
    candidates = np.argpartition(values, k - 1, axis=1)[:, :k]
    chosen = np.take_along_axis(values, candidates, axis=1)
    order = np.take_along_axis(candidates, np.lexsort((candidates, chosen), axis=1), axis=1)
    # the partition picks any of the values tied at the k-th (duplicate images): there, the lowest indexes win
    tied = (values <= chosen.max(1, keepdims=True)).sum(1) > k
    if tied.any():
        order[tied] = np.argsort(values[tied], axis=1, kind="stable")[:, :k]
    return order


def sparsity(distances: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Simplified LOF: log of a sample's k-th neighbour distance over its neighbours' mean k-th neighbour
    distance; high where a sample is far from the crowd its neighbours belong to."""
    kth = np.maximum(distances[:, -1], 1e-12)
    return np.log(kth / kth[ids].mean(1))


def pooled(z: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Mean z-score of a sample's neighbours."""
    return z[ids].mean(1)


def column_median(values: np.ndarray) -> np.ndarray:
    """``np.median(values.astype(np.float64), 0)``, exactly, ~4x faster on a window's residuals: the middle
    values found in the input's dtype along the rows of its transpose (one partition; for an even count the
    lower middle is the largest value below the upper one), averaged in float64."""
    n = len(values)
    rows = np.ascontiguousarray(values.T)
    below = np.partition(rows, n // 2, axis=1)
    upper = below[:, n // 2]
    lower = upper if n % 2 else below[:, :n // 2].max(1)
    return (lower.astype(np.float64) + upper) / 2


def spectrum(residuals: np.ndarray, directions: int) -> np.ndarray:
    """How far each sample stands out along the top principal directions of the window's residuals:
    the largest |projection| in robust standard deviations (median absolute deviation) of each direction.

    The projections on the top directions are the top eigenvectors of the window's (N, N) Gram matrix
    scaled by the singular values, which the robust scaling cancels: ~10x faster than an SVD of the
    (N, pixels) residuals at N = 1,000. A window of more samples than pixels projects on the top eigenvectors
    of the (pixels, pixels) covariance instead (the same projections): an eigensolver on a 10,000-sample
    Gram matrix takes minutes."""
    residuals = np.asarray(residuals)
    centred = residuals.astype(np.float64)  # the one float64 copy of the (N, pixels) residuals
    centred -= column_median(residuals)
    n, d = centred.shape
    if n <= d:
        _, top = scipy.linalg.eigh(centred @ centred.T, subset_by_index=[n - directions, n - 1])
    else:
        _, axes = scipy.linalg.eigh(centred.T @ centred, subset_by_index=[d - directions, d - 1])
        top = centred @ axes
    projection = np.abs(top)
    spread = np.median(projection, 0) / 0.6745
    return (projection / np.maximum(spread, 1e-300)).max(1)


def collapse_test(outstanding: np.ndarray, paper_z: np.ndarray, embeddings: np.ndarray, distances: np.ndarray,
                  ids: np.ndarray, rule: WindowRule) -> bool:
    """A collapse: at least ``rule.collapse_count`` samples stand out in the residual spectrum and have most
    of their embedding neighbours standing out too (one shared residual pattern), and two of three hold:

    - *tight*: they sit in one tight, dense spot of the embedding space (one target embedding);
    - *undrawn*: the decoder fails on them (the embedding describes another image);
    - *bulk*: they are many and most of what stands out.

    Each alone is seen on clean windows: the clean images of classes the decoder never saw are each other's
    neighbours and the decoder fails on them, but they spread over their classes (no denser than the window);
    a tight clump of clean look-alikes (in the sweep's streams, pullovers, coats and shirts) is drawn well
    (median paper z 0.2-2.3; triggered groups 4.1-9.1 at 3-5%). Triggered images show two or three: when many
    are triggered they drag the window's own paper z scale (their median down to 1.8 at 18%), but they are
    most of what stands out (71-98% there, no clean clump of 30 more than 62%); triggered images of a T-shirt
    target sit among the clean T-shirts, no denser than the window (0.8-1.5 of its median distance, DRUPE's
    spread by design), but the decoder fails on them. Scoring a clean window as collapsed would change its
    scale and bury a lone triggered image."""
    grouped = outstanding & (outstanding[ids].mean(1) >= 0.5)
    n_grouped = int(grouped.sum())
    if n_grouped < rule.collapse_count:
        return False
    resultant = np.linalg.norm(unit_rows(embeddings)[grouped].mean(0))
    density = np.median(distances[grouped, -1]) / max(np.median(distances[:, -1]), 1e-12)
    tight = resultant >= rule.collapse_resultant and density <= rule.collapse_density
    undrawn = np.median(paper_z[grouped]) >= rule.collapse_paper_z
    bulk = n_grouped >= rule.collapse_bulk and n_grouped >= rule.collapse_bulk_share * int(outstanding.sum())
    return int(tight) + int(undrawn) + int(bulk) >= 2


def quiet_score(parts: dict[str, np.ndarray], rule: WindowRule) -> np.ndarray:
    """The score of a window without a collapse: the paper score on the calibration's fixed scale, plus the
    excess error's z when there is a clean reference; neither depends on the window."""
    paper = (np.asarray(parts["paper_score"], np.float64) - rule.paper_median) / rule.paper_scale
    return paper if rule.reference is None else paper + parts["excess_z"]


def collapsed_score(parts: dict[str, np.ndarray]) -> np.ndarray:
    """The score of a collapsed window (before the calibrated shift): many triggered images together."""
    return parts["pooled_z"] + parts["spectrum_z"]


@cache
def blas() -> ThreadpoolController:
    """numpy's and scipy's BLAS/LAPACK thread pools, found once per process."""
    return ThreadpoolController()


def score_window(paper_scores: np.ndarray, embeddings: np.ndarray, residuals: np.ndarray, rule: WindowRule,
                 excess: np.ndarray | None = None) -> WindowScores:
    """The shipped score of one window's samples from their paper scores, embeddings and residuals.

    ``excess``: the samples' excess errors when already known (calibration passes the reference images'
    own, each left out of its neighbours); else measured against ``rule.reference`` if it has one.
    A non-finite paper score (a broken encoder or model) stays out of the window and gets NaN parts."""
    paper_scores = np.asarray(paper_scores, np.float64)
    finite = np.isfinite(paper_scores)
    if not finite.all():
        score = np.full(len(finite), np.nan, np.float32)
        parts = {name: score.copy() for name in PARTS} | {"paper_score": paper_scores.astype(np.float32)}
        if not finite.any():
            return WindowScores(score, parts, np.zeros(len(finite), bool))
        judged = score_window(paper_scores[finite], embeddings[finite], residuals[finite], rule,
                              None if excess is None else excess[finite])
        score[finite] = judged.score
        for name in PARTS[1:]:
            parts[name][finite] = judged.parts[name]
        return WindowScores(score, parts, judged.collapse)
    paper_z = robust_z(paper_scores)
    n = len(paper_z)
    parts = {"paper_score": paper_scores, "paper_z": paper_z, "excess_z": np.full(n, np.nan)}
    if rule.reference is not None:
        if excess is None:
            with blas().limit(limits=1, user_api="blas"):
                excess = rule.reference.excess(paper_scores, embeddings, rule.reference_k)
        parts["excess_z"] = (np.asarray(excess, np.float64) - rule.excess_median) / rule.excess_scale
    if n < max(rule.min_size, rule.k + 1, rule.directions + 1):
        nothing = np.full(n, np.nan)
        parts |= {"sparsity_z": nothing, "pooled_z": nothing, "spectrum_z": nothing}
        return WindowScores(quiet_score(parts, rule).astype(np.float32), as_float32(parts), np.zeros(n, bool))
    # one BLAS thread: the window's linear algebra is small, and a BLAS pool of its own per DataLoader worker
    # spins on the cores the other workers' encoders need (the filter ran 1.5x slower with 2 workers)
    with blas().limit(limits=1, user_api="blas"):
        distances, ids = nearest(embeddings, rule.k)
        outstanding = spectrum(residuals, rule.directions)
    parts |= {"sparsity_z": robust_z(sparsity(distances, ids)), "pooled_z": pooled(paper_z, ids),
              "spectrum_z": robust_z(np.log(outstanding))}
    collapse = collapse_test(outstanding > rule.outlier, paper_z, embeddings, distances, ids, rule)
    score = collapsed_score(parts) + rule.collapse_shift if collapse else quiet_score(parts, rule)
    return WindowScores(score.astype(np.float32), as_float32(parts), np.full(n, collapse))


def as_float32(parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: part.astype(np.float32) for name, part in parts.items()}


def score_windows(paper_scores: np.ndarray, embeddings: np.ndarray, residuals: np.ndarray, rule: WindowRule,
                  excess: np.ndarray | None = None) -> WindowScores:
    """In-memory arrays cut into consecutive windows of ``rule.size``, as the stage cuts a shard (calibration
    on reference images, benchmarks)."""
    cut = range(0, len(paper_scores), rule.size)
    judged = [score_window(paper_scores[i:i + rule.size], embeddings[i:i + rule.size], residuals[i:i + rule.size],
                           rule, None if excess is None else excess[i:i + rule.size]) for i in cut]
    return WindowScores(np.concatenate([w.score for w in judged]),
                        {name: np.concatenate([w.parts[name] for w in judged]) for name in PARTS},
                        np.concatenate([w.collapse for w in judged]))


def filter_scores(scorer: Scorer, images: np.ndarray, keys: Sequence[str], rule: WindowRule | None) -> np.ndarray:
    """What the filter decides on, for an in-memory uint8 array cut into windows as a shard is: the window
    scores under ``rule``, or the paper scores when it is None (the demo's checks, benchmarks)."""
    return decision_scores(scorer.score_all(images, keys, residuals=rule is not None), rule)


def decision_scores(scored: ScoredBatch, rule: WindowRule | None) -> np.ndarray:
    """:func:`filter_scores` of images already scored (with residuals when ``rule`` is given), e.g. to keep their
    paper scores beside."""
    return score_windows(scored.scores, scored.embeddings, scored.residuals, rule).score if rule else scored.scores


def calibrate(scorer: Scorer, images: np.ndarray, rule: WindowRule | None, fpr: float | None = None,
              fraction: float | None = None) -> tuple[Threshold, WindowRule | None]:
    """The threshold (and the rule with its scales, collapse shift and, at a false-positive rate, its clean
    reference) from reference images cut into windows: at most ``fpr`` of clean references above it, or the
    top ``fraction`` of a sample of the data itself (a removal budget; that sample may be poisoned, so it is
    no clean reference). ``rule`` None, or a decoder that does not fit the reference images (:func:`misfit`):
    the paper score alone. What ``dedefilter calibrate`` runs."""
    return calibrate_scored(score_reference(scorer, images, residuals=rule is not None), rule, fpr, fraction,
                            own_error=(scorer.detector.record or {}).get("own_error"))


def score_reference(scorer: Scorer, images: np.ndarray, residuals: bool = True) -> ScoredBatch:
    """Reference images scored as :func:`calibrate` scores them (keyed ``reference-0``, ``reference-1``, ...),
    to calibrate several rules on one scoring with :func:`calibrate_scored`."""
    return scorer.score_all(images, [f"reference-{i}" for i in range(len(images))], residuals=residuals)


def misfit(reference_scores: np.ndarray, own_error: float | None) -> float | None:
    """How many times worse the decoder draws the reference images than its own training images (median paper
    scores); None when the detector's record has no own error (trained before it was measured)."""
    finite = np.asarray(reference_scores, np.float64)[np.isfinite(reference_scores)]
    if not own_error or own_error <= 0 or finite.size == 0:
        return None
    return float(np.median(finite) / own_error)


def calibrate_scored(scored: ScoredBatch, rule: WindowRule | None, fpr: float | None = None,
                     fraction: float | None = None,
                     own_error: float | None = None) -> tuple[Threshold, WindowRule | None]:
    """:func:`calibrate` on reference images already scored (with residuals when ``rule`` is given);
    ``own_error``: the detector's (its record's ``own_error``), to check that its decoder fits them."""
    if (fpr is None) == (fraction is None):
        raise ValueError("give exactly one of fpr and fraction")
    level = fpr if fpr is not None else fraction
    make = for_false_positive_rate if fpr is not None else for_contamination
    worse = None if rule is None else misfit(scored.scores, own_error)
    if worse is not None and worse > rule.max_misfit:
        log.warning("the decoder draws the reference images %.1fx worse than its own training images (more than "
                    "%.1fx): it was trained on other data, so its scores say little here and the window rule is off "
                    "(the paper score alone decides). Train the detector on images like these, e.g. a sample of the "
                    "shards being filtered (`dedefilter train --aux <shards>`)", worse, rule.max_misfit)
        rule = None
    if rule is None:
        return make(scored.scores, level, "paper"), None
    finite = np.isfinite(scored.scores)
    if not finite.any():
        raise ValueError("no finite reference score to calibrate on")
    median, scale = robust_scale(scored.scores[finite])
    rule = replace(rule.uncalibrated(), paper_median=median, paper_scale=scale)
    excess = None
    if fpr is not None:  # clean references: each one's excess error among the others sets the excess scale
        reference = CleanReference(scored.embeddings[finite], scored.scores[finite])
        own = reference.excess(reference.scores, reference.embeddings, rule.reference_k, own=True)
        excess_median, excess_scale = robust_scale(own)
        rule = replace(rule, reference=reference, excess_median=excess_median, excess_scale=excess_scale)
        excess = np.full(len(finite), np.nan)
        excess[finite] = own
    judged = score_windows(scored.scores, scored.embeddings, scored.residuals, rule, excess)
    quiet, collapsed = quiet_score(judged.parts, rule), collapsed_score(judged.parts)
    usable = np.isfinite(quiet) & np.isfinite(collapsed)  # windows of at least min_size
    if usable.any():
        shift = upper_quantile(quiet[usable], level) - upper_quantile(collapsed[usable], level)
        rule = replace(rule, collapse_shift=float(np.float32(shift)))
    scores = score_windows(scored.scores, scored.embeddings, scored.residuals, rule, excess).score
    return make(scores, level, "window"), rule
