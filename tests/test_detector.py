"""Detector checkpoints: round trip, untrusted files, the wrong encoder."""

from __future__ import annotations

import copy
import json
import os
import pickle

import numpy as np
import pytest
import torch

from dedefilter import CheckpointError, DeDeFilter, Detector, Scorer, load_encoder
from dedefilter.encoders import EncoderInput
from dedefilter.window import WindowRule, calibrate


def test_round_trip_keeps_scores_threshold_and_id(tmp_path, detector, encoder, shard_data):
    images, _, keys = shard_data
    detector.save(tmp_path / "det.pt")
    loaded = Detector.load(tmp_path / "det.pt", encoder.fingerprint)
    assert loaded.threshold == detector.threshold
    assert loaded.model_id == detector.model_id
    before = Scorer(encoder, detector).score(images[:64], keys[:64]).scores
    after = Scorer(encoder, loaded).score(images[:64], keys[:64]).scores
    assert np.array_equal(before, after)


@pytest.mark.parametrize("content", [os.urandom(4096), b"", b"\x80\x02.", b"hello"],
                         ids=["random", "empty", "empty-pickle", "text"])
def test_garbage_file_gives_a_clear_error(tmp_path, content):
    path = tmp_path / "garbage.pt"
    path.write_bytes(content)  # on main: "IndexError: list index out of range" / "(IndexError: pop from empty list)"
    with pytest.raises(CheckpointError, match=r"garbage.pt is not a dedefilter detector checkpoint: make one with "
                                              r"`dedefilter train`"):
        Detector.load(path)


def test_a_checkpoint_missing_fields_is_named_damaged(tmp_path):
    torch.save({"format": "dedefilter-detector/1", "config": {}}, tmp_path / "cut.pt")  # on main: KeyError 'embed_dim'
    with pytest.raises(CheckpointError, match="damaged dedefilter detector checkpoint: it lacks embed_dim, state_dict"):
        Detector.load(tmp_path / "cut.pt")


def test_model_id_survives_a_bf16_cast(detector):
    """The id hashes raw bytes: on main, ``.numpy()`` fails for bf16 (as it does for CUDA tensors)."""
    cast = Detector(copy.deepcopy(detector.model).to(torch.bfloat16), detector.encoder_name,
                    detector.encoder_fingerprint)
    assert cast.model_id.startswith("dede-") and cast.model_id != detector.model_id


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_model_id_is_the_same_after_a_move_to_cuda(detector):
    on_cpu = Detector(copy.deepcopy(detector.model), detector.encoder_name, detector.encoder_fingerprint)
    on_gpu = Detector(copy.deepcopy(detector.model).cuda(), detector.encoder_name, detector.encoder_fingerprint)
    assert on_gpu.model_id == on_cpu.model_id == detector.model_id  # on main: "can't convert cuda tensor to numpy"


def test_the_encoder_input_round_trips_and_old_checkpoints_keep_32(tmp_path, detector, encoder, shard_data):
    images, _, keys = shard_data
    wider = Detector(detector.model, encoder.name, encoder.fingerprint, detector.threshold,
                     encoder_input=EncoderInput(size=64, resize=72, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    wider.save(tmp_path / "wide.pt")
    loaded = Detector.load(tmp_path / "wide.pt", encoder.fingerprint)
    assert loaded.encoder_input == wider.encoder_input and loaded.model_id == wider.model_id != detector.model_id
    assert Scorer(encoder, loaded).decode_size == 72
    old = torch.load(tmp_path / "wide.pt", weights_only=True)
    del old["encoder_input"]  # as written before the record existed
    torch.save(old, tmp_path / "old.pt")
    legacy = Detector.load(tmp_path / "old.pt", encoder.fingerprint)
    assert legacy.encoder_input is None and Scorer(encoder, legacy).encoder.input == EncoderInput(size=32)
    assert np.array_equal(Scorer(encoder, legacy).score(images[:32], keys[:32]).scores,
                          Scorer(encoder, detector).score(images[:32], keys[:32]).scores)


def test_a_threshold_calibrated_with_another_versions_window_rule_is_dropped_and_said(tmp_path, detector, encoder,
                                                                                         caplog):
    detector.with_threshold(detector.threshold, WindowRule()).save(tmp_path / "det.pt")
    assert Detector.load(tmp_path / "det.pt", encoder.fingerprint).window == WindowRule()
    old = torch.load(tmp_path / "det.pt", weights_only=True)
    old["window"] = json.dumps({k: v for k, v in WindowRule().to_dict().items() if k != "collapse_resultant"})
    torch.save(old, tmp_path / "old.pt")  # calibrated before the collapse test had this condition
    loaded = Detector.load(tmp_path / "old.pt", encoder.fingerprint)
    assert loaded.threshold is None and loaded.window is None  # `filter` refuses it, `calibrate` can redo it
    assert loaded.model_id == detector.model_id and "calibrate it again" in caplog.text
    with pytest.raises(ValueError, match="no threshold"):
        DeDeFilter(Scorer(encoder, loaded))


def test_the_clean_reference_round_trips_and_a_malformed_one_is_refused(tmp_path, detector, encoder, fmnist_test):
    images, _ = fmnist_test
    threshold, rule = calibrate(Scorer(encoder, detector), images[7000:7300], WindowRule(size=100), fpr=0.05)
    detector.with_threshold(threshold, rule).save(tmp_path / "det.pt")
    loaded = Detector.load(tmp_path / "det.pt", encoder.fingerprint).window
    assert loaded == rule and loaded.reference is not None
    assert np.array_equal(loaded.reference.embeddings, rule.reference.embeddings)
    assert np.array_equal(loaded.reference.scores, rule.reference.scores)
    bad = torch.load(tmp_path / "det.pt", weights_only=True)
    bad["window_reference"]["embeddings"] = bad["window_reference"]["embeddings"][:, :5]  # another encoder's
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="reference embeddings have 5 dimensions"):
        Detector.load(tmp_path / "bad.pt", encoder.fingerprint)


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
