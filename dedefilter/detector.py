"""A trained detector: the DeDe model, its config, its threshold and the encoder it belongs to.

Checkpoints hold only tensors and plain values and load with ``weights_only=True``, so a file from a
stranger cannot run code; a detector made for another encoder is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path

import torch

from .calibration import Threshold
from .config import DeDeConfig
from .model import DeDeModel

CHECKPOINT_FORMAT = "dedefilter-detector/1"


class CheckpointError(ValueError):
    """A checkpoint is unreadable, not ours, or made for another encoder."""


@dataclass
class Detector:
    model: DeDeModel
    encoder_name: str
    encoder_fingerprint: str
    threshold: Threshold | None = None
    record: dict | None = None

    @property
    def config(self) -> DeDeConfig:
        return self.model.config

    @cached_property
    def model_id(self) -> str:
        """Identifies the weights and the encoder they were trained for, so every Parquet row says which
        model scored it. Hashed once (28 MB at the paper's size): a detector's weights are frozen."""
        digest = hashlib.sha256(self.encoder_fingerprint.encode())
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().contiguous().numpy().tobytes())
        return f"dede-{digest.hexdigest()[:12]}"

    def with_threshold(self, threshold: Threshold) -> Detector:
        return replace(self, threshold=threshold)

    def save(self, path: str | Path) -> None:
        torch.save({
            "format": CHECKPOINT_FORMAT,
            "config": asdict(self.config),
            "embed_dim": self.model.project.in_features,
            "state_dict": self.model.state_dict(),
            "encoder_name": self.encoder_name,
            "encoder_fingerprint": self.encoder_fingerprint,
            "threshold": json.dumps(self.threshold.to_dict() if self.threshold else None),
            "record": json.dumps(self.record or {}),
        }, path)

    @classmethod
    def load(cls, path: str | Path, encoder_fingerprint: str | None = None) -> Detector:
        """Load a checkpoint; with ``encoder_fingerprint``, refuse one trained for another encoder."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"detector checkpoint {path} does not exist")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle, zip and torch raise many types for a bad file
            raise CheckpointError(f"{path} is not a loadable dedefilter detector checkpoint "
                                  f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
        if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path} is not a dedefilter detector checkpoint (format {CHECKPOINT_FORMAT!r})")
        if encoder_fingerprint is not None and checkpoint["encoder_fingerprint"] != encoder_fingerprint:
            raise CheckpointError(
                f"{path} was trained for encoder {checkpoint['encoder_name']!r} "
                f"(fingerprint {checkpoint['encoder_fingerprint']}), not for the given encoder "
                f"(fingerprint {encoder_fingerprint}): train a detector for this encoder with `dedefilter train`")
        try:
            model = DeDeModel(DeDeConfig(**checkpoint["config"]), checkpoint["embed_dim"])
            model.load_state_dict(checkpoint["state_dict"])
        except (TypeError, RuntimeError) as err:
            raise CheckpointError(f"{path}: config or weights do not match the DeDe model: {err}") from None
        threshold = json.loads(checkpoint["threshold"])
        return cls(model=model.eval(), encoder_name=checkpoint["encoder_name"],
                   encoder_fingerprint=checkpoint["encoder_fingerprint"],
                   threshold=Threshold(**threshold) if threshold else None,
                   record=json.loads(checkpoint["record"]))
