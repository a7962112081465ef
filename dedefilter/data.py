"""Real images that can be had offline: Fashion-MNIST (Debian package) and photo patches (pip wheels);
one image decoder; the square views that the encoder and the decoder take of a decoded image.

Image sets are uint8 arrays shaped (N, S, S, 3): Fashion-MNIST at its padded 32x32 (upsample it with
:func:`resize_images`), photo patches at any side. Nothing is downloaded and nothing is synthesised:
if the data is missing, the error says which package installs it.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

# The Debian package's location; DEDEFILTER_FASHION_MNIST points elsewhere (e.g. a copy on a GPU machine).
FASHION_MNIST_DIR = Path(os.environ.get("DEDEFILTER_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FASHION_MNIST_SPLITS = ("train", "test")
IMAGE_SIZE = 32  # Fashion-MNIST's padded side, and the default side of every view
# Images are checked against this before decoding: a small PNG can declare 100000 x 100000 pixels and
# would need tens of GB once decoded (a decompression bomb). 8192 x 8192 RGB is ~200 MB.
MAX_PIXELS = 8192 * 8192
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class DataUnavailable(RuntimeError):
    """A real dataset is not installed on this machine."""


def fashion_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST as (images (N, 32, 32, 3) uint8, labels (N,) int64).

    The 28x28 grayscale images are zero-padded to 32x32 (the background is black, so padding adds no
    content and needs no interpolation) and the channel is repeated for RGB encoders.
    """
    if split not in FASHION_MNIST_SPLITS:
        raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', not {split!r}")
    prefix = {"train": "train", "test": "t10k"}[split]
    images_file = FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"
    labels_file = FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    if not images_file.exists():
        raise DataUnavailable(
            f"{images_file} not found: install Fashion-MNIST with "
            "`apt-get install -y dataset-fashion-mnist` (Debian package, needs root)"
        )
    with gzip.open(images_file) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(labels_file) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    return np.repeat(padded[..., None], 3, axis=-1), labels


def photo_names() -> list[str]:
    """Names of the natural photos bundled in scikit-image, scikit-learn and matplotlib wheels."""
    return ["astronaut", "coffee", "chelsea", "rocket", "motorcycle", "hubble_deep_field",
            "retina", "grass", "gravel", "brick", "china", "flower", "grace_hopper"]


def load_photo(name: str) -> np.ndarray:
    """One bundled photo as an (H, W, 3) uint8 array."""
    try:
        if name in ("china", "flower"):
            from sklearn.datasets import load_sample_image
            return np.asarray(load_sample_image(f"{name}.jpg"))
        if name == "grace_hopper":
            from matplotlib import cbook
            with cbook.get_sample_data("grace_hopper.jpg") as f:
                return np.asarray(Image.open(f).convert("RGB"))
        from skimage import data as skdata
        image = skdata.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skdata, name)()
    except ImportError as err:
        raise DataUnavailable(
            f"photo {name!r} needs its package: pip install 'dedefilter[photos]' ({err})"
        ) from err
    except OSError as err:  # a package version that fetches this photo instead of shipping it, offline
        raise DataUnavailable(f"photo {name!r} is not in the installed package ({err})") from err
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return image[..., :3].astype(np.uint8)


def photo_patches(count: int, seed: int = 0, names: list[str] | None = None, size: int = IMAGE_SIZE) -> np.ndarray:
    """Random ``size`` x ``size`` crops of the bundled photos: a real, unlabeled out-of-distribution image set.

    Each photo is first shrunk so its shorter side is 4 x ``size`` (128 px for 32 px crops), so a crop
    shows an object part or a texture rather than a flat patch of a megapixel photo; a photo already
    smaller keeps its pixels (or is enlarged to ``size``). Photos missing their package are skipped.
    """
    rng = np.random.default_rng(seed)
    photos = []
    for name in names or photo_names():
        try:
            photo = Image.fromarray(load_photo(name))
        except DataUnavailable:
            continue
        scale = max(size, min(4 * size, min(photo.size))) / min(photo.size)
        photos.append(np.asarray(photo.resize((round(photo.width * scale), round(photo.height * scale)),
                                              Image.BILINEAR)))
    if not photos:
        raise DataUnavailable("no bundled photos found: pip install 'dedefilter[photos]'")
    which = rng.integers(len(photos), size=count)
    patches = np.empty((count, size, size, 3), np.uint8)
    for i, p in enumerate(which):
        photo = photos[p]
        y = rng.integers(photo.shape[0] - size + 1)
        x = rng.integers(photo.shape[1] - size + 1)
        patches[i] = photo[y:y + size, x:x + size]
    return patches


def resize_square(pixels: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """Float images (B, C, H, W) -> (B, C, size, size): the centred square, resized (antialiased, as PIL).

    The view a model takes of a decoded batch, in tensor ops (no PIL round trip). An image already at
    ``size`` is returned untouched, so a 32x32 shard reaches a 32x32 model bit for bit.
    """
    h, w = pixels.shape[-2:]
    side = min(h, w)
    if h != w:
        top, left = (h - side) // 2, (w - side) // 2
        pixels = pixels[..., top:top + side, left:left + side]
    if side == size:
        return pixels
    smooth = mode in ("bilinear", "bicubic")
    return F.interpolate(pixels, size=(size, size), mode=mode, antialias=smooth,
                         align_corners=False if smooth else None)


def center_crop(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """The centred ``size`` x ``size`` crop of square images (B, C, S, S), as torchvision rounds it."""
    side = pixels.shape[-1]
    if side == size:
        return pixels
    if side < size:
        raise ValueError(f"cannot crop {size} px from {side} px images")
    start = int(round((side - size) / 2.0))
    return pixels[..., start:start + size, start:start + size]


def resize_images(images: np.ndarray, size: int, batch_size: int = 512) -> np.ndarray:
    """uint8 (N, H, W, 3) -> uint8 (N, size, size, 3) by :func:`resize_square` (e.g. Fashion-MNIST upsampled)."""
    if images.shape[1:3] == (size, size):
        return images
    out = np.empty((len(images), size, size, 3), np.uint8)
    for i in range(0, len(images), batch_size):
        pixels = torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])).permute(0, 3, 1, 2).float()
        resized = resize_square(pixels, size).round_().clamp_(0, 255).to(torch.uint8)
        out[i:i + batch_size] = resized.permute(0, 2, 3, 1).numpy()
    return out


def decode_image(data: bytes, size: int = IMAGE_SIZE, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes -> (size, size, 3) uint8: RGB, shorter side resized, centre-cropped.

    Images already at the target size pass without interpolation, so a 32x32 shard decodes exactly.
    Grayscale, palette and RGBA (alpha dropped) become RGB; 16-bit grayscale is scaled to 8 bits (PIL
    would clip it). Raises ValueError with the reason when the bytes are not a readable image or declare
    more than ``max_pixels`` pixels (checked from the header, before any pixel is decoded): the bytes are
    untrusted, and PIL's decoders raise many exception types on malformed input.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.width * image.height > max_pixels:
                    raise Image.DecompressionBombError(f"{image.width}x{image.height} pixels")
                image.draft("RGB", (size, size))
                if image.mode in SIXTEEN_BIT_MODES:
                    rgb = Image.fromarray((np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)).convert("RGB")
                else:
                    rgb = image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError(f"image too large to decode ({err}; the limit is {max_pixels} pixels, "
                         "a guard against decompression bombs)") from err
    except Exception as err:  # any decoder failure is a property of the sample, not of the run
        reason = re.sub(r" at 0x[0-9a-f]+", "", str(err))  # PIL names the stream object: same sample, same reason
        raise ValueError(f"undecodable image: {type(err).__name__}: {reason}") from err
    if rgb.size != (size, size):
        rgb = ImageOps.fit(rgb, (size, size), Image.BILINEAR)
    return np.asarray(rgb)


def encode_png(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes; single-channel content is stored as grayscale to keep shards small."""
    if np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 0], image[..., 2]):
        pil = Image.fromarray(image[..., 0], mode="L")
    else:
        pil = Image.fromarray(image, mode="RGB")
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return buffer.getvalue()
