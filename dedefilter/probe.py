"""Linear probe on frozen features: the measurement that tells whether a backdoor is real."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .encoders import Encoder, embed_array


def train_linear_probe(features: torch.Tensor, labels: torch.Tensor, epochs: int = 200,
                       seed: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    """Multinomial logistic regression on standardised features (full batch, Adam); returns a predictor."""
    torch.manual_seed(seed)
    mean, std = features.mean(0), features.std(0) + 1e-6
    x = (features - mean) / std
    n_classes = int(labels.max()) + 1
    layer = torch.nn.Linear(x.shape[1], n_classes)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(epochs):
        loss = F.cross_entropy(layer(x), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def predict(new_features: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return layer((new_features - mean) / std).argmax(1)

    return predict


def backdoor_report(encoder: Encoder, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                    test_y: np.ndarray, trigger, target_class: int) -> dict:
    """Clean accuracy of a linear probe, and its attack success rate (ASR): the share of triggered
    non-target-class test images it assigns to the target class."""
    predict = train_linear_probe(embed_array(encoder, train_x), torch.as_tensor(train_y))
    clean_pred = predict(embed_array(encoder, test_x)).numpy()
    source = test_y != target_class
    triggered_pred = predict(embed_array(encoder, trigger.apply(test_x[source]))).numpy()
    return {"clean_accuracy": round(float((clean_pred == test_y).mean()), 4),
            "asr": round(float((triggered_pred == target_class).mean()), 4),
            "n_probe_train": len(train_x), "n_test": len(test_x), "n_triggered": int(source.sum())}
