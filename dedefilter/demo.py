"""The end-to-end demo: the bundled backdoored encoder, real Fashion-MNIST test images with 5%
patch-triggered, a DeDe detector trained on 1%-poisoned in-distribution auxiliary data and calibrated
with the shipped window rule, the filter streamed over WebDataset shards with 2 DataLoader workers,
Parquet scores and filtered shards out. The paper score of each sample is in the same Parquet rows, so
the demo reports both.

The same images are then scored with the clean encoder (and its own detector) to show what the
score measures: the backdoor (the triggered embedding contradicts the image) or merely the patch.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds

from .attacks.triggers import PatchTrigger, poison
from .config import DeDeConfig
from .data import FASHION_MNIST_CLASSES, fashion_mnist
from .detector import CheckpointError, Detector
from .encoders import BACKDOORED_ENCODER, CLEAN_ENCODER, Encoder, load_encoder
from .job import filter_shards
from .metrics import auroc, auroc_per_source_class, rates_at_threshold, tpr_at_fpr
from .scoring import Scorer
from .shards import write_image_shards
from .stage import StageConfig
from .training import train_model
from .window import WindowRule, calibrate

BACKDOORED, CLEAN = BACKDOORED_ENCODER, CLEAN_ENCODER


@dataclass(frozen=True)
class DemoConfig:
    work_dir: str = ".dedefilter-demo"
    results_path: str = "benchmarks/results/demo.json"
    n_test: int = 10_000
    triggered_fraction: float = 0.05
    n_aux: int = 6_000
    aux_poison_fraction: float = 0.01
    n_reference: int = 2_000
    target_fpr: float = 0.01
    epochs: int = 10
    num_workers: int = 2
    batch_size: int = 256
    seed: int = 0
    retrain: bool = False
    image_size: int = 32  # the decoder's view; the bundled encoders take 32x32 (their shards are 32x32)
    patch_size: int = 4
    window: int = WindowRule().size  # the shipped window-level score; 0: the paper score alone


def get_detector(encoder: Encoder, aux: np.ndarray, reference: np.ndarray, config: DemoConfig,
                 log) -> tuple[Detector, str]:
    """Load the cached detector for this encoder (calibrated again if an older version calibrated it with
    another window rule), or train and calibrate one; says which it did."""
    path = Path(config.work_dir) / f"detector-{encoder.name}.pt"
    made_with = asdict(replace(config, retrain=False))
    rule = WindowRule(size=config.window) if config.window else None
    detector, how = None, "trained"
    if path.exists() and not config.retrain:
        try:
            cached = Detector.load(path, encoder.fingerprint)
            if cached.record.get("demo") == made_with:
                log(f"loaded {path}")
                detector, how = cached, "loaded from cache"
                stored = cached.window.uncalibrated() if cached.window else None
                if cached.threshold is not None and stored == rule:
                    return detector, how
                log("its threshold was calibrated with another window rule: calibrating it again")
                how = "loaded from cache, calibrated again"
        except CheckpointError as err:
            log(f"retraining: {err}")
    if detector is None:
        log(f"training a DeDe detector for {encoder.name} on {len(aux)} auxiliary images ...")
        dede = replace(DeDeConfig(), epochs=config.epochs, seed=config.seed, image_size=config.image_size,
                       patch_size=config.patch_size)
        model, record = train_model(encoder, aux, dede, log=log)
        detector = Detector(model, encoder.name, encoder.fingerprint, record=record | {"demo": made_with},
                            encoder_input=encoder.input)
    detector = detector.with_threshold(*calibrate(Scorer(encoder, detector), reference, rule, fpr=config.target_fpr))
    detector.save(path)
    return detector, how


def evaluate(parquet_dir: Path, truth: dict[str, tuple[bool, int]], target: int) -> dict:
    """Detection figures of the filter's decision score, and the AUROC of the paper score in the same rows."""
    table = ds.dataset(str(parquet_dir), format="parquet").to_table(
        columns=["key", "score", "paper_score", "threshold"], filter=ds.field("status") != "error")
    scores = table["score"].to_numpy()
    paper = table["paper_score"].to_numpy(zero_copy_only=False)
    triggered, labels = map(np.array, zip(*(truth[key] for key in table["key"].to_pylist())))
    threshold = table["threshold"][0].as_py()
    tpr, fpr = rates_at_threshold(scores, triggered, threshold)
    per_class = auroc_per_source_class(scores, triggered, labels, FASHION_MNIST_CLASSES)
    return {"auroc": round(auroc(scores, triggered), 4),
            "paper_score_auroc": round(auroc(paper, triggered), 4) if np.isfinite(paper).all() else None,
            "tpr_at_1pct_fpr": round(tpr_at_fpr(scores, triggered, 0.01), 4),
            "threshold": threshold, "tpr_at_threshold": round(tpr, 4), "fpr_at_threshold": round(fpr, 4),
            "auroc_per_source_class": per_class, "n_clean": int((~triggered).sum()),
            "n_triggered": int(triggered.sum())}


def run_demo(config: DemoConfig = DemoConfig(), log=print) -> dict:
    start = time.perf_counter()
    work = Path(config.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(config.seed)
    backdoored, clean = load_encoder(BACKDOORED), load_encoder(CLEAN)
    target = backdoored.card["target_class"]
    trigger = PatchTrigger.from_description(backdoored.card["trigger"])
    log(f"attack: {BACKDOORED}, {trigger.size}x{trigger.size} checkerboard patch, "
        f"target class {target} ({FASHION_MNIST_CLASSES[target]})")

    test_x, test_y = fashion_mnist("test")
    test_x, test_y = test_x[:config.n_test].copy(), test_y[:config.n_test]
    triggered = poison(test_x, test_y, config.triggered_fraction, target, trigger, rng)
    keys = [f"fmnist-test-{i:05d}" for i in range(len(test_x))]
    meta = [{"label": FASHION_MNIST_CLASSES[y]} for y in test_y]
    shutil.rmtree(work / "test-shards", ignore_errors=True)  # no stale shards from a larger run
    urls = write_image_shards(work / "test-shards", test_x, keys, test_y, meta, shard_size=1000)
    truth = {k: (bool(t), int(y)) for k, t, y in zip(keys, triggered, test_y, strict=True)}
    log(f"wrote {len(urls)} shards: {len(keys)} test images, {int(triggered.sum())} triggered")

    train_x, train_y = fashion_mnist("train")
    aux_idx = rng.choice(50_000, config.n_aux, replace=False)
    aux = train_x[aux_idx].copy()
    n_aux_poisoned = int(poison(aux, train_y[aux_idx], config.aux_poison_fraction, target, trigger, rng).sum())
    reference = train_x[50_000:50_000 + config.n_reference]  # clean, held out of encoder and aux data

    results = {"attack": {"encoder": BACKDOORED, "trigger": trigger.describe(), "target_class": target,
                          "target_name": FASHION_MNIST_CLASSES[target], "probe": backdoored.card["probe"]},
               "data": {"test": "Fashion-MNIST t10k (Debian dataset-fashion-mnist), zero-padded to 32x32",
                        "aux": f"{config.n_aux} Fashion-MNIST train images, {n_aux_poisoned} triggered",
                        "reference": f"{config.n_reference} clean Fashion-MNIST train images (held out)"},
               "config": asdict(config)}
    for name, encoder in (("backdoored", backdoored), ("clean", clean)):
        detector, detector_source = get_detector(encoder, aux, reference, config, log)
        log(f"[{name} encoder] filtering {len(urls)} shards with {config.num_workers} workers ...")
        job = filter_shards(urls, Scorer(encoder, detector), work / f"out-{name}", overwrite=True,
                            stage=StageConfig(batch_size=config.batch_size), num_workers=config.num_workers,
                            progress=False)
        metrics = evaluate(job.parquet_dir, truth, target)
        metrics.update(kept=job.ledger["kept"], dropped=job.ledger["dropped"], errors=job.ledger["error"],
                       samples_per_s=round(job.samples_per_s, 1), model_id=detector.model_id,
                       detector=detector_source, detector_train_seconds=detector.record["train_seconds"],
                       parquet=str(job.parquet_dir), filtered_shards=len(job.shard_paths))
        results[name] = metrics
        log(json.dumps({k: v for k, v in metrics.items() if k != "auroc_per_source_class"}))
        log("AUROC per source class: " + json.dumps(metrics["auroc_per_source_class"]))
    summary = results["backdoored"]
    results.update({k: summary[k] for k in ("auroc", "tpr_at_1pct_fpr", "threshold", "tpr_at_threshold",
                                            "fpr_at_threshold", "n_clean", "n_triggered", "kept", "dropped",
                                            "samples_per_s")})
    results["seconds"] = round(time.perf_counter() - start, 1)
    Path(config.results_path).parent.mkdir(parents=True, exist_ok=True)
    Path(config.results_path).write_text(json.dumps(results, indent=2) + "\n")
    log(f"demo done in {results['seconds']}s: AUROC {summary['auroc']} (backdoored encoder), "
        f"{results['clean']['auroc']} (clean encoder); wrote {config.results_path}")
    return results
