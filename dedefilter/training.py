"""Train a DeDe model on an auxiliary image set.

The encoder is frozen and there is no augmentation, so every image is embedded exactly once (the
embedding cache) and each epoch only runs the DeDe model. The auxiliary set may be in-distribution
and slightly poisoned (:func:`train_trimmed` then leaves out what a first model draws worst), or
out-of-distribution (natural-photo patches). The trained model's own error (the median paper score of its
training images) is recorded: calibration checks that the decoder fits the reference images by it.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .calibration import upper_quantile
from .config import DeDeConfig
from .data import resize_square
from .detector import Detector
from .encoders import Encoder, embed_array, to_float
from .masking import random_visible
from .model import DeDeModel, masked_patch_mse, patchify
from .scoring import Scorer

OWN_ERROR_IMAGES = 2000  # training images scored for the decoder's own error


def training_precision(requested: str, device: str = "cpu") -> str:
    """Resolve "auto": bf16 autocast on GPUs and on CPUs that compute bf16 natively, else fp32.
    Scoring is always fp32."""
    if requested not in ("auto", "bf16", "fp32"):
        raise ValueError(f"train_precision must be auto, bf16 or fp32, not {requested!r}")
    if requested == "auto":
        native = device != "cpu" or torch.ops.mkldnn._is_mkldnn_bf16_supported()
        return "bf16" if native else "fp32"
    return requested


def train_model(encoder: Encoder, images: np.ndarray, config: DeDeConfig = DeDeConfig(),
                log=print, device: str = "cpu") -> tuple[DeDeModel, dict]:
    """Train on uint8 images (N, S, S, 3), embedding each image once; the model returns on the CPU.
    The encoder sees its own input (``encoder.input``) and the decoder ``config.image_size``, both cut
    from the same images. ``device`` is where the encoder's module lives and where training runs."""
    torch.manual_seed(config.seed)
    start = time.perf_counter()
    embeddings = embed_array(encoder, images, device=device)
    embed_seconds = time.perf_counter() - start
    patches = torch.cat([patchify(resize_square(to_float(images[i:i + 512]), config.image_size), config.patch_size)
                         for i in range(0, len(images), 512)]).to(device)
    model = DeDeModel(config, embeddings.shape[1]).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    n_visible = config.n_visible(config.train_mask_ratio)
    precision = training_precision(config.train_precision, device)
    losses = []
    model.train()
    for epoch in range(config.epochs):
        order = torch.randperm(len(patches), generator=generator)
        total, batches = torch.zeros((), device=device), 0
        for i in range(0, len(order), config.batch_size):
            idx = order[i:i + config.batch_size]
            visible = random_visible(len(idx), config.n_patches, n_visible, generator).to(device)
            idx = idx.to(device)
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                predicted = model(patches[idx], embeddings[idx], visible)
            loss = masked_patch_mse(predicted.float(), patches[idx], visible).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
            batches += 1
        losses.append(round(float(total) / batches, 5))
        log(f"dede epoch {epoch + 1}/{config.epochs} loss {losses[-1]:.5f} ({time.perf_counter() - start:.0f}s)")
    model.eval()
    error = own_error(scorer_of(encoder, model, device), images)
    model.cpu()
    record = {"n_aux": len(images), "losses": losses, "precision": precision, "embed_seconds": round(embed_seconds, 1),
              "train_seconds": round(time.perf_counter() - start, 1), "own_error": error}
    return model, record


def train_trimmed(encoder: Encoder, images: np.ndarray, config: DeDeConfig = DeDeConfig(), trim: float = 0.05,
                  log=print, device: str = "cpu", first: DeDeModel | None = None) -> tuple[DeDeModel, dict]:
    """Train on a sample of the very data being filtered, which may hold triggered images: a first model scores
    the sample, its top ``trim`` paper scores are dropped and a second model trains on the rest. A decoder that
    learned triggered images draws them better (they were its training data), so it finds them less well: trained
    on a sample of a 1%-triggered stream, the paper score was 0.004-0.061 AUROC below a detector trained on clean
    images in the detection sweep. ``first``: the first model, when already trained on ``images``."""
    if first is None:
        first, _ = train_model(encoder, images, config, log, device)
    scores = scorer_of(encoder, first, device).score_array(images, [f"aux-{i}" for i in range(len(images))])
    kept = scores <= upper_quantile(scores, trim)
    n_trimmed = len(images) - int(kept.sum())
    log(f"dropped the {n_trimmed} of {len(images)} training images the first model drew worst")
    model, record = train_model(encoder, images[kept], config, log, device)
    return model, record | {"trim": trim, "n_trimmed": n_trimmed}


def scorer_of(encoder: Encoder, model: DeDeModel, device: str) -> Scorer:
    """A scorer for a model still in training (no threshold, no rule)."""
    return Scorer(encoder, Detector(model, encoder.name, encoder.fingerprint, encoder_input=encoder.input), device)


def own_error(scorer: Scorer, images: np.ndarray, n: int = OWN_ERROR_IMAGES) -> float:
    """The median paper score of (up to ``n`` evenly spaced of) the detector's training images, scored as the
    filter scores them: how well the decoder draws what it learned from, the yardstick calibration holds the
    reference images' errors against (:func:`dedefilter.window.misfit`)."""
    rows = np.linspace(0, len(images) - 1, min(n, len(images))).astype(int)
    return float(np.median(scorer.score_array(images[rows], [f"aux-{i}" for i in rows])))
