"""One adapter so any frozen image encoder plugs into the filter.

An encoder maps float images (B, 3, H, W) in [0, 1] to embeddings (B, D), after its own preprocessing:
an :class:`EncoderInput` (side, resize-then-centre-crop rule, normalisation) that the spec carries.
The encoder may be:
- a bundled checkpoint trained by this project (``fmnist-simclr``, ``fmnist-badencoder``): 32x32, no
  normalisation (the card's ``input`` says otherwise when it differs),
- a dedefilter encoder checkpoint file (``*.pt`` written by :func:`save_encoder`), its card's ``input``,
- a ``torch.export`` archive (``*.pt2``) or a TorchScript file, taking [0, 1] images at 32x32 unless
  told otherwise (``dedefilter train --encoder-size/--encoder-resize/--encoder-mean/--encoder-std``),
- ``torchvision:NAME`` (optionally ``torchvision:NAME@weights.pt``), head removed, with the input its
  weights enum's transforms describe (resnet50: resize 232, crop 224, ImageNet mean/std),
- ``package.module:factory``, a callable returning such an ``nn.Module`` (32x32 unless told otherwise).
The fingerprint (a hash of the weights) ties a trained detector to the encoder it was trained for; the
detector stores the encoder input it was trained with.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import zipfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .data import IMAGE_SIZE, center_crop, resize_square

ENCODER_FORMAT = "dedefilter-encoder/1"
BUNDLED_DIR = Path(__file__).parent / "weights"
CLEAN_ENCODER = "fmnist-simclr"  # the bundled SimCLR encoder (dedefilter/weights, rebuilt by pipelines/train_encoders.py)
BACKDOORED_ENCODER = "fmnist-badencoder"  # the same encoder after the bundled BadEncoder-style attack
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
HEADS = ("fc", "classifier", "heads", "head")  # the attribute holding a torchvision model's classifier


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


@dataclass(frozen=True)
class EncoderInput:
    """How a decoded image becomes the encoder's input, as torchvision's classification transforms do it:
    the centred square resized to ``resize`` (default: ``size``), centre-cropped to ``size``, then
    ``(x - mean) / std`` per channel (no mean/std: the encoder takes [0, 1] pixels as they are).

    Stored in the detector checkpoint, so calibration and filtering feed the encoder exactly what
    training did, whatever the decoder's own image size.
    """

    size: int = IMAGE_SIZE
    resize: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.size < 1 or (self.resize is not None and self.resize < self.size):
            raise ValueError(f"encoder input: size {self.size} must be positive and resize {self.resize} at least the size")
        if (self.mean is None) != (self.std is None):
            raise ValueError("encoder input: give both mean and std, or neither")
        if self.mean is not None:  # a JSON round trip gives lists; compare and hash as tuples of floats
            object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
            object.__setattr__(self, "std", tuple(float(d) for d in self.std))
            if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
                raise ValueError(f"encoder input: mean and std need 3 values (RGB), std > 0; got {self.mean}, {self.std}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"encoder input: interpolation must be one of {INTERPOLATIONS}, not {self.interpolation!r}")

    @property
    def decode_size(self) -> int:
        """The side an image needs before this input is cut from it."""
        return self.resize or self.size

    def prepare(self, pixels: torch.Tensor) -> torch.Tensor:
        """Float images (B, 3, H, W) in [0, 1], any size -> the encoder's input (B, 3, size, size)."""
        pixels = center_crop(resize_square(pixels, self.decode_size, self.interpolation), self.size)
        if self.mean is None:
            return pixels
        mean = torch.tensor(self.mean, device=pixels.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=pixels.device).view(1, -1, 1, 1)
        return (pixels - mean) / std

    def to_dict(self) -> dict:
        return asdict(self)


def decode_size(encoder_input: EncoderInput, decoder_size: int) -> int:
    """Each image is decoded once at this side; the encoder's and the decoder's views are cut from it."""
    return max(encoder_input.decode_size, decoder_size)


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
    input: EncoderInput = EncoderInput()
    embed_dim: int = field(init=False)

    def __post_init__(self) -> None:
        self.module.eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)
        self.embed_dim = self.embed(torch.zeros(2, 3, self.input.size, self.input.size)).shape[1]

    @torch.inference_mode()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float in [0, 1], any size -> (B, D) float32 embeddings of the encoder's own view."""
        return self.module(self.input.prepare(images)).float().flatten(1)

    def with_input(self, encoder_input: EncoderInput) -> Encoder:
        """The same frozen module fed another input (e.g. the one a detector was trained with)."""
        return self if encoder_input == self.input else replace(self, input=encoder_input)


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


def build_encoder(module: nn.Module, name: str, card: dict | None = None,
                  encoder_input: EncoderInput | None = None) -> Encoder:
    """A frozen :class:`Encoder`; its input is ``encoder_input``, else the card's ``input``, else 32x32 [0, 1]."""
    card = card or {}
    if encoder_input is None:
        encoder_input = EncoderInput(**card["input"]) if "input" in card else EncoderInput()
    return Encoder(module=module, name=name, fingerprint=fingerprint(module), card=card, input=encoder_input)


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


def torchvision_input(name: str) -> EncoderInput:
    """The input a torchvision model's weights enum describes (its transforms: resize, crop, mean/std,
    interpolation; read from the enum, nothing is downloaded); ImageNet's 256 -> 224 when it has none."""
    import torchvision

    try:
        transforms = torchvision.models.get_model_weights(name).DEFAULT.transforms()
        return EncoderInput(size=transforms.crop_size[0], resize=transforms.resize_size[0],
                            mean=tuple(transforms.mean), std=tuple(transforms.std),
                            interpolation=transforms.interpolation.value)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return EncoderInput(224, 256, IMAGENET_MEAN, IMAGENET_STD)


def load_weights(backbone: nn.Module, path: Path, head: str | None, name: str) -> None:
    """Load a user's state dict strictly: only the removed classifier's keys (``head.*``) may be extra.
    A file for another model must fail here, not leave a random encoder with a valid fingerprint."""
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} for torchvision:{name} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and torch raise many types for a bad file
        raise ValueError(f"{path} is not a readable state dict ({type(err).__name__}: "
                         f"{(str(err).splitlines() or [''])[0][:200]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict (parameter name -> tensor): save "
                         f"`torchvision.models.{name}(...).state_dict()` with torch.save")
    if head is not None:
        state = {k: v for k, v in state.items() if not k.startswith(f"{head}.")}
    expected = backbone.state_dict()
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        problems = [f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})"
                    for keys, what in ((missing, "missing"), (unexpected, "unexpected"), (wrong, "with another shape"))
                    if keys]
        raise ValueError(f"{path} does not hold torchvision {name} weights: {'; '.join(problems)} "
                         f"parameters; give the state dict of torchvision.models.{name}")
    backbone.load_state_dict(state)


def _load_torchvision(spec: str) -> Encoder:
    import torchvision

    name, _, weights = spec.partition("@")
    if name == "resnet18_cifar":
        backbone, head = resnet18_cifar(), "fc"
        encoder_input = EncoderInput(IMAGE_SIZE, None, IMAGENET_MEAN, IMAGENET_STD)
    else:
        try:
            backbone = torchvision.models.get_model(name, weights=None)
        except ValueError as err:
            raise ValueError(f"unknown torchvision model {name!r}") from err
        head = next((h for h in HEADS if hasattr(backbone, h)), None)
        if head is not None:
            setattr(backbone, head, nn.Identity())
        encoder_input = torchvision_input(name)
    if weights:
        load_weights(backbone, Path(weights), head, name)
    return build_encoder(backbone, f"torchvision:{spec}", encoder_input=encoder_input)


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
    """Embed a uint8 (N, H, W, 3) array in batches, each image through the encoder's own input: the
    embedding cache that decoder training reuses. ``device`` is where the encoder's module lives (the
    result stays there)."""
    return torch.cat([encoder.embed(to_float(images[i:i + batch_size]).to(device))
                      for i in range(0, len(images), batch_size)])
