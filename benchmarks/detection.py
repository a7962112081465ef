"""Detection sweep: the product's window score against the paper score and four baselines, on streams of
Fashion-MNIST test images 0.1% to 18% triggered, with five kinds of auxiliary data (issue 13, item 4).

    python -m benchmarks.detection [--quick] [--device cuda] [--attacks NAME ...] [--fresh]
    python -m benchmarks.detection --heldout      # the held-out attack, once, after every choice is frozen
    python -m benchmarks.detection --assemble     # only write the report from the saved per-attack parts
    python -m benchmarks.detection --stream-seed 2 --aux id-clean id-poisoned-1% class-disjoint ood-photos \
        --attacks ... --results benchmarks/results/detection-heldout-streams-seed2   # streams no rule was tuned on

Per attack (an encoder made by a recorded recipe, see ``dedefilter.attacks.registry``):

- The stream: the 10,000 Fashion-MNIST test images in a seeded shuffled order, cut into shards (windows) of
  1,000 as ``dedefilter filter`` cuts a shard. At share s, a seeded draw of round(s * 10,000) non-target-class
  images is replaced by their triggered versions; the draws are nested (the first n of one seeded order),
  the same for every method and auxiliary set. For the class-disjoint detector the draw comes only from the
  five classes its decoder never saw.
- Every image any stream holds is scored once per detector with :meth:`dedefilter.Scorer.score_all`
  (paper scores, embeddings, residuals); each stream is assembled from those arrays, and
  ``paper`` is its paper score, ``shipped`` :func:`dedefilter.window.score_windows` with the default
  :class:`~dedefilter.window.WindowRule` (with the scales, collapse shift and, at a false-positive rate, the
  clean reference calibration set; ``self`` has no clean reference) over its windows: what
  ``filter`` runs with a detector calibrated by ``calibrate`` (default ``--window 1000``); ``audit`` the
  order ``dedefilter audit`` + ``select --separated`` removes in over the whole stream (its separated
  collapse regions first, then the shipped score; flags at the shipped threshold).
- Detectors (the paper's DeDe config, as the demo trains it): in-distribution clean, in-distribution 1%
  poisoned, class-disjoint (the target class and four others), OOD photo patches, and ``self``: a sample of
  the 1%-share stream itself (scored on every share, trained at 1%; twice, as ``train --trim 0.05`` trains
  it, the second time without the first model's worst-drawn 5%).
- Calibration checks that each decoder fits the reference (:func:`dedefilter.window.misfit`); where it
  does not, the rule is off and ``shipped`` is the paper score, as ``filter`` then runs it.
- Thresholds as ``calibrate`` sets them (:func:`dedefilter.window.calibrate`): 1% FPR on 2,000 clean reference
  images (train[50000:52000], windows of 1,000); for ``self`` a 2% removal budget on the stream's first 2,000
  images (``calibrate --budget 0.02`` with the stream's shards as ``--reference``). Baselines the same, on
  their own window scores.
- Baselines on the same windows: L2 norm (two-sided robust z in the window), kNN density (k=10), masking
  consistency (per sample), and the k-NN sparsity of Huang et al. (ICLR 2025; k=16, the window as reference,
  the library's :func:`dedefilter.window.nearest` / :func:`~dedefilter.window.sparsity`).
- Downstream: a linear probe on the attacked encoder (train[50000:60000]); clean accuracy (CA) and attack
  success rate (ASR) on the stream before and after dropping each method's suspects.

One row per (attack, share, aux, method) in ``"sweep"`` of ``benchmarks/results/detection.json``. Each attack
is saved as a part when it finishes; a rerun skips attacks whose part was made with the same settings and
window rule, and the report is assembled from the parts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from dedefilter.attacks.registry import ATTACKS, PRETRAIN, PROBE_TRAIN, load_or_train
from dedefilter.attacks.triggers import poison
from dedefilter.audit import Scan, analyse, removal_score
from dedefilter.calibration import for_contamination, for_false_positive_rate, upper_quantile
from dedefilter.config import DeDeConfig
from dedefilter.data import FASHION_MNIST_CLASSES, fashion_mnist, photo_patches
from dedefilter.detector import CheckpointError, Detector
from dedefilter.encoders import Encoder, embed_array, to_float
from dedefilter.metrics import auroc, tpr_at_fpr
from dedefilter.probe import train_linear_probe
from dedefilter.scoring import ScoredBatch, Scorer
from dedefilter.training import own_error, train_model, train_trimmed
from dedefilter.window import (
    WindowRule,
    calibrate_scored,
    misfit,
    nearest,
    robust_z,
    score_reference,
    score_windows,
    sparsity,
)

from . import detection_methods as methods

SHARES = (0.001, 0.005, 0.01, 0.03, 0.18)
AUX_MODES = ("id-clean", "id-poisoned-1%", "class-disjoint", "ood-photos", "self")
BASELINES = ("l2-norm", "knn-density", "mask-consistency", "knn-sparsity")
METHODS = ("paper", "shipped", "audit", *BASELINES)
SPARSITY_K = 16  # Huang et al.'s k
MIN_ASR = 0.8  # an attack that does not work is not a test of a detector: listed, not evaluated
# The working attacks, encoders committed in benchmarks/attacks, in the order the full run takes them.
SWEEP_ATTACKS = ("badencoder-patch-trouser", "badencoder-patch-tshirt", "badencoder-blend-tshirt", "drupe-patch-tshirt",
                 "badencoder-small-tshirt")
# Held out: the window rule was tuned on badencoder-patch-trouser alone and frozen before this attack ran.
HELDOUT = "drupe-patch-trouser"
# The class-disjoint detector sees the target class and the first four of these that are not the target.
DISJOINT_OTHERS = (2, 4, 7, 9, 5)  # Pullover, Coat, Sneaker, Ankle boot (Sandal if one is the target)
REFERENCE = slice(PROBE_TRAIN.start, PROBE_TRAIN.start + 2000)  # clean, held out of encoders and aux data


@dataclass(frozen=True)
class BenchConfig:
    attacks: tuple[str, ...] = SWEEP_ATTACKS
    aux_modes: tuple[str, ...] = AUX_MODES
    shares: tuple[float, ...] = SHARES
    n_stream: int = 10_000  # Fashion-MNIST test images in a stream (all of them)
    n_reference: int = 2000  # clean reference images (id / class-disjoint / ood), or stream images (self)
    n_aux: int = 6000
    aux_poison_fraction: float = 0.01
    self_share: float = 0.01  # the stream the self detector is trained on
    self_trim: float = 0.05  # ... twice: the second time without the first detector's top 5% (`train --trim 0.05`)
    epochs: int = 10
    n_probe_train: int = 10_000
    target_fpr: float = 0.01  # thresholds from clean references
    budget: float = 0.02  # the self detector's removal budget
    seed: int = 0
    stream_seed: int = 0  # the streams' order and triggered draws (1 and 2 are spent as held-out; a new rule needs 3)
    device: str = "cpu"
    attack_dir: str = "benchmarks/attacks"
    cache_dir: str = ".dedefilter-bench/detectors"
    results: str = "benchmarks/results/detection"


QUICK = {"attacks": ("badencoder-patch-trouser", "badencoder-patch-tshirt"), "aux_modes": ("id-poisoned-1%", "self"),
         "n_aux": 1500, "epochs": 3, "n_probe_train": 3000, "results": "benchmarks/results/detection-quick"}
RESULT_FIELDS = ("aux_modes", "shares", "n_stream", "n_reference", "n_aux", "aux_poison_fraction", "self_share",
                 "self_trim", "epochs", "n_probe_train", "target_fpr", "budget", "seed",
                 "stream_seed")  # a part depends on these


def disjoint_classes(target: int) -> tuple[list[int], list[int]]:
    """(classes the class-disjoint detector sees, the five it never sees: the triggered images' sources)."""
    seen = sorted([target, *[c for c in DISJOINT_OTHERS if c != target][:4]])
    return seen, [c for c in range(10) if c not in seen]


@dataclass
class Pool:
    """Every image a stream of one attack can hold, each scored once: the clean stream in stream order
    (rows 0 .. n_stream-1), then the triggered versions of every image some stream draws."""

    images: np.ndarray  # (M, 32, 32, 3) uint8
    keys: list[str]
    labels: np.ndarray  # (M,) source class
    triggered: np.ndarray  # (M,) bool
    triggered_row: np.ndarray  # (n_stream,) the row of each clean image's triggered version, -1 if none
    draws: dict[str, np.ndarray]  # stream kind -> stream positions in draw order (at share s the first n)

    @property
    def n_stream(self) -> int:
        return len(self.triggered_row)


@dataclass
class Stream:
    kind: str  # "all" (non-target sources) or "class-disjoint" (sources the class-disjoint decoder never saw)
    share: float
    rows: np.ndarray  # (n_stream,) pool rows in stream order
    triggered: np.ndarray
    labels: np.ndarray


def make_pool(images: np.ndarray, labels: np.ndarray, trigger, target: int, kinds: tuple[str, ...],
              max_share: float, n_stream: int, seed: int) -> Pool:
    """The stream (``n_stream`` of ``images`` in a seeded order) and, per kind, a seeded draw order of the
    images that may be triggered; triggered versions are made for the first ``max_share`` of each draw."""
    order = np.random.default_rng(seed).permutation(len(images))[:n_stream]
    clean, clean_labels = images[order], labels[order]
    draw = np.random.default_rng(seed + 1).permutation(n_stream)
    unseen = disjoint_classes(target)[1]
    eligible = {"all": clean_labels[draw] != target, "class-disjoint": np.isin(clean_labels[draw], unseen)}
    draws = {kind: draw[eligible[kind]] for kind in kinds}
    n_max = round(max_share * n_stream)
    if any(len(d) < n_max for d in draws.values()):
        raise ValueError(f"a share of {max_share} needs {n_max} eligible images; the draws hold "
                         f"{ {kind: len(d) for kind, d in draws.items()} }")
    drawn = np.unique(np.concatenate([d[:n_max] for d in draws.values()]))
    triggered_row = np.full(n_stream, -1)
    triggered_row[drawn] = n_stream + np.arange(len(drawn))
    keys = [f"test-{i:05d}" for i in order] + [f"test-{i:05d}-t" for i in order[drawn]]
    return Pool(np.concatenate([clean, trigger.apply(clean[drawn])]), keys,
                np.r_[clean_labels, clean_labels[drawn]], np.r_[np.zeros(n_stream, bool), np.ones(len(drawn), bool)],
                triggered_row, draws)


def make_stream(pool: Pool, kind: str, share: float) -> Stream:
    """The clean stream with the first round(share * n) images of ``kind``'s draw replaced by their
    triggered versions, in place (the order, so every window, stays)."""
    rows = np.arange(pool.n_stream)
    chosen = pool.draws[kind][:round(share * pool.n_stream)]
    rows[chosen] = pool.triggered_row[chosen]
    return Stream(kind, share, rows, pool.triggered[rows], pool.labels[rows])


def stream_kind(aux: str) -> str:
    return "class-disjoint" if aux == "class-disjoint" else "all"


def per_window(fn: Callable[..., np.ndarray], *arrays: np.ndarray, size: int) -> np.ndarray:
    """``fn`` applied to consecutive windows of ``size`` rows of ``arrays``, concatenated."""
    return np.concatenate([fn(*(a[i:i + size] for a in arrays)) for i in range(0, len(arrays[0]), size)])


def knn_sparsity(embeddings: np.ndarray) -> np.ndarray:
    """Huang et al.'s k-NN sparsity with the window as reference: the library's own parts."""
    return sparsity(*nearest(embeddings, SPARSITY_K))


def baseline_scores(embeddings: np.ndarray, consistency: np.ndarray, size: int) -> dict[str, np.ndarray]:
    """The four baselines over consecutive windows of ``size`` (mask consistency is per sample)."""
    return {"l2-norm": per_window(lambda e: np.abs(robust_z(methods.l2_norm(e))), embeddings, size=size),
            "knn-density": per_window(methods.knn_density, embeddings, size=size),
            "mask-consistency": np.asarray(consistency, np.float64),
            "knn-sparsity": per_window(knn_sparsity, embeddings, size=size)}


def recall_at_budget(scores: np.ndarray, triggered: np.ndarray, budget: float) -> float:
    """Share of the triggered images among those a ``budget`` fraction cut removes (``upper_quantile``, the
    library's one fraction rule)."""
    return float((scores[triggered] > upper_quantile(scores, budget)).mean())


def downstream(predicted: np.ndarray, labels: np.ndarray, triggered: np.ndarray, target: int,
               kept: np.ndarray | None = None) -> dict:
    """CA over clean images and ASR over triggered ones; with ``kept``, a dropped image counts as neither
    correct nor a success (it never reaches the model)."""
    kept = np.ones(len(predicted), bool) if kept is None else kept
    clean = ~triggered
    correct = (predicted == labels) & kept
    success = (predicted == target) & kept
    return {"clean_accuracy": round(float(correct[clean].mean()), 4), "asr": round(float(success[triggered].mean()), 4),
            "dropped_triggered": round(float(1 - kept[triggered].mean()), 4),
            "dropped_clean": round(float(1 - kept[clean].mean()), 4)}


def cell_metrics(scores: np.ndarray, threshold: float, stream: Stream, predicted: np.ndarray, target: int) -> dict:
    """The row's figures for one method's scores over one stream, its threshold, and the probe's predictions."""
    positive = stream.triggered
    before = downstream(predicted, stream.labels, positive, target)
    after = downstream(predicted, stream.labels, positive, target, kept=~(scores > threshold))
    return {"auroc": round(auroc(scores, positive), 4), "tpr_at_1fpr": round(tpr_at_fpr(scores, positive, 0.01), 4),
            "recall_at_2pct": round(recall_at_budget(scores, positive, 0.02), 4),
            "recall_at_10pct": round(recall_at_budget(scores, positive, 0.10), 4),
            "asr_after": after["asr"], "ca_after": after["clean_accuracy"],
            "ca_before": before["clean_accuracy"], "asr_before": before["asr"],
            "threshold": float(threshold), "dropped_triggered": after["dropped_triggered"],
            "dropped_clean": after["dropped_clean"], "n_triggered": int(positive.sum())}


def audited(scores: np.ndarray, threshold: float, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``dedefilter audit`` over the whole stream's scores and embeddings: (the order ``select --separated``
    removes in, the separated collapse regions first, then the shipped score; the separated rows)."""
    scan = Scan.from_arrays([str(i) for i in range(len(scores))], scores, threshold, embeddings)
    separated = analyse(scan).separated
    return removal_score(scores, separated), separated


def detector_rows(attack: str, aux: str, scored: ScoredBatch, reference: dict[str, np.ndarray] | None,
                  streams: list[Stream], baselines: dict[tuple[str, float], dict[str, np.ndarray]],
                  predicted: np.ndarray, target: int, rule: WindowRule, config: BenchConfig,
                  detector_error: float | None) -> list[dict]:
    """Every (share, method) row of one detector: its pool scores assembled into each stream, the shipped
    window score over the stream's windows, the baselines' scores of the same stream.

    ``reference``: the baselines' scores on the clean reference windows and, for "shipped" and "paper",
    ``calibrate``'s (threshold, rule) on them (at ``target_fpr``); None for the self detector, whose
    thresholds are the ``budget`` cut of the stream's first ``n_reference`` samples, as ``calibrate
    --budget`` sets it on the stream's first shards. ``detector_error``: the detector's own error (its record's);
    where its decoder does not fit the reference, calibration turns the rule off and "shipped" is the paper score,
    as ``filter`` runs it then."""
    rows = []
    for stream in streams:
        r = stream.rows
        if reference is None:
            head_rows = r[:config.n_reference]
            head = ScoredBatch(*(a[head_rows] for a in (scored.scores, scored.embeddings, scored.residuals)))
            calibrated = {"shipped": calibrate_scored(head, rule, fraction=config.budget, own_error=detector_error),
                          "paper": calibrate_scored(head, None, fraction=config.budget)}
        else:
            calibrated = {method: reference[method] for method in ("shipped", "paper")}
        tuned = calibrated["shipped"][1]  # the rule with the collapse shift calibration set; None: turned off
        calibrated["audit"] = calibrated["shipped"]  # the audit reads the filter's flags
        window = score_windows(scored.scores[r], scored.embeddings[r], scored.residuals[r], tuned) if tuned else None
        scores = {"paper": scored.scores[r].astype(np.float64),
                  "shipped": (window.score if tuned else scored.scores[r]).astype(np.float64),
                  **baselines[stream.kind, stream.share]}
        scores["audit"], separated = audited(scores["shipped"], calibrated["shipped"][0].value, scored.embeddings[r])
        for method in METHODS:
            s = scores[method]
            if method in calibrated:
                threshold = calibrated[method][0].value
            else:
                threshold = (for_contamination(s[:config.n_reference], config.budget) if reference is None
                             else for_false_positive_rate(reference[method], config.target_fpr)).value
            row = {"attack": attack, "share": stream.share, "aux": aux, "method": method}
            row |= cell_metrics(s, threshold, stream, predicted[r], target)
            if method == "shipped":
                row["collapsed_windows"] = int(window.collapse[::rule.size].sum()) if tuned else 0
                row["collapse_shift"] = tuned.collapse_shift if tuned else None
                row["misfit"] = misfit(scored.scores[r][:config.n_reference] if reference is None
                                       else reference["reference_paper_scores"], detector_error)
                row["rule_off"] = tuned is None
            if method == "audit":
                row["separated_rows"] = int(separated.sum())
                row["separated_triggered"] = int((separated & stream.triggered).sum())
            if aux == "self":
                row["self_trained_at"] = config.self_share
            rows.append(row)
    return rows


def digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def aux_images(mode: str, pool: Pool, trigger, target: int, config: BenchConfig) -> tuple[np.ndarray, str]:
    """Auxiliary training images for one mode, and what they are (never the probe's or the reference's images)."""
    rng = np.random.default_rng(config.seed)
    if mode == "ood-photos":
        return photo_patches(config.n_aux, seed=config.seed), f"{config.n_aux} photo patches"
    if mode == "self":
        stream = make_stream(pool, "all", config.self_share)
        sample = np.sort(rng.choice(pool.n_stream, config.n_aux, replace=False))
        rows = stream.rows[sample]
        return pool.images[rows], (f"{config.n_aux} images of the {config.self_share:.0%}-share stream itself, "
                                   f"{int(pool.triggered[rows].sum())} triggered")
    x, y = fashion_mnist("train")
    candidates = np.arange(PRETRAIN.start, PRETRAIN.stop)
    if mode == "class-disjoint":
        seen = disjoint_classes(target)[0]
        candidates = candidates[np.isin(y[candidates], seen)]
    chosen = rng.permutation(candidates)[:config.n_aux]
    images, labels = x[chosen].copy(), y[chosen]
    if mode == "id-poisoned-1%":
        n = int(poison(images, labels, config.aux_poison_fraction, target, trigger,
                       np.random.default_rng(config.seed + 1)).sum())
        return images, f"{config.n_aux} Fashion-MNIST train[:50000] images, {n} triggered"
    if mode == "class-disjoint":
        return images, (f"{config.n_aux} clean Fashion-MNIST train[:50000] images of "
                        f"{', '.join(FASHION_MNIST_CLASSES[c] for c in seen)} only")
    return images, f"{config.n_aux} clean Fashion-MNIST train[:50000] images"


def get_detector(encoder: Encoder, attack: str, mode: str, images: np.ndarray, config: BenchConfig, log) -> Detector:
    """The detector trained on ``images`` (the paper's DeDe config, ``config.epochs``), cached by what made it;
    the self detector as ``train --trim`` trains it (its first model is the untrimmed one, cached too)."""
    dede = replace(DeDeConfig(), epochs=config.epochs, seed=config.seed)
    made_with = {"attack": attack, "aux": mode, "n_aux": len(images), "aux_sha": digest(images), "dede": asdict(dede)}
    trim = config.self_trim if mode == "self" else 0.0
    if trim:
        made_with["trim"] = trim
    key = hashlib.sha256(json.dumps(made_with, sort_keys=True).encode()).hexdigest()[:10]
    path = Path(config.cache_dir) / f"{attack}-{mode}-{key}.pt"
    if path.exists():
        try:
            detector = Detector.load(path, encoder.fingerprint)
        except CheckpointError as err:
            log(f"retraining: {err}")
        else:
            if "own_error" not in detector.record:  # cached before training measured it: measure it as training does
                detector.record["own_error"] = own_error(Scorer(encoder, detector, config.device), images)
                detector.model.cpu()
                detector.save(path)
            return detector
    if trim:
        first = get_detector(encoder, attack, mode, images, replace(config, self_trim=0.0), log).model
        model, record = train_trimmed(encoder, images, dede, trim, log=lambda _: None, device=config.device,
                                      first=first)
    else:
        model, record = train_model(encoder, images, dede, log=lambda _: None, device=config.device)
    log(f"  trained the {mode} detector in {record['train_seconds']}s (loss {record['losses'][-1]})")
    detector = Detector(model, encoder.name, encoder.fingerprint, record=record | {"bench": made_with},
                        encoder_input=encoder.input)
    path.parent.mkdir(parents=True, exist_ok=True)
    detector.save(path)
    return detector


def consistency_of(encoder: Encoder, images: np.ndarray, device: str, seed: int, chunk: int = 2000) -> np.ndarray:
    """Masking consistency in chunks (its masks for a whole pool would not fit comfortably in memory)."""
    return np.concatenate([methods.masking_consistency(encoder, to_float(images[i:i + chunk]), device, seed + i)
                           for i in range(0, len(images), chunk)])


def evaluate_attack(name: str, config: BenchConfig, log) -> dict:
    start = time.perf_counter()
    encoder, card = load_or_train(name, config.attack_dir, config.device, log)
    encoder.module.to(config.device)
    spec = ATTACKS[name]
    trigger, target = spec.trigger, spec.target_class
    seen, unseen = disjoint_classes(target)
    described = {"summary": spec.summary, "target": FASHION_MNIST_CLASSES[target], "trigger": trigger.describe(),
                 "probe": card.get("probe"), "spread": card.get("spread"), "heldout": name == HELDOUT,
                 "class_disjoint": {"seen": [FASHION_MNIST_CLASSES[c] for c in seen],
                                    "triggered_sources": [FASHION_MNIST_CLASSES[c] for c in unseen]}}
    if card["probe"]["asr"] < MIN_ASR:
        log(f"{name}: ASR {card['probe']['asr']:.3f} < {MIN_ASR}: the attack failed, not evaluated")
        return described | {"rows": None, "seconds": round(time.perf_counter() - start, 1)}
    device, rule = config.device, WindowRule()
    kinds = tuple(dict.fromkeys(stream_kind(mode) for mode in config.aux_modes))
    test_x, test_y = fashion_mnist("test")
    pool = make_pool(test_x, test_y, trigger, target, kinds, max(config.shares), config.n_stream, config.stream_seed)
    streams = {kind: [make_stream(pool, kind, share) for share in config.shares] for kind in kinds}
    log(f"{name}: target {FASHION_MNIST_CLASSES[target]}; {len(pool.keys)} images to score per detector "
        f"({int(pool.triggered.sum())} triggered versions)")

    train_x, train_y = fashion_mnist("train")
    reference = train_x[REFERENCE][:config.n_reference]
    embeddings = embed_array(encoder, pool.images, device=device).cpu().numpy()
    reference_embeddings = embed_array(encoder, reference, device=device).cpu().numpy()
    consistency = consistency_of(encoder, pool.images, device, config.seed)
    reference_consistency = consistency_of(encoder, reference, device, config.seed + 10_000)
    baselines = {(s.kind, s.share): baseline_scores(embeddings[s.rows], consistency[s.rows], rule.size)
                 for kind in kinds for s in streams[kind]}
    reference_baselines = baseline_scores(reference_embeddings, reference_consistency, rule.size)
    probe_rows = slice(PROBE_TRAIN.start, PROBE_TRAIN.start + config.n_probe_train)
    predict = train_linear_probe(embed_array(encoder, train_x[probe_rows], device=device).cpu(),
                                 torch.as_tensor(train_y[probe_rows]), seed=config.seed)
    predicted = predict(torch.from_numpy(embeddings)).numpy()
    log(f"  baselines and probe done ({time.perf_counter() - start:.0f}s)")

    rows, aux_described, mode_seconds = [], {}, {}
    for mode in config.aux_modes:
        mode_start = time.perf_counter()
        images, aux_described[mode] = aux_images(mode, pool, trigger, target, config)
        detector = get_detector(encoder, name, mode, images, config, log)
        scorer = Scorer(encoder, detector, device)
        scored = scorer.score_all(pool.images, pool.keys, residuals=True)
        reference_scores = None
        if mode != "self":  # as `dedefilter calibrate --reference ... --window 1000` (and --window 0), one scoring
            reference_scored = score_reference(scorer, reference)
            reference_scores = {"shipped": calibrate_scored(reference_scored, rule, fpr=config.target_fpr,
                                                            own_error=detector.record["own_error"]),
                                "reference_paper_scores": reference_scored.scores,
                                "paper": calibrate_scored(reference_scored, None, fpr=config.target_fpr)}
            reference_scores |= reference_baselines
        rows += detector_rows(name, mode, scored, reference_scores, streams[stream_kind(mode)], baselines, predicted,
                              target, rule, config, detector.record["own_error"])
        detector.model.cpu()
        mode_seconds[mode] = round(time.perf_counter() - mode_start, 1)
        shipped = {r["share"]: r["auroc"] for r in rows if r["aux"] == mode and r["method"] == "shipped"}
        paper = {r["share"]: r["auroc"] for r in rows if r["aux"] == mode and r["method"] == "paper"}
        log(f"  {mode} ({mode_seconds[mode]:.0f}s) AUROC shipped {shipped} paper {paper}")
    encoder.module.cpu()
    return described | {"aux": aux_described, "mode_seconds": mode_seconds, "rows": rows,
                        "seconds": round(time.perf_counter() - start, 1)}


def device_name(device: str) -> str:
    name = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu"
    return f"{name} ({torch.get_num_threads()} threads)"


def result_settings(config: BenchConfig) -> dict:
    """What a saved part depends on: the run's settings and the shipped window rule (a part scored under
    another rule is stale)."""
    settings = asdict(config)
    return {key: settings[key] for key in RESULT_FIELDS} | {"window_rule": WindowRule().to_dict()}


def run_attack(name: str, config: BenchConfig, parts: Path, log=print) -> None:
    """Evaluate one attack and save it as a part at once, so a run cut short keeps what it finished."""
    result = evaluate_attack(name, config, log) | {
        "settings": result_settings(config), "device_name": device_name(config.device), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    partial = parts / f"{name}.json.partial"
    partial.write_text(json.dumps(result, indent=1))
    partial.replace(parts / f"{name}.json")


def saved_part(parts: Path, name: str, config: BenchConfig) -> dict | None:
    """The attack's saved part if it was made with these settings and has a row for every method."""
    path = parts / f"{name}.json"
    if not path.exists():
        return None
    part = json.loads(path.read_text())
    methods_in = {row["method"] for row in part["rows"] or []}
    complete = part["rows"] is None or methods_in >= set(METHODS)
    return part if complete and part.get("settings") == json.loads(json.dumps(result_settings(config))) else None


def pct(share: float) -> str:
    return f"{share * 100:g}%"


def markdown(report: dict) -> str:
    meta, sweep = report["meta"], report["sweep"]
    config = meta["config"]
    attacks = [name for name, a in report["attacks"].items() if a["rows"] is not None]
    shares = config["shares"]
    index = {(r["attack"], r["aux"], r["share"], r["method"]): r for r in sweep}
    lines = [
        "# Detection sweep", "",
        f"`{meta['command']}` on {meta['device_name']} ({meta['date']}, torch {meta['torch']}; seconds per attack: "
        + ", ".join(f"{n} {s:.0f}" for n, s in meta["attack_seconds"].items()) + "). "
        f"Streams of {config['n_stream']} Fashion-MNIST test images (shuffled, windows of {WindowRule().size}); "
        "at each share a nested seeded draw of non-target images is triggered in place. DeDe at the paper's size, "
        f"{config['epochs']} epochs on {config['n_aux']} auxiliary images. Thresholds: "
        f"{config['target_fpr']:.0%} FPR on {config['n_reference']} clean reference images; "
        f"self: a {config['budget']:.0%} budget on the stream's first "
        f"{config['n_reference']} (no clean reference, so no excess error). shipped = `WindowRule()` over the stream's "
        "windows, as `dedefilter filter` runs it; "
        "paper = the paper score alone.", "",
        f"Attacks in this file: {', '.join(attacks) or 'none'}"
        + (f"; not yet run: {', '.join(meta['missing'])}" if meta["missing"] else "") + ".", ""]

    def table(title: str, fields: tuple[str, ...], methods_: tuple[str, ...] = ("shipped", "paper")) -> None:
        lines.extend([f"## {title}", "", "| attack | aux | " + " | ".join(pct(s) for s in shares) + " |",
                      "|---|---|" + "---|" * len(shares)])
        for name in attacks:
            for aux in config["aux_modes"]:
                cells = []
                for share in shares:
                    found = [index.get((name, aux, share, m)) for m in methods_]
                    cells.append(" / ".join(f"{r[f]:.3f}" if r else "-" for r in found for f in fields))
                lines.append(f"| {name}{' (held out)' if report['attacks'][name]['heldout'] else ''} | {aux} | "
                             + " | ".join(cells) + " |")
        lines.append("")

    table("AUROC: shipped / paper", ("auroc",))
    table("AUROC: audit (separated regions, then shipped) / shipped", ("auroc",), ("audit", "shipped"))
    table("TPR at 1% FPR: shipped / paper", ("tpr_at_1fpr",))
    table("Recall at a 10% removal budget: shipped / paper", ("recall_at_10pct",))
    table("ASR after filtering at the threshold: shipped / paper (ASR before: see the JSON)", ("asr_after",))
    lines += ["## Baselines on the same windows: AUROC (streams of all non-target sources; aux-independent)", "",
              "| attack | method | " + " | ".join(pct(s) for s in shares) + " |", "|---|---|" + "---|" * len(shares)]
    for name in attacks:
        aux = next((a for a in config["aux_modes"] if stream_kind(a) == "all"), None)
        for method in ("shipped", "audit", "paper", *BASELINES):
            label = f"{method} ({aux})" if method in ("shipped", "audit", "paper") else method
            cells = [f"{index[name, aux, s, method]['auroc']:.3f}" if (name, aux, s, method) in index else "-"
                     for s in shares]
            lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    worse = [(k, index[k]["auroc"], index[(*k[:3], "paper")]["auroc"]) for k in index
             if k[3] == "shipped" and index[k]["auroc"] < index[(*k[:3], "paper")]["auroc"] - 0.005]
    off = sorted({(k[0], k[1], index[k]["misfit"]) for k in index if k[3] == "shipped" and index[k].get("rule_off")})
    lines += ["", f"## Detectors whose decoder does not fit (misfit > {WindowRule().max_misfit}: shipped = paper)", ""]
    lines += [f"- {a} / {aux}: draws the reference {m:.1f}x worse than its own training images"
              for a, aux, m in off] or ["- none"]
    lines += ["", "## Cells where shipped < paper - 0.005 AUROC", ""]
    lines += [f"- {a} / {aux} / {pct(s)}: shipped {x:.3f}, paper {p:.3f}"
              for (a, aux, s, _), x, p in worse] or ["- none"]
    failed = [name for name, a in report["attacks"].items() if a["rows"] is None]
    if failed:
        lines += ["", f"Attacks that failed (probe ASR < {MIN_ASR:.0%}): " + ", ".join(failed)]
    return "\n".join(lines) + "\n"


def assemble(config: BenchConfig, parts: Path, command: str, seconds: float) -> dict:
    """The report from every saved part (the sweep's attacks, then the held-out one if it ran)."""
    attacks = {}
    for name in (*config.attacks, HELDOUT):
        part = saved_part(parts, name, config)
        if part is not None:
            attacks[name] = part
    missing = [name for name in config.attacks if name not in attacks]
    sweep = [row | {"heldout": True} if name == HELDOUT else row
             for name, a in attacks.items() for row in a["rows"] or []]
    report = {"meta": {"command": command, "config": asdict(config), "attacks_in_sweep": list(attacks),
                       "missing": missing, "heldout": HELDOUT, "window_rule": WindowRule().to_dict(),
                       "date": ", ".join(sorted({a["date"] for a in attacks.values()})),
                       "torch": ", ".join(sorted({a["torch"] for a in attacks.values()})),
                       "device_name": ", ".join(sorted({a["device_name"] for a in attacks.values()})),
                       "seconds": round(seconds, 1),
                       "attack_seconds": {name: a["seconds"] for name, a in attacks.items()}},
              "sweep": sweep, "attacks": {name: {k: v for k, v in a.items() if k != "rows"} | {"rows": len(a["rows"])
                                                                                             if a["rows"] else None}
                                          for name, a in attacks.items()}}
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 attacks, 2 aux modes, small detectors: minutes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--attacks", nargs="+", choices=sorted(ATTACKS),
                        help=f"{HELDOUT} only with --stream-seed other than 0 (else --heldout)")
    parser.add_argument("--aux", nargs="+", choices=AUX_MODES, help="these auxiliary sets only")
    parser.add_argument("--stream-seed", type=int, default=0,
                        help="draw other streams, as a held-out check run once after every choice is frozen "
                             "(1 and 2 are spent: docs/BENCHMARKS.md, held-out streams)")
    parser.add_argument("--heldout", action="store_true",
                        help=f"run only the held-out attack {HELDOUT} (once, after every choice is frozen)")
    parser.add_argument("--results", help="output path without extension")
    parser.add_argument("--assemble", action="store_true", help="only write the report from the saved parts")
    parser.add_argument("--fresh", action="store_true", help="delete the saved parts first (else finished attacks "
                                                             "made with the same settings are kept)")
    args = parser.parse_args(argv)
    if args.heldout and args.attacks:
        parser.error("--heldout runs the held-out attack alone")
    if HELDOUT in (args.attacks or ()) and not args.stream_seed:
        parser.error(f"{HELDOUT} is the held-out attack: --heldout runs it")
    config = BenchConfig(device=args.device, stream_seed=args.stream_seed)
    if args.quick:
        config = replace(config, **QUICK)
    if args.attacks:
        config = replace(config, attacks=tuple(args.attacks))
    if args.aux:
        config = replace(config, aux_modes=tuple(args.aux))
    if args.results:
        config = replace(config, results=args.results)
    torch.manual_seed(config.seed)
    start = time.perf_counter()
    parts = Path(f"{config.results}-parts")
    if args.fresh:
        shutil.rmtree(parts, ignore_errors=True)
    parts.mkdir(parents=True, exist_ok=True)
    if not args.assemble:
        for name in (HELDOUT,) if args.heldout else config.attacks:
            if saved_part(parts, name, config) is not None:
                print(f"{name}: kept the saved part", flush=True)
                continue
            run_attack(name, config, parts, log=lambda message: print(message, flush=True))
    command = ("python -m benchmarks.detection" + (" --quick" if args.quick else "")
               + (f" --stream-seed {args.stream_seed}" if args.stream_seed else ""))
    report = assemble(config, parts, command, time.perf_counter() - start)
    path = Path(config.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    path.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
