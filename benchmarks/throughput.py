"""Throughput: what the DeDe filter costs on top of the loader and the encoder pass it needs.

Side by side in one run, over the same WebDataset shards of real Fashion-MNIST images (repeated
with new keys for large counts), each configuration in a fresh subprocess so memory peaks do not mix:

  a  decode-only loader       shards -> decode -> batch (in the DataLoader workers)
  b  + encoder embedding      ... -> the encoder's forward pass (in the Scorer's fixed-size chunks)
  c  + the full DeDe stage    ``filter_shards``: decode -> encoder + DeDe model -> decide -> Parquet
  e  (c) with bf16            the same, the DeDe model's linear layers in bf16 (Scorer precision="bf16")
  w  the shipped filter       (c) deciding on the window-level score (``WindowRule()``, what ``dedefilter
                              calibrate`` stores by default): residuals kept, each shard's windows judged
  x  (w) with bf16
  d  the official loop        workers decode, the main process runs the encoder and the DeDe model
                              with random masks, a per-sample ``.item()`` loop, and keeps every
                              reconstruction until the end (benchmarks/official_loop.py)

for num_workers 0/1/2 and batch sizes 64/256, with the demo's small encoder and with the paper's
encoder size (ResNet-18, CIFAR stem, 32x32). At 224 (``--only at224``): a torchvision ResNet-50 at its
own input (resize 232, crop 224, ImageNet normalisation) over Fashion-MNIST upsampled to 256 px, (b)
encoder-only against (c) the full filter with a DeDe decoder at 32 and at 64, rounds alternating. Timing uses a DeDe model of the paper's size with its
seeded initial weights, a threshold that keeps every sample and, for the shipped rule, a clean reference of
2,000 seeded random embeddings (as ``calibrate --fpr`` on 2,000 images leaves it): the compute does not
depend on the weights or values, and keeping everything is the most work for the loader. Also measured: decoder-training
seconds per epoch with and without the embedding cache, and (``--memory``) peak memory streaming
100,000 vs 10,000 samples.

The shipped section (``--only shipped``) runs (b), (c), (w), (e), (x) with ResNet-18 and 2 workers at 2,048 and
8,192 samples in every round. The goals are judged at 8,192: a run lasts 30-46 s there instead of 7-13 s, so
the spread of speed between processes weighs less, and so does a filter job's start-up in each worker (the
packed DeDe model, the first window's fresh memory).

The parts (``--only parts``, CPU): the encoder, the DeDe model as the Scorer runs it (fp32 and bf16) and one
window's ``score_window`` timed apart in one process on one thread, with their multiply-accumulates: what each
part of the shipped filter costs against the encoder's forward pass, the loader and the second process aside.

    python -m benchmarks.throughput [--quick] [--memory] [--only SECTION] [--repeats N] [--device cpu|cuda] [--out DIR]

Writes DIR/throughput.json and DIR/throughput.md (default benchmarks/results); each step updates its
own section of the JSON, so ``--memory`` can run later on its own.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.official_loop import official_errors
from benchmarks.procmem import PeakSampler, cpu_seconds
from dedefilter import (
    DeDeConfig,
    Detector,
    Scorer,
    StageConfig,
    filter_shards,
    fixed,
    load_encoder,
)
from dedefilter.attacks.triggers import PatchTrigger, poison
from dedefilter.data import decode_image, fashion_mnist, resize_images, resize_square
from dedefilter.demo import BACKDOORED, DemoConfig
from dedefilter.encoders import embed_array, to_float
from dedefilter.job import keep_freed_memory
from dedefilter.masking import random_visible
from dedefilter.metrics import auroc
from dedefilter.model import DeDeModel, can_pack, masked_patch_mse, patchify
from dedefilter.scoring import CHUNK, PRECISIONS, chunk_size
from dedefilter.shards import decode_shards, shard_pipeline, write_image_shards
from dedefilter.stage import batched
from dedefilter.training import train_model, training_precision
from dedefilter.window import CleanReference, WindowRule, decision_scores, score_window

ENCODERS = {"demo": "fmnist-badencoder", "resnet18": "torchvision:resnet18_cifar", "resnet50": "torchvision:resnet50"}
MODES = ("a", "b", "c", "e", "d")  # e: (c) with the DeDe model in bf16
MiB = 2 ** 20
# Reading a process's PSS (/proc/PID/smaps_rollup) stalls it: sampled every 50 ms, the reads slowed
# (c) by 24% and (b) by 18% (ResNet-18, 2 workers); every 0.5 s they cost a few percent.
SAMPLE_EVERY_S = 0.5


@dataclass(frozen=True)
class Plan:
    """What one run measures; the sample counts keep a full CPU run near 20 minutes on 2 cores."""

    samples: dict  # encoder -> samples per loader configuration
    workers: tuple[int, ...] = (0, 1, 2)
    batches: tuple[int, ...] = (64, 256)
    repeats: int = 3  # rounds of (b, c) for the must-show ratio (ResNet-18, batch 256)
    # samples of the shipped section's rounds, each size in every round (the goals are judged at the largest)
    shipped_samples: tuple[int, ...] = (2048, 8192)
    growth: tuple[int, int] = (4096, 16384)  # (c) and (d) peak memory at two sample counts (demo encoder)
    growth_workers: int = 2
    train_images: dict | None = None  # encoder -> decoder-training images (None: skip)
    train_rounds: int = 3
    memory: tuple[int, int] = (10_000, 100_000)  # the --memory streaming run
    at224: dict | None = None  # ResNet-50 at 224: samples, image side of the shards, workers, batch, rounds, decoders
    parts: dict | None = None  # the parts on one thread (run_parts): encoder, images, rounds, window (CPU only)


# Shards of 64, a multiple of the scorer's chunk of 16: a shard's last chunk is padded, so a shard size that
# is not a multiple would make (c) score padding that (b) does not embed.
AT224 = {"samples": 256, "side": 256, "shard_size": 64, "workers": 2, "batch": 64, "rounds": 2,
         "decoders": [[32, 4], [64, 8]]}
PARTS = {"encoder": "resnet18", "images": 512, "rounds": 5, "window": 1000}
FULL = Plan(samples={"demo": 4096, "resnet18": 2048}, growth=(2048, 8192), train_images={"demo": 1024, "resnet18": 512},
            at224=AT224, parts=PARTS)
QUICK = Plan(samples={"demo": 1024, "resnet18": 256}, workers=(0, 2), growth=(1024, 4096), shipped_samples=(256,),
             train_images={"demo": 512, "resnet18": 256}, train_rounds=1, at224=AT224 | {"samples": 128, "rounds": 1},
             parts=PARTS | {"images": 128, "rounds": 2, "window": 256})
# One short GPU run (< 4 minutes): its shards (2,048 and 8,192 samples, 45 MB) are built on the CPU
# machine and carried (the GPU machine has no Fashion-MNIST). Growth runs in the main process, where
# the CUDA peak is readable: the official loop keeps its reconstructions in GPU memory. Decoder
# training stays a CPU figure (dedefilter trains on the CPU).
GPU = Plan(samples={"demo": 8192, "resnet18": 8192}, workers=(4,), batches=(256,), repeats=1, shipped_samples=(8192,),
           growth=(2048, 8192), growth_workers=0, train_images=None,
           at224=AT224 | {"samples": 4096, "shard_size": 512, "workers": 4, "batch": 256, "rounds": 1})
# The GPU plan's shape at sizes a CPU runs in a few minutes: checks the GPU command before device time is spent.
SMOKE = replace(GPU, samples={"demo": 256, "resnet18": 32}, growth=(128, 256), shipped_samples=(32,),
                at224=AT224 | {"samples": 32, "shard_size": 16, "rounds": 1})
PLANS = {"full": FULL, "quick": QUICK, "gpu": GPU, "smoke": SMOKE}


# ---------------------------------------------------------------- shards


def build_shards(count: int, root: Path, side: int = 32, shard_size: int | None = None) -> list[str]:
    """``count`` real Fashion-MNIST test images (repeated with new keys past 10,000) as WebDataset shards,
    at their padded 32x32 or upsampled to ``side``.

    By default at least 16 equal shards (at most 1,000 samples each): DataLoader workers split the data
    by shard, so fewer shards than workers would leave workers idle.
    """
    directory = root / (f"shards-{count}" if side == 32 else f"shards-{count}-{side}px")
    shard_size = shard_size or min(1000, -(-count // 16))
    done = directory / "done.json"
    if not done.exists() or json.loads(done.read_text()).get("shard_size") != shard_size:
        shutil.rmtree(directory, ignore_errors=True)
        images, labels = fashion_mnist("test")
        for start in range(0, count, 10_000):
            index = np.arange(start, min(count, start + 10_000))
            write_image_shards(directory, resize_images(images[index % len(images)], side), [f"s{i:07d}" for i in index],
                               labels[index % len(images)], shard_size=shard_size, prefix=f"part{start // 10_000:03d}")
        done.write_text(json.dumps({"samples": count, "shard_size": shard_size, "side": side,
                                    "source": "Fashion-MNIST t10k, repeated with new keys"}))
    return sorted(str(p) for p in directory.glob("*.tar"))


# ---------------------------------------------------------------- one configuration (in a subprocess)


def decoded_batches(samples: Iterable[dict], batch_size: int, size: int = 32) -> Iterator[torch.Tensor]:
    """(a): decode and batch, what any image loader does (at the side the encoder's input is cut from)."""
    for batch in batched(samples, batch_size):
        yield torch.from_numpy(np.stack([decode_image(s["png"], size) for s in batch]))


def embedded_batches(batches: Iterable[torch.Tensor], encoder, device: str) -> Iterator[torch.Tensor]:
    """(b): the encoder's forward pass on each batch, in the fixed-size chunks the Scorer runs it in (placed
    on the device inside the worker). On a CPU, chunks of 16 run ResNet-18 1.3x faster than whole batches
    of 256, so this is the stricter floor for (c)/(b)."""
    encoder.module.to(device)
    chunk = chunk_size(device)
    for images in batches:
        pixels = to_float(images).to(device)
        yield torch.cat([encoder.embed(pixels[i:i + chunk]) for i in range(0, len(pixels), chunk)]).cpu()


def tensor_batches(samples: Iterable[dict], batch_size: int) -> Iterator[torch.Tensor]:
    """(d)'s loader: one float tensor per sample (torchvision's ToTensor), stacked like default_collate."""
    tensors = (torch.from_numpy(np.array(decode_image(s["png"]))).permute(2, 0, 1).float().div(255) for s in samples)
    for batch in batched(tensors, batch_size):
        yield torch.stack(batch)


def timing_reference(encoder, n: int = 2000) -> CleanReference:
    """A clean reference of ``n`` seeded random embeddings and errors: the excess error's compute (each sample
    against ``n`` reference images) does not depend on the values."""
    rng = np.random.default_rng(0)
    return CleanReference(rng.normal(size=(n, encoder.embed_dim)), rng.gamma(4.0, 0.01, n))


def timing_detector(encoder, decoder: tuple[int, int] = (32, 4)) -> Detector:
    """A DeDe model of the paper's size (decoder image and patch side ``decoder``) with seeded initial
    weights; its threshold keeps every sample."""
    torch.manual_seed(0)
    model = DeDeModel(replace(DeDeConfig(), image_size=decoder[0], patch_size=decoder[1]), encoder.embed_dim).eval()
    return Detector(model, encoder.name, encoder.fingerprint, threshold=fixed(float("inf")))


def loader(pipeline, workers: int) -> wds.WebLoader:
    """Workers keep torch's one thread each and their freed memory, as in the filter job
    (dedefilter.job.die_with_parent and keep_freed_memory say why): the same allocator for every mode."""
    return wds.WebLoader(pipeline, batch_size=None, num_workers=workers,
                         worker_init_fn=lambda _worker_id: keep_freed_memory())


def run_loader(config: dict) -> dict:
    """Time one (mode, encoder, samples, workers, batch, device) configuration."""
    mode, workers, batch, device = config["mode"], config["workers"], config["batch"], config["device"]
    urls = config["urls"]
    torch.manual_seed(0)
    encoder = load_encoder(ENCODERS[config["encoder"]])
    decoder = tuple(config.get("decoder", (32, 4)))
    size = encoder.input.decode_size  # what the encoder's input is cut from; (c) decodes at the larger of this and the decoder's
    count = 0
    with PeakSampler(SAMPLE_EVERY_S) as memory, tempfile.TemporaryDirectory() as tmp:
        start, cpu_start = time.perf_counter(), cpu_seconds()
        if mode == "a":
            for images in loader(shard_pipeline(urls, lambda s: decoded_batches(s, batch, size)), workers):
                count += len(images)
        elif mode == "b":
            stages = (lambda s: decoded_batches(s, batch, size), lambda b: embedded_batches(b, encoder, device))
            for embeddings in loader(shard_pipeline(urls, *stages), workers):
                count += len(embeddings)
        elif mode in ("c", "e", "w", "x"):
            detector = timing_detector(encoder, decoder)
            if mode in ("w", "x"):  # the shipped rule with a clean reference, as `calibrate --fpr` leaves it
                detector = detector.with_threshold(detector.threshold, WindowRule(reference=timing_reference(encoder)))
            scorer = Scorer(encoder, detector, device=device, precision="bf16" if mode in ("e", "x") else "fp32")
            result = filter_shards(urls, scorer, Path(tmp) / "out", stage=StageConfig(batch_size=batch),
                                   num_workers=workers, write_shards=False, progress=False)
            if not result.balanced:
                raise RuntimeError(f"ledger {result.ledger} != live counts {result.live_counts}")
            count = sum(result.ledger.values())
        elif mode == "d":
            detector = timing_detector(encoder)
            encoder.module.to(device)
            detector.model.to(device)
            batches = loader(shard_pipeline(urls, lambda s: tensor_batches(s, batch)), workers)
            errors, _ = official_errors(batches, encoder.module, detector.model, detector.config, device=device)
            count = len(errors)
        seconds = time.perf_counter() - start
    cpu = cpu_seconds() - cpu_start - memory.own_cpu_seconds  # workers have exited and been reaped by now
    result = {"samples": count, "seconds": round(seconds, 3), "samples_per_s": round(count / seconds, 1),
              "cpu_seconds": round(cpu, 3),
              "peak_rss_mib": round(memory.peak.rss / MiB), "peak_pss_mib": round(memory.peak.pss / MiB),
              "processes": memory.peak.processes}
    if device == "cuda" and torch.cuda.is_initialized():  # the GPU memory of this process (not of its workers)
        result["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated() / MiB)
    return result


def decoder_step(model: DeDeModel, optimizer: torch.optim.Optimizer, patches: torch.Tensor,
                 embeddings: torch.Tensor, visible: torch.Tensor, precision: str) -> None:
    """One optimiser step, exactly as dedefilter.training.train_model takes it."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        predicted = model(patches, embeddings, visible)
    loss = masked_patch_mse(predicted.float(), patches, visible).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def run_training(config: dict) -> dict:
    """Seconds per decoder-training epoch: cached embeddings (the library's train_model), recomputed
    embeddings (the official ``train_decoder``), and the DeDe model's own forward/backward on ready
    tensors. CPU seconds on one thread, so other processes' load does not enter the figures; the three
    alternate for ``rounds`` rounds and each keeps its fastest round."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    encoder = load_encoder(ENCODERS[config["encoder"]])
    images = decode_shards(config["urls"], limit=config["images"])
    dede = replace(DeDeConfig(), epochs=2)

    def cached_epoch() -> tuple[float, float]:
        marks: list[float] = []
        _, record = train_model(encoder, images, dede, log=lambda _: marks.append(time.process_time()))
        return marks[1] - marks[0], record["embed_seconds"]  # the second epoch: the first warms up

    precision = training_precision(dede.train_precision)
    n_visible = dede.n_visible(dede.train_mask_ratio)
    generator = torch.Generator().manual_seed(0)
    model = DeDeModel(dede, encoder.embed_dim).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=dede.lr, weight_decay=dede.weight_decay)
    slices = [slice(i, i + dede.batch_size) for i in range(0, len(images), dede.batch_size)]

    def uncached_epoch() -> float:
        start = time.process_time()
        for part in slices:
            pixels = to_float(images[part])
            visible = random_visible(len(pixels), dede.n_patches, n_visible, generator)
            decoder_step(model, optimizer, patchify(pixels, dede.patch_size), encoder.embed(pixels), visible, precision)
        return time.process_time() - start

    all_patches = patchify(to_float(images), dede.patch_size)
    all_embeddings = embed_array(encoder, images)
    ready = [(all_patches[part].contiguous(), all_embeddings[part].contiguous(),
              random_visible(len(all_patches[part]), dede.n_patches, n_visible, generator)) for part in slices]

    def decoder_only_epoch() -> float:
        start = time.process_time()
        for patches, embeddings, visible in ready:
            decoder_step(model, optimizer, patches, embeddings, visible, precision)
        return time.process_time() - start

    times = []
    for _ in range(config["rounds"]):
        times.append((*cached_epoch(), uncached_epoch(), decoder_only_epoch()))
    cached, embed_once, uncached, decoder_only = (min(column) for column in zip(*times, strict=True))
    return {"images": len(images), "precision": precision, "rounds": config["rounds"], "embed_once_s": embed_once,
            "cached_epoch_s": round(cached, 2), "uncached_epoch_s": round(uncached, 2),
            "decoder_only_epoch_s": round(decoder_only, 2),
            "cached_over_decoder_only": round(cached / decoder_only, 3),
            "speedup_over_uncached": round(uncached / cached, 2)}


def run_precision(config: dict) -> dict:
    """The demo's trained detector on the demo's test images with the DeDe model in fp32 and in bf16: the AUROC of
    what the filter decides on (the detector's window rule) and of the paper score, and how many of the filter's
    decisions at the detector's threshold (calibrated in fp32) bf16 rounding changes."""
    torch.set_num_threads(1)  # one thread: a busy machine stalls multi-threaded kernels; AUROC is the point here
    encoder = load_encoder(BACKDOORED)
    detector = Detector.load(config["detector"], encoder.fingerprint)
    demo = DemoConfig(**detector.record["demo"])
    # the demo's test set, rebuilt exactly as run_demo draws it (same seed, same order of draws)
    rng = np.random.default_rng(demo.seed)
    images, labels = fashion_mnist("test")
    images, labels = images[:demo.n_test].copy(), labels[:demo.n_test]
    trigger = PatchTrigger.from_description(encoder.card["trigger"])
    triggered = poison(images, labels, demo.triggered_fraction, encoder.card["target_class"], trigger, rng)
    keys = [f"fmnist-test-{i:05d}" for i in range(len(images))]
    out = {"detector": config["detector"], "n_clean": int((~triggered).sum()), "n_triggered": int(triggered.sum()),
           "window_rule": detector.window is not None}
    decided, paper = {}, {}
    for precision in ("fp32", "bf16"):
        start = time.perf_counter()
        scorer = Scorer(encoder, detector, precision=precision)
        scored = scorer.score_all(images, keys, residuals=detector.window is not None)
        paper[precision] = scored.scores
        decided[precision] = decision_scores(scored, detector.window)
        out[precision] = {"auroc": round(auroc(decided[precision], triggered), 6),
                          "paper_score_auroc": round(auroc(paper[precision], triggered), 6),
                          "samples_per_s": round(len(images) / (time.perf_counter() - start), 1)}
    relative = np.abs(paper["bf16"] - paper["fp32"]) / paper["fp32"]
    threshold = detector.threshold.value
    out["max_relative_paper_score_difference"] = float(f"{relative.max():.3g}")
    out["decisions_changed_at_fp32_threshold"] = int(((decided["bf16"] > threshold)
                                                      != (decided["fp32"] > threshold)).sum())
    out["auroc_equal_to_3_decimals"] = f"{out['fp32']['auroc']:.3f}" == f"{out['bf16']['auroc']:.3f}"
    return out


def run_parts(config: dict) -> dict:
    """What the DeDe stage adds to the encoder's forward pass, part by part, in one process on one thread: the
    encoder and the DeDe model as the Scorer runs them (the model on packed weights, in fp32 and in bf16) on the
    same chunks of real images in alternated rounds, and one full window's ``score_window`` (the shipped rule with
    a 2,000-image clean reference). With the multiply-accumulates per sample of the encoder and of the model
    (torch's FlopCounterMode; the model's attention, 2 x 65^2 x 192 per block, is not counted). 1 + (model +
    window) / encoder is what the parts add on one thread with the rest of the machine idle; it does not bound the
    2-worker loaders' ratios, where two processes share the machine (two encoders side by side may slow each other
    more than an encoder and a decoder do), and the loader's decoding and the Parquet sink come on top."""
    torch.set_num_threads(1)
    encoder = load_encoder(ENCODERS[config["encoder"]])
    detector = timing_detector(encoder)
    rule = WindowRule(reference=timing_reference(encoder))
    images, _ = fashion_mnist("test")
    pixels = to_float(resize_images(images[:config["images"]], encoder.input.decode_size))
    scorers = {precision: Scorer(encoder, detector, precision=precision) for precision in PRECISIONS}
    size = detector.config.image_size
    chunks = [(pixels[i:i + CHUNK].contiguous(memory_format=torch.channels_last),  # as score_pixels lays them out
               [f"k{j}" for j in range(i, i + CHUNK)]) for i in range(0, len(pixels) - CHUNK + 1, CHUNK)]
    with torch.inference_mode():
        embedded = [encoder.embed(chunk) for chunk, _ in chunks]
        views = [resize_square(chunk, size) for chunk, _ in chunks]
        parts = {"encoder": lambda i: encoder.embed(chunks[i][0])} | {
            f"model_{precision}": (lambda i, s=scorer: s.reconstruction_error(views[i], embedded[i], chunks[i][1]))
            for precision, scorer in scorers.items()}
        for part in parts.values():  # warm up: the packed copies are made at the first call
            part(0)
        per_chunk: dict[str, list[float]] = {name: [] for name in parts}
        for _ in range(config["rounds"]):
            for name, part in parts.items():
                start = time.perf_counter()
                for i in range(len(chunks)):
                    part(i)
                per_chunk[name].append((time.perf_counter() - start) / len(chunks))
        ms = {name: 1000 * statistics.median(times) for name, times in per_chunk.items()}
        window = scorers["fp32"].score_all(images[:config["window"]], [f"w{i}" for i in range(config["window"])],
                                           residuals=True)
        window_s = []
        for _ in range(3):  # a process's first window costs more (fresh pages): the median of three
            start = time.perf_counter()
            score_window(window.scores, window.embeddings, window.residuals, rule)
            window_s.append(time.perf_counter() - start)
        ms["window"] = 1000 * statistics.median(window_s) / config["window"] * CHUNK
        with FlopCounterMode(display=False) as encoder_count:
            encoder.embed(chunks[0][0])
        visible = torch.empty(CHUNK, 0, dtype=torch.long)  # the paper's scoring mask shows no patch
        with FlopCounterMode(display=False) as model_count:  # the plain model: packed layers are not counted
            detector.model(patchify(views[0], detector.config.patch_size), embedded[0], visible)
    macs = {"encoder": encoder_count.get_total_flops() / 2 / CHUNK, "model": model_count.get_total_flops() / 2 / CHUNK}
    added = {precision: (ms[f"model_{precision}"] + ms["window"]) / ms["encoder"] for precision in PRECISIONS}
    return {"encoder": config["encoder"], "images": len(chunks) * CHUNK, "chunk": CHUNK, "rounds": config["rounds"],
            "window": config["window"], "bf16_packed": can_pack(torch.bfloat16),
            "ms_per_chunk": {name: round(value, 2) for name, value in ms.items()},
            "mmac_per_sample": {name: round(value / 1e6, 1) for name, value in macs.items()},
            "gmac_per_s": {name: round(macs["encoder" if name == "encoder" else "model"] * CHUNK / ms[name] / 1e6, 1)
                           for name in parts},
            "model_over_encoder": {precision: round(ms[f"model_{precision}"] / ms["encoder"], 3)
                                   for precision in PRECISIONS},
            "one_thread_ratio": {precision: round(1 + value, 3) for precision, value in added.items()}}


# ---------------------------------------------------------------- the driver


def in_subprocess(config: dict, nice: int = 0) -> dict:
    """Run one configuration in a fresh interpreter; its last stdout line is the JSON result."""
    command = [sys.executable, "-m", "benchmarks.throughput", "--one", json.dumps(config)]
    done = subprocess.run(command, capture_output=True, text=True, check=False, preexec_fn=lambda: os.nice(nice) if nice else None)
    if done.returncode != 0:
        raise RuntimeError(f"configuration {config} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine(device: str) -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "cores_available": len(os.sched_getaffinity(0)),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "device": device,
            "device_name": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    try:
        with open("/proc/cpuinfo") as f:
            info["device_name"] = info["device_name"] if device == "cuda" else next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def loader_section(plan: Plan, root: Path, device: str) -> dict:
    rows = []
    shards = {name: build_shards(n, root) for name, n in plan.samples.items()}
    for name in plan.samples:
        for workers in plan.workers:
            for batch in plan.batches:
                for mode in MODES:
                    config = {"mode": mode, "encoder": name, "workers": workers, "batch": batch, "device": device,
                              "urls": shards[name]}
                    result = in_subprocess(config)
                    rows.append({k: v for k, v in config.items() if k != "urls"} | result)
                    log(f"{name} w{workers} b{batch} {mode}: {result['samples_per_s']} samples/s, "
                        f"PSS {result['peak_pss_mib']} MiB")
    # the must-show pair, repeated in alternation so a burst of load on the machine hits both
    must_workers = max(plan.workers)
    must_batch = max(plan.batches)
    first = {r["mode"]: r for r in rows if r["encoder"] == "resnet18" and r["workers"] == must_workers
             and r["batch"] == must_batch}
    rounds = [first]
    for _ in range(plan.repeats - 1):
        rounds.append({mode: in_subprocess({"mode": mode, "encoder": "resnet18", "workers": must_workers,
                                            "batch": must_batch, "device": device, "urls": shards["resnet18"]})
                       for mode in ("b", "c", "e")})
        log(f"must-show round: (c)/(b) = {rounds[-1]['c']['seconds'] / rounds[-1]['b']['seconds']:.3f}")
    c_over_b = [round(r["c"]["seconds"] / r["b"]["seconds"], 3) for r in rounds]
    e_over_b = [round(r["e"]["seconds"] / r["b"]["seconds"], 3) for r in rounds]
    c_over_b_cpu = [round(r["c"]["cpu_seconds"] / r["b"]["cpu_seconds"], 3) for r in rounds]
    e_over_b_cpu = [round(r["e"]["cpu_seconds"] / r["b"]["cpu_seconds"], 3) for r in rounds]
    growth = []
    for count in plan.growth:
        urls = build_shards(count, root)
        for mode in ("c", "d"):
            result = in_subprocess({"mode": mode, "encoder": "demo", "workers": plan.growth_workers,
                                    "batch": must_batch, "device": device, "urls": urls})
            growth.append({"mode": mode, "samples": count} | result)
            log(f"growth {mode} {count}: PSS {result['peak_pss_mib']} MiB, {result['samples_per_s']} samples/s")
    return {"rows": rows, "must_show": {"encoder": "resnet18", "workers": must_workers, "batch": must_batch,
                                        "c_over_b_rounds": c_over_b, "c_over_b_median": statistics.median(c_over_b),
                                        "e_over_b_rounds": e_over_b, "e_over_b_median": statistics.median(e_over_b),
                                        "c_over_b_cpu_rounds": c_over_b_cpu,
                                        "c_over_b_cpu_median": statistics.median(c_over_b_cpu),
                                        "e_over_b_cpu_rounds": e_over_b_cpu,
                                        "e_over_b_cpu_median": statistics.median(e_over_b_cpu)},
            "growth": growth}


def shipped_section(plan: Plan, root: Path, device: str) -> dict:
    """The shipped filter's cost: (b) encoder-only, (c)/(e) the paper score in fp32/bf16, (w)/(x) the window-level
    score in fp32/bf16, ResNet-18 (CIFAR stem), 2 workers, batch 256, in alternated rounds, each round at every
    size of ``plan.shipped_samples``; shards of 1,000 samples, so each window is a full one."""
    shard_sizes = {count: min(1000, count // 2) for count in plan.shipped_samples}
    sizes = {count: build_shards(count, root, shard_size=shard_size) for count, shard_size in shard_sizes.items()}
    rounds = {count: [] for count in sizes}
    for _ in range(plan.repeats):
        for count, urls in sizes.items():
            done = {}
            for mode in ("b", "c", "w", "e", "x"):
                done[mode] = in_subprocess({"mode": mode, "encoder": "resnet18", "workers": 2, "batch": 256,
                                            "device": device, "urls": urls})
                log(f"shipped round, {count} samples: {mode} {done[mode]['samples_per_s']} samples/s, "
                    f"{done[mode]['seconds']} s")
            rounds[count].append(done)
    return {"by_samples": {str(count): shipped_ratios(rounds[count]) | {"shard_size": shard_sizes[count]}
                           for count in sizes}}


def shipped_ratios(rounds: list[dict]) -> dict:
    """Each mode over (b) per round, in wall and in CPU seconds, and their medians."""
    out = {"rounds": rounds}
    for kind, field in (("ratios", "seconds"), ("cpu_ratios", "cpu_seconds")):
        out[kind] = {f"{m}_over_b": [round(r[m][field] / r["b"][field], 3) for r in rounds] for m in "cwex"}
        out[kind.replace("ratios", "medians")] = {name: statistics.median(v) for name, v in out[kind].items()}
    return out


def at224_section(plan: Plan, root: Path, device: str) -> dict:
    """ResNet-50 at 224: (b) encoder-only and (c) the full filter with each decoder, rounds alternating so a
    burst of load on the machine hits all of them."""
    spec = plan.at224
    urls = build_shards(spec["samples"], root, spec["side"], spec["shard_size"])
    common = {"encoder": "resnet50", "workers": spec["workers"], "batch": spec["batch"], "device": device, "urls": urls}
    runs = [("b", None)] + [("c", tuple(d)) for d in spec["decoders"]]
    rounds = []
    for _ in range(spec["rounds"]):
        done = {}
        for mode, decoder in runs:
            result = in_subprocess(common | {"mode": mode} | ({"decoder": list(decoder)} if decoder else {}))
            done["b" if decoder is None else f"c{decoder[0]}"] = result
            log(f"at224 {mode} decoder {decoder}: {result['samples_per_s']} samples/s, {result['seconds']} s")
        rounds.append(done)
    return {"plan": spec, "rounds": rounds} | at224_ratios(spec, rounds)


def at224_ratios(spec: dict, rounds: list[dict]) -> dict:
    """(c)/(b) per decoder and round, in wall seconds and in CPU seconds (main + workers: robust to other load)."""
    out = {}
    for kind, field in (("ratios", "seconds"), ("cpu_ratios", "cpu_seconds")):
        out[kind] = {f"c{d[0]}_over_b": [round(r[f"c{d[0]}"][field] / r["b"][field], 3) for r in rounds]
                     for d in spec["decoders"]}
        out[kind.replace("ratios", "medians")] = {name: statistics.median(v) for name, v in out[kind].items()}
    return out


def parts_section(plan: Plan) -> dict:
    result = in_subprocess(plan.parts | {"parts": True})
    log(f"parts: {result}")
    return result


def training_section(plan: Plan, root: Path) -> dict:
    out = {}
    for name, count in (plan.train_images or {}).items():
        out[name] = in_subprocess({"encoder": name, "images": count, "rounds": plan.train_rounds,
                                   "urls": build_shards(max(count, 1000), root)})
        log(f"training {name}: {out[name]}")
    return out


def precision_section(demo_dir: Path) -> dict | None:
    path = demo_dir / f"detector-{BACKDOORED}.pt"
    if not path.exists():
        log(f"no demo detector at {path}: run `make demo` first for the bf16 AUROC check; skipped")
        return None
    result = in_subprocess({"detector": str(path)})
    log(f"precision: {result}")
    return result


def memory_section(plan: Plan, root: Path, device: str, mode: str) -> dict:
    rows = []
    for count in plan.memory:
        result = in_subprocess({"mode": mode, "encoder": "demo", "workers": 2, "batch": 256, "device": device,
                                "urls": build_shards(count, root)})
        rows.append({"samples": count} | result)
        log(f"memory {count}: {result}")
    small, large = rows
    return {"mode": mode, "rows": rows, "rss_ratio": round(large["peak_rss_mib"] / small["peak_rss_mib"], 3),
            "pss_ratio": round(large["peak_pss_mib"] / small["peak_pss_mib"], 3)}


# ---------------------------------------------------------------- report


def by_configuration(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    """The loader rows as {(encoder, workers, batch): {mode: row}}."""
    pairs: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        pairs.setdefault((row["encoder"], row["workers"], row["batch"]), {})[row["mode"]] = row
    return pairs


def loader_verdicts(loaders: dict, where: str = "") -> list[tuple[str, str, bool]]:
    must = loaders["must_show"]
    setting = f"ResNet-18 CIFAR stem, batch {must['batch']}, {must['workers']} workers{where}"
    median = must["c_over_b_median"]
    out = [(f"(c) <= 1.3x time of (b), {setting}",
            f"median (c)/(b) = {median:.2f} over rounds {must['c_over_b_rounds']}", median <= 1.3)]
    median = must["e_over_b_median"]
    out.append((f"the same with the DeDe model in bf16 ((e), Scorer precision=\"bf16\"){where}",
                f"median (e)/(b) = {median:.2f} over rounds {must['e_over_b_rounds']}", median <= 1.3))
    if "c_over_b_cpu_median" in must:
        for mode in ("c", "e"):
            median = must[f"{mode}_over_b_cpu_median"]
            out.append((f"the same in CPU seconds (main + workers; robust to other load), ({mode})/(b){where}",
                        f"median ({mode})/(b) = {median:.2f} over rounds {must[f'{mode}_over_b_cpu_rounds']}",
                        median <= 1.3))
    pairs = by_configuration(loaders["rows"])
    ratios = [p["c"]["seconds"] / p["d"]["seconds"] * p["d"]["samples"] / p["c"]["samples"] for p in pairs.values()
              if "c" in p and "d" in p]
    at_must = pairs.get(("resnet18", must["workers"], must["batch"]), {})
    if "c" in at_must and "d" in at_must:
        ratio = at_must["c"]["seconds"] / at_must["d"]["seconds"]
        out.append((f"(c) at least as fast as (d), {setting}", f"(c)/(d) time {ratio:.2f}", ratio <= 1.0))
    out.append((f"(c) at least as fast as (d), every configuration{where}",
                f"(c)/(d) time from {min(ratios):.2f} to {max(ratios):.2f}", max(ratios) <= 1.0))
    kind = "cuda_peak_mib" if all("cuda_peak_mib" in g for g in loaders["growth"]) else "peak_pss_mib"
    growth = {(g["mode"], g["samples"]): g[kind] for g in loaders["growth"]}
    (n1, n2) = sorted({g["samples"] for g in loaders["growth"]})
    d_growth, c_growth = growth["d", n2] / growth["d", n1], growth["c", n2] / growth["c", n1]
    out.append((f"(d)'s peak memory grows with samples, (c)'s flat ({n1} -> {n2}){where}",
                f"peak {'GPU memory' if kind == 'cuda_peak_mib' else 'PSS'} (d) x{d_growth:.2f}, (c) x{c_growth:.2f}",
                d_growth > 1.2 and c_growth <= 1.1))
    return out


def verdicts(results: dict) -> list[tuple[str, str, bool]]:
    """Each must-show of the issue with the measured figure and whether it holds."""
    out = loader_verdicts(results["loader"]) if results.get("loader") else []
    for name, t in (results.get("training") or {}).items():
        out.append((f"cached epoch within 1.1x of decoder-only time ({name})",
                    f"{t['cached_over_decoder_only']:.2f}x; {t['speedup_over_uncached']:.2f}x faster than recomputing",
                    t["cached_over_decoder_only"] <= 1.1))
    precision = results.get("precision")
    if precision:
        out.append(("bf16 DeDe model: AUROC unchanged to 3 decimals (demo detector, demo test set)",
                    f"fp32 {precision['fp32']['auroc']}, bf16 {precision['bf16']['auroc']}",
                    precision["auroc_equal_to_3_decimals"]))
    memory = results.get("memory")
    if memory:
        small, large = memory["rows"]
        out.append((f"peak RSS at {large['samples']:,} within 10% of {small['samples']:,}",
                    (f"RSS x{memory['rss_ratio']:.3f} ({small['peak_rss_mib']} -> {large['peak_rss_mib']} MiB), "
                    f"PSS x{memory['pss_ratio']:.3f}"), abs(memory["rss_ratio"] - 1) <= 0.1))
    if results.get("gpu"):
        out += loader_verdicts(results["gpu"], f" (GPU: {results['gpu']['machine']['device_name']})")
    shipped = (results.get("shipped") or {}).get("by_samples", {})
    if shipped:  # judged at the largest size; the smaller sizes are shown beside it
        largest = max(shipped, key=int)
        at = shipped[largest]
        for mode, limit, what in (("w", 1.3, "fp32"), ("x", 1.15, "bf16")):
            median, cpu = at["medians"][f"{mode}_over_b"], at["cpu_medians"][f"{mode}_over_b"]
            others = "; ".join(f"at {int(n):,} samples {s['medians'][f'{mode}_over_b']:.2f}"
                               for n, s in sorted(shipped.items(), key=lambda i: int(i[0])) if n != largest)
            out.append((f"the shipped filter (window-level score, DeDe model in {what}) <= {limit}x encoder-only, "
                        f"ResNet-18 CIFAR stem, 2 workers, batch 256, {int(largest):,} samples",
                        (f"median ({mode})/(b) = {median:.2f} in wall time over rounds "
                         f"{at['ratios'][f'{mode}_over_b']}; "
                         f"{cpu:.2f} in CPU seconds; the paper score alone (c) {at['medians']['c_over_b']:.2f}, "
                         f"(e) {at['medians']['e_over_b']:.2f}" + (f"; {others}" if others else "")), median <= limit))
    at224 = results.get("at224")
    if at224:
        for name, median in at224["medians"].items():
            cpu = at224["cpu_medians"][name]
            out.append((f"ResNet-50 at 224: full filter (decoder {name[1:].split('_')[0]} px) <= 1.1x encoder-only",
                        (f"median (c)/(b) = {median:.2f} in wall time over rounds {at224['ratios'][name]}; "
                         f"{cpu:.2f} in CPU seconds over rounds {at224['cpu_ratios'][name]}"), median <= 1.1))
    return out


def describe(run: dict) -> str:
    m = run["machine"]
    return (f"`python -m benchmarks.throughput {run['argv']}` on {m['date']}: {m['device_name']}, "
            f"{m['cores_available']} cores available, torch {m['torch']} ({m['torch_threads']} threads), "
            f"device {m['device']}, load average at start {m['load_average_at_start']}")


def loader_lines(loaders: dict, title: str) -> list[str]:
    lines = ["", title, "",
             ("| encoder | workers | batch | (a) decode | (b) + encoder | (c) + DeDe stage | (e) (c) in bf16 "
              "| (d) official loop | (c)/(b) time | (e)/(b) time | (c)/(d) time | (c)/(b) CPU | (e)/(b) CPU "
              "| (c)/(d) CPU | PSS a / b / c / e / d |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    pairs = by_configuration(loaders["rows"])
    for (name, workers, batch), p in pairs.items():
        rate = {mode: p[mode]["samples_per_s"] for mode in MODES}
        lines.append(f"| {name} | {workers} | {batch} | " + " | ".join(f"{rate[mode]:.0f}" for mode in MODES)
                     + f" | {rate['b'] / rate['c']:.2f} | {rate['b'] / rate['e']:.2f} | {rate['d'] / rate['c']:.2f} | "
                     + " | ".join(f"{p[x]['cpu_seconds'] / p[y]['cpu_seconds']:.2f}" if "cpu_seconds" in p[x] else "-"
                                  for x, y in (("c", "b"), ("e", "b"), ("c", "d"))) + " | "
                     + " / ".join(str(p[mode]["peak_pss_mib"]) for mode in MODES) + " |")
    lines += ["", (f"Peak memory against sample count (demo encoder, {loaders['plan'].get('growth_workers', 2)} workers): "
              "(d) keeps every reconstruction, (c) streams."),
              "", "| mode | samples | samples/s | peak RSS MiB | peak PSS MiB | peak GPU MiB |", "|---|---|---|---|---|---|"]
    for g in loaders["growth"]:
        lines.append(f"| {g['mode']} | {g['samples']} | {g['samples_per_s']:.0f} | {g['peak_rss_mib']} "
                     f"| {g['peak_pss_mib']} | {g.get('cuda_peak_mib', '-')} |")
    return lines


def parts_lines(parts: dict) -> list[str]:
    ms, macs, rate = parts["ms_per_chunk"], parts["mmac_per_sample"], parts["gmac_per_s"]
    lines = ["", (f"## The parts on one thread ({parts['encoder']}, {parts['images']} real images in chunks of "
                  f"{parts['chunk']}, median of {parts['rounds']} alternated rounds; the window: one of "
                  f"{parts['window']} samples, per chunk)"), "",
             "| part | ms per chunk | M MAC per sample | GMAC/s | over the encoder |", "|---|---|---|---|---|",
             f"| encoder | {ms['encoder']} | {macs['encoder']} | {rate['encoder']} | 1 |"]
    for precision in PRECISIONS:
        name = f"model_{precision}"
        lines.append(f"| DeDe model, {precision} | {ms[name]} | {macs['model']} | {rate[name]} "
                     f"| {parts['model_over_encoder'][precision]} |")
    lines.append(f"| window (shipped rule) | {ms['window']} | | | {ms['window'] / ms['encoder']:.3f} |")
    ratio = parts["one_thread_ratio"]
    lines += ["", (f"The model does {macs['model'] / macs['encoder']:.3f} of the encoder's multiply-accumulates. "
                   f"On one thread the parts add up to 1 + (model + window) / encoder = **{ratio['fp32']}x in fp32, "
                   f"{ratio['bf16']}x in bf16**{'' if parts['bf16_packed'] else ' (bf16 autocast: no native bf16)'}. "
                   "Not a bound on the 2-worker loaders' ratios: there two processes share the machine, and the "
                   "loader's decoding and the Parquet sink come on top.")]
    return lines


def render(results: dict) -> str:
    runs = [results[name] for name in ("loader", "memory", "at224", "shipped", "parts") if results.get(name)]
    lines = ["# Throughput", "", "Written by " + "; and by ".join(describe(run) for run in runs) + ".",
             ("Each configuration ran in a fresh subprocess; samples/s include DataLoader start-up. "
             "Timing uses a paper-size DeDe model (dim 192, 12 + 4 layers) with its seeded initial weights "
             "(no ResNet-18 detector is trained here; the compute does not depend on the weights), a "
             "threshold that keeps every sample and, for the shipped rule, a clean reference of 2,000 seeded "
             "random embeddings. Memory: peak over the process tree (main + workers), "
             f"sampled every {SAMPLE_EVERY_S} s; RSS counts shared pages once per process, PSS splits them. "
             "Ratios are of seconds for the same samples, measured side by side in one run."), "",
             "## Must show", "", "| claim | measured | holds |", "|---|---|---|"]
    for claim, figure, ok in verdicts(results):
        lines.append(f"| {claim} | {figure} | {'yes' if ok else 'NO'} |")
    if results.get("loader"):
        lines += loader_lines(results["loader"], "## Loader throughput (samples/s) and peak memory (PSS MiB, main + workers)")
    if results.get("at224"):
        spec = results["at224"]["plan"]
        lines += ["", (f"## At 224: torchvision ResNet-50 (random weights) at its own input, {spec['samples']} "
                       f"Fashion-MNIST images upsampled to {spec['side']} px in shards of {spec['shard_size']}, "
                       f"{spec['workers']} workers, batch {spec['batch']}"),
                  "", "| round | (b) encoder-only | " + " | ".join(f"(c) decoder {d[0]} px, patch {d[1]}"
                                                                 for d in spec["decoders"]) + " | (c)/(b) |",
                  "|---|---|" + "---|" * len(spec["decoders"]) + "---|"]
        for i, r in enumerate(results["at224"]["rounds"]):
            cs = [r[f"c{d[0]}"] for d in spec["decoders"]]
            lines.append(f"| {i + 1} | {r['b']['samples_per_s']:.1f} samples/s, {r['b']['cpu_seconds']:.0f} CPU s | "
                         + " | ".join(f"{c['samples_per_s']:.1f} samples/s, {c['cpu_seconds']:.0f} CPU s" for c in cs)
                         + " | " + " / ".join(f"{c['seconds'] / r['b']['seconds']:.2f} (CPU "
                                              f"{c['cpu_seconds'] / r['b']['cpu_seconds']:.2f})" for c in cs) + " |")
    if results.get("parts"):
        lines += parts_lines(results["parts"]["parts"])
    if results.get("training"):
        lines += ["", "## Decoder training, CPU seconds per epoch on one thread (paper-size DeDe model)", "",
                  ("| encoder | images | precision | embed once (wall s) | epoch, cached (s) | epoch, recomputing (s) "
                  "| DeDe fwd/bwd only (s) | cached / fwd-bwd | speed-up of the cache |"),
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, t in results["training"].items():
            lines.append(f"| {name} | {t['images']} | {t['precision']} | {t['embed_once_s']} | {t['cached_epoch_s']} "
                         f"| {t['uncached_epoch_s']} | {t['decoder_only_epoch_s']} | {t['cached_over_decoder_only']} "
                         f"| {t['speedup_over_uncached']}x |")
    if results.get("precision"):
        p = results["precision"]
        lines += ["", "## Reduced precision (the demo's trained detector on its 10,000 test images)", "",
                  "| DeDe model | AUROC, the filter's score | AUROC, the paper score | samples/s (one thread) |",
                  "|---|---|---|---|"]
        lines += [f"| {name} | {p[name]['auroc']} | {p[name]['paper_score_auroc']} | {p[name]['samples_per_s']:.0f} |"
                  for name in ("fp32", "bf16")]
        lines += ["", (f"Largest relative paper score difference {p['max_relative_paper_score_difference']}; "
                       f"{p['decisions_changed_at_fp32_threshold']} of the {p['n_clean'] + p['n_triggered']} filter "
                       "decisions change at the detector's (fp32-calibrated) threshold.")]
    if results.get("memory"):
        mode = results["memory"].get("mode", "c")
        lines += ["", f"## Streaming memory (({mode}), demo encoder, 2 workers, batch 256)", "",
                  "| samples | seconds | samples/s | peak RSS MiB | peak PSS MiB |", "|---|---|---|---|---|"]
        for r in results["memory"]["rows"]:
            lines.append(f"| {r['samples']:,} | {r['seconds']:.0f} | {r['samples_per_s']:.0f} | {r['peak_rss_mib']} "
                         f"| {r['peak_pss_mib']} |")
    if results.get("gpu"):
        lines += ["", "## GPU", "", "Written by " + describe(results["gpu"]) + "."]
        lines += loader_lines(results["gpu"], "### Loader throughput on the GPU (samples/s) and peak host memory (PSS MiB)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sample counts (a few minutes)")
    parser.add_argument("--plan", choices=sorted(PLANS), help="default: gpu with --device cuda, else full or quick")
    parser.add_argument("--workers", type=int, nargs="+", help="override the plan's num_workers values")
    parser.add_argument("--batches", type=int, nargs="+", help="override the plan's batch sizes")
    parser.add_argument("--repeats", type=int, help="override the plan's alternated rounds of the must-show ratios")
    parser.add_argument("--memory", action="store_true", help="only the 10,000 vs 100,000 streaming memory run")
    parser.add_argument("--memory-bf16", action="store_true",
                        help="stream the memory run with the DeDe model in bf16 (mode e): 2.5x sooner, same state kept")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default="benchmarks/results", help="folder for throughput.json and .md")
    parser.add_argument("--work", default=".dedefilter-bench", help="folder for the generated shards")
    parser.add_argument("--demo-dir", default=".dedefilter-demo",
                        help="the demo's work folder: its cached detector is used for the bf16 AUROC check")
    parser.add_argument("--shards-only", action="store_true", help="build the shards this run needs, then stop")
    parser.add_argument("--only", choices=["loader", "training", "precision", "at224", "shipped", "parts"],
                        help="run one section (at224 also on --device cuda)")
    parser.add_argument("--merge-gpu", metavar="JSON", help="add the loader section of a --device cuda run's "
                        "throughput.json to the results in --out as its GPU section, then stop")
    parser.add_argument("--render", action="store_true", help="only rewrite throughput.md from throughput.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # one configuration, run by the driver in a subprocess
    args = parser.parse_args(argv)
    if args.one:
        config = json.loads(args.one)
        run = (run_parts if "parts" in config else run_precision if "detector" in config
               else run_training if "images" in config else run_loader)
        print(json.dumps(run(config)))
        return
    plan = PLANS[args.plan or ("gpu" if args.device == "cuda" else "quick" if args.quick else "full")]
    plan = replace(plan, workers=tuple(args.workers or plan.workers), batches=tuple(args.batches or plan.batches),
                   repeats=args.repeats or plan.repeats)
    root = Path(args.work)
    if args.shards_only:
        counts = {*plan.samples.values(), *plan.growth, *(max(n, 1000) for n in (plan.train_images or {}).values()),
                  *(plan.memory if args.memory else ())}
        for count in sorted(counts):
            build_shards(count, root)
        if plan.at224:
            build_shards(plan.at224["samples"], root, plan.at224["side"], plan.at224["shard_size"])
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "throughput.json"
    if args.merge_gpu or args.render:
        results = json.loads(path.read_text())
        if args.merge_gpu:
            results["gpu"] = json.loads(Path(args.merge_gpu).read_text())["loader"]
        path.write_text(json.dumps(results, indent=2) + "\n")
        (out / "throughput.md").write_text(render(results))
        return
    run = {"machine": machine(args.device), "argv": " ".join(sys.argv[1:] if argv is None else argv),
           "plan": asdict(plan)}

    def save(name: str, section: dict | None) -> dict:
        """Write one finished section (re-reading the file: another step may have written meanwhile)."""
        merged = (json.loads(path.read_text()) if path.exists() else {}) | {name: section}
        path.write_text(json.dumps(merged, indent=2) + "\n")
        (out / "throughput.md").write_text(render(merged))
        return merged

    if args.memory:
        results = save("memory", run | memory_section(plan, root, args.device, "e" if args.memory_bf16 else "c"))
    else:
        cpu, only = args.device == "cpu", args.only
        if only == "at224":  # its own section (on a GPU too: --device cuda --out elsewhere)
            results = save("at224", run | at224_section(plan, root, args.device))
        if only in (None, "shipped"):
            results = save("shipped", run | shipped_section(plan, root, args.device))
        if only in (None, "loader"):
            results = save("loader", run | loader_section(plan, root, args.device))
        if only is None and plan.at224:
            results = save("at224", run | at224_section(plan, root, args.device))
        if only in (None, "training"):
            results = save("training", training_section(plan, root) if cpu else None)
        if only in (None, "precision"):
            results = save("precision", precision_section(Path(args.demo_dir)) if cpu else None)
        if only in (None, "parts"):
            results = save("parts", run | {"parts": parts_section(plan)} if cpu and plan.parts else None)
    print(render(results))


if __name__ == "__main__":
    main()
