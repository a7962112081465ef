"""Real data offline, and the one image decoder the filter uses."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dedefilter.data import decode_image, encode_png, photo_patches
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
