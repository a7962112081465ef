"""Detector checkpoints: round trip, untrusted files, the wrong encoder."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from dedefilter import CheckpointError, Detector, Scorer, load_encoder


def test_round_trip_keeps_scores_threshold_and_id(tmp_path, detector, encoder, shard_data):
    images, _, keys = shard_data
    detector.save(tmp_path / "det.pt")
    loaded = Detector.load(tmp_path / "det.pt", encoder.fingerprint)
    assert loaded.threshold == detector.threshold
    assert loaded.model_id == detector.model_id
    before = Scorer(encoder, detector).score(images[:64], keys[:64]).scores
    after = Scorer(encoder, loaded).score(images[:64], keys[:64]).scores
    assert np.array_equal(before, after)


def test_garbage_file_gives_a_clear_error(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="not a loadable dedefilter detector checkpoint"):
        Detector.load(path)


class Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_payload_is_refused_and_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"format": "dedefilter-detector/1", "evil": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError):
        Detector.load(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump(Payload(), f)
    with pytest.raises(CheckpointError):
        Detector.load(tmp_path / "evil.pkl")
    assert not (tmp_path / "pwned").exists()


def test_a_detector_for_another_encoder_is_refused(tmp_path, detector):
    clean = load_encoder("fmnist-simclr")
    detector.save(tmp_path / "det.pt")
    with pytest.raises(CheckpointError, match="trained for encoder 'fmnist-badencoder'"):
        Detector.load(tmp_path / "det.pt", clean.fingerprint)
    with pytest.raises(CheckpointError, match="trained for encoder"):
        Scorer(clean, detector)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Detector.load(tmp_path / "nope.pt")
