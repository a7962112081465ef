"""Triggers that attacks paste into images (evaluation only: the filter itself never sees them)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class PatchTrigger:
    """A black/white checkerboard patch pasted at a fixed corner position (BadEncoder-style).

    ``size`` pixels square, checker cells of ``cell`` pixels, top-left corner at (``y``, ``x``) of the
    32x32 image. The default sits inside Fashion-MNIST's 28x28 content area, bottom right.
    """

    size: int = 6
    cell: int = 2
    y: int = 24
    x: int = 24

    def pattern(self) -> np.ndarray:
        idx = np.arange(self.size) // self.cell
        return np.where((idx[:, None] + idx[None, :]) % 2 == 0, 255, 0).astype(np.uint8)

    def apply(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 -> a triggered copy; pixels outside the patch are untouched."""
        triggered = images.copy()
        triggered[:, self.y:self.y + self.size, self.x:self.x + self.size, :] = self.pattern()[..., None]
        return triggered

    def describe(self) -> dict:
        return {"kind": "patch", **asdict(self)}

    @classmethod
    def from_description(cls, description: dict) -> PatchTrigger:
        """The inverse of :meth:`describe` (as stored in an encoder card)."""
        return cls(**{k: v for k, v in description.items() if k != "kind"})


def poison(images: np.ndarray, labels: np.ndarray, fraction: float, target: int, trigger: PatchTrigger,
           rng: np.random.Generator) -> np.ndarray:
    """Paste the trigger, in place, on ``fraction`` of all images drawn from non-target classes; returns the mask."""
    chosen = rng.choice(np.flatnonzero(labels != target), round(fraction * len(images)), replace=False)
    mask = np.zeros(len(images), bool)
    mask[chosen] = True
    images[mask] = trigger.apply(images[mask])
    return mask
