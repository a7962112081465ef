"""Real data offline, and the one image decoder the filter uses."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from dedefilter.data import decode_image, encode_png, photo_patches, resize_images, resize_square
from dedefilter.shards import read_shard, write_image_shards


def test_fashion_mnist_is_padded_real_and_balanced(fmnist_test):
    images, labels = fmnist_test
    assert images.shape == (10_000, 32, 32, 3) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10
    assert images[:, :2].max() == 0 and images[:, :, -2:].max() == 0  # zero padding, content inside
    assert (images[..., 0] == images[..., 2]).all()  # grayscale repeated


def test_photo_patches_are_deterministic_natural_crops():
    patches = photo_patches(64, seed=3)
    assert patches.shape == (64, 32, 32, 3)
    assert np.array_equal(patches, photo_patches(64, seed=3))
    assert not np.array_equal(patches, photo_patches(64, seed=4))
    # natural images are smooth: neighbouring pixels differ far less than in noise (~85 for uniform)
    neighbour_gap = np.abs(np.diff(patches.astype(int), axis=2)).mean()
    assert neighbour_gap < 30


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK"])
def test_decode_handles_image_modes_and_sizes(mode):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 64, 3), dtype=np.uint8)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="TIFF" if mode in ("I;16", "CMYK") else "PNG")
    decoded = decode_image(buffer.getvalue())
    assert decoded.shape == (32, 32, 3) and decoded.dtype == np.uint8


def test_decode_rejects_non_images_with_a_reason():
    with pytest.raises(ValueError, match="undecodable image"):
        decode_image(b"GIF89a but then garbage")


def test_shards_round_trip_exactly(tmp_path, fmnist_test):
    images, labels = fmnist_test
    paths = write_image_shards(tmp_path, images[:25], [f"k{i}" for i in range(25)], labels[:25], shard_size=10)
    assert len(paths) == 3
    samples = [s for p in paths for s in read_shard(p)]
    assert [s["__key__"] for s in samples] == [f"k{i}" for i in range(25)]
    assert all(np.array_equal(decode_image(s["png"]), images[i]) for i, s in enumerate(samples))
    assert int(samples[7]["cls"]) == labels[7]
    assert encode_png(images[0])[:4] == b"\x89PNG"


def test_views_are_exact_at_their_own_size_and_resize_like_pil(fmnist_test):
    images, _ = fmnist_test
    pixels = torch.from_numpy(images[:8]).permute(0, 3, 1, 2).float()
    assert resize_square(pixels, 32) is pixels  # a 32x32 shard reaches a 32x32 model untouched
    upsampled = resize_images(images[:8], 64)
    pil = np.stack([np.asarray(Image.fromarray(image).resize((64, 64), Image.BILINEAR)) for image in images[:8]])
    assert upsampled.shape == (8, 64, 64, 3) and np.abs(upsampled.astype(int) - pil).max() <= 2
    wide = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(2, 3, 4, 6)
    assert torch.equal(resize_square(wide, 4), wide[..., 1:5])  # the centred square of a landscape image


def test_photo_patches_come_at_the_size_asked_for():
    patches = photo_patches(4, seed=0, size=96)
    assert patches.shape == (4, 96, 96, 3) and np.abs(np.diff(patches.astype(int), axis=2)).mean() < 30
