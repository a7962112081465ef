"""SimCLR pre-training for the small encoders the demo and benchmarks need (CPU, minutes).

Augmentations run batched on tensors (one affine grid per batch), not per image in PIL.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .encoders import SmallCNN, to_float


@dataclass(frozen=True)
class SimCLRConfig:
    epochs: int = 4
    batch_size: int = 256
    lr: float = 1e-3
    temperature: float = 0.5
    projection_dim: int = 128
    min_crop_scale: float = 0.2
    seed: int = 0


def augment(images: torch.Tensor, generator: torch.Generator, min_scale: float = 0.2) -> torch.Tensor:
    """Random resized crop, horizontal flip and brightness jitter for a whole batch at once."""
    n = images.shape[0]
    rand = torch.rand(n, 5, generator=generator).to(images.device)  # CPU draws: same views on any device
    scale = (min_scale + (1 - min_scale) * rand[:, 0]).sqrt()
    aspect = torch.exp((rand[:, 1] - 0.5) * 0.575)  # log-uniform in (3/4, 4/3)
    sx = (scale * aspect.sqrt()).clamp(max=1.0)
    sy = (scale / aspect.sqrt()).clamp(max=1.0)
    tx = (rand[:, 2] * 2 - 1) * (1 - sx)
    ty = (rand[:, 3] * 2 - 1) * (1 - sy)
    flip = torch.where(rand[:, 4] < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=images.device)
    theta[:, 0, 0] = sx * flip
    theta[:, 0, 2] = tx
    theta[:, 1, 1] = sy
    theta[:, 1, 2] = ty
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    views = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    brightness = 0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=generator).to(images.device)
    return (views * brightness).clamp_(0, 1)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalised temperature-scaled cross-entropy over 2N views."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    n = z1.shape[0]
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, targets)


def train_simclr(images: np.ndarray, config: SimCLRConfig = SimCLRConfig(), log=print,
                 init: SmallCNN | None = None, device: str = "cpu") -> tuple[SmallCNN, dict]:
    """Train a :class:`SmallCNN` with SimCLR on uint8 images; returns it (on the CPU) and its training record.

    ``init`` continues pretraining from a copy of that encoder (with a fresh projection head) instead
    of a random one: how the SSL-poisoning attacks stay affordable on a CPU.
    """
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    encoder = SmallCNN() if init is None else copy.deepcopy(init).requires_grad_(True)
    encoder.train()
    head = nn.Sequential(nn.Linear(encoder.embed_dim, encoder.embed_dim), nn.ReLU(),
                         nn.Linear(encoder.embed_dim, config.projection_dim))
    encoder, head = encoder.to(device), head.to(device)
    optimizer = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=config.lr)
    data = to_float(images).to(device)
    start, losses = time.perf_counter(), []
    for epoch in range(config.epochs):
        order = torch.randperm(len(data), generator=generator).to(device)
        total = 0.0
        for i in range(0, len(data) - config.batch_size + 1, config.batch_size):
            batch = data[order[i:i + config.batch_size]]
            v1 = augment(batch, generator, config.min_crop_scale)
            v2 = augment(batch, generator, config.min_crop_scale)
            loss = nt_xent(head(encoder(v1)), head(encoder(v2)), config.temperature)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.detach()
        losses.append(float(total) / (len(data) // config.batch_size))
        log(f"simclr epoch {epoch + 1}/{config.epochs} loss {losses[-1]:.4f} ({time.perf_counter() - start:.0f}s)")
    record = {"recipe": "simclr", **asdict(config), "n_images": len(images), "losses": losses,
              "train_seconds": round(time.perf_counter() - start, 1)}
    return encoder.eval().cpu(), record
