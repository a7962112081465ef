"""One adapter so any frozen image encoder plugs into the filter.

An encoder maps float images (B, 3, H, W) in [0, 1] to embeddings (B, D). It may be:
- a bundled checkpoint trained by this project (``fmnist-simclr``, ``fmnist-badencoder``),
- a dedefilter encoder checkpoint file (``*.pt`` written by :func:`save_encoder`),
- a ``torch.export`` archive (``*.pt2``) or a TorchScript file, taking [0, 1] images,
- ``torchvision:NAME`` (optionally ``torchvision:NAME@weights.pt``), head removed, ImageNet normalisation,
- ``package.module:factory``, a callable returning such an ``nn.Module``.
The fingerprint (a hash of the weights) ties a trained detector to the encoder it was trained for.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

ENCODER_FORMAT = "dedefilter-encoder/1"
BUNDLED_DIR = Path(__file__).parent / "weights"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [0, 1]."""
    tensor = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    return tensor.permute(0, 3, 1, 2).float().div_(255)


class SmallCNN(nn.Module):
    """A 4-stage CNN (32-64-128-256 channels, 256-d output): an SSL encoder that trains on 2 CPU cores."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 256)):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for i, width in enumerate(widths):
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True)]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            channels = width
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.embed_dim = widths[-1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images * 2 - 1)


class Normalized(nn.Module):
    """Applies a fixed mean/std normalisation before a backbone that expects it."""

    def __init__(self, backbone: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone((images - self.mean) / self.std)


class Exported(nn.Module):
    """A ``torch.export`` module: its train/eval mode was fixed at export time and it refuses ``.eval()``."""

    def __init__(self, graph: nn.Module):
        super().__init__()
        self.graph = graph

    def train(self, mode: bool = True) -> Exported:
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.graph(images)


ARCHITECTURES = {"small_cnn": SmallCNN}


@dataclass
class Encoder:
    """A frozen encoder with what the filter needs to know about it."""

    module: nn.Module
    name: str
    fingerprint: str
    card: dict
    embed_dim: int = field(init=False)

    def __post_init__(self) -> None:
        self.module.eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)
        self.embed_dim = self.embed(torch.zeros(2, 3, 32, 32)).shape[1]

    @torch.inference_mode()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float in [0, 1] -> (B, D) float32 embeddings."""
        return self.module(images).float().flatten(1)


def fingerprint(module: nn.Module) -> str:
    """SHA-256 over the module's parameter and buffer names and bytes (first 16 hex digits)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def save_encoder(module: nn.Module, path: str | Path, arch: str, card: dict) -> None:
    """Write a dedefilter encoder checkpoint: weights plus the card (recipe, seed, data, measurements)."""
    torch.save({"format": ENCODER_FORMAT, "arch": arch, "state_dict": module.state_dict(),
                "card": json.dumps(card, sort_keys=True)}, path)


def build_encoder(module: nn.Module, name: str, card: dict | None = None) -> Encoder:
    return Encoder(module=module, name=name, fingerprint=fingerprint(module), card=card or {})


def bundled_encoders() -> list[str]:
    return sorted(p.stem for p in BUNDLED_DIR.glob("*.pt"))


def load_encoder(spec: str) -> Encoder:
    """Resolve an encoder spec (see the module docstring) into a frozen :class:`Encoder`."""
    if spec in bundled_encoders():
        return _load_file(BUNDLED_DIR / f"{spec}.pt", name=spec)
    if spec.startswith("torchvision:"):
        return _load_torchvision(spec.removeprefix("torchvision:"))
    path = Path(spec)
    if path.suffix in (".pt", ".pth", ".pt2") or path.exists():
        return _load_file(path, name=path.stem)
    if ":" in spec:
        return _load_factory(spec)
    raise ValueError(
        f"encoder spec {spec!r} is not a bundled encoder {bundled_encoders()}, a file, "
        "'torchvision:NAME' or 'module:factory'"
    )


def _load_file(path: Path, name: str) -> Encoder:
    if not path.is_file():
        raise FileNotFoundError(f"encoder file {path} does not exist")
    if path.suffix == ".pt2":
        try:
            return build_encoder(Exported(torch.export.load(str(path)).module()), name)
        except Exception as err:  # torch.export raises many types for a bad archive
            raise ValueError(f"{path} is not a readable torch.export archive: {err}") from err
    if zipfile.is_zipfile(path) and any(n.split("/", 2)[1:2] == ["code"] for n in zipfile.ZipFile(path).namelist()):
        return build_encoder(torch.jit.load(str(path), map_location="cpu"), name)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and torch raise many types for a bad file
        raise ValueError(f"{path} is not a readable encoder checkpoint or TorchScript file: {err}") from err
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != ENCODER_FORMAT:
        raise ValueError(f"{path} is not a dedefilter encoder checkpoint (no format {ENCODER_FORMAT!r})")
    if checkpoint["arch"] not in ARCHITECTURES:
        raise ValueError(f"{path}: unknown encoder architecture {checkpoint['arch']!r}")
    module = ARCHITECTURES[checkpoint["arch"]]()
    module.load_state_dict(checkpoint["state_dict"])
    return build_encoder(module, name, json.loads(checkpoint["card"]))


def resnet18_cifar() -> nn.Module:
    """ResNet-18 with the CIFAR stem (3x3 conv, no max-pool), the paper's encoder at 32x32; head removed."""
    import torchvision

    model = torchvision.models.resnet18(weights=None)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    model.fc = nn.Identity()
    return model


def _load_torchvision(spec: str) -> Encoder:
    import torchvision

    name, _, weights = spec.partition("@")
    if name == "resnet18_cifar":
        backbone = resnet18_cifar()
    else:
        try:
            backbone = torchvision.models.get_model(name, weights=None)
        except ValueError as err:
            raise ValueError(f"unknown torchvision model {name!r}") from err
        for head in ("fc", "classifier", "heads", "head"):
            if hasattr(backbone, head):
                setattr(backbone, head, nn.Identity())
                break
    if weights:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        backbone.load_state_dict(state, strict=False)
    return build_encoder(Normalized(backbone, IMAGENET_MEAN, IMAGENET_STD), f"torchvision:{spec}")


def _load_factory(spec: str) -> Encoder:
    module_name, _, factory_name = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), factory_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import encoder factory {spec!r}: {err}") from err
    module = factory()
    if not isinstance(module, nn.Module):
        raise ValueError(f"encoder factory {spec!r} returned {type(module).__name__}, not an nn.Module")
    return build_encoder(module, spec)


def embed_array(encoder: Encoder, images: np.ndarray, batch_size: int = 512, device: str = "cpu") -> torch.Tensor:
    """Embed a uint8 (N, H, W, 3) array in batches: the embedding cache that decoder training reuses.
    ``device`` is where the encoder's module lives (the result stays there)."""
    return torch.cat([encoder.embed(to_float(images[i:i + batch_size]).to(device))
                      for i in range(0, len(images), batch_size)])
