"""Scores compared by the detection benchmark, all "higher = more suspect", all batched.

Baselines need no training: the embedding's L2 norm, kNN density of the embeddings over the scored
set (triggered images collapse onto the attack's target embedding), and a masking-consistency score in
the spirit of BackdoorIDS (a backdoor holds under masking, so triggered embeddings barely drift).
DeDe variants use a trained detector: the paper's masked pixel error, its mean over K masks, an
embedding-space consistency score, a differential score, a spectral score of the reconstruction
residuals, and z-score combinations with the baselines.
"""

from __future__ import annotations

from collections.abc import Callable

import faiss
import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from dedefilter.config import DeDeConfig
from dedefilter.detector import Detector
from dedefilter.encoders import Encoder
from dedefilter.masking import key_seeds, keyed_visible
from dedefilter.model import masked_patch_mse, patchify, unpatchify
from dedefilter.scoring import Scorer

BATCH = 500
KNN_K = 10
MASK_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5)  # progressive masking for the consistency baseline
MASK_VIEWS = 2  # random masks per ratio
SCORE_MASKS = 8  # K of the "mean over K masks" variant
SPECTRAL_K = 3  # principal directions of the stream's residuals in the spectral score


@torch.inference_mode()
def over_batches(fn: Callable[[torch.Tensor, slice], torch.Tensor], pixels: torch.Tensor, device: str) -> np.ndarray:
    """Apply ``fn(batch_on_device, index_slice)`` over (N, 3, S, S) pixels; concatenated on the CPU."""
    out = [fn(pixels[i:i + BATCH].to(device), slice(i, i + BATCH)).float().cpu() for i in range(0, len(pixels), BATCH)]
    return torch.cat(out).numpy()


def embed(encoder: Encoder, pixels: torch.Tensor, device: str) -> np.ndarray:
    return over_batches(lambda batch, _: encoder.embed(batch), pixels, device)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# ---------- baselines ----------

def l2_norm(embeddings: np.ndarray) -> np.ndarray:
    """The embedding's norm (backdoored encoders often map triggered images to an unusual norm)."""
    return np.linalg.norm(embeddings, axis=1)


def nearest_in_stream(stream: np.ndarray, queries: np.ndarray | None = None,
                      k: int = KNN_K) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarities to, and ids of, the k nearest stream embeddings of each query (of each
    stream embedding when ``queries`` is None, itself excluded)."""
    index = faiss.IndexFlatIP(stream.shape[1])
    index.add(np.ascontiguousarray(unit(stream), np.float32))
    if queries is None:
        similarity, ids = index.search(np.ascontiguousarray(unit(stream), np.float32), k + 1)
        return similarity[:, 1:], ids[:, 1:]
    return index.search(np.ascontiguousarray(unit(queries), np.float32), k)


def knn_density(stream: np.ndarray, queries: np.ndarray | None = None, k: int = KNN_K) -> np.ndarray:
    """Minus the mean cosine distance to the k nearest stream embeddings: high where embeddings crowd
    together, as triggered ones do around the target."""
    similarity, _ = nearest_in_stream(stream, queries, k)
    return -(1 - similarity).mean(1)


def patch_masks(n: int, ratio: float, generator: torch.Generator, size: int = 32, patch: int = 4) -> torch.Tensor:
    """(n, 1, size, size) binary masks that zero a ``ratio`` share of the patches at random."""
    grid = (torch.rand(n, 1, size // patch, size // patch, generator=generator) >= ratio).float()
    return F.interpolate(grid, scale_factor=patch, mode="nearest")


def masking_consistency(encoder: Encoder, pixels: torch.Tensor, device: str, seed: int = 0) -> np.ndarray:
    """Minus the mean embedding drift (1 - cosine) under progressively heavier random patch masking."""
    generator = torch.Generator().manual_seed(seed)
    masks = [[patch_masks(len(pixels), ratio, generator) for _ in range(MASK_VIEWS)] for ratio in MASK_RATIOS]

    def drift(batch: torch.Tensor, rows: slice) -> torch.Tensor:
        reference = F.normalize(encoder.embed(batch), dim=1)
        total = torch.zeros(len(batch), device=batch.device)
        for views in masks:
            for mask in views:
                masked = F.normalize(encoder.embed(batch * mask[rows].to(batch.device)), dim=1)
                total += 1 - (masked * reference).sum(1)
        return -total / (len(MASK_RATIOS) * MASK_VIEWS)

    return over_batches(drift, pixels, device)


# ---------- DeDe variants ----------

class DeDeVariants:
    """Per-sample scores of one trained DeDe model (on ``device``) for a frozen encoder."""

    def __init__(self, detector: Detector, encoder: Encoder, device: str):
        self.scorer = Scorer(encoder, detector, device)  # the product's scorer: the paper score is what `filter` runs
        self.model = detector.model.to(device).eval()
        self.encoder = encoder
        self.config: DeDeConfig = detector.config
        self.device = device

    def _error(self, batch: torch.Tensor, embeddings: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        patches = patchify(batch, self.config.patch_size)
        return masked_patch_mse(self.model(patches, embeddings, visible), patches, visible)

    def _no_visible(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.empty(len(batch), 0, dtype=torch.long, device=batch.device)

    def paper(self, pixels: torch.Tensor, keys: list[str]) -> np.ndarray:
        """The paper's score, as the filter computes it (:meth:`dedefilter.Scorer.score_pixels`)."""
        return np.concatenate([self.scorer.score_pixels(pixels[i:i + BATCH], keys[i:i + BATCH]).scores
                               for i in range(0, len(pixels), BATCH)])

    def residuals(self, pixels: torch.Tensor) -> np.ndarray:
        """(N, C*S*S) image minus its reconstruction in the paper's setting (the paper score is their mean square)."""

        def residual(batch: torch.Tensor, _: slice) -> torch.Tensor:
            patches = patchify(batch, self.config.patch_size)
            predicted = self.model(patches, self.encoder.embed(batch), self._no_visible(batch))
            return (batch - unpatchify(predicted, self.config.patch_size)).flatten(1)

        return over_batches(residual, pixels, self.device)

    def mean_over_masks(self, pixels: torch.Tensor, keys: list[str]) -> np.ndarray:
        """Mean masked MSE over K key-seeded masks at the training ratio 0.9 (6 patches visible)."""
        seeds = key_seeds(keys, self.config.seed)
        n_visible = self.config.n_visible(self.config.train_mask_ratio)

        def score(batch: torch.Tensor, rows: slice) -> torch.Tensor:
            embeddings = self.encoder.embed(batch)
            total = torch.zeros(len(batch), device=batch.device)
            for k in range(SCORE_MASKS):
                visible = keyed_visible(seeds[rows], self.config.n_patches, n_visible, k).to(batch.device)
                total += self._error(batch, embeddings, visible)
            return total / SCORE_MASKS

        return over_batches(score, pixels, self.device)

    def embedding_consistency(self, pixels: torch.Tensor) -> np.ndarray:
        """1 - cos(E(x), E(reconstruction of x)): does the image the embedding describes embed back to it?"""

        def score(batch: torch.Tensor, _: slice) -> torch.Tensor:
            embeddings = self.encoder.embed(batch)
            patches = patchify(batch, self.config.patch_size)
            predicted = self.model(patches, embeddings, self._no_visible(batch))
            image = unpatchify(predicted, self.config.patch_size).clamp(0, 1)
            return 1 - F.cosine_similarity(self.encoder.embed(image), embeddings, dim=1)

        return over_batches(score, pixels, self.device)

    def differential(self, pixels: torch.Tensor, kernel: int = 3, sigma: float = 1.0) -> np.ndarray:
        """Error from E(x) minus error from E(blurred x): a blur breaks high-frequency triggers, so a
        triggered image's blurred embedding describes it better; hard-to-reconstruct clean images
        are hard from both and cancel out."""

        def score(batch: torch.Tensor, _: slice) -> torch.Tensor:
            own = self._error(batch, self.encoder.embed(batch), self._no_visible(batch))
            blurred = self.encoder.embed(TF.gaussian_blur(batch, kernel, sigma))
            return own - self._error(batch, blurred, self._no_visible(batch))

        return over_batches(score, pixels, self.device)


def with_neighbours(scores: tuple[np.ndarray, np.ndarray], stream: np.ndarray, reference: np.ndarray,
                    k: int = KNN_K) -> tuple[np.ndarray, np.ndarray]:
    """A score plus its mean over the sample's k nearest stream embeddings (a reference image's
    neighbours are stream images too, so it is calibrated like a clean stream image).

    A backdoored encoder maps triggered images onto one target embedding, so a triggered image's
    neighbours are triggered and its noisy pixel error is averaged with theirs; a clean image that is
    merely hard to reconstruct has clean neighbours."""
    own, own_reference = scores
    _, ids = nearest_in_stream(stream, None, k)
    _, reference_ids = nearest_in_stream(stream, reference, k)
    return own + own[ids].mean(1), own_reference + own[reference_ids].mean(1)


def residual_spectrum(stream: np.ndarray, reference: np.ndarray,
                      k: int = SPECTRAL_K) -> tuple[np.ndarray, np.ndarray]:
    """Log energy of each residual in the top-k principal directions of the stream's residuals, centred
    on the clean reference's mean residual, each direction scaled by its spread over the reference.

    The decoder never draws a trigger (the embedding describes the target, not the patch or the noise),
    so every triggered image leaves the same pattern in its residual at the same place; when enough of
    the stream is triggered that shared pattern is a top direction (spectral signatures, Tran et al.
    2018), while a clean residual's error is spread over many directions."""
    centre = reference.mean(0)
    _, _, directions = np.linalg.svd(stream - centre, full_matrices=False)
    stream_projection, reference_projection = ((x - centre) @ directions[:k].T for x in (stream, reference))
    spread = reference_projection.std(0) + 1e-12
    return tuple(np.log(((p / spread) ** 2).sum(1) + 1e-6) for p in (stream_projection, reference_projection))


def zscore_sum(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Combine scores as the sum of their z-scores, each standardised on its clean reference scores.

    ``parts`` holds (stream scores, reference scores) pairs; returns the combined (stream, reference)."""
    stream = sum((s - r.mean()) / (r.std() + 1e-12) for s, r in parts)
    reference = sum((r - r.mean()) / (r.std() + 1e-12) for _, r in parts)
    return stream, reference
