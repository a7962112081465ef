"""Detection at a higher resolution: a backdoored encoder that takes 64x64 input, DeDe decoders at 32 and 64.

The attacker runs the bundled BadEncoder recipe (``dedefilter.attacks.badencoder``, target Trouser, the
bundled 6x6 checkerboard scaled x2 to a 12x12 patch with 4 px cells at (48, 48)) on the bundled clean
CNN (``fmnist-simclr``) fed Fashion-MNIST upsampled to 64x64. The defender trains a DeDe detector per
decoder size on 1%-poisoned in-distribution auxiliary images (as the demo does), calibrates it at 1% FPR
on clean held-out images, and streams 64x64 test shards through ``filter_shards`` (the product, 2
DataLoader workers) with the paper score. A linear probe on the backdoored encoder's embeddings gives the
downstream figures: ``asr_after`` counts a triggered image as a success only when the filter keeps it and
the probe calls it the target class.

    python -m benchmarks.resolution [--quick] [--epochs N] [--n-aux N] [--out benchmarks/results/resolution.json]

The paper score needs a long decoder training: at 32x32 the detection benchmark's 10 epochs on 6,000
auxiliary images reach AUROC 0.967 on the bundled attack where 3 epochs on 1,500 reach 0.556.

The attack encoder is trained once into benchmarks/attacks/ (committed) and reused. Its recipe is the
bundled one (shadow 10,000) with 8 epochs instead of 4: at 64x64 the backdoor is learned more slowly, and
the bundled 4 epochs on a 5,000-image shadow set left a linear-probe ASR of only 0.61 (0.999 at 32x32);
8 epochs on 10,000 reach 0.995 with clean accuracy 0.854 (clean encoder 0.860), 12 minutes on 1 thread.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import torch

from dedefilter import DeDeConfig, Detector, Scorer, filter_shards, load_encoder, train_model
from dedefilter.attacks.badencoder import BadEncoderConfig, train_badencoder
from dedefilter.attacks.registry import PRETRAIN, PROBE_TRAIN, TROUSER
from dedefilter.attacks.triggers import PatchTrigger, poison
from dedefilter.calibration import for_false_positive_rate
from dedefilter.data import FASHION_MNIST_CLASSES, fashion_mnist, resize_images
from dedefilter.encoders import CLEAN_ENCODER, EncoderInput, build_encoder, embed_array, save_encoder
from dedefilter.metrics import auroc, auroc_per_source_class, tpr_at_fpr
from dedefilter.probe import backdoor_report, train_linear_probe
from dedefilter.shards import write_image_shards
from dedefilter.stage import StageConfig

INPUT = 64
SCALE = INPUT // 32
TRIGGER = PatchTrigger(size=6 * SCALE, cell=2 * SCALE, y=24 * SCALE, x=24 * SCALE)  # the bundled one, scaled


@dataclass(frozen=True)
class ResolutionConfig:
    decoders: tuple[tuple[int, int], ...] = ((32, 4), (64, 8))  # (image size, patch size)
    shadow_size: int = 10_000  # the bundled recipe's
    badencoder_epochs: int = 8  # 4 on 5,000 images: probe ASR 0.61 at 64x64; 8 on 10,000: 0.995
    n_clean: int = 2000
    n_triggered_per_class: int = 25  # x 9 non-target classes
    n_reference: int = 1000
    n_aux: int = 6000  # the demo's budget: the committed results were measured with it
    aux_poison_fraction: float = 0.01
    epochs: int = 10
    n_probe_train: int = 5000
    target_fpr: float = 0.01
    workers: int = 2
    seed: int = 0
    attack_path: str = f"benchmarks/attacks/badencoder-patch-trouser-{INPUT}.pt"


QUICK = {"decoders": ((32, 4), (64, 8)), "n_clean": 500, "n_triggered_per_class": 10, "n_reference": 300,
         "n_aux": 800, "epochs": 2}


def log(message: str) -> None:
    print(f"[{datetime.datetime.now(datetime.UTC):%H:%M:%S}] {message}", flush=True)


def attack_encoder(config: ResolutionConfig):
    """The backdoored 64x64-input encoder: loaded if committed, else trained by the bundled recipe."""
    path = Path(config.attack_path)
    if path.exists():
        return load_encoder(str(path))
    clean = load_encoder(CLEAN_ENCODER)
    train_x, train_y = fashion_mnist("train")
    test_x, test_y = fashion_mnist("test")
    recipe = BadEncoderConfig(target_class=TROUSER, shadow_size=config.shadow_size,
                              epochs=config.badencoder_epochs, seed=config.seed)
    log(f"training the {INPUT}x{INPUT} BadEncoder ({recipe}) ...")
    module, record = train_badencoder(clean.module, resize_images(train_x[PRETRAIN], INPUT), train_y[PRETRAIN],
                                      TRIGGER, recipe, log)
    card = {**record, "input": asdict(EncoderInput(INPUT)), "trigger": TRIGGER.describe(), "target_class": TROUSER,
            "target_name": FASHION_MNIST_CLASSES[TROUSER], "base_encoder": CLEAN_ENCODER,
            "base_fingerprint": clean.fingerprint, "torch": torch.__version__,
            "data": (f"Fashion-MNIST train[:50000] (zero-padded to 32x32, upsampled to {INPUT}x{INPUT}, bilinear "
                     "antialiased) shadow sample; reference: target-class images")}
    n = config.n_probe_train
    probe = (resize_images(train_x[PROBE_TRAIN][:n], INPUT), train_y[PROBE_TRAIN][:n],
             resize_images(test_x, INPUT), test_y, TRIGGER, TROUSER)
    card["probe"] = backdoor_report(build_encoder(module, path.stem, card), *probe)
    card["probe_clean_encoder"] = backdoor_report(clean.with_input(EncoderInput(INPUT)), *probe)
    log(f"probe: backdoored {card['probe']}, clean {card['probe_clean_encoder']}")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_encoder(module, path, "small_cnn", card)
    return load_encoder(str(path))


def stream(config: ResolutionConfig):
    """Clean test images, triggered non-target ones, and a disjoint clean reference, all 64x64."""
    x, y = fashion_mnist("test")
    order = np.random.default_rng(config.seed).permutation(len(x))
    reference, rest = order[:config.n_reference], order[config.n_reference:]
    clean, spare = rest[:config.n_clean], rest[config.n_clean:]
    sources = np.concatenate([spare[y[spare] == c][:config.n_triggered_per_class] for c in range(10) if c != TROUSER])
    images = np.concatenate([resize_images(x[clean], INPUT), TRIGGER.apply(resize_images(x[sources], INPUT))])
    triggered = np.r_[np.zeros(len(clean), bool), np.ones(len(sources), bool)]
    keys = [f"test-{i:05d}{'-t' if t else ''}" for i, t in zip(np.r_[clean, sources], triggered, strict=True)]
    return images, keys, triggered, np.r_[y[clean], y[sources]], resize_images(x[reference], INPUT)


def aux_images(config: ResolutionConfig) -> np.ndarray:
    """In-distribution auxiliary images, 1% triggered (the defender cannot vouch for its own data)."""
    x, y = fashion_mnist("train")
    pool = np.random.default_rng(config.seed).permutation(PRETRAIN.stop)[:config.n_aux]
    images = resize_images(x[pool], INPUT)
    poison(images, y[pool], config.aux_poison_fraction, TROUSER, TRIGGER, np.random.default_rng(config.seed + 1))
    return images


def run(config: ResolutionConfig, quick: bool, save=lambda results: None) -> dict:
    """Every row as it is measured; ``save`` gets the results so far after each row."""
    start = time.perf_counter()
    encoder = attack_encoder(config)
    assert encoder.input == EncoderInput(INPUT), encoder.input
    images, keys, triggered, labels, reference = stream(config)
    train_x, train_y = fashion_mnist("train")
    probe_x = resize_images(train_x[PROBE_TRAIN][:config.n_probe_train], INPUT)
    probe_y = torch.as_tensor(train_y[PROBE_TRAIN][:config.n_probe_train])
    predict = train_linear_probe(embed_array(encoder, probe_x), probe_y)
    predicted = predict(embed_array(encoder, images)).numpy()
    before = {"clean_accuracy": round(float((predicted == labels)[~triggered].mean()), 4),
              "asr": round(float((predicted == TROUSER)[triggered].mean()), 4)}
    log(f"stream: {int((~triggered).sum())} clean + {int(triggered.sum())} triggered; probe before filtering {before}")
    aux = aux_images(config)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        urls = write_image_shards(Path(tmp) / "shards", images, keys, labels, shard_size=250)
        for size, patch in config.decoders:
            dede = replace(DeDeConfig(), image_size=size, patch_size=patch, epochs=config.epochs, seed=config.seed)
            log(f"decoder {size}px / patch {patch}: training on {len(aux)} auxiliary images, "
                f"{config.epochs} epochs ...")
            model, record = train_model(encoder, aux, dede, log=lambda _: None)
            detector = Detector(model, encoder.name, encoder.fingerprint, encoder_input=encoder.input, record=record)
            reference_keys = [f"ref-{i}" for i in range(len(reference))]
            reference_scores = Scorer(encoder, detector).score_array(reference, reference_keys)
            detector = detector.with_threshold(for_false_positive_rate(reference_scores, config.target_fpr))
            result = filter_shards(urls, Scorer(encoder, detector), Path(tmp) / f"out-{size}",
                                   num_workers=config.workers,
                                   stage=StageConfig(batch_size=256), write_shards=False, progress=False)
            if not result.balanced:
                raise RuntimeError(f"ledger does not balance: {result.ledger}")
            table = ds.dataset(str(result.parquet_dir), format="parquet").to_table(columns=["key", "score", "status"])
            by_key = {row["key"]: row for row in table.to_pylist()}
            scores = np.array([by_key[k]["score"] for k in keys])
            kept = np.array([by_key[k]["status"] == "kept" for k in keys])
            row = {"encoder_input": INPUT, "decoder_size": size, "patch": patch,
                   "auroc": round(auroc(scores, triggered), 4),
                   "tpr_at_1fpr": round(tpr_at_fpr(scores, triggered, 0.01), 4),
                   "asr_after": round(float(((predicted == TROUSER) & kept)[triggered].mean()), 4),
                   "seconds_per_1k": round(1000 / result.samples_per_s, 1),
                   "asr_before": before["asr"],
                   "clean_accuracy_after": round(float(((predicted == labels) & kept)[~triggered].mean()), 4),
                   "dropped_clean": round(float(1 - kept[~triggered].mean()), 4),
                   "train_seconds": record["train_seconds"], "final_loss": record["losses"][-1],
                   "auroc_per_source_class": auroc_per_source_class(scores, triggered, labels, FASHION_MNIST_CLASSES)}
            log(json.dumps({k: v for k, v in row.items() if k != "auroc_per_source_class"}))
            rows.append(row)
            save(summary(rows, before, encoder, config, quick, start))
    return summary(rows, before, encoder, config, quick, start)


def summary(rows: list[dict], before: dict, encoder, config: ResolutionConfig, quick: bool, start: float) -> dict:
    return {"rows": rows, "probe_before_filtering": before,
            "attack": {"encoder": config.attack_path, "card_probe": encoder.card.get("probe"),
                       "card_probe_clean_encoder": encoder.card.get("probe_clean_encoder"),
                       "trigger": TRIGGER.describe(), "target": FASHION_MNIST_CLASSES[TROUSER]},
            "config": asdict(config), "quick": quick, "seconds": round(time.perf_counter() - start, 1),
            "machine": {"platform": platform.platform(), "cores_available": len(os.sched_getaffinity(0)),
                        "torch": torch.__version__, "threads": torch.get_num_threads(),
                        "date": f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}",
                        "load_average_at_start": [round(v, 2) for v in os.getloadavg()]},
            "score": "paper (DeDe reconstruction error, score mask ratio 0.99)",
            "goal": "AUROC >= 0.97 with a decoder at 32 or 64"}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run of a few minutes")
    parser.add_argument("--epochs", type=int, help="decoder training epochs (default 10)")
    parser.add_argument("--n-aux", type=int, help="auxiliary training images (default 6000)")
    parser.add_argument("--out", default=None, help="default benchmarks/results/resolution.json (--quick: -quick.json)")
    args = parser.parse_args(argv)
    config = replace(ResolutionConfig(), **QUICK) if args.quick else ResolutionConfig()
    config = replace(config, **{name: v for name, v in (("epochs", args.epochs), ("n_aux", args.n_aux)) if v})
    out = Path(args.out or f"benchmarks/results/resolution{'-quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(results: dict) -> None:
        results["argv"] = " ".join(argv if argv is not None else sys.argv[1:])
        out.write_text(json.dumps(results, indent=2) + "\n")

    results = run(config, args.quick, save)
    save(results)
    log(f"wrote {out}: " + json.dumps([{k: r[k] for k in ("decoder_size", "patch", "auroc", "tpr_at_1fpr", "asr_after",
                                                          "seconds_per_1k")} for r in results["rows"]]))
    return results


if __name__ == "__main__":
    main()
