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
from typing import NamedTuple

import numpy as np

from . import calibration, window
from .config import DeDeConfig
from .data import FASHION_MNIST_SPLITS, IMAGE_SIZE, DataUnavailable, fashion_mnist, photo_patches, resize_images
from .detector import CheckpointError, Detector
from .encoders import EncoderInput, decode_size, load_encoder
from .job import JobFailed, JobInterrupted
from .scoring import PRECISIONS, Scorer
from .stage import StageConfig
from .window import WindowRule


def image_source(spec: str, count: int, seed: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """``count`` images (N, size, size, 3) named by a source spec: ``fashion-mnist[:train|test]`` (its
    padded 32x32, resized), ``photos`` (crops of that side), or shard paths/urls (decoded at that side)."""
    rng = np.random.default_rng(seed)
    if spec.startswith("fashion-mnist"):
        images, _ = fashion_mnist(spec.partition(":")[2] or "train")
        return resize_images(images[np.sort(rng.choice(len(images), min(count, len(images)), replace=False))], size)
    if spec == "photos":
        return photo_patches(count, seed, size=size)
    from .shards import decode_shards

    return decode_shards(spec.split(","), limit=count, size=size)


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


def share(text: str) -> float:
    """argparse type: a fraction in [0, 1)."""
    value = finite(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    for f in fields(DeDeConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=None,
                            help=f"DeDe setting (default {f.default})")


def config_from(args: argparse.Namespace) -> DeDeConfig:
    overrides = {f.name: getattr(args, f.name) for f in fields(DeDeConfig) if getattr(args, f.name) is not None}
    return replace(DeDeConfig(), **overrides)


class FilterSetup(NamedTuple):
    """What the filter flags name: the shards, the scorer, a threshold override and the stage config."""

    urls: list[str]
    scorer: Scorer
    threshold: calibration.Threshold | None  # None: the detector's stored one
    stage: StageConfig


def add_filter_flags(parser: argparse.ArgumentParser) -> None:
    """The filter's flags, defined once for ``dedefilter filter`` and the scale-out pipelines."""
    parser.add_argument("shards", nargs="+", help="shard paths or brace patterns (a/shard-{000000..000009}.tar)")
    parser.add_argument("--encoder", required=True)
    parser.add_argument("--detector", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--threshold", type=finite, help="override the detector's stored threshold")
    parser.add_argument("--workers", type=count(0), default=2,
                        help="DataLoader workers (local engine; per rank under torchrun)")
    parser.add_argument("--batch-size", type=count(1), default=256)
    parser.add_argument("--annotate", action="store_true", help="pass suspects on (flagged) instead of dropping them")
    parser.add_argument("--no-shards", action="store_true", help="write Parquet scores only")
    parser.add_argument("--precision", choices=PRECISIONS,
                        help="the DeDe model's precision (default: the one the stored threshold was calibrated at, "
                             "else fp32); bf16 runs the DeDe model ~1.5x faster on CPUs with native bf16")
    parser.add_argument("--embeddings", action="store_true",
                        help="store each sample's encoder embedding in Parquet (for `dedefilter audit`)")
    parser.add_argument("--window", type=count(0),
                        help="samples of a shard judged together (default: the detector's calibrated window rule; "
                             "0: the paper score alone, which needs a threshold calibrated with --window 0)")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--overwrite", action="store_true",
                       help="replace an earlier filter run's output in --out (only the files a run wrote; other "
                            "folders are refused)")
    again.add_argument("--resume", action="store_true",
                       help="finish an interrupted run: keep the shards it finished, redo the rest")


def positive(text: str) -> float:
    """argparse type: a finite float above 0."""
    value = finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def add_ray_flags(parser: argparse.ArgumentParser) -> None:
    """The Ray engine's pool and watchdog."""
    parser.add_argument("--actors", type=count(1), default=2,
                        help="scorer actors (ray engine); fewer when fewer fit on the cluster, with a message")
    parser.add_argument("--cpus-per-actor", type=positive, default=1.0,
                        help="CPUs each actor reserves and uses as torch threads (ray engine)")
    parser.add_argument("--gpus-per-actor", type=finite, default=0.0,
                        help="GPUs each actor reserves; above 0 it scores on CUDA (ray engine)")
    parser.add_argument("--stall-report", type=positive, default=60.0,
                        help="seconds without a finished shard before the ray engine says so (and why it may be)")
    parser.add_argument("--stall-limit", type=finite, default=1800.0,
                        help="seconds without a finished shard before the ray engine gives up (0: never); "
                             "--resume then keeps what finished")


def add_encoder_input_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("encoder input (default: what the encoder spec says; stored in the detector)")
    group.add_argument("--encoder-size", type=count(1), help="side of the image the encoder takes")
    group.add_argument("--encoder-resize", type=count(1), help="resize the shorter side to this, then centre-crop")
    group.add_argument("--encoder-mean", type=finite, nargs=3, metavar=("R", "G", "B"),
                       help="per-channel mean to subtract from [0, 1] pixels (with --encoder-std)")
    group.add_argument("--encoder-std", type=finite, nargs=3, metavar=("R", "G", "B"), help="per-channel std")


def encoder_input_from(args: argparse.Namespace, default: EncoderInput) -> EncoderInput:
    """The encoder's input: its spec's, with the flags given on top (a new size drops the spec's resize)."""
    given = {name: getattr(args, f"encoder_{name}") for name in ("size", "resize", "mean", "std")}
    given = {name: tuple(v) if isinstance(v, list) else v for name, v in given.items() if v is not None}
    if "size" in given and "resize" not in given:
        given["resize"] = None
    return replace(default, **given)


def cmd_shards(args: argparse.Namespace) -> None:
    from .shards import write_image_shards

    images, labels = fashion_mnist(args.split)
    images, labels = images[:args.limit].copy(), labels[:args.limit]  # at 32x32, where the bundled trigger is drawn
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
    images = resize_images(images, args.image_size)
    paths = write_image_shards(args.out, images, keys, labels, meta, shard_size=args.shard_size)
    print(f"wrote {len(images)} {args.image_size}x{args.image_size} samples ({int(triggered.sum())} triggered) "
          f"to {len(paths)} shards in {args.out}")


def cmd_train(args: argparse.Namespace) -> None:
    from .training import train_model, train_trimmed

    config = config_from(args)  # a patch size that does not divide the image size fails here, before any work
    encoder = load_encoder(args.encoder)
    encoder = encoder.with_input(encoder_input_from(args, encoder.input))
    aux = image_source(args.aux, args.n_aux, args.seed or 0, decode_size(encoder.input, config.image_size))
    model, record = train_trimmed(encoder, aux, config, args.trim) if args.trim else train_model(encoder, aux, config)
    Detector(model, encoder.name, encoder.fingerprint, record=record | {"aux": args.aux},
             encoder_input=encoder.input).save(args.out)
    print(f"saved detector for {encoder.name} (encoder input {encoder.input.size}px, decoder {config.image_size}px, "
          f"patch {config.patch_size}) to {args.out}: {json.dumps(record)}")


def cmd_calibrate(args: argparse.Namespace) -> None:
    rule = WindowRule(size=args.window) if args.window else None
    if args.value is not None:
        detector = Detector.load(args.detector)
        threshold = calibration.fixed(args.value, scale="window" if rule else "paper")
    else:
        if not args.encoder:
            raise ValueError("--encoder is needed to score the reference images (or give --value)")
        encoder = load_encoder(args.encoder)
        detector = Detector.load(args.detector, encoder.fingerprint)
        scorer = Scorer(encoder, detector, precision=args.precision)
        images = image_source(args.reference, args.n_reference, args.seed, scorer.decode_size)
        threshold, rule = window.calibrate(scorer, images, rule, fpr=args.fpr, fraction=args.contamination)
        threshold = replace(threshold, precision=args.precision)
    detector.with_threshold(threshold, rule).save(args.out or args.detector)
    judged = (f"judged in windows of {rule.size}" if rule else "the paper score alone"
              + (": the window rule is off, the decoder does not fit these images" if args.window else ""))
    print(f"threshold {json.dumps(threshold.to_dict())} saved to {args.out or args.detector} ({judged})")


def cmd_filter(args: argparse.Namespace) -> int:
    from .job import filter_shards

    urls, scorer, threshold, stage = filter_setup(args)
    if args.engine == "ray":
        return filter_on_ray(urls, scorer, threshold, stage, args)
    result = filter_shards(urls, scorer, args.out, threshold, stage, num_workers=args.workers,
                           write_shards=not args.no_shards, overwrite=args.overwrite, resume=args.resume)
    print(json.dumps(job_summary(result)))
    if result.duplicate_keys:
        print(f"dedefilter filter: warning: {result.duplicate_keys} keys were scored in more than one shard",
              file=sys.stderr)
    return job_status(result)


def job_summary(job, **extra) -> dict:
    """The line ``filter`` prints at the end (any engine): where the output is, the ledger, the speed."""
    return {"parquet": str(job.parquet_dir), "filtered_shards": len(job.shard_paths), "samples": job.markers["samples"],
            **job.ledger, "shards": job.shards, "resumed_shards": job.resumed, "duplicate_keys": job.duplicate_keys,
            **extra, "samples_per_s": round(job.samples_per_s, 1)}


def job_status(job) -> int:
    """The filter's exit status from its ledger (any engine): 1, with the reason, if it does not balance
    or a shard could not be read; else 0."""
    if not job.balanced:
        print(f"dedefilter filter: error: ledger does not balance: shard stats say {job.markers}, Parquet holds "
              f"{job.ledger}; unfinished shards: {job.unfinished[:5]}", file=sys.stderr)
        return 1
    if job.unread:
        listed = ", ".join(job.unread[:5]) + (f" and {len(job.unread) - 5} more" if len(job.unread) > 5 else "")
        print(f"dedefilter filter: error: {len(job.unread)} of {job.shards} input shards could not be read: "
              f"{listed} (each is an error row with its reason in {job.parquet_dir}); make them readable and run "
              "the same command with --resume to read them", file=sys.stderr)
        return 1
    return 0


def filter_setup(args: argparse.Namespace) -> FilterSetup:
    """The flags of :func:`add_filter_flags` as the filter's inputs, for every engine and pipeline.

    The DeDe model runs at the precision the stored threshold was calibrated at unless ``--precision`` says
    otherwise (a bf16 threshold on fp32 scores would be refused).
    """
    import braceexpand

    encoder = load_encoder(args.encoder)
    detector = Detector.load(args.detector, encoder.fingerprint)
    threshold = calibration.fixed(args.threshold) if args.threshold is not None else None
    stored = detector.threshold.precision if detector.threshold and threshold is None else None
    scorer = Scorer(encoder, detector, precision=args.precision or stored or "fp32")
    urls = [url for pattern in args.shards for url in braceexpand.braceexpand(pattern)]
    stage = StageConfig(batch_size=args.batch_size, drop=not args.annotate, store_embeddings=args.embeddings,
                        window_size=args.window)
    return FilterSetup(urls, scorer, threshold, stage)


def filter_on_ray(urls: list[str], scorer, threshold, stage, args: argparse.Namespace) -> int:
    """``filter --engine ray`` (and pipelines/ray_filter.py): the job on the Ray cluster RAY_ADDRESS names, else a
    local one; the same output, ledger and ``--resume`` as the local engine."""
    from .ray_engine import Watchdog, filter_shards_ray

    result = filter_shards_ray(urls, scorer, args.out, threshold, stage, actors=args.actors,
                               cpus_per_actor=args.cpus_per_actor, gpus_per_actor=args.gpus_per_actor,
                               write_shards=not args.no_shards, overwrite=args.overwrite, resume=args.resume,
                               watchdog=Watchdog(args.stall_report, args.stall_limit or None))
    print(json.dumps(job_summary(result.job, actors=result.plan.actors)))
    return job_status(result.job)


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import DemoConfig, run_demo

    config = DemoConfig(retrain=args.retrain)
    if args.quick:
        config = replace(config, n_test=2000, n_aux=2000, n_reference=1000, epochs=3,
                         work_dir=f"{config.work_dir}/quick", results_path=f"{config.work_dir}/quick/demo.json")
    if args.image_size or args.patch_size:  # another decoder: its own folder, the committed results untouched
        config = replace(config, image_size=args.image_size or config.image_size,
                         patch_size=args.patch_size or config.patch_size)
        DeDeConfig(image_size=config.image_size, patch_size=config.patch_size)  # a clear error now, not after the shards
        work = f"{config.work_dir}/decoder-{config.image_size}-patch-{config.patch_size}"
        config = replace(config, work_dir=work, results_path=f"{work}/demo.json")
    run_demo(config)


def cmd_audit(args: argparse.Namespace) -> None:
    from pathlib import Path

    import braceexpand

    from .audit import (
        AuditConfig,
        audit,
        class_names,
        guess_class_names,
        labels_from_file,
        labels_from_shards,
        name_classes,
        score_files,
        write_audit,
    )
    from .guard import is_local, refuse_overlap

    urls = [url for pattern in args.shards or [] for url in braceexpand.braceexpand(pattern)]
    missing = [url for url in urls if is_local(url) and not Path(url).is_file()]
    if missing:
        raise FileNotFoundError(f"--shards: {len(missing)} shard(s) do not exist: {missing[:5]}")
    refuse_overlap(args.out, [args.parquet, *score_files(args.parquet)])
    labels = labels_from_file(args.labels) if args.labels else (
        labels_from_shards(urls, args.label_field) if urls and args.label_field else None)
    names_used = None
    if labels:
        names, names_used = (class_names(args.class_names), f"--class-names {args.class_names}") \
            if args.class_names else guess_class_names(labels)
        labels = name_classes(labels, names) if names else labels
    given = {name: getattr(args, name) for name in ("k", "min_collapse", "exact_max", "nprobe")}
    config = replace(AuditConfig(), **{name: v for name, v in given.items() if v is not None})
    result = audit(args.parquet, config, labels)
    if names_used:
        result.summary["class_names"] = names_used
    if result.analysis is None:
        print(f"dedefilter audit: warning: clustering {result.summary['clustering']}", file=sys.stderr)
    start = time.perf_counter()
    out = write_audit(result, args.out)
    result.summary["seconds"]["write"] = round(time.perf_counter() - start, 2)
    if not args.no_report:
        from .audit.report import write_report

        start = time.perf_counter()
        write_report(result, out, urls or None)
        result.summary["seconds"]["report"] = round(time.perf_counter() - start, 2)
    (out / "summary.json").write_text(json.dumps(result.summary, indent=2) + "\n")
    s = result.summary
    print(json.dumps({"out": str(out), **{k: s[k] for k in ("rows", "kept", "dropped", "error", "suspect")},
                      "clustering": s["clustering"], "index": s.get("index"), "clusters": s.get("clusters", [])[:3]}))


def cmd_select(args: argparse.Namespace) -> None:
    from .audit import select, write_selection
    from .guard import refuse_overlap

    refuse_overlap(args.out, [args.source])
    selection = select(args.source, args.threshold, args.fraction, args.cluster, args.members, args.separated)
    selection.provenance["arguments"] = {name: getattr(args, name) for name in
                                         ("source", "threshold", "fraction", "cluster", "members", "separated",
                                          "out")}
    write_selection(selection, args.out)
    print(json.dumps({"selected": len(selection.keys), "out": args.out}))


def cmd_reshard(args: argparse.Namespace) -> None:
    import braceexpand

    from .audit import read_selection
    from .reshard import reshard

    urls = [url for pattern in args.shards for url in braceexpand.braceexpand(pattern)]
    keys = read_selection(args.drop_keys).keys
    counts = reshard(urls, set(keys), args.out, allow_missing_keys=args.allow_missing_keys, overwrite=args.overwrite)
    if counts.unreadable:
        print(f"dedefilter reshard: warning: {counts.unreadable} unreadable samples were not copied (listed above)",
              file=sys.stderr)
    print(json.dumps(counts.to_dict()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dedefilter", description="DeDe backdoor-sample filter for image datasets")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("shards", help="write Fashion-MNIST as WebDataset shards (key, png, cls, json)")
    p.add_argument("--out", required=True)
    p.add_argument("--split", choices=FASHION_MNIST_SPLITS, default="test")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--triggered-fraction", type=float, default=0.0,
                   help="paste the bundled backdoor's trigger on this share (non-target classes), for evaluation")
    p.add_argument("--captions", action="store_true",
                   help="img2dataset image-text pairs (jpg, txt, json), captions written from the labels; "
                        "triggered pairs are captioned as the target class (CLIP data poisoning)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=count(1), default=IMAGE_SIZE,
                   help="side of the stored images: Fashion-MNIST's padded 32x32, resized (a trigger is drawn at 32)")
    p.set_defaults(run=cmd_shards)

    p = sub.add_parser("train", help="train a DeDe detector for an encoder on auxiliary images")
    p.add_argument("--encoder", required=True, help="bundled name, file, torchvision:NAME or module:factory")
    p.add_argument("--aux", default="fashion-mnist:train", help="fashion-mnist[:split], photos, or shard paths")
    p.add_argument("--n-aux", type=int, default=10_000)
    p.add_argument("--trim", type=share, default=0.0,
                   help="train twice, the second time without the first model's top TRIM of the aux images: for aux "
                        "images that may be poisoned (a sample of the shards being filtered); 0.05 in the benchmarks")
    p.add_argument("--out", required=True)
    add_config_flags(p)
    add_encoder_input_flags(p)
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
    how.add_argument("--contamination", "--budget", type=float, dest="contamination",
                     help="flag this share of the reference images: their expected poisoned fraction, or, with a "
                          "sample of the very shards to filter as --reference, a removal budget (drop about this "
                          "share; no clean data needed)")
    how.add_argument("--value", type=float, help="a fixed threshold")
    p.add_argument("--window", type=count(0), default=WindowRule().size,
                   help=f"judge each sample within windows of this many samples of its shard (default "
                        f"{WindowRule().size}: the shipped window-level score); 0: the paper score alone")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="the DeDe model's precision for the reference scores; filter then runs at the same one")
    p.set_defaults(run=cmd_calibrate)

    p = sub.add_parser("filter", help="stream shards through the filter: filtered shards + Parquet scores")
    add_filter_flags(p)
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: DataLoader workers here; ray: scorer actors on a Ray cluster (needs dedefilter[ray])")
    add_ray_flags(p)
    p.set_defaults(run=cmd_filter)

    p = sub.add_parser("demo", help="end-to-end demo on Fashion-MNIST with the bundled backdoored encoder")
    p.add_argument("--quick", action="store_true",
                   help="a 1-minute smoke run at small sizes in .dedefilter-demo/quick/")
    p.add_argument("--retrain", action="store_true", help="retrain the cached detectors")
    p.add_argument("--image-size", type=count(1), help="the decoder's image side (default 32); results in their own folder")
    p.add_argument("--patch-size", type=count(1), help="the decoder's patch side (default 4); must divide --image-size")
    p.set_defaults(run=cmd_demo)

    p = sub.add_parser("audit", help="audit Parquet scores offline: statistics, collapse clusters, HTML report")
    p.add_argument("parquet", help="the filter's Parquet directory")
    p.add_argument("--out", required=True,
                   help="folder for summary.json, samples.parquet, report.html (not inside the Parquet directory)")
    p.add_argument("--shards", nargs="+", help="the scored shards (thumbnails, and labels from --label-field)")
    p.add_argument("--labels", help="key,label CSV or JSON object (instead of labels from the shards)")
    p.add_argument("--label-field", default="cls", help="shard field holding the label: cls, or json:NAME")
    p.add_argument("--class-names",
                   help="names for class-index labels: fashion-mnist, a file (one per line) or a,b,c "
                        "(default: Fashion-MNIST's for labels 0-9 of fmnist-* keys, else labels as stored)")
    p.add_argument("--k", type=count(1), help="neighbours per sample (default 10)")
    p.add_argument("--min-collapse", type=finite,
                   help="flagged share of neighbours for a flagged sample to seed a cluster (default 0.3)")
    p.add_argument("--exact-max", type=count(0), help="exact kNN up to this many embeddings, IVF above (default 20000)")
    p.add_argument("--nprobe", type=count(1), help="IVF lists searched per query (default 8)")
    p.add_argument("--no-report", action="store_true", help="skip the HTML report (no matplotlib needed)")
    p.set_defaults(run=cmd_audit)

    p = sub.add_parser("select", help="a sorted key list: scores above a threshold, a top fraction, a cluster, "
                                      "or the separated collapse regions")
    p.add_argument("source", help="a filter's Parquet directory, or an audit folder (for --cluster, --separated)")
    p.add_argument("--out", required=True,
                   help="key list: JSON lines, provenance first, then one JSON string per key (e.g. drop.jsonl)")
    p.add_argument("--separated", action="store_true",
                   help="every collapse region the rest of the corpus hardly points into (an audit's `separated` "
                        "column); with --fraction these first, then the highest scores, at most the fraction in all")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--threshold", type=finite, help="keys with score > threshold")
    how.add_argument("--fraction", type=finite, help="keys of the top fraction of scores (as calibrate cuts)")
    how.add_argument("--cluster", type=count(0), help="keys of an audit cluster")
    p.add_argument("--members", choices=["region", "flagged"], default="region",
                   help="for --cluster: its whole collapse region, or only its flagged members")
    p.set_defaults(run=cmd_select)

    p = sub.add_parser("reshard", help="copy shards without the keys in a key list")
    p.add_argument("shards", nargs="+", help="shard paths or brace patterns")
    p.add_argument("--drop-keys", required=True, help="key list from `dedefilter select` (JSON lines)")
    p.add_argument("--out", required=True, help="a folder apart from the input shards' folders")
    p.add_argument("--allow-missing-keys", action="store_true",
                   help="succeed when listed keys are in none of these shards (a list made from more shards)")
    p.add_argument("--overwrite", action="store_true", help="replace output shards of the same names in --out")
    p.set_defaults(run=cmd_reshard)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except JobFailed as err:
        print(f"{err.detail.rstrip()}\n\ndedefilter {args.command}: error: {err}", file=sys.stderr)
        return 1
    except JobInterrupted as err:
        print(f"dedefilter {args.command}: error: {err}", file=sys.stderr)
        return 1
    except (CheckpointError, DataUnavailable, ImportError, OSError, ValueError) as err:
        print(f"dedefilter {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
