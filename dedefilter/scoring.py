"""Batched DeDe scoring: frozen-encoder embedding, masked reconstruction, per-sample error.

The score of a sample is the mean squared error of its reconstruction over the masked patches
(visible patches pasted back), averaged over ``score_masks`` masks seeded by the sample's key. On
request the scorer also returns the residuals (image minus reconstruction on the masked patches), which
the window-level scores (:mod:`dedefilter.window`) search for a pattern shared by many samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .data import resize_square
from .detector import CheckpointError, Detector
from .encoders import Encoder, decode_size, to_float
from .masking import key_seeds, keyed_visible
from .model import cpu_inference_copy, masked_patch_mse, patchify

# The models run on fixed-shape, contiguous chunks: CPU kernels pick different code paths (and float
# rounding) for other shapes and memory layouts, and a sample's score must be bit-identical whatever
# batch, worker or order it lands in (tests/test_stage.py). Chunks of 16 are also faster than 256 here.
# A GPU needs larger chunks to be busy; its scores are reproducible per device and chunk size.
CHUNK = 16
CUDA_CHUNK = 256
PRECISIONS = ("fp32", "bf16")  # of the DeDe model; the encoder always runs in fp32


def chunk_size(device: str | torch.device) -> int:
    """Samples per model call on ``device``."""
    return CUDA_CHUNK if torch.device(device).type == "cuda" else CHUNK


@dataclass
class ScoredBatch:
    scores: np.ndarray  # (B,) float32
    embeddings: np.ndarray  # (B, D) float32
    residuals: np.ndarray | None = None  # (B, n_patches * 3 * patch**2) float32, when asked for


def pad_batch(pixels: torch.Tensor, keys: list[str], chunk: int = CHUNK) -> tuple[torch.Tensor, list[str]]:
    """Pad a batch to a whole number of chunks by repeating its last sample."""
    extra = -len(keys) % chunk
    if extra == 0:
        return pixels, keys
    return torch.cat([pixels, pixels[-1:].expand(extra, -1, -1, -1)]), keys + keys[-1:] * extra


class Scorer:
    """Scores batches of images with one encoder and one detector.

    Each image comes decoded once, at :attr:`decode_size`; the encoder's view (its own size and
    normalisation, as the detector was trained with) and the decoder's view (``config.image_size``)
    are both cut from it with tensor ops.

    ``precision="bf16"`` runs the DeDe model's linear layers (not the encoder) in bfloat16: on a CPU with
    native bf16 a copy packed in bf16 (:func:`dedefilter.model.cpu_inference_copy`), elsewhere bf16 autocast;
    scores differ from fp32 by bf16 rounding, so calibrate the threshold with the same precision. fp32 is
    the default.

    With ``device="cuda"`` the encoder and the DeDe model move there at the first batch, not before,
    so a scorer built in the main process still works in forked DataLoader workers (CUDA cannot be
    initialised before a fork); scores come back as CPU arrays.
    """

    def __init__(self, encoder: Encoder, detector: Detector, device: str | torch.device = "cpu",
                 precision: str = "fp32"):
        if encoder.fingerprint != detector.encoder_fingerprint:
            raise CheckpointError(
                f"detector was trained for encoder {detector.encoder_name!r} ({detector.encoder_fingerprint}), "
                f"not {encoder.name!r} ({encoder.fingerprint})")
        self.encoder = encoder.with_input(detector.encoder_input) if detector.encoder_input else encoder
        self.detector = detector
        self.config = detector.config
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be {' or '.join(PRECISIONS)}, not {precision!r}")
        self.precision = precision
        self.device = torch.device(device)
        self.chunk = chunk_size(self.device)
        self._model: torch.nn.Module | None = None  # the DeDe model as it runs here (see _place)

    def __getstate__(self) -> dict:
        return self.__dict__ | {"_model": None}  # oneDNN's packed weights cannot be pickled; rebuilt where it runs

    @property
    def decode_size(self) -> int:
        """The side to decode images at: the larger of the encoder's and the decoder's needs."""
        return decode_size(self.encoder.input, self.config.image_size)

    def _place(self) -> torch.nn.Module:
        """The DeDe model as it runs here, made at the first score in the process that scores: the encoder and
        the model on the device; on a CPU, a copy whose linear layers have their weights laid out once for
        oneDNN in the scorer's precision (~2x faster)."""
        if self._model is None:
            if self.device.type != "cpu":
                self.encoder.module.to(self.device)
                self.detector.model.to(self.device)
            rows = self.chunk * (self.config.n_patches + 1)  # a chunk's decoder tokens, the class token included
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
            on_cpu = self.device.type == "cpu"
            self._model = cpu_inference_copy(self.detector.model, rows, dtype) if on_cpu else self.detector.model
        return self._model

    @property
    def model(self) -> torch.nn.Module:
        """The DeDe model as it runs here (:meth:`_place`)."""
        return self._place()

    def score(self, images: np.ndarray | torch.Tensor, keys: Sequence[str]) -> ScoredBatch:
        """Score uint8 images (B, H, W, 3), best decoded at :attr:`decode_size`."""
        return self.score_pixels(to_float(images), keys)

    def score_array(self, images: np.ndarray, keys: Sequence[str], batch_size: int = 512) -> np.ndarray:
        """Paper scores of a whole in-memory uint8 array (e.g. clean reference images for calibration)."""
        return self.score_all(images, keys, batch_size).scores

    def score_all(self, images: np.ndarray, keys: Sequence[str], batch_size: int = 512,
                  residuals: bool = False) -> ScoredBatch:
        """Scores, embeddings (and residuals) of a whole in-memory uint8 array, ``batch_size`` images at a time."""
        parts = [self.score_pixels(to_float(images[i:i + batch_size]), keys[i:i + batch_size], residuals)
                 for i in range(0, len(images), batch_size)]
        return ScoredBatch(np.concatenate([p.scores for p in parts]), np.concatenate([p.embeddings for p in parts]),
                           np.concatenate([p.residuals for p in parts]) if residuals else None)

    @torch.inference_mode()
    def score_pixels(self, pixels: torch.Tensor, keys: Sequence[str], residuals: bool = False) -> ScoredBatch:
        """Score float images (B, 3, H, W) in [0, 1]; the encoder and the decoder each get their own view
        (the centred square, resized), per fixed-size chunk so a sample's score never depends on its batch."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) RGB, got {tuple(pixels.shape)}")
        if len(keys) != len(pixels):
            raise ValueError(f"{len(pixels)} images but {len(keys)} keys")
        self._place()
        n, size = len(keys), self.chunk
        pixels, keys = pad_batch(pixels, list(keys), size)
        # one memory layout for every chunk (scores must not depend on the batch); channels-last, the layout a
        # decoded uint8 batch already has: convolutional encoders run ~30% faster on it on a CPU (ResNet-50 at 224)
        pixels = pixels.contiguous(memory_format=torch.channels_last)
        embeddings, scores, residual_chunks = [], [], []
        for i in range(0, len(keys), size):
            chunk = pixels[i:i + size].to(self.device, non_blocking=True)
            embeddings.append(self.encoder.embed(chunk))
            decoder_view = resize_square(chunk, self.config.image_size)
            error, residual = self.reconstruction_error(decoder_view, embeddings[-1], keys[i:i + size])
            scores.append(error)
            if residuals:
                residual_chunks.append(residual.flatten(1))
        return ScoredBatch(torch.cat(scores)[:n].cpu().numpy(), torch.cat(embeddings)[:n].cpu().numpy(),
                           torch.cat(residual_chunks)[:n].cpu().numpy() if residuals else None)

    @torch.inference_mode()
    def reconstruction_error(self, pixels: torch.Tensor, embeddings: torch.Tensor,
                             keys: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample masked-patch MSE (B,) and the residual patches (B, n_patches, 3 * patch**2): the image
        minus its reconstruction on the masked patches, zero on visible ones, averaged over the masks."""
        config = self.config
        patches = patchify(pixels, config.patch_size)
        n_visible = config.n_visible(config.score_mask_ratio)
        if n_visible == 0:  # the paper's ratio 0.99 at 64 patches: every mask is empty, one pass suffices
            visible = torch.empty(len(keys), 0, dtype=torch.long, device=pixels.device)
            predicted = self._reconstruct(patches, embeddings, visible)
            return masked_patch_mse(predicted, patches, visible), patches - predicted
        seeds = key_seeds(keys, config.seed)
        total = torch.zeros(len(keys), device=pixels.device)
        residual = torch.zeros_like(patches)
        for k in range(config.score_masks):
            visible = keyed_visible(seeds, config.n_patches, n_visible, k).to(pixels.device)
            predicted = self._reconstruct(patches, embeddings, visible)
            total += masked_patch_mse(predicted, patches, visible)
            residual += (patches - predicted).scatter_(1, visible[..., None].expand(-1, -1, patches.shape[-1]), 0.0)
        return total / config.score_masks, residual / config.score_masks

    def _reconstruct(self, patches: torch.Tensor, embeddings: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        model = self.model
        autocast = self.precision == "bf16" and model is self.detector.model  # not a copy packed in bf16
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast):
            return model(patches, embeddings, visible).float()
