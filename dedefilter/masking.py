"""Patch masks. Scoring masks are a pure function of (sample key, seed, mask index), so a sample's
score is the same in any worker, batch or order; training masks come from a seeded generator."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def key_seeds(keys: Sequence[str], seed: int) -> np.ndarray:
    """One 64-bit seed per sample key (BLAKE2b of seed and key; stable across processes and runs)."""
    prefix = f"{seed}\x00".encode()
    return np.array([int.from_bytes(hashlib.blake2b(prefix + k.encode(), digest_size=8).digest(), "little")
                     for k in keys], dtype=np.uint64)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def keyed_visible(seeds: np.ndarray, n_patches: int, n_visible: int, mask_index: int = 0) -> torch.Tensor:
    """(B, n_visible) indexes of the visible patches of each sample's ``mask_index``-th scoring mask."""
    with np.errstate(over="ignore"):
        counters = np.uint64(mask_index * n_patches) + np.arange(n_patches, dtype=np.uint64)
        draws = _splitmix64(seeds[:, None] * _GOLDEN + counters[None, :])
    order = np.argsort(draws, axis=1, kind="stable")[:, :n_visible]
    return torch.from_numpy(np.sort(order, axis=1).astype(np.int64))


def random_visible(batch: int, n_patches: int, n_visible: int, generator: torch.Generator) -> torch.Tensor:
    """(B, n_visible) random visible patch indexes for training."""
    return torch.rand(batch, n_patches, generator=generator).argsort(1)[:, :n_visible]
