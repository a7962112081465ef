"""Triggers that attacks paste into images (evaluation only: the filter itself never sees them).

Every trigger is a frozen dataclass: ``apply`` maps uint8 images (N, H, W, 3) to a triggered copy and is
deterministic (no RNG at apply time; a seeded pattern is drawn from the trigger's own seed), and
``describe`` / :func:`trigger_from_description` round-trip it through an encoder card.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np


class Trigger(Protocol):
    def apply(self, images: np.ndarray) -> np.ndarray: ...

    def describe(self) -> dict: ...


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


@dataclass(frozen=True)
class BlendTrigger:
    """A fixed noise image blended over the whole image: ``(1 - alpha) * x + alpha * pattern`` (Chen et al.).

    The pattern is uniform noise drawn from ``seed``; ``gray`` repeats one noise channel over RGB so
    Fashion-MNIST's gray images stay gray (a coloured pattern would be an out-of-distribution cue that
    any colour check catches, not a test of the detector).
    """

    alpha: float = 0.2
    seed: int = 0
    size: int = 32
    gray: bool = True

    def pattern(self) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        noise = rng.integers(0, 256, (self.size, self.size, 1 if self.gray else 3)).astype(np.float32)
        return np.broadcast_to(noise, (self.size, self.size, 3))

    def apply(self, images: np.ndarray) -> np.ndarray:
        """(N, size, size, 3) uint8 -> a blended copy; each pixel moves by at most alpha * 255 (+ rounding)."""
        blended = (1 - self.alpha) * images.astype(np.float32) + self.alpha * self.pattern()
        return np.clip(np.rint(blended), 0, 255).astype(np.uint8)

    def describe(self) -> dict:
        return {"kind": "blend", **asdict(self)}

    @classmethod
    def from_description(cls, description: dict) -> BlendTrigger:
        return cls(**{k: v for k, v in description.items() if k != "kind"})


def dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix C: ``C @ x`` is the DCT of x, ``C.T @ y`` its inverse."""
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    matrix = np.sqrt(2 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
    matrix[0] /= np.sqrt(2)
    return matrix


def rgb_to_ycbcr(rgb: np.ndarray) -> np.ndarray:
    """Full-range (JPEG) YCbCr of float RGB in [0, 255], channel last."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = 128 - 0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 128 + 0.5 * r - 0.418688 * g - 0.081312 * b
    return np.stack([y, cb, cr], axis=-1)


def ycbcr_to_rgb(ycbcr: np.ndarray) -> np.ndarray:
    y, cb, cr = ycbcr[..., 0], ycbcr[..., 1] - 128, ycbcr[..., 2] - 128
    return np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], axis=-1)


@dataclass(frozen=True)
class CTRLTrigger:
    """CTRL's frequency-domain trigger (Li et al., ICCV 2023): in YCbCr, add ``magnitude`` to fixed
    DCT coefficients of each ``window`` x ``window`` block of the chosen channels, then back to RGB.

    CTRL puts it in the chroma channels (Cb, Cr) of colour images. Fashion-MNIST is one gray channel
    repeated (Cb = Cr = 128 everywhere), so a chroma trigger would paint colour no clean image has: an
    out-of-distribution cue a colour check catches, not an invisible trigger. The default therefore
    uses the luma channel Y, which keeps images gray; pass ``channels=(1, 2)`` for CTRL's chroma
    version on RGB data. Coefficient (15, 15) is a mid-high and (31, 31) the highest frequency of a
    32-block, as in CTRL. Each coefficient moves a pixel by at most ``magnitude * 2 / window``; pixels
    pushed below 0 or above 255 are clipped (on Fashion-MNIST's black background half the pattern is).
    """

    magnitude: float = 50.0
    positions: tuple[tuple[int, int], ...] = ((15, 15), (31, 31))
    channels: tuple[int, ...] = (0,)  # 0 = Y, 1 = Cb, 2 = Cr
    window: int = 32

    def pattern(self) -> np.ndarray:
        """The additive (window, window) change to each chosen channel: inverse DCT of the spikes."""
        spikes = np.zeros((self.window, self.window))
        for u, v in self.positions:
            spikes[u, v] = self.magnitude
        c = dct_matrix(self.window)
        return c.T @ spikes @ c

    def apply(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 with H, W multiples of ``window`` -> a triggered copy."""
        _, h, w, _ = images.shape
        if h % self.window or w % self.window:
            raise ValueError(f"CTRL trigger needs image sides divisible by window {self.window}, got {h}x{w}")
        ycbcr = rgb_to_ycbcr(images.astype(np.float64))
        tiled = np.tile(self.pattern(), (h // self.window, w // self.window))
        for channel in self.channels:
            ycbcr[..., channel] += tiled
        return np.clip(np.rint(ycbcr_to_rgb(ycbcr)), 0, 255).astype(np.uint8)

    def describe(self) -> dict:
        return {"kind": "ctrl", "magnitude": self.magnitude, "positions": [list(p) for p in self.positions],
                "channels": list(self.channels), "window": self.window}

    @classmethod
    def from_description(cls, description: dict) -> CTRLTrigger:
        return cls(magnitude=float(description["magnitude"]),
                   positions=tuple(tuple(int(i) for i in p) for p in description["positions"]),
                   channels=tuple(int(c) for c in description["channels"]), window=int(description["window"]))


TRIGGERS = {"patch": PatchTrigger, "blend": BlendTrigger, "ctrl": CTRLTrigger}


def trigger_from_description(description: dict) -> Trigger:
    """Rebuild any trigger from its :meth:`describe` dict (as stored in an encoder card)."""
    kind = description.get("kind")
    if kind not in TRIGGERS:
        raise ValueError(f"unknown trigger kind {kind!r}; known: {sorted(TRIGGERS)}")
    return TRIGGERS[kind].from_description(description)


def poison(images: np.ndarray, labels: np.ndarray, fraction: float, target: int, trigger: Trigger,
           rng: np.random.Generator) -> np.ndarray:
    """Paste the trigger, in place, on ``fraction`` of all images drawn from non-target classes; returns the mask."""
    chosen = rng.choice(np.flatnonzero(labels != target), round(fraction * len(images)), replace=False)
    mask = np.zeros(len(images), bool)
    mask[chosen] = True
    images[mask] = trigger.apply(images[mask])
    return mask


def poison_target_class(images: np.ndarray, labels: np.ndarray, fraction: float, target: int, trigger: Trigger,
                        rng: np.random.Generator) -> np.ndarray:
    """SSL data poisoning: paste the trigger, in place, on ``fraction`` of all images, drawn from the
    target class (the pretraining then ties the trigger to target-class content); returns the mask."""
    candidates = np.flatnonzero(labels == target)
    count = round(fraction * len(images))
    if count > len(candidates):
        raise ValueError(f"poison fraction {fraction} needs {count} target-class images, only {len(candidates)} exist")
    mask = np.zeros(len(images), bool)
    mask[rng.choice(candidates, count, replace=False)] = True
    images[mask] = trigger.apply(images[mask])
    return mask
