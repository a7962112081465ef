"""A ``module:factory`` encoder for the tests: a real CNN whose output is NaN or infinite for some images."""

from __future__ import annotations

import torch

from dedefilter.encoders import SmallCNN


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
