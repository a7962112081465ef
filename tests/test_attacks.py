"""The benchmark's attacks: triggers change exactly what they should, the recipes run, the cache is honest."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from dedefilter.attacks.badencoder import (
    BadEncoderConfig,
    sliced_wasserstein,
    train_badencoder,
)
from dedefilter.attacks.registry import ATTACKS, load_or_train
from dedefilter.attacks.triggers import (
    BlendTrigger,
    CTRLTrigger,
    PatchTrigger,
    dct_matrix,
    poison_target_class,
    trigger_from_description,
)
from dedefilter.encoders import SmallCNN, fingerprint, load_encoder, save_encoder
from dedefilter.ssl import SimCLRConfig, train_simclr

TRIGGERS = [PatchTrigger(), PatchTrigger(size=4, cell=1), BlendTrigger(), CTRLTrigger(), CTRLTrigger(channels=(1, 2))]


@pytest.fixture(scope="module")
def images(fmnist_test):
    return fmnist_test[0][:64]


@pytest.mark.parametrize("trigger", TRIGGERS, ids=lambda t: json.dumps(t.describe()))
def test_each_trigger_is_deterministic_and_round_trips_through_a_card(trigger, images):
    original = images.copy()
    first, second = trigger.apply(images), trigger.apply(images)
    assert np.array_equal(first, second) and not np.array_equal(first, images)
    assert np.array_equal(images, original)  # apply returns a copy
    card = json.loads(json.dumps(trigger.describe()))
    assert trigger_from_description(card) == trigger


def test_patch_trigger_changes_only_the_patch_pixels(images):
    trigger = PatchTrigger(size=4, cell=1)
    changed = np.any(trigger.apply(images) != images, axis=(0, 3))
    inside = np.zeros((32, 32), bool)
    inside[24:28, 24:28] = True
    assert not changed[~inside].any() and changed[inside].all()


def test_blend_trigger_moves_every_pixel_by_at_most_alpha_and_keeps_gray_images_gray(images):
    trigger = BlendTrigger(alpha=0.2)
    blended = trigger.apply(images)
    change = np.abs(blended.astype(int) - images)
    assert change.max() <= 0.2 * 255 + 0.5
    assert (change > 0).mean() > 0.9
    assert np.array_equal(blended[..., 0], blended[..., 2])


def test_ctrl_trigger_lives_in_the_chosen_dct_coefficients(images):
    trigger = CTRLTrigger(magnitude=50.0, positions=((15, 15), (31, 31)))
    mid_gray = (64 + images // 2).astype(np.uint8)  # real images squeezed into [64, 191]: nothing clips
    difference = trigger.apply(mid_gray).astype(float) - mid_gray
    c = dct_matrix(32)
    spectrum = c @ difference[..., 0] @ c.T  # the DCT of each image's change (one 32x32 block)
    energy = spectrum ** 2
    chosen = energy[:, 15, 15] + energy[:, 31, 31]
    assert (chosen / energy.sum(axis=(1, 2))).min() > 0.95  # rounding to uint8 is the only leak
    assert np.abs(spectrum[:, [15, 31], [15, 31]] - 50).max() < 2
    assert np.array_equal(difference[..., 0], difference[..., 1])  # a luma trigger keeps gray images gray


def test_ctrl_trigger_is_nearly_invisible_and_chroma_would_paint_gray_images(images):
    luma = CTRLTrigger(magnitude=50.0).apply(images).astype(int)
    assert np.abs(luma - images).max() <= 2 * 50 * 2 / 32 + 0.5  # two coefficients, each <= magnitude * 2 / 32
    chroma = CTRLTrigger(magnitude=50.0, channels=(1, 2)).apply(images)
    assert (chroma[..., 0] != chroma[..., 2]).mean() > 0.3  # colour no clean Fashion-MNIST image has


def test_ctrl_trigger_rejects_images_that_do_not_tile_into_windows():
    with pytest.raises(ValueError, match="divisible by window 32"):
        CTRLTrigger().apply(np.zeros((1, 28, 28, 3), np.uint8))


def test_unknown_trigger_kind_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown trigger kind 'warp'.*blend.*ctrl.*patch"):
        trigger_from_description({"kind": "warp"})


def test_sliced_wasserstein_is_zero_for_the_same_points_and_grows_with_a_shift():
    points = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    shuffled = points[torch.randperm(200, generator=torch.Generator().manual_seed(1))]
    generator = torch.Generator().manual_seed(2)
    assert sliced_wasserstein(points, shuffled, generator=generator).item() == pytest.approx(0, abs=1e-10)
    near = sliced_wasserstein(points, points + 0.1, generator=torch.Generator().manual_seed(2)).item()
    far = sliced_wasserstein(points, points + 1.0, generator=torch.Generator().manual_seed(2)).item()
    assert 0 < near < far


def test_target_class_poisoning_triggers_only_target_images_in_place(fmnist_test):
    images, labels = fmnist_test[0][:1000].copy(), fmnist_test[1][:1000]
    original = images.copy()
    mask = poison_target_class(images, labels, 0.05, 0, PatchTrigger(), np.random.default_rng(0))
    assert mask.sum() == 50 and (labels[mask] == 0).all()
    assert np.array_equal(images[mask], PatchTrigger().apply(original[mask]))
    assert np.array_equal(images[~mask], original[~mask])
    with pytest.raises(ValueError, match="needs 500 target-class images"):
        poison_target_class(original.copy(), labels, 0.5, 0, PatchTrigger(), np.random.default_rng(0))


def test_a_tiny_ssl_poisoning_run_continues_from_the_clean_encoder(fmnist_test):
    images, labels = fmnist_test[0][:40].copy(), fmnist_test[1][:40]
    poison_target_class(images, labels, 0.05, 0, CTRLTrigger(), np.random.default_rng(0))
    clean = load_encoder("fmnist-simclr")
    config = SimCLRConfig(epochs=1, batch_size=16)
    first, record = train_simclr(images, config, log=lambda *_: None, init=clean.module)
    second, _ = train_simclr(images, config, log=lambda *_: None, init=clean.module)
    assert fingerprint(first) == fingerprint(second) != clean.fingerprint
    assert fingerprint(clean.module) == clean.fingerprint  # the clean encoder itself is untouched
    assert len(record["losses"]) == 1 and np.isfinite(record["losses"][0])


def test_a_tiny_drupe_run_records_its_distribution_term(fmnist_test):
    images, labels = fmnist_test
    config = BadEncoderConfig(target_class=0, shadow_size=64, n_reference=4, epochs=1, batch_size=32,
                              effectiveness_weight=0.1, distribution_weight=1.0, distribution_pool=16)
    module, record = train_badencoder(load_encoder("fmnist-simclr").module, images[:2000], labels[:2000],
                                      PatchTrigger(), config, log=lambda *_: None)
    assert record["history"][0]["distribution"] > 0
    assert not next(module.parameters()).requires_grad


def test_a_cached_checkpoint_from_another_recipe_is_refused(tmp_path):
    spec = ATTACKS["drupe-patch-tshirt"]
    wrong = {**json.loads(json.dumps(spec.describe())), "config": {"distribution_weight": 0.0}}
    save_encoder(SmallCNN(), tmp_path / "drupe-patch-tshirt.pt", "small_cnn", wrong)
    with pytest.raises(ValueError, match="different recipe.*delete it"):
        load_or_train("drupe-patch-tshirt", tmp_path)
    right = json.loads(json.dumps(spec.describe()))
    save_encoder(SmallCNN(), tmp_path / "drupe-patch-tshirt.pt", "small_cnn", right)
    encoder, card = load_or_train("drupe-patch-tshirt", tmp_path)
    assert encoder.name == "drupe-patch-tshirt" and card["target_class"] == 0


def test_every_attack_names_one_recipe_and_a_trigger_its_card_can_rebuild():
    assert len(ATTACKS) >= 7
    for name, spec in ATTACKS.items():
        assert spec.name == name
        assert (spec.kind == "bundled") or (spec.badencoder is not None) != (spec.simclr is not None)
        assert trigger_from_description(spec.trigger.describe()) == spec.trigger
    assert replace(ATTACKS["badencoder-patch-tshirt"].badencoder, target_class=1) == BadEncoderConfig()
