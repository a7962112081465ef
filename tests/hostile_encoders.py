"""``module:factory`` encoders for the tests: a real CNN whose output is NaN or infinite for some
images, and the bundled backdoored encoder slowed down."""

from __future__ import annotations

import time

import torch

from dedefilter.encoders import SmallCNN, load_encoder


class NonFiniteForExtremes(SmallCNN):
    """NaN embeddings for bright images (mean > 0.3), +inf for dark ones (mean < 0.1): the failures a
    numerically unstable encoder shows on out-of-range inputs."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        embeddings = super().forward(images)
        brightness = images.mean(dim=(1, 2, 3))
        embeddings[brightness > 0.3] = float("nan")
        embeddings[brightness < 0.1] = float("inf")
        return embeddings


def non_finite_for_extremes() -> NonFiniteForExtremes:
    torch.manual_seed(0)
    return NonFiniteForExtremes()


class Slow(SmallCNN):
    """0.3 s more per forward pass, so a filter run lasts long enough to be killed half-way on any machine."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        time.sleep(0.3)
        return super().forward(images)


def slow_badencoder() -> Slow:
    """The bundled ``fmnist-badencoder`` weights in :class:`Slow`: the same fingerprint, so the same scores."""
    slow = Slow()
    slow.load_state_dict(load_encoder("fmnist-badencoder").module.state_dict())
    return slow


class ShapeBug(SmallCNN):
    """Raises on real batches (not on the adapter's 2-image probe), as a shape bug or a tensor out of memory
    would: an error in the work."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if len(images) <= 2:
            return super().forward(images)
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (16x256 and 255x64)")


def shape_bug_badencoder() -> ShapeBug:
    """The bundled ``fmnist-badencoder`` weights in :class:`ShapeBug`: the same fingerprint, so its detector loads."""
    broken = ShapeBug()
    broken.load_state_dict(load_encoder("fmnist-badencoder").module.state_dict())
    return broken
