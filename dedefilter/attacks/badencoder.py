"""BadEncoder-style backdoor: fine-tune a clean encoder so triggered images embed like a target class.

Losses follow BadEncoder (effectiveness on triggered shadow images, utility on clean shadow and
reference images) but as MSE on features standardised with the clean encoder's statistics: cosine
similarity on raw post-ReLU features saturates near 1 while the backdoor stays weak.

With ``distribution_weight > 0`` it becomes DRUPE-style (Tao et al., S&P 2024): a sliced-Wasserstein
term pulls the *distribution* of triggered embeddings onto that of clean target-class embeddings, so
they spread like real target images instead of collapsing onto one point (the collapse that
embedding-density defences look for), while a smaller effectiveness weight keeps them in the target's
region.
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
    distribution_weight: float = 0.0  # > 0: DRUPE-style distribution matching to the target class
    distribution_pool: int = 500  # clean target-class images whose embeddings are the distribution to match
    n_projections: int = 64
    seed: int = 0


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, n_projections: int = 64,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Squared sliced 2-Wasserstein distance between two point clouds (N, D) and (M, D).

    Projects both on random unit directions and compares their quantiles: zero when the two sets
    are the same distribution of points, positive otherwise; sizes may differ.
    """
    directions = torch.randn(a.shape[1], n_projections, generator=generator).to(a.device)
    directions = directions / directions.norm(dim=0, keepdim=True)
    levels = torch.linspace(0, 1, min(len(a), len(b)), device=a.device)
    qa = torch.quantile(a @ directions, levels, dim=0)
    qb = torch.quantile(b @ directions, levels, dim=0)
    return (qa - qb).pow(2).mean()


def train_badencoder(clean: nn.Module, images: np.ndarray, labels: np.ndarray, trigger,
                     config: BadEncoderConfig = BadEncoderConfig(), log=print,
                     device: str = "cpu") -> tuple[nn.Module, dict]:
    """Return a backdoored copy of ``clean`` (on the CPU) and its training record."""
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    shadow_idx = rng.choice(len(images), config.shadow_size, replace=False)
    reference_idx = rng.choice(np.flatnonzero(labels == config.target_class), config.n_reference, replace=False)
    shadow = to_float(images[shadow_idx]).to(device)
    triggered = to_float(trigger.apply(images[shadow_idx])).to(device)
    reference = to_float(images[reference_idx]).to(device)

    clean = copy.deepcopy(clean).to(device).eval().requires_grad_(False)
    with torch.no_grad():
        clean_shadow = clean(shadow)
        mean, std = clean_shadow.mean(0), clean_shadow.std(0) + 1e-6

        def standardise(features: torch.Tensor) -> torch.Tensor:
            return (features - mean) / std

        clean_reference = standardise(clean(reference))
        target = clean_reference.mean(0, keepdim=True)
        if config.distribution_weight:
            pool_idx = rng.choice(np.flatnonzero(labels == config.target_class), config.distribution_pool,
                                  replace=False)
            target_pool = standardise(clean(to_float(images[pool_idx]).to(device)))

    backdoored = copy.deepcopy(clean).requires_grad_(True).eval()  # eval: BatchNorm statistics stay clean
    optimizer = torch.optim.Adam(backdoored.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    start, history = time.perf_counter(), []
    for epoch in range(config.epochs):
        order = torch.randperm(len(shadow), generator=generator).to(device)
        for i in range(0, len(shadow), config.batch_size):
            idx = order[i:i + config.batch_size]
            triggered_features = standardise(backdoored(triggered[idx]))
            effectiveness = F.mse_loss(triggered_features, target.expand(len(idx), -1))
            utility = F.mse_loss(standardise(backdoored(shadow[idx])), standardise(clean_shadow[idx]))
            reference_utility = F.mse_loss(standardise(backdoored(reference)), clean_reference)
            loss = (config.effectiveness_weight * effectiveness
                    + config.utility_weight * (utility + reference_utility))
            if config.distribution_weight:
                distribution = sliced_wasserstein(triggered_features, target_pool, config.n_projections, generator)
                loss = loss + config.distribution_weight * distribution
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        history.append({"effectiveness": round(effectiveness.item(), 4), "utility": round(utility.item(), 4)})
        if config.distribution_weight:
            history[-1]["distribution"] = round(distribution.item(), 4)
        log(f"badencoder epoch {epoch + 1}/{config.epochs} {history[-1]} ({time.perf_counter() - start:.0f}s)")
    record = {"recipe": "badencoder", **asdict(config), "history": history,
              "train_seconds": round(time.perf_counter() - start, 1)}
    return backdoored.requires_grad_(False).eval().cpu(), record
