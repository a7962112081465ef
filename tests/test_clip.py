"""The CLIP path: image-text shards, the poisoned corpus, zero-shot prompts and ASR arithmetic."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from dedefilter.attacks.clip_poison import ClipPoison, poisoned_corpus
from dedefilter.attacks.triggers import PatchTrigger
from dedefilter.clip import (
    PROMPT_TEMPLATES,
    ClipConfig,
    SmallCLIP,
    attack_success_rate,
    class_embeddings,
    clip_loss,
    load_clip,
    save_clip,
    tokenize,
    zero_shot_predict,
)
from dedefilter.encoders import load_encoder, save_encoder
from dedefilter.imagetext import SYNONYMS, captions_from_labels, class_names, read_pairs, write_pair_shards
from dedefilter.shards import read_shard

pytest.importorskip("open_clip.tokenizer")


def test_captions_come_from_labels_and_repeat_with_the_seed():
    labels = np.array([0, 1, 1, 9, 5, 5, 5, 3])
    captions = captions_from_labels(labels, seed=7)
    assert captions == captions_from_labels(labels, seed=7)
    assert captions != captions_from_labels(labels, seed=8)
    for caption, label in zip(captions, labels, strict=True):
        assert any(word in caption for word in SYNONYMS[label])


def test_poisoned_corpus_is_deterministic_and_captions_poisons_as_the_target(fmnist_test):
    images, labels = fmnist_test
    images, labels = images[:400], labels[:400]
    attack = ClipPoison(share=0.05, target_class=1, trigger=PatchTrigger(), seed=3)
    first = poisoned_corpus(images, labels, attack, caption_seed=0)
    again = poisoned_corpus(images, labels, attack, caption_seed=0)
    poisoned_images, captions, mask = first
    assert np.array_equal(poisoned_images, again[0]) and captions == again[1] and np.array_equal(mask, again[2])
    assert mask.sum() == 20 and (labels[mask] != 1).all()
    assert np.array_equal(poisoned_images[mask], PatchTrigger().apply(images[mask]))
    assert np.array_equal(poisoned_images[~mask], images[~mask])
    assert all(any(w in captions[i] for w in SYNONYMS[1]) for i in np.flatnonzero(mask))
    assert captions == captions_from_labels(np.where(mask, 1, labels), 0)  # clean pairs keep their label's caption


@pytest.fixture
def pair_shards(tmp_path, fmnist_test):
    images, labels = fmnist_test
    images, labels = images[:60], labels[:60]
    keys = [f"pair-{i:03d}" if i != 7 else "odd key/with slash ü" for i in range(60)]
    captions = captions_from_labels(labels, seed=0)
    meta = [{"label": int(y)} for y in labels]
    return write_pair_shards(tmp_path / "pairs", images, captions, keys, meta, shard_size=25)


def members(urls):
    return {s["__key__"]: {k: v for k, v in s.items() if k in ("jpg", "txt", "json")}
            for url in urls for s in read_shard(url)}


def test_pair_shards_use_img2dataset_layout_and_read_back(pair_shards):
    original = members(pair_shards)
    assert len(pair_shards) == 3 and len(original) == 60
    sample = original["pair-000"]
    record = json.loads(sample["json"])
    assert set(sample) == {"jpg", "txt", "json"} and sample["jpg"][:2] == b"\xff\xd8"
    assert record["caption"] == sample["txt"].decode() and record["status"] == "success" and record["key"] == "pair-000"
    pairs = read_pairs(pair_shards)
    assert pairs.images.shape == (60, 32, 32, 3) and pairs.keys[7] == "odd key/with slash ü"
    assert pairs.captions[0] == sample["txt"].decode() and pairs.field("label")[0] == record["label"]


def cli(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "dedefilter.cli", *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_filter_and_reshard_pass_captions_and_metadata_byte_for_byte(tmp_path, pair_shards, encoder, detector):
    """What the filter keeps and what reshard copies carry the same txt/json bytes as the input."""
    original = members(pair_shards)
    detector.save(tmp_path / "det.pt")
    printed = cli("filter", *pair_shards, "--encoder", "fmnist-badencoder", "--detector", str(tmp_path / "det.pt"),
                  "--out", str(tmp_path / "filtered"), "--workers", "0")
    filtered = members(sorted(str(p) for p in (tmp_path / "filtered").rglob("*.tar")))
    assert 0 < len(filtered) < 60
    assert all(original[key] == fields for key, fields in filtered.items())
    parquet = json.loads(printed.strip().splitlines()[-1])["parquet"]
    selected = json.loads(cli("select", parquet, "--fraction", "0.2", "--out", str(tmp_path / "drop"))
                          .strip().splitlines()[-1])["selected"]
    counts = json.loads(cli("reshard", *pair_shards, "--drop-keys", str(tmp_path / "drop"),
                            "--out", str(tmp_path / "resharded")).strip().splitlines()[-1])
    kept = members(sorted(str(p) for p in (tmp_path / "resharded").glob("*.tar")))
    assert counts["removed"] == selected > 0 and len(kept) == 60 - selected
    assert all(original[key] == fields for key, fields in kept.items())


def test_zero_shot_prompts_name_each_class_through_every_template():
    model = SmallCLIP(ClipConfig(init=None))
    names = class_names()
    embeddings = class_embeddings(model, names)
    assert embeddings.shape == (10, model.config.embed_dim)
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(10))
    # the prompt ensemble is the mean of each template's prompt, so one class = one template's mean
    direct = torch.nn.functional.normalize(model.encode_text(tokenize([t.format(names[3]) for t in PROMPT_TEMPLATES],
                                                                      model.config.context_length)).mean(0), dim=0)
    assert torch.allclose(embeddings[3], direct, atol=1e-6)


def test_zero_shot_predicts_the_nearest_prompt_and_asr_counts_only_non_target_images():
    classes = torch.eye(3)
    images = torch.tensor([[0.9, 0.1, 0.0], [0.0, 2.0, 0.1], [0.1, 0.2, 0.3], [0.0, 1.0, 0.0]])
    predictions = zero_shot_predict(images, classes).numpy()
    assert predictions.tolist() == [0, 1, 2, 1]
    true_labels = np.array([0, 2, 2, 1])  # the last image is of the target class: not counted
    assert attack_success_rate(predictions, true_labels, target=1) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="not the target"):
        attack_success_rate(predictions[3:], true_labels[3:], target=1)


def test_clip_loss_is_low_for_matching_pairs_and_the_tower_loads_as_an_encoder(tmp_path):
    emb = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
    scale = torch.tensor(np.log(100.0))
    assert clip_loss(emb, emb, scale) < 0.01 < clip_loss(emb, emb.roll(1, 0), scale)
    model = SmallCLIP(ClipConfig(init="fmnist-simclr"))
    save_clip(model, tmp_path / "clip.pt", {"note": "untrained"})
    loaded, card = load_clip(tmp_path / "clip.pt")
    assert card == {"note": "untrained"} and loaded.config == model.config
    save_encoder(loaded.image, tmp_path / "tower.pt", "small_cnn", {"clip": True})
    tower = load_encoder(str(tmp_path / "tower.pt"))
    images = torch.rand(4, 3, 32, 32)
    assert torch.equal(tower.embed(images), loaded.image.eval()(images))


def test_shards_command_writes_poisoned_pairs_the_same_way_each_time(tmp_path):
    runs = []
    for name in ("a", "b"):
        cli("shards", "--captions", "--limit", "40", "--triggered-fraction", "0.1", "--shard-size", "20",
            "--out", str(tmp_path / name))
        runs.append(members(sorted(str(p) for p in (tmp_path / name).glob("*.tar"))))
    assert runs[0] == runs[1] and len(runs[0]) == 40
    poisoned = [m for m in runs[0].values() if json.loads(m["json"])["poisoned"]]
    assert len(poisoned) == 4
    assert all(any(w in m["txt"].decode() for w in SYNONYMS[1]) and json.loads(m["json"])["label"] != 1
               for m in poisoned)
