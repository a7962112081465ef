"""Train small CLIPs on poisoned Fashion-MNIST image-text shards, one per poison share, and find the
smallest share that takes (zero-shot ASR >= 80%, clean zero-shot accuracy within 2 points of the
CLIP trained at share 0). Each image tower is saved as a dedefilter encoder with its card (recipe,
seed, data, attack, zero-shot and linear-probe figures), so ``--encoder <file>`` works everywhere.

    python -m pipelines.train_clip --shares 0 0.001 0.005 0.01 --out benchmarks/attacks
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch

from dedefilter.attacks.clip_poison import ClipPoison, fashion_mnist_pairs
from dedefilter.clip import ClipConfig, train_clip, zero_shot_report
from dedefilter.data import fashion_mnist
from dedefilter.encoders import SmallCNN, build_encoder, save_encoder
from dedefilter.imagetext import class_names, read_pairs
from dedefilter.probe import backdoor_report

TAKES_ASR, TAKES_ACCURACY_DROP = 0.80, 0.02


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.001, 0.005, 0.01])
    parser.add_argument("--n-pairs", type=int, default=20_000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--target", type=int, default=1, help="target class (default 1, Trouser)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/attacks")
    parser.add_argument("--work-dir", default=".dedefilter-bench/train-clip")
    parser.add_argument("--results", default="benchmarks/results/clip_poison.json")
    args = parser.parse_args(argv)

    test_x, test_y = fashion_mnist("test")
    train_x, train_y = fashion_mnist("train")
    probe_data = (train_x[50_000:], train_y[50_000:], test_x, test_y)  # probe data held out of the corpus
    config = replace(ClipConfig(), epochs=args.epochs, seed=args.seed)
    torch.manual_seed(args.seed)
    attack = ClipPoison(share=0.0, target_class=args.target, seed=args.seed)
    rows = {"random_init_probe": backdoor_report(build_encoder(SmallCNN().eval(), "random-init"), *probe_data,
                                                 attack.trigger, args.target)}
    for share in args.shares:
        start = time.perf_counter()
        attack = replace(attack, share=share)
        work = Path(args.work_dir) / f"share-{share}"
        shutil.rmtree(work, ignore_errors=True)  # this pipeline's own scratch folder
        urls, _ = fashion_mnist_pairs(work, args.n_pairs, attack, caption_seed=args.seed)
        pairs = read_pairs(urls)
        model, record = train_clip(pairs.images, pairs.captions, config)
        report = zero_shot_report(model, class_names(), test_x, test_y, attack.trigger, args.target)
        report["probe"] = backdoor_report(build_encoder(model.image, "tower"), *probe_data, attack.trigger, args.target)
        card = {"recipe": record, "attack": attack.describe(), "trigger": attack.trigger.describe(),
                "target_class": args.target, "data": f"Fashion-MNIST train[:{args.n_pairs}] as img2dataset shards "
                "(JPEG q95), captions written from the labels (dedefilter.imagetext)",
                "zero_shot": {k: report[k] for k in ("zero_shot_accuracy", "zero_shot_asr", "n_test", "prompts")},
                "probe": report["probe"], "made_by": "python -m pipelines.train_clip"}
        name = f"clip-poison-{share:g}-trouser" if share else "clip-clean"
        Path(args.out).mkdir(parents=True, exist_ok=True)
        save_encoder(model.image, Path(args.out) / f"{name}.pt", "small_cnn", card)
        rows[name] = {"share": share, "n_poisoned": int(round(share * args.n_pairs)), **report,
                      "train_seconds": record["train_seconds"], "seconds": round(time.perf_counter() - start, 1)}
        print(json.dumps({name: {k: v for k, v in rows[name].items() if k != "prompts"}}), flush=True)
    clean = rows.get("clip-clean")
    if clean is not None:
        for row in rows.values():
            if "share" in row and row["share"]:
                row["takes"] = bool(row["zero_shot_asr"] >= TAKES_ASR and
                                    row["zero_shot_accuracy"] >= clean["zero_shot_accuracy"] - TAKES_ACCURACY_DROP)
        taking = [row["share"] for row in rows.values() if row.get("takes")]
        rows["smallest_share_that_takes"] = min(taking) if taking else None
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps({"n_pairs": args.n_pairs, "epochs": args.epochs, **rows}, indent=2) + "\n")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
