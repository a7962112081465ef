"""Shared fixtures: real Fashion-MNIST images, the bundled encoders, a small real DeDe detector."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from dedefilter import DeDeConfig, Detector, Scorer, fixed, load_encoder, train_model
from dedefilter.attacks.triggers import PatchTrigger
from dedefilter.data import DataUnavailable, fashion_mnist
from dedefilter.shards import write_image_shards

# A small DeDe model so the suite trains it in seconds; the demo and benchmarks use the paper's size.
SMALL = replace(DeDeConfig(), dim=64, heads=2, encoder_depth=1, decoder_depth=1, epochs=2, batch_size=128)


@pytest.fixture(scope="session")
def fmnist_test():
    try:
        return fashion_mnist("test")
    except DataUnavailable as err:
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def encoder():
    return load_encoder("fmnist-badencoder")


@pytest.fixture(scope="session")
def detector(encoder, fmnist_test):
    images, _ = fmnist_test
    model, record = train_model(encoder, images[5000:6000], SMALL, log=lambda *_: None)
    trained = Detector(model, encoder.name, encoder.fingerprint, record=record)
    scores = Scorer(encoder, trained).score(images[6000:6500], [str(i) for i in range(500)]).scores
    return trained.with_threshold(fixed(float(np.quantile(scores, 0.8))))  # drops a good share


@pytest.fixture(scope="session")
def scorer(encoder, detector):
    return Scorer(encoder, detector)


@pytest.fixture(scope="session")
def shard_data(fmnist_test):
    """300 real test images (every 10th triggered), as arrays plus keys."""
    images, labels = fmnist_test
    images, labels = images[:300].copy(), labels[:300]
    images[::10] = PatchTrigger().apply(images[::10])
    keys = [f"img-{i:04d}" for i in range(len(images))]
    return images, labels, keys


@pytest.fixture
def shards(tmp_path, shard_data):
    """The 300 images as three WebDataset shards of 100, with ``json`` metadata."""
    images, labels, keys = shard_data
    meta = [{"index": i} for i in range(len(keys))]
    return write_image_shards(tmp_path / "in", images, keys, labels, meta, shard_size=100)
