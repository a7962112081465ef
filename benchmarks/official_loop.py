"""The official DeDe scoring loop, re-implemented as the reference the filter is measured against.

tardisblue9/DeDe ``utils.MAE_error`` (called by ``downstream_evaluation.py`` with ``save_cuda=False``)
scores a dataset like this: for each DataLoader batch run the encoder, run the MAE with a fresh random
mask per sample (``PatchShuffle``: one ``np.random.shuffle`` per sample), paste the visible patches
back, keep a grid of [masked, reconstruction, original] images for every batch until the end, and
compute each sample's error in a Python loop with ``.item()``. Its error is the sum of squared errors
over the masked pixels: ``3 * patch**2 * n_masked`` times dedefilter's per-pixel mean score.

Here the same loop drives dedefilter's own encoder and DeDe model, so the comparison measures the
loop, not a different network.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch

from dedefilter.config import DeDeConfig
from dedefilter.model import DeDeModel, patchify, unpatchify


def shuffled_visible(batch: int, n_patches: int, n_visible: int) -> torch.Tensor:
    """The official ``PatchShuffle``: a forward and backward permutation drawn per sample from numpy's global RNG."""
    forward_indexes = []
    for _ in range(batch):
        forward = np.arange(n_patches)
        np.random.shuffle(forward)
        np.argsort(forward)  # the backward indexes the official model also builds
        forward_indexes.append(forward)
    return torch.as_tensor(np.stack(forward_indexes)[:, :n_visible], dtype=torch.long)


@torch.no_grad()
def official_errors(batches: Iterable[torch.Tensor], embed: Callable[[torch.Tensor], torch.Tensor],
                    model: DeDeModel, config: DeDeConfig,
                    visible: Callable[[int], torch.Tensor] | None = None,
                    device: str | torch.device = "cpu") -> tuple[list[float], list[torch.Tensor]]:
    """Errors of float image batches (B, 3, S, S) the official way; also returns the kept image grids.

    ``visible(batch_size)`` gives the visible patch indexes; by default the official random draw.
    """
    n_visible = config.n_visible(config.score_mask_ratio)
    visible = visible or (lambda b: shuffled_visible(b, config.n_patches, n_visible))
    model.eval()
    errors: list[float] = []
    grids: list[torch.Tensor] = []
    for images in batches:
        images = images.to(device)
        features = embed(images)
        patches = patchify(images, config.patch_size)
        shown = visible(len(images)).to(device)
        predicted = unpatchify(model(patches, features, shown), config.patch_size)
        masked = torch.ones(patches.shape[:2], device=device).scatter_(1, shown, 0.0)
        mask = unpatchify(masked.unsqueeze(-1).expand_as(patches), config.patch_size)
        predicted = predicted * mask + images * (1 - mask)
        grids.append(torch.cat([images * (1 - mask), predicted, images]))
        for i in range(images.shape[0]):
            error = torch.sum((images[i] - predicted[i]) ** 2)
            errors.append(error.item())
    return errors, grids
