"""The scorer's CPU model: linear layers packed for oneDNN (fp32, and bf16 where native), the same predictions,
picklable scorers."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from dedefilter import DeDeConfig, Scorer
from dedefilter.model import DeDeModel, PackedLinear, can_pack, cpu_inference_copy, masked_patch_mse, patchify

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")


@needs_onednn
def test_the_packed_copy_predicts_what_the_model_predicts_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = DeDeModel(DeDeConfig(), embed_dim=512).eval()
    packed = cpu_inference_copy(model, rows=16 * 65)
    assert any(isinstance(m, PackedLinear) for m in packed.modules())
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    patches, embeddings = torch.rand(16, 64, 48), torch.randn(16, 512)
    for visible in (torch.empty(16, 0, dtype=torch.long), torch.arange(6).repeat(16, 1)):  # scoring, training masks
        with torch.inference_mode():
            expected, got = model(patches, embeddings, visible), packed(patches, embeddings, visible)
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_fp32_cpu_scores_run_on_the_packed_copy_and_match_the_plain_model(scorer, shard_data):
    images, _, keys = shard_data
    scores = scorer.score(images[:32], keys[:32]).scores
    if torch.backends.mkldnn.is_available():
        assert scorer.model is not scorer.detector.model
    pixels = torch.from_numpy(images[:32]).permute(0, 3, 1, 2).float().div(255)
    visible = torch.empty(32, 0, dtype=torch.long)  # the paper's score mask leaves no patch visible
    with torch.inference_mode():
        patches = patchify(pixels, scorer.config.patch_size)
        plain = scorer.detector.model(patches, scorer.encoder.embed(pixels), visible)
    assert np.allclose(scores, masked_patch_mse(plain, patches, visible).numpy(), rtol=1e-4)


def test_a_scorer_that_has_scored_pickles_and_scores_bit_identically(scorer, shard_data):
    images, _, keys = shard_data
    before = scorer.score(images[:32], keys[:32]).scores
    copied = pickle.loads(pickle.dumps(scorer))  # a Ray actor or a spawned worker gets the scorer so
    assert np.array_equal(copied.score(images[:32], keys[:32]).scores, before)


@pytest.mark.skipif(not can_pack(torch.bfloat16), reason="this CPU has no native bf16")
def test_the_bf16_packed_copy_scores_within_bf16_rounding_of_fp32_as_autocast_does():
    torch.manual_seed(0)
    model = DeDeModel(DeDeConfig(), embed_dim=512).eval()
    packed = cpu_inference_copy(model, rows=16 * 65, dtype=torch.bfloat16)
    hidden = [m for m in packed.modules() if isinstance(m, PackedLinear) and m.feeds_packed]
    assert len(hidden) == 16 and all(m.weight.dtype == torch.bfloat16 for m in hidden)  # each block's MLP hidden layer
    patches, embeddings = torch.rand(16, 64, 48), torch.randn(16, 512)
    visible = torch.empty(16, 0, dtype=torch.long)
    with torch.inference_mode():
        fp32 = masked_patch_mse(model(patches, embeddings, visible), patches, visible)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = masked_patch_mse(model(patches, embeddings, visible).float(), patches, visible)
        got = masked_patch_mse(packed(patches, embeddings, visible), patches, visible)
    assert not torch.equal(got, fp32)  # it did compute in bf16
    assert torch.allclose(got, fp32, rtol=0.01) and torch.allclose(autocast, fp32, rtol=0.01)


def test_bf16_scores_run_on_a_bf16_packed_copy_where_the_cpu_has_native_bf16_else_on_the_model(encoder, detector):
    model = Scorer(encoder, detector, precision="bf16").model
    if can_pack(torch.bfloat16):
        assert model is not detector.model
        assert any(isinstance(m, PackedLinear) and m.weight.dtype == torch.bfloat16 for m in model.modules())
    else:
        assert model is detector.model  # run under bf16 autocast
