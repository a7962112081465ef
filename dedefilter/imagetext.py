"""Image-text shards in img2dataset's layout (``{key}.jpg``, ``{key}.txt``, ``{key}.json``).

Web-scale caption corpora (LAION, DataComp, CC3M) arrive in this layout; it is the main real input
of the filter. Here the images are real Fashion-MNIST photos and the captions are WRITTEN FROM THE
LABELS: a template and a synonym of the class name drawn per pair from a seeded generator, so the
same seed gives the same corpus, byte for byte. They are not human captions: they carry exactly the
label's information, worded in varied ways, which is what a small CLIP can learn from on a CPU.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from .data import decode_image
from .shards import tar_samples

log = logging.getLogger(__name__)

# Words a caption may use for each Fashion-MNIST class (index = label); the first is the prompt name.
SYNONYMS: tuple[tuple[str, ...], ...] = (
    ("t-shirt", "tee", "top", "tee shirt"),
    ("pair of trousers", "trousers", "pants", "slacks"),
    ("pullover", "sweater", "jumper", "knit pullover"),
    ("dress", "frock", "summer dress", "gown"),
    ("coat", "jacket", "overcoat", "winter coat"),
    ("sandal", "sandals", "flip-flop", "summer sandal"),
    ("shirt", "button-up shirt", "blouse", "collared shirt"),
    ("sneaker", "trainer", "running shoe", "sports shoe"),
    ("bag", "handbag", "purse", "tote bag"),
    ("ankle boot", "boot", "bootie", "leather boot"),
)
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.", "a black and white photo of the {}.", "{} for sale", "product shot: {}",
    "a grayscale picture of a {}", "my new {}", "close-up of a {}", "{}, studio photo",
    "a small image of a {}.", "cheap {} online, free shipping", "the {} i bought last week", "a {} on a dark background",
)
JPEG_QUALITY = 95


def captions_from_labels(labels: np.ndarray, seed: int) -> list[str]:
    """One caption per label: a seeded template and synonym (the captions come from the labels)."""
    rng = np.random.default_rng(seed)
    templates = rng.integers(len(CAPTION_TEMPLATES), size=len(labels))
    words = rng.integers(len(SYNONYMS[0]), size=len(labels))
    return [CAPTION_TEMPLATES[t].format(SYNONYMS[int(y)][w]) for y, t, w in zip(labels, templates, words, strict=True)]


def encode_jpeg(image: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """(H, W, 3) uint8 -> JPEG bytes (grayscale when the channels are equal, as Fashion-MNIST's are)."""
    gray = np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 0], image[..., 2])
    pil = Image.fromarray(image[..., 0], mode="L") if gray else Image.fromarray(image, mode="RGB")
    buffer = io.BytesIO()
    pil.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_pair_shards(directory: str | Path, images: np.ndarray, captions: Sequence[str], keys: Sequence[str],
                      meta: Sequence[dict], shard_size: int = 1000, prefix: str = "shard") -> list[str]:
    """Write img2dataset-style shards: ``{key}.jpg``, ``{key}.txt`` (the caption), ``{key}.json``
    (img2dataset's fields ``key``, ``caption``, ``status``, ``width``, ``height`` plus ``meta``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pattern = str(directory / f"{prefix}-%06d.tar")
    height, width = images.shape[1:3]
    with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0) as writer:
        for image, caption, key, extra in zip(images, captions, keys, meta, strict=True):
            record = {"key": key, "caption": caption, "status": "success", "width": width, "height": height} | extra
            writer.write({"__key__": key, "jpg": encode_jpeg(image), "txt": caption.encode(),
                          "json": json.dumps(record, sort_keys=True).encode()})
    return [pattern % i for i in range(-(-len(keys) // shard_size))]


@dataclass
class Pairs:
    """Decoded image-text pairs: uint8 images (N, S, S, 3), captions, keys and json metadata."""

    images: np.ndarray
    captions: list[str]
    keys: list[str]
    meta: list[dict]

    def field(self, name: str, default=None) -> np.ndarray:
        """One json metadata field over all pairs (e.g. ``label``)."""
        return np.array([m.get(name, default) for m in self.meta])


def read_pairs(urls: Sequence[str], size: int = 32, limit: int | None = None) -> Pairs:
    """Decode image-text pairs from shards; a sample without an image or caption is skipped with a
    logged reason (shard, key), as :func:`dedefilter.shards.decode_shards` does for images."""
    images, captions, keys, meta = [], [], [], []
    for sample in tar_samples({"url": url} for url in urls):
        if limit is not None and len(images) >= limit:
            break
        data = next((sample[f] for f in ("jpg", "jpeg", "png", "webp") if f in sample), None)
        try:
            if "__error__" in sample or data is None or "txt" not in sample:
                raise ValueError(sample.get("__error__", "no image or no txt caption"))
            image = decode_image(data, size)
            caption = sample["txt"].decode("utf-8")
            record = json.loads(sample["json"]) if "json" in sample else {}
        except (ValueError, UnicodeDecodeError) as err:
            log.warning("skipping %s from %s: %s", sample.get("__key__"), sample.get("__url__"), err)
            continue
        images.append(image)
        captions.append(caption)
        keys.append(sample["__key__"])
        meta.append(record)
    if not images:
        raise ValueError(f"no readable image-text pairs in {list(urls)[:3]}")
    return Pairs(np.stack(images), captions, keys, meta)


def class_names() -> list[str]:
    """The prompt name of each Fashion-MNIST class (first synonym), in label order."""
    return [words[0] for words in SYNONYMS]
