"""The baselines the detection sweep compares with DeDe, all "higher = more suspect", all batched.

They need no training: the embedding's L2 norm, kNN density of the embeddings (triggered images collapse
onto the attack's target embedding), and a masking-consistency score in the spirit of BackdoorIDS (a
backdoor holds under masking, so triggered embeddings barely drift). The sweep computes the first two per
window of the stream; the k-NN sparsity of Huang et al. is the library's own
(:func:`dedefilter.window.sparsity`), and DeDe's scores are the library's :class:`dedefilter.Scorer` and
:mod:`dedefilter.window`: nothing here re-implements them.
"""

from __future__ import annotations

from collections.abc import Callable

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from dedefilter.encoders import Encoder

BATCH = 500
KNN_K = 10
MASK_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5)  # progressive masking for the consistency baseline
MASK_VIEWS = 2  # random masks per ratio


@torch.inference_mode()
def over_batches(fn: Callable[[torch.Tensor, slice], torch.Tensor], pixels: torch.Tensor, device: str) -> np.ndarray:
    """Apply ``fn(batch_on_device, index_slice)`` over (N, 3, S, S) pixels; concatenated on the CPU."""
    out = [fn(pixels[i:i + BATCH].to(device), slice(i, i + BATCH)).float().cpu() for i in range(0, len(pixels), BATCH)]
    return torch.cat(out).numpy()


def embed(encoder: Encoder, pixels: torch.Tensor, device: str) -> np.ndarray:
    return over_batches(lambda batch, _: encoder.embed(batch), pixels, device)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


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
