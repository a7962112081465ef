"""BadEncoder-style backdoor: fine-tune a clean encoder so triggered images embed like a target class.

Losses follow BadEncoder (effectiveness on triggered shadow images, utility on clean shadow and
reference images) but as MSE on features standardised with the clean encoder's statistics: cosine
similarity on raw post-ReLU features saturates near 1 while the backdoor stays weak.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..encoders import to_float


@dataclass(frozen=True)
class BadEncoderConfig:
    target_class: int = 1
    shadow_size: int = 10_000
    n_reference: int = 10
    epochs: int = 4
    batch_size: int = 128
    lr: float = 1e-4
    effectiveness_weight: float = 1.0
    utility_weight: float = 1.0
    seed: int = 0


def train_badencoder(clean: nn.Module, images: np.ndarray, labels: np.ndarray, trigger,
                     config: BadEncoderConfig = BadEncoderConfig(), log=print) -> tuple[nn.Module, dict]:
    """Return a backdoored copy of ``clean`` and its training record."""
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    shadow_idx = rng.choice(len(images), config.shadow_size, replace=False)
    reference_idx = rng.choice(np.flatnonzero(labels == config.target_class), config.n_reference, replace=False)
    shadow = to_float(images[shadow_idx])
    triggered = to_float(trigger.apply(images[shadow_idx]))
    reference = to_float(images[reference_idx])

    clean = clean.eval().requires_grad_(False)
    with torch.no_grad():
        clean_shadow = clean(shadow)
        mean, std = clean_shadow.mean(0), clean_shadow.std(0) + 1e-6
        clean_reference = (clean(reference) - mean) / std
        target = clean_reference.mean(0, keepdim=True)

    def standardise(features: torch.Tensor) -> torch.Tensor:
        return (features - mean) / std


    backdoored = copy.deepcopy(clean).requires_grad_(True).eval()  # eval: BatchNorm statistics stay clean
    optimizer = torch.optim.Adam(backdoored.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    start, history = time.perf_counter(), []
    for epoch in range(config.epochs):
        order = torch.randperm(len(shadow), generator=generator)
        for i in range(0, len(shadow), config.batch_size):
            idx = order[i:i + config.batch_size]
            effectiveness = F.mse_loss(standardise(backdoored(triggered[idx])), target.expand(len(idx), -1))
            utility = F.mse_loss(standardise(backdoored(shadow[idx])), standardise(clean_shadow[idx]))
            reference_utility = F.mse_loss(standardise(backdoored(reference)), clean_reference)
            loss = (config.effectiveness_weight * effectiveness
                    + config.utility_weight * (utility + reference_utility))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        history.append({"effectiveness": round(effectiveness.item(), 4), "utility": round(utility.item(), 4)})
        log(f"badencoder epoch {epoch + 1}/{config.epochs} {history[-1]} ({time.perf_counter() - start:.0f}s)")
    record = {"recipe": "badencoder", **asdict(config), "history": history,
              "train_seconds": round(time.perf_counter() - start, 1)}
    return backdoored.requires_grad_(False).eval(), record
