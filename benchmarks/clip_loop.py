"""The curator's loop on a poisoned image-text corpus, end to end, as a user runs it.

poisoned img2dataset shards (Carlini & Terzis data poisoning) -> train a small CLIP (backdoored) ->
``dedefilter train`` on a sample of the same shards (no clean data) -> ``calibrate --contamination``
(the removal budget, no clean references) -> ``dedefilter filter --embeddings`` over the training shards
with the CLIP's image tower -> ``audit`` -> ``select --separated --fraction`` (the separated collapse regions
first, then the highest scores, 10% of the corpus in all) / ``reshard`` -> retrain the CLIP on the cleaned
shards -> zero-shot ASR and accuracy, next to a CLIP trained on the corpus without its poisoned pairs.

Every step is the ``dedefilter`` command (a subprocess) with its defaults: the filter's shipped window-level
score (``dedefilter.window``), the audit's collapse regions (``dedefilter.audit.collapse``). The AUROC is that
of the order the selection removes in; the filter's score alone and the paper score are reported beside it.
Captions are written from the Fashion-MNIST labels (see dedefilter/imagetext.py).

    python -m benchmarks.clip_loop            # 20,000 pairs (21 min on 2 cores)
    python -m benchmarks.clip_loop --quick    # 10,000 pairs, 8 CLIP epochs, smaller DeDe training
    python -m benchmarks.clip_loop --seed 1   # another draw (CLIP init, poisoned pairs, captions): the held-out run
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import torch

from dedefilter.attacks.clip_poison import ClipPoison, fashion_mnist_pairs
from dedefilter.audit import SAMPLES_FILE, read_selection, removal_score
from dedefilter.clip import ClipConfig, SmallCLIP, save_clip, train_clip, zero_shot_report
from dedefilter.data import FASHION_MNIST_CLASSES, fashion_mnist
from dedefilter.encoders import SmallCNN, build_encoder, save_encoder
from dedefilter.imagetext import class_names, read_pairs
from dedefilter.metrics import auroc, auroc_per_source_class
from dedefilter.probe import backdoor_report

RESULTS = Path("benchmarks/results")


@dataclass(frozen=True)
class LoopConfig:
    work_dir: str = ".dedefilter-bench/clip-loop"
    n_pairs: int = 20_000  # Fashion-MNIST train[:n_pairs], captions from labels
    poison_share: float = 0.01
    target_class: int = 1  # Trouser
    clip_epochs: int = 10
    n_aux: int = 5_000  # DeDe training sample: the first n_aux pairs of the (poisoned) shards
    dede_epochs: int = 10
    removal_budget: float = 0.10  # DEFUSE's protocol: remove at most 10% of the corpus
    n_test: int = 10_000  # Fashion-MNIST t10k (zero-shot accuracy and ASR)
    n_probe: int = 10_000  # Fashion-MNIST train[50000:] (linear-probe training, held out of the corpus)
    shard_size: int = 1000
    seed: int = 0
    results_name: str = "clip_loop"


QUICK = replace(LoopConfig(), work_dir=".dedefilter-bench/clip-loop-quick", n_pairs=10_000, clip_epochs=8,
                n_aux=2_000, dede_epochs=4, n_test=2_000, n_probe=5_000,
                results_name="clip_loop-quick")


def dedefilter(*args: str) -> dict:
    """Run one ``dedefilter`` command as a user would; returns the JSON it prints last (or {})."""
    command = [sys.executable, "-m", "dedefilter.cli", *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[2:])} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    last = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    return json.loads(last) if last.startswith("{") else {}


def remove_selected(audit_dir: Path, urls: list[str], budget: float, work: Path) -> tuple[list[str], dict]:
    """``select`` the separated collapse regions, then the top scores, ``budget`` of the corpus in all;
    ``reshard`` the shards without them: the cleaned corpus.

    The one place that knows the key-list format passed between the two commands."""
    keys = work / "remove-keys.txt"
    selected = dedefilter("select", audit_dir, "--separated", "--fraction", budget, "--out", keys)
    counts = dedefilter("reshard", *urls, "--drop-keys", keys, "--out", work / "cleaned")
    return sorted(str(p) for p in (work / "cleaned").glob("*.tar")), {"select": selected, "reshard": counts}


def probe(module: torch.nn.Module, name: str, data: dict, attack: ClipPoison) -> dict:
    """Linear-probe clean accuracy and ASR of an image tower (dedefilter.probe)."""
    return backdoor_report(build_encoder(module, name), *data["probe"], *data["test"], attack.trigger,
                           attack.target_class)


def train_and_measure(pairs, keep: np.ndarray, clip_config: ClipConfig, data: dict, attack: ClipPoison,
                      name: str, log) -> tuple[SmallCLIP, dict]:
    model, record = train_clip(pairs.images[keep], [c for c, k in zip(pairs.captions, keep, strict=True) if k],
                               clip_config, log=lambda m: log(f"[{name}] {m}"))
    report = zero_shot_report(model, class_names(), *data["test"], attack.trigger, attack.target_class)
    report["probe"] = probe(model.image, name, data, attack)
    log(f"[{name}] zero-shot accuracy {report['zero_shot_accuracy']}, ASR {report['zero_shot_asr']}; "
        f"probe {report['probe']}")
    return model, {"train": record, **report}


def train_reference(pairs, keep: np.ndarray, clip_config: ClipConfig, data: dict, attack: ClipPoison) -> dict:
    """The CLIP trained without the poisoned pairs (in a worker process): its figures only."""
    return train_and_measure(pairs, keep, clip_config, data, attack, "clean", partial(print, flush=True))[1]


def detection_metrics(parquet_dir: Path, audit_dir: Path, truth: dict[str, bool], labels: dict[str, int],
                      removed: list[str]) -> dict:
    """AUROC of the removal order (audit), of the filter's score and of the paper score; recall of the
    removed keys, and of the same number of top keys by each score alone."""
    filtered = ds.dataset(str(parquet_dir), format="parquet").to_table(
        columns=["key", "paper_score"], filter=ds.field("status") != "error")
    paper_of = dict(zip(filtered["key"].to_pylist(), filtered["paper_score"].to_numpy().tolist(), strict=True))
    table = ds.dataset(str(audit_dir / SAMPLES_FILE), format="parquet").to_table(
        columns=["key", "score", "separated"], filter=ds.field("status") != "error")
    keys, scores, separated = table["key"].to_pylist(), table["score"].to_numpy(), table["separated"].to_numpy()
    paper = np.array([paper_of[k] for k in keys])
    order = removal_score(scores, separated)
    poisoned = np.array([truth[k] for k in keys])
    label = np.array([labels[k] for k in keys])

    def recall_of_top(values: np.ndarray) -> float:
        top = np.argsort(-values, kind="stable")[:len(removed)]
        return round(float(poisoned[top].sum() / poisoned.sum()), 4)

    return {"auroc": round(auroc(order, poisoned), 4),
            "recall_at_10pct": round(float(sum(truth[k] for k in removed) / poisoned.sum()), 4),
            "filter_score_auroc": round(auroc(scores, poisoned), 4), "filter_score_recall_at_10pct":
            recall_of_top(scores), "paper_score_auroc": round(auroc(paper, poisoned), 4),
            "paper_score_recall_at_10pct": recall_of_top(paper),
            "separated_rows": int(separated.sum()), "poisoned_in_separated": int(poisoned[separated].sum()),
            "auroc_per_source_class": auroc_per_source_class(order, poisoned, label, FASHION_MNIST_CLASSES),
            "n_scored": len(keys), "n_poisoned": int(poisoned.sum())}


def run(config: LoopConfig, log=print) -> dict:
    start = time.perf_counter()
    work = Path(config.work_dir)
    shutil.rmtree(work, ignore_errors=True)  # this benchmark's own scratch folder
    work.mkdir(parents=True)
    attack = ClipPoison(share=config.poison_share, target_class=config.target_class, seed=config.seed)
    clip_config = replace(ClipConfig(), epochs=config.clip_epochs, seed=config.seed)
    test_x, test_y = fashion_mnist("test")
    probe_x, probe_y = fashion_mnist("train")
    data = {"test": (test_x[:config.n_test], test_y[:config.n_test]),
            "probe": (probe_x[50_000:50_000 + config.n_probe], probe_y[50_000:50_000 + config.n_probe])}
    seconds = {}

    # 1. the poisoned corpus, read back from its shards as a trainer would
    urls, truth = fashion_mnist_pairs(work / "shards", config.n_pairs, attack, config.seed, config.shard_size)
    pairs = read_pairs(urls)
    poisoned = np.array([truth[k] for k in pairs.keys])
    labels = dict(zip(pairs.keys, pairs.field("label").tolist(), strict=True))
    log(f"wrote {len(urls)} shards: {len(pairs.keys)} pairs, {int(poisoned.sum())} poisoned "
        f"(target {FASHION_MNIST_CLASSES[config.target_class]})")

    # 2. the backdoored CLIP; the reference (the same corpus without its poisoned pairs) trains beside the loop
    reference = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    clean_future = reference.submit(train_reference, pairs, ~poisoned, clip_config, data, attack)
    t = time.perf_counter()
    backdoored, before = train_and_measure(pairs, np.ones(len(poisoned), bool), clip_config, data, attack,
                                           "poisoned", log)
    seconds["clip_poisoned"] = round(time.perf_counter() - t, 1)
    torch.manual_seed(config.seed)
    random_tower = probe(SmallCNN().eval(), "random-init", data, attack)
    tower = work / "clip-image-tower.pt"
    card = {"recipe": before["train"], "attack": attack.describe(), "data": f"{config.n_pairs} Fashion-MNIST train "
            "pairs, captions from labels", "zero_shot": {k: before[k] for k in ("zero_shot_accuracy", "zero_shot_asr")},
            "probe": before["probe"], "target_class": config.target_class, "trigger": attack.trigger.describe()}
    save_encoder(backdoored.image, tower, "small_cnn", card)
    save_clip(backdoored, work / "clip-poisoned.pt", card)  # both towers, for zero-shot use later

    # 3. the filter, with the backdoored CLIP's image tower and no clean data
    t = time.perf_counter()
    n_aux_shards = -(-config.n_aux // config.shard_size)
    detector = work / "detector.pt"
    dedefilter("train", "--encoder", tower, "--aux", ",".join(urls[:n_aux_shards]), "--n-aux", config.n_aux,
               "--epochs", config.dede_epochs, "--seed", config.seed, "--out", detector)
    seconds["dede_train"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    dedefilter("calibrate", "--detector", detector, "--encoder", tower, "--reference", ",".join(urls[n_aux_shards:]
               or urls), "--n-reference", min(config.n_aux, config.n_pairs), "--contamination", config.removal_budget)
    filtered = dedefilter("filter", *urls, "--encoder", tower, "--detector", detector, "--out", work / "filter",
                          "--annotate", "--no-shards", "--embeddings", "--workers", 2)
    parquet = Path(filtered["parquet"])
    seconds["calibrate_and_filter"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    audit = dedefilter("audit", parquet, "--out", work / "audit", "--shards", *urls, "--label-field", "json:label",
                       "--no-report")
    cleaned_urls, removal = remove_selected(work / "audit", urls, config.removal_budget, work)
    seconds["audit_select_reshard"] = round(time.perf_counter() - t, 1)
    removed = read_selection(work / "remove-keys.txt").keys
    detection = detection_metrics(parquet, work / "audit", truth, labels, removed)
    log(f"detection: {json.dumps({k: v for k, v in detection.items() if k != 'auroc_per_source_class'})}; "
        f"removal: {json.dumps(removal)}")

    # 4. retrain on the cleaned shards
    t = time.perf_counter()
    cleaned = read_pairs(cleaned_urls)
    _, after = train_and_measure(cleaned, np.ones(len(cleaned.keys), bool), clip_config, data, attack, "retrained",
                                 log)
    seconds["clip_retrained"] = round(time.perf_counter() - t, 1)
    remaining = int(sum(truth[k] for k in cleaned.keys))
    clean = clean_future.result()
    reference.shutdown()

    results = {
        "poison_share": config.poison_share,
        "asr_before": before["zero_shot_asr"], "acc_before": before["zero_shot_accuracy"],
        "acc_clean_model": clean["zero_shot_accuracy"], "asr_clean_model": clean["zero_shot_asr"],
        "auroc": detection["auroc"], "recall_at_10pct": detection["recall_at_10pct"],
        "removed_share": round(removal["reshard"]["removed"] / len(pairs.keys), 4),
        "asr_after": after["zero_shot_asr"], "acc_after": after["zero_shot_accuracy"],
        "poisoned_pairs_left": remaining, "n_pairs": len(pairs.keys), "n_poisoned": int(poisoned.sum()),
        "score": "the removal order of `select --separated --fraction`: the audit's separated collapse regions, "
                 "then the filter's shipped window-level score",
        "filter_score_auroc": detection["filter_score_auroc"],
        "filter_score_recall_at_10pct": detection["filter_score_recall_at_10pct"],
        "paper_score_auroc": detection["paper_score_auroc"],
        "paper_score_recall_at_10pct": detection["paper_score_recall_at_10pct"],
        "detection": detection, "removal": removal, "audit": audit,
        "models": {"poisoned": before, "clean": clean, "retrained": after, "random_init_probe": random_tower},
        "attack": attack.describe(), "config": asdict(config), "seconds": seconds,
        "total_seconds": round(time.perf_counter() - start, 1),
        "data": "Fashion-MNIST (Debian dataset-fashion-mnist) zero-padded to 32x32, JPEG q95 in the shards; "
                "captions written from the labels with varied templates and synonyms",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{config.results_name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / f"{config.results_name}.md").write_text(markdown(results))
    log(markdown(results))
    return results


def markdown(r: dict) -> str:
    c = r["config"]
    rows = [("poison share", f"{r['poison_share']:.1%} ({r['n_poisoned']} of {r['n_pairs']} pairs)"),
            ("zero-shot ASR, poisoned CLIP", f"{r['asr_before']:.1%}"),
            ("zero-shot accuracy, poisoned CLIP", f"{r['acc_before']:.1%}"),
            ("zero-shot accuracy, CLIP without the poisoned pairs", f"{r['acc_clean_model']:.1%}"),
            ("AUROC (removal order: separated regions, then the filter's score)", f"{r['auroc']:.3f}"),
            (f"recall of poisoned pairs, {c['removal_budget']:.0%} removed", f"{r['recall_at_10pct']:.1%}"),
            ("poisoned pairs in separated regions / rows in them",
             f"{r['detection']['poisoned_in_separated']} / {r['detection']['separated_rows']}"),
            ("the filter's score alone: AUROC / recall at the same budget",
             f"{r['filter_score_auroc']:.3f} / {r['filter_score_recall_at_10pct']:.1%}"),
            ("the paper score alone: AUROC / recall at the same budget",
             f"{r['paper_score_auroc']:.3f} / {r['paper_score_recall_at_10pct']:.1%}"),
            ("share of the corpus removed", f"{r['removed_share']:.1%}"),
            ("poisoned pairs left", str(r["poisoned_pairs_left"])),
            ("zero-shot ASR after retraining on the cleaned shards", f"{r['asr_after']:.1%}"),
            ("zero-shot accuracy after retraining", f"{r['acc_after']:.1%}")]
    probes = {"poisoned tower": r["models"]["poisoned"]["probe"], "retrained": r["models"]["retrained"]["probe"],
              "random init": r["models"]["random_init_probe"]}
    lines = [f"# CLIP poison -> filter -> audit -> retrain ({c['n_pairs']} pairs, seed {c['seed']}, "
             f"{r['total_seconds'] / 60:.0f} min)", "",
             "| measure | value |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows), "",
             "Linear probe (clean accuracy / ASR): " + ", ".join(
                 f"{label} {probe['clean_accuracy']} / {probe['asr']}" for label, probe in probes.items()) + ".", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10,000 pairs, 8 CLIP epochs, a smaller DeDe training")
    parser.add_argument("--poison-share", type=float,
                        help="override the share of poisoned pairs; results as NAME-pSHARE (e.g. -p0.005)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the CLIP, the poisoned pairs and the captions; not 0: results as NAME-seedN")
    args = parser.parse_args(argv)
    config = QUICK if args.quick else LoopConfig()
    if args.poison_share is not None:
        config = suffixed(replace(config, poison_share=args.poison_share), f"p{args.poison_share:g}")
    if args.seed:
        config = suffixed(replace(config, seed=args.seed), f"seed{args.seed}")
    run(config)


def suffixed(config: LoopConfig, suffix: str) -> LoopConfig:
    """A run off the defaults keeps its own work folder and results (NAME-suffix), never the default's."""
    return replace(config, work_dir=f"{config.work_dir}-{suffix}", results_name=f"{config.results_name}-{suffix}")


if __name__ == "__main__":
    main()
