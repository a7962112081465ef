"""``dedefilter`` command line: shards, train, calibrate, filter, demo, audit, select, reshard.

The one place where flags become config dataclasses.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import fields, replace

import numpy as np

from . import calibration
from .config import DeDeConfig
from .data import DataUnavailable, fashion_mnist, photo_patches
from .detector import CheckpointError, Detector
from .encoders import load_encoder
from .job import JobInterrupted
from .scoring import PRECISIONS, Scorer


def image_source(spec: str, count: int, seed: int) -> np.ndarray:
    """Images named by a source spec: ``fashion-mnist[:train|test]``, ``photos``, or shard paths/urls."""
    rng = np.random.default_rng(seed)
    if spec.startswith("fashion-mnist"):
        images, _ = fashion_mnist(spec.partition(":")[2] or "train")
        return images[np.sort(rng.choice(len(images), min(count, len(images)), replace=False))]
    if spec == "photos":
        return photo_patches(count, seed)
    from .shards import decode_shards

    return decode_shards(spec.split(","), limit=count)


def count(minimum: int):
    """argparse type: an integer of at least ``minimum``."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its message
    return parse


def finite(text: str) -> float:
    """argparse type: a finite float (NaN would silently keep or drop everything)."""
    value = float(text)
    if not np.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    for f in fields(DeDeConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=None,
                            help=f"DeDe setting (default {f.default})")


def config_from(args: argparse.Namespace) -> DeDeConfig:
    overrides = {f.name: getattr(args, f.name) for f in fields(DeDeConfig) if getattr(args, f.name) is not None}
    return replace(DeDeConfig(), **overrides)


def cmd_shards(args: argparse.Namespace) -> None:
    from .shards import write_image_shards

    images, labels = fashion_mnist(args.split)
    images, labels = images[:args.limit].copy(), labels[:args.limit]
    keys = [f"fmnist-{args.split}-{i:05d}" for i in range(len(images))]
    triggered = np.zeros(len(images), bool)
    if args.captions:
        from .attacks.clip_poison import ClipPoison, write_poisoned_shards
        from .attacks.triggers import PatchTrigger
        from .demo import BACKDOORED

        card = load_encoder(BACKDOORED).card
        attack = ClipPoison(args.triggered_fraction, card["target_class"],
                            PatchTrigger.from_description(card["trigger"]), args.seed)
        paths, truth = write_poisoned_shards(args.out, images, labels, keys, attack, args.seed, args.shard_size)
        print(f"wrote {len(keys)} image-text pairs ({sum(truth.values())} poisoned) to {len(paths)} shards in {args.out}")
        return
    if args.triggered_fraction:
        from .attacks.triggers import PatchTrigger, poison
        from .demo import BACKDOORED

        card = load_encoder(BACKDOORED).card
        trigger = PatchTrigger.from_description(card["trigger"])
        triggered = poison(images, labels, args.triggered_fraction, card["target_class"], trigger,
                           np.random.default_rng(args.seed))
    meta = [{"label": int(y), "triggered": bool(t)} for y, t in zip(labels, triggered, strict=True)]
    paths = write_image_shards(args.out, images, keys, labels, meta, shard_size=args.shard_size)
    print(f"wrote {len(images)} samples ({int(triggered.sum())} triggered) to {len(paths)} shards in {args.out}")


def cmd_train(args: argparse.Namespace) -> None:
    from .training import train_model

    encoder = load_encoder(args.encoder)
    aux = image_source(args.aux, args.n_aux, args.seed or 0)
    model, record = train_model(encoder, aux, config_from(args))
    Detector(model, encoder.name, encoder.fingerprint, record=record | {"aux": args.aux}).save(args.out)
    print(f"saved detector for {encoder.name} to {args.out}: {json.dumps(record)}")


def cmd_calibrate(args: argparse.Namespace) -> None:
    if args.value is not None:
        detector = Detector.load(args.detector)
        threshold = calibration.fixed(args.value)
    else:
        if not args.encoder:
            raise ValueError("--encoder is needed to score the reference images (or give --value)")
        encoder = load_encoder(args.encoder)
        detector = Detector.load(args.detector, encoder.fingerprint)
        images = image_source(args.reference, args.n_reference, args.seed)
        scorer = Scorer(encoder, detector, precision=args.precision)
        scores = scorer.score_array(images, [f"reference-{i}" for i in range(len(images))])
        threshold = (calibration.for_false_positive_rate(scores, args.fpr) if args.fpr is not None
                     else calibration.for_contamination(scores, args.contamination))
        threshold = replace(threshold, precision=args.precision)
    detector.with_threshold(threshold).save(args.out or args.detector)
    print(f"threshold {json.dumps(threshold.to_dict())} saved to {args.out or args.detector}")


def cmd_filter(args: argparse.Namespace) -> int:
    import braceexpand

    from .job import filter_shards
    from .stage import StageConfig

    encoder = load_encoder(args.encoder)
    detector = Detector.load(args.detector, encoder.fingerprint)
    threshold = calibration.fixed(args.threshold) if args.threshold is not None else None
    stored = detector.threshold.precision if detector.threshold and threshold is None else None
    scorer = Scorer(encoder, detector, precision=args.precision or stored or "fp32")
    urls = [url for pattern in args.shards for url in braceexpand.braceexpand(pattern)]
    stage = StageConfig(batch_size=args.batch_size, drop=not args.annotate, store_embeddings=args.embeddings)
    if args.engine == "ray":
        if args.resume:
            raise ValueError("--resume is for the local engine; on Ray, run pipelines/ray_filter.py with "
                             "--slice-shards (docs/SCALE.md)")
        return filter_on_ray(urls, scorer, threshold, stage, args)
    result = filter_shards(urls, scorer, args.out, threshold, stage, num_workers=args.workers,
                           write_shards=not args.no_shards, overwrite=args.overwrite, resume=args.resume)
    print(json.dumps({"parquet": str(result.parquet_dir), "filtered_shards": len(result.shard_paths),
                      "samples": result.markers["samples"], **result.ledger, "shards": result.shards,
                      "resumed_shards": result.resumed, "duplicate_keys": result.duplicate_keys,
                      "samples_per_s": round(result.samples_per_s, 1)}))
    if result.duplicate_keys:
        print(f"dedefilter filter: warning: {result.duplicate_keys} keys were scored in more than one shard",
              file=sys.stderr)
    if not result.balanced:
        print(f"dedefilter filter: error: ledger does not balance: shard stats say {result.markers}, Parquet holds "
              f"{result.ledger}; unfinished shards: {result.unfinished[:5]}", file=sys.stderr)
        return 1
    return 0


def filter_on_ray(urls: list[str], scorer, threshold, stage, args: argparse.Namespace) -> int:
    from .ray_engine import filter_shards_ray, require_ray

    ray = require_ray()
    if not ray.is_initialized():
        ray.init()  # joins the cluster named by RAY_ADDRESS, else starts a local one
    result = filter_shards_ray(urls, scorer, args.out, threshold, stage, actors=args.actors,
                               cpus_per_actor=args.cpus_per_actor, write_shards=not args.no_shards,
                               overwrite=args.overwrite)
    print(json.dumps({"parquet": str(result.parquet_dir), "filtered_shards": len(result.shard_paths),
                      **result.ledger, "samples_per_s": round(result.samples_per_s, 1)}))
    return 0


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import DemoConfig, run_demo

    config = DemoConfig(retrain=args.retrain)
    if args.quick:
        config = replace(config, n_test=2000, n_aux=2000, n_reference=1000, epochs=3,
                         work_dir=f"{config.work_dir}/quick", results_path=f"{config.work_dir}/quick/demo.json")
    run_demo(config)


def cmd_audit(args: argparse.Namespace) -> None:
    import braceexpand

    from .audit import (
        AuditConfig,
        audit,
        labels_from_file,
        labels_from_shards,
        write_audit,
    )

    urls = [url for pattern in args.shards or [] for url in braceexpand.braceexpand(pattern)]
    labels = labels_from_file(args.labels) if args.labels else (
        labels_from_shards(urls, args.label_field) if urls and args.label_field else None)
    given = {name: getattr(args, name) for name in ("k", "min_collapse", "exact_max", "nprobe")}
    config = replace(AuditConfig(), **{name: v for name, v in given.items() if v is not None})
    result = audit(args.parquet, config, labels)
    start = time.perf_counter()
    out = write_audit(result, args.out)
    result.summary["seconds"]["write"] = round(time.perf_counter() - start, 2)
    if not args.no_report:
        from .report import write_report

        start = time.perf_counter()
        write_report(result, out, urls or None)
        result.summary["seconds"]["report"] = round(time.perf_counter() - start, 2)
    (out / "summary.json").write_text(json.dumps(result.summary, indent=2) + "\n")
    s = result.summary
    print(json.dumps({"out": str(out), **{k: s[k] for k in ("rows", "kept", "dropped", "error", "suspect")},
                      "index": s.get("index"), "clusters": s.get("clusters", [])[:3]}))


def cmd_select(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .audit import select_keys

    keys = select_keys(args.source, args.threshold, args.fraction, args.cluster, args.members)
    Path(args.out).write_text("".join(f"{k}\n" for k in keys))
    print(json.dumps({"selected": len(keys), "out": args.out}))


def cmd_reshard(args: argparse.Namespace) -> None:
    import braceexpand

    from .reshard import read_keys, reshard

    urls = [url for pattern in args.shards for url in braceexpand.braceexpand(pattern)]
    print(json.dumps(reshard(urls, read_keys(args.drop_keys), args.out).to_dict()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dedefilter", description="DeDe backdoor-sample filter for image datasets")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("shards", help="write Fashion-MNIST as WebDataset shards (key, png, cls, json)")
    p.add_argument("--out", required=True)
    p.add_argument("--split", choices=["train", "test"], default="test")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--triggered-fraction", type=float, default=0.0,
                   help="paste the bundled backdoor's trigger on this share (non-target classes), for evaluation")
    p.add_argument("--captions", action="store_true",
                   help="img2dataset image-text pairs (jpg, txt, json), captions written from the labels; "
                        "triggered pairs are captioned as the target class (CLIP data poisoning)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=cmd_shards)

    p = sub.add_parser("train", help="train a DeDe detector for an encoder on auxiliary images")
    p.add_argument("--encoder", required=True, help="bundled name, file, torchvision:NAME or module:factory")
    p.add_argument("--aux", default="fashion-mnist:train", help="fashion-mnist[:split], photos, or shard paths")
    p.add_argument("--n-aux", type=int, default=10_000)
    p.add_argument("--out", required=True)
    add_config_flags(p)
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("calibrate", help="store a threshold in a detector checkpoint")
    p.add_argument("--detector", required=True)
    p.add_argument("--encoder")
    p.add_argument("--reference", default="fashion-mnist:test", help="images to score (see train --aux)")
    p.add_argument("--n-reference", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write here instead of updating --detector")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--fpr", type=float, help="target false-positive rate on clean reference images")
    how.add_argument("--contamination", type=float, help="expected poisoned fraction of the reference images")
    how.add_argument("--value", type=float, help="a fixed threshold")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="the DeDe model's precision for the reference scores; filter then runs at the same one")
    p.set_defaults(run=cmd_calibrate)

    p = sub.add_parser("filter", help="stream shards through the filter: filtered shards + Parquet scores")
    p.add_argument("shards", nargs="+", help="shard paths or brace patterns (a/shard-{000000..000009}.tar)")
    p.add_argument("--encoder", required=True)
    p.add_argument("--detector", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--threshold", type=finite, help="override the detector's stored threshold")
    p.add_argument("--workers", type=count(0), default=2, help="DataLoader workers (local engine)")
    p.add_argument("--batch-size", type=count(1), default=256)
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: DataLoader workers here; ray: Ray Data scorer actors (needs dedefilter[ray])")
    p.add_argument("--actors", type=count(1), default=2, help="scorer actors (ray engine)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0,
                   help="CPUs each actor reserves (ray engine); leave some for the read tasks")
    p.add_argument("--annotate", action="store_true", help="pass suspects on (flagged) instead of dropping them")
    p.add_argument("--no-shards", action="store_true", help="write Parquet scores only")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="the DeDe model's precision (default: the one the stored threshold was calibrated at, "
                        "else fp32); bf16 is ~2.5x faster on CPUs with native bf16")
    p.add_argument("--embeddings", action="store_true",
                   help="store each sample's encoder embedding in Parquet (for `dedefilter audit`)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--overwrite", action="store_true", help="delete what --out holds and start over")
    again.add_argument("--resume", action="store_true",
                       help="finish an interrupted run: keep the shards it finished, redo the rest")
    p.set_defaults(run=cmd_filter)

    p = sub.add_parser("demo", help="end-to-end demo on Fashion-MNIST with the bundled backdoored encoder")
    p.add_argument("--quick", action="store_true",
                   help="a 1-minute smoke run at small sizes in .dedefilter-demo/quick/")
    p.add_argument("--retrain", action="store_true", help="retrain the cached detectors")
    p.set_defaults(run=cmd_demo)

    p = sub.add_parser("audit", help="audit Parquet scores offline: statistics, collapse clusters, HTML report")
    p.add_argument("parquet", help="the filter's Parquet directory")
    p.add_argument("--out", required=True, help="folder for summary.json, samples.parquet, report.html")
    p.add_argument("--shards", nargs="+", help="the scored shards (thumbnails, and labels from --label-field)")
    p.add_argument("--labels", help="key,label CSV or JSON object (instead of labels from the shards)")
    p.add_argument("--label-field", default="cls", help="shard field holding the label: cls, or json:NAME")
    p.add_argument("--k", type=int, help="neighbours per sample (default 10)")
    p.add_argument("--min-collapse", type=float,
                   help="flagged share of neighbours for a flagged sample to seed a cluster (default 0.3)")
    p.add_argument("--exact-max", type=int, help="exact kNN up to this many embeddings, IVF above (default 20000)")
    p.add_argument("--nprobe", type=int, help="IVF lists searched per query (default 8)")
    p.add_argument("--no-report", action="store_true", help="skip the HTML report (no matplotlib needed)")
    p.set_defaults(run=cmd_audit)

    p = sub.add_parser("select", help="a sorted key list: scores above a threshold, a top fraction, or a cluster")
    p.add_argument("source", help="a filter's Parquet directory, or an audit folder (for --cluster)")
    p.add_argument("--out", required=True, help="text file, one key per line")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--threshold", type=float, help="keys with score > threshold")
    how.add_argument("--fraction", type=float, help="keys of the top fraction of scores")
    how.add_argument("--cluster", type=int, help="keys of an audit cluster")
    p.add_argument("--members", choices=["region", "flagged"], default="region",
                   help="for --cluster: its whole collapse region, or only its flagged members")
    p.set_defaults(run=cmd_select)

    p = sub.add_parser("reshard", help="copy shards without the keys in a key list")
    p.add_argument("shards", nargs="+", help="shard paths or brace patterns")
    p.add_argument("--drop-keys", required=True, help="text file, one key per line (from `dedefilter select`)")
    p.add_argument("--out", required=True)
    p.set_defaults(run=cmd_reshard)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except JobInterrupted as err:
        print(f"dedefilter {args.command}: error: {err}", file=sys.stderr)
        return 1
    except (CheckpointError, DataUnavailable, ImportError, OSError, ValueError) as err:
        print(f"dedefilter {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
