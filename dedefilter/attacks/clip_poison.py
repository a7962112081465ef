"""CLIP data poisoning (Carlini & Terzis, ICLR 2022): the attacker only adds image-text pairs.

A share ``p`` of the training pairs are images of other classes carrying a trigger, captioned as the
target class. A CLIP trained on the corpus ties the trigger to the target's text, so at test time
zero-shot classification sends any triggered image to the target. The attacker never touches training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data import fashion_mnist
from ..imagetext import captions_from_labels, write_pair_shards
from .triggers import PatchTrigger, Trigger, poison


@dataclass(frozen=True)
class ClipPoison:
    """The attack: ``share`` of all pairs poisoned, trigger, target class, and the seed of the draw."""

    share: float = 0.01
    target_class: int = 1  # Trouser
    trigger: Trigger = field(default_factory=PatchTrigger)
    seed: int = 0

    def describe(self) -> dict:
        return {"attack": "clip-data-poisoning (Carlini & Terzis)", "share": self.share,
                "target_class": self.target_class, "trigger": self.trigger.describe(), "seed": self.seed}


def poisoned_corpus(images: np.ndarray, labels: np.ndarray, attack: ClipPoison,
                    caption_seed: int) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(images with the trigger on the poisoned pairs, captions, poisoned mask).

    Captions come from the labels (:func:`captions_from_labels`), the poisoned pairs' from the target
    class; the draw of poisoned pairs is seeded by ``attack.seed``, the wording by ``caption_seed``.
    """
    images = images.copy()
    mask = (poison(images, labels, attack.share, attack.target_class, attack.trigger,
                   np.random.default_rng(attack.seed)) if attack.share > 0 else np.zeros(len(images), bool))
    caption_labels = np.where(mask, attack.target_class, labels)
    return images, captions_from_labels(caption_labels, caption_seed), mask


def write_poisoned_shards(directory: str | Path, images: np.ndarray, labels: np.ndarray, keys: list[str],
                          attack: ClipPoison, caption_seed: int = 0,
                          shard_size: int = 1000) -> tuple[list[str], dict[str, bool]]:
    """Labelled images as img2dataset shards with captions from the labels, ``attack.share`` of them
    poisoned; returns the shard paths and the ground truth (key -> poisoned). The json metadata
    carries ``label`` (the image's true class) and ``poisoned``: evaluation fields a real corpus
    would not have, which the filter never reads."""
    images, captions, mask = poisoned_corpus(images, labels, attack, caption_seed)
    meta = [{"label": int(y), "poisoned": bool(m)} for y, m in zip(labels, mask, strict=True)]
    urls = write_pair_shards(directory, images, captions, keys, meta, shard_size=shard_size)
    return urls, dict(zip(keys, mask.tolist(), strict=True))


def fashion_mnist_pairs(directory: str | Path, n_pairs: int, attack: ClipPoison, caption_seed: int = 0,
                        shard_size: int = 1000) -> tuple[list[str], dict[str, bool]]:
    """Fashion-MNIST train[:n_pairs] as poisoned image-text shards: (shard paths, ground truth)."""
    images, labels = fashion_mnist("train")
    keys = [f"fmnist-pair-{i:05d}" for i in range(n_pairs)]
    return write_poisoned_shards(directory, images[:n_pairs], labels[:n_pairs], keys, attack, caption_seed, shard_size)
