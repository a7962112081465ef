"""A trained detector: the DeDe model, its config, its threshold and the encoder it belongs to.

Two resolutions live in a checkpoint: the decoder's (``config.image_size``, ``config.patch_size``) and
the encoder's input it was trained with (:class:`~dedefilter.encoders.EncoderInput`; checkpoints from
before it was recorded use the encoder's own, which was 32x32 for every encoder they could be made for).
The window rule (:class:`~dedefilter.window.WindowRule`) its threshold was calibrated with is stored too,
with its clean reference images' embeddings and paper scores when it has them (float32 tensors beside the
rule), so the filter decides as calibration did; a rule with other settings than this version's (made by
another version) cannot be rebuilt, so that threshold is dropped, with a warning, and must be calibrated
again. Checkpoints hold only tensors and plain values and load with ``weights_only=True``, so a file from
a stranger cannot run code; a detector made for another encoder is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path

import torch

from .calibration import Threshold
from .config import DeDeConfig
from .encoders import EncoderInput
from .model import DeDeModel
from .window import CleanReference, WindowRule

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "dedefilter-detector/1"
FIELDS = ("config", "embed_dim", "state_dict", "encoder_name", "encoder_fingerprint", "threshold", "record")


class CheckpointError(ValueError):
    """A checkpoint is unreadable, not ours, or made for another encoder."""


@dataclass
class Detector:
    model: DeDeModel
    encoder_name: str
    encoder_fingerprint: str
    threshold: Threshold | None = None
    record: dict | None = None
    encoder_input: EncoderInput | None = None  # None: the encoder's own input (its spec's default)
    window: WindowRule | None = None  # None: the paper score alone decides

    @property
    def config(self) -> DeDeConfig:
        return self.model.config

    @cached_property
    def model_id(self) -> str:
        """Identifies the weights and the encoder they were trained for, so every Parquet row says which
        model scored it. Hashed once (28 MB at the paper's size): a detector's weights are frozen."""
        digest = hashlib.sha256(self.encoder_fingerprint.encode())
        if self.encoder_input is not None:
            digest.update(json.dumps(self.encoder_input.to_dict(), sort_keys=True).encode())
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode())
            # the raw bytes, wherever the model was moved (a GPU) and whatever its dtype (bf16 has no numpy type)
            digest.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
        return f"dede-{digest.hexdigest()[:12]}"

    def with_threshold(self, threshold: Threshold, window: WindowRule | None = None) -> Detector:
        """This detector deciding at ``threshold``, on window scores of ``window`` (None: the paper score)."""
        return replace(self, threshold=threshold, window=window)

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
            "encoder_input": json.dumps(self.encoder_input.to_dict() if self.encoder_input else None),
            "window": json.dumps(self.window.to_dict() if self.window else None),
            "window_reference": None if self.window is None or self.window.reference is None else {
                "embeddings": torch.from_numpy(self.window.reference.embeddings),
                "scores": torch.from_numpy(self.window.reference.scores)},
        }, path)

    @classmethod
    def load(cls, path: str | Path, encoder_fingerprint: str | None = None) -> Detector:
        """Load a checkpoint; with ``encoder_fingerprint``, refuse one trained for another encoder."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"detector checkpoint {path} does not exist")
        not_ours = (f"{path} is not a dedefilter detector checkpoint: make one with `dedefilter train` "
                    "(and `dedefilter calibrate`), or give the file those commands wrote")
        if path.stat().st_size == 0:
            raise CheckpointError(f"{not_ours} (the file is empty)")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle, zip and torch raise many types for a bad file
            # the first sentence only: torch's advice to unpickle unsafely is not ours to give
            detail = (str(err).splitlines() or [""])[0].split(". ")[0][:160]
            raise CheckpointError(f"{not_ours} (torch.load cannot read it, the file is damaged or of another kind: "
                                  f"{type(err).__name__}{': ' + detail if detail else ''})") from None
        if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{not_ours} (no format {CHECKPOINT_FORMAT!r})")
        if missing := [name for name in FIELDS if name not in checkpoint]:
            raise CheckpointError(f"{path} is a damaged dedefilter detector checkpoint: it lacks {', '.join(missing)}")
        if encoder_fingerprint is not None and checkpoint["encoder_fingerprint"] != encoder_fingerprint:
            raise CheckpointError(
                f"{path} was trained for encoder {checkpoint['encoder_name']!r} "
                f"(fingerprint {checkpoint['encoder_fingerprint']}), not for the given encoder "
                f"(fingerprint {encoder_fingerprint}): train a detector for this encoder with `dedefilter train`")
        try:
            model = DeDeModel(DeDeConfig(**checkpoint["config"]), checkpoint["embed_dim"])
            model.load_state_dict(checkpoint["state_dict"])
        except (TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{path}: config or weights do not match the DeDe model: {err}") from None
        try:
            threshold = json.loads(checkpoint["threshold"])
            encoder_input = json.loads(checkpoint.get("encoder_input", "null"))
            window = json.loads(checkpoint.get("window", "null"))
            if window is not None and set(window) != set(WindowRule().to_dict()):
                log.warning("%s: calibrated with a window rule of other settings (%s); loaded without its threshold: "
                            "calibrate it again with `dedefilter calibrate`", path, ", ".join(sorted(window)))
                threshold = window = None
            reference = checkpoint.get("window_reference") if window is not None else None
            if reference is not None:
                if not (isinstance(reference, dict) and set(reference) == {"embeddings", "scores"}
                        and all(isinstance(t, torch.Tensor) for t in reference.values())):
                    raise ValueError("the window rule's reference is not two tensors (embeddings, scores)")
                reference = CleanReference(reference["embeddings"].numpy(), reference["scores"].numpy())
                if reference.embeddings.shape[1] != checkpoint["embed_dim"]:
                    raise ValueError(f"the window rule's reference embeddings have {reference.embeddings.shape[1]} "
                                     f"dimensions, the encoder {checkpoint['embed_dim']}")
            return cls(model=model.eval(), encoder_name=checkpoint["encoder_name"],
                       encoder_fingerprint=checkpoint["encoder_fingerprint"],
                       threshold=Threshold(**threshold) if threshold else None,
                       record=json.loads(checkpoint["record"]),
                       encoder_input=EncoderInput(**encoder_input) if encoder_input else None,
                       window=WindowRule(**window, reference=reference) if window else None)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: unreadable threshold, record, encoder input, window rule or its reference: "
                                  f"{err}") from None
