"""Scoring masks depend on the sample key and seed only, never on batch or order."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from dedefilter import Scorer
from dedefilter.config import DeDeConfig
from dedefilter.masking import key_seeds, keyed_visible
from dedefilter.model import DeDeModel


def test_masks_are_a_function_of_key_and_seed():
    keys = [f"k{i}" for i in range(20)]
    alone = keyed_visible(key_seeds(keys[5:6], 0), 64, 6)
    in_batch = keyed_visible(key_seeds(keys, 0), 64, 6)
    reversed_batch = keyed_visible(key_seeds(keys[::-1], 0), 64, 6)
    assert torch.equal(alone[0], in_batch[5])
    assert torch.equal(in_batch, reversed_batch.flip(0))
    assert not torch.equal(in_batch, keyed_visible(key_seeds(keys, 1), 64, 6))
    assert not torch.equal(in_batch, keyed_visible(key_seeds(keys, 0), 64, 6, mask_index=1))


def test_masks_have_the_right_number_of_distinct_patches():
    visible = keyed_visible(key_seeds([str(i) for i in range(1000)], 0), 64, 6)
    assert visible.shape == (1000, 6)
    assert all(len(set(row.tolist())) == 6 for row in visible)
    counts = np.bincount(visible.flatten().numpy(), minlength=64)
    assert counts.min() > 50 and counts.max() < 140  # every patch gets masked roughly equally often


def test_paper_ratios_leave_six_and_zero_visible_patches():
    config = DeDeConfig()
    assert config.n_visible(config.train_mask_ratio) == 6
    assert config.n_visible(config.score_mask_ratio) == 0


def test_score_does_not_depend_on_batch_or_order_with_visible_patches(encoder, detector, shard_data):
    images, _, keys = shard_data
    config = replace(detector.config, score_mask_ratio=0.75, score_masks=3)  # 16 visible patches, 3 masks
    model = DeDeModel(config, encoder.embed_dim)
    model.load_state_dict(detector.model.state_dict())
    scorer = Scorer(encoder, replace(detector, model=model.eval()))
    whole = scorer.score(images[:40], keys[:40]).scores
    shuffled = scorer.score(images[:40][::-1], keys[:40][::-1]).scores[::-1]
    piecewise = np.concatenate([scorer.score(images[:40][i:i + 7], keys[:40][i:i + 7]).scores for i in range(0, 40, 7)])
    np.testing.assert_array_equal(shuffled, whole)
    np.testing.assert_array_equal(piecewise, whole)
