"""The window-level score: each part on planted data, the collapse test, the memory bound, the same scores
in any worker or batch layout, and thresholds that keep their false-positive rate on clean data."""

from __future__ import annotations

import json
from dataclasses import replace
from itertools import islice

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch
from conftest import SMALL

from dedefilter import DeDeFilter, Detector, StageConfig, filter_shards, fixed, for_false_positive_rate, train_model
from dedefilter.data import photo_patches
from dedefilter.metrics import auroc
from dedefilter.scoring import ScoredBatch, Scorer
from dedefilter.training import own_error
from dedefilter.window import (
    CleanReference,
    WindowRule,
    calibrate,
    calibrate_scored,
    column_median,
    filter_scores,
    misfit,
    score_window,
    score_windows,
    smallest,
    spectrum,
)

RULE = WindowRule(size=1000)
CALIBRATED = replace(RULE, paper_median=0.04, paper_scale=0.02)  # as calibrate sets it on clean_window's scores


def clean_window(rng: np.random.Generator, n: int = 1000, dim: int = 32, pixels: int = 192):
    """Paper scores, embeddings in ten classes, and residuals of n clean samples, all noisy."""
    centres = rng.normal(size=(10, dim))
    embeddings = centres[rng.integers(0, 10, n)] + 0.3 * rng.normal(size=(n, dim))
    return rng.gamma(4.0, 0.01, n), embeddings, rng.normal(size=(n, pixels))


def plant_group(rng: np.random.Generator, residuals: np.ndarray, embeddings: np.ndarray, members: np.ndarray) -> None:
    """Give ``members`` one shared residual pattern and one tight spot of the embedding space, in place."""
    residuals[members] += 6 * rng.normal(size=residuals.shape[1])
    dim = embeddings.shape[1]
    embeddings[members] = rng.normal(size=dim) + 0.01 * rng.normal(size=(len(members), dim))


def test_sparsity_finds_a_few_planted_samples_that_sit_between_classes_and_a_quiet_window_keeps_the_paper_score():
    rng = np.random.default_rng(0)
    scores, embeddings, residuals = clean_window(rng)
    planted = np.arange(3)  # 0.3% of the window: too few to collapse
    embeddings[planted] = embeddings[10:13].mean(0) + 0.3 * rng.normal(size=(3, embeddings.shape[1]))
    judged = score_window(scores, embeddings, residuals, CALIBRATED)
    assert not judged.collapse.any()
    top = np.argsort(-judged.parts["sparsity_z"])[:10]
    assert set(planted) <= set(top)
    # sparsity is recorded, the paper score decides, on the calibration's fixed scale
    assert np.array_equal(judged.score, ((scores - 0.04) / 0.02).astype(np.float32))


def test_where_no_window_collapses_the_filter_ranks_samples_as_the_paper_score_does():
    rng = np.random.default_rng(8)
    parts = [clean_window(rng) for _ in range(3)]
    for offset, (scores, _, _) in zip((0.0, 0.02, -0.01), parts, strict=True):
        scores += offset  # shards of different difficulty: a window's own z would rescale each
    stream = [np.concatenate(p) for p in zip(*parts, strict=True)]
    judged = score_windows(*stream, CALIBRATED)
    assert not judged.collapse.any()
    assert np.array_equal(np.argsort(judged.score, kind="stable"), np.argsort(stream[0].astype(np.float32),
                                                                              kind="stable"))


def test_a_planted_collapse_fires_the_test_and_pooling_plus_spectrum_rank_it_first():
    rng = np.random.default_rng(1)
    scores, embeddings, residuals = clean_window(rng)
    planted = rng.choice(1000, 30, replace=False)  # 3%: one shared trigger, one target embedding
    plant_group(rng, residuals, embeddings, planted)
    scores[planted] *= 3  # the decoder draws the target, not the image
    judged = score_window(scores, embeddings, residuals, RULE)
    truth = np.isin(np.arange(1000), planted)
    assert judged.collapse.all()
    assert auroc(judged.score, truth) == 1.0
    assert auroc(judged.parts["spectrum_z"], truth) == 1.0 and auroc(judged.parts["pooled_z"], truth) > 0.99
    assert auroc(judged.parts["paper_z"], truth) < 0.97  # the paper score alone does not separate them


def test_a_clump_of_clean_look_alikes_is_no_collapse_unless_the_decoder_fails_on_it():
    rng = np.random.default_rng(6)
    scores, embeddings, residuals = clean_window(rng)
    clump = rng.choice(1000, 20, replace=False)  # look-alike pullovers: one tight spot, drawn as well as any
    plant_group(rng, residuals, embeddings, clump)
    clean_clump = score_window(scores, embeddings, residuals, RULE)
    assert not clean_clump.collapse.any() and abs(float(np.median(clean_clump.parts["paper_z"][clump]))) < 1
    scores[clump] += 0.1  # the same clump, but its embedding describes another image: five robust SDs of error
    assert score_window(scores, embeddings, residuals, RULE).collapse.all()


def test_a_large_collapse_fires_though_it_drags_the_windows_paper_z_scale():
    rng = np.random.default_rng(7)
    scores, embeddings, residuals = clean_window(rng)
    planted = rng.choice(1000, 180, replace=False)  # 18%: a fifth of the window moves the median and the IQR
    plant_group(rng, residuals, embeddings, planted)
    scores[planted] *= 1.5
    judged = score_window(scores, embeddings, residuals, RULE)
    assert np.median(judged.parts["paper_z"][planted]) < RULE.collapse_paper_z and judged.collapse.all()
    assert not score_window(scores, embeddings, residuals, replace(RULE, collapse_bulk=181)).collapse.any()


def test_a_large_group_the_decoder_fails_on_collapses_though_it_is_as_spread_as_a_class():
    rng = np.random.default_rng(5)
    scores, embeddings, residuals = clean_window(rng)
    # a T-shirt target: the triggered images sit in a spread class of their own, no denser than the window
    triggered = np.flatnonzero(np.linalg.norm(embeddings - embeddings[0], axis=1) < 3)  # sample 0's class
    residuals[triggered] += 6 * rng.normal(size=residuals.shape[1])
    assert len(triggered) >= RULE.collapse_bulk and not score_window(scores, embeddings, residuals, RULE).collapse.any()
    scores[triggered] += 0.1  # the decoder draws the target, not the image
    assert score_window(scores, embeddings, residuals, RULE).collapse.all()


def test_a_class_the_decoder_never_saw_is_a_group_but_not_a_collapse():
    rng = np.random.default_rng(4)
    scores, embeddings, residuals = clean_window(rng)
    unseen = np.flatnonzero(np.linalg.norm(embeddings - embeddings[0], axis=1) < 3)  # sample 0's class
    residuals[unseen] += 6 * rng.normal(size=residuals.shape[1])  # the shape the decoder cannot draw
    scores[unseen] *= 1.5
    unseen_class = score_window(scores, embeddings.copy(), residuals, RULE)  # grouped, yet as spread as a class
    assert len(unseen) >= 50 and not unseen_class.collapse.any()
    embeddings[unseen] = embeddings[unseen].mean(0) + 0.01 * rng.normal(size=(len(unseen), embeddings.shape[1]))
    assert score_window(scores, embeddings, residuals, RULE).collapse.all()  # the same group, squeezed to one spot


def test_a_clean_window_does_not_collapse_and_its_scores_stay_centred():
    for seed in range(5):
        judged = score_window(*clean_window(np.random.default_rng(seed)), CALIBRATED)
        assert not judged.collapse.any()
        assert abs(float(np.median(judged.score))) < 0.5


def test_the_spectrum_of_a_window_with_more_samples_than_pixels_takes_the_same_projections():
    rng = np.random.default_rng(6)
    residuals = rng.normal(size=(300, 40))
    residuals[:10] += 5 * rng.normal(size=40)  # one shared pattern
    tall = spectrum(residuals, 3)  # 300 samples > 40 pixels: the covariance's eigenvectors
    wide = spectrum(np.concatenate([residuals, np.zeros((300, 300))], axis=1), 3)  # 300 <= 340: the Gram matrix's
    assert np.allclose(tall, wide)
    assert set(np.argsort(-tall)[:10]) == set(range(10))


@pytest.mark.parametrize("rows", [1, 2, 7, 999, 1000])
def test_the_column_median_of_float32_residuals_is_numpys_float64_median_exactly(rows):
    residuals = np.random.default_rng(7).normal(size=(rows, 48)).astype(np.float32)
    residuals[:, :4] = np.float32(0.1)  # ties
    residuals[::3, 4] = np.float32(1e-8)
    assert np.array_equal(column_median(residuals), np.median(residuals.astype(np.float64), 0))


def test_the_k_smallest_are_a_stable_argsorts_first_k_even_among_ties():
    rng = np.random.default_rng(8)
    for _ in range(50):
        values = rng.integers(0, 6, size=(40, 30)).astype(np.float64)  # many ties at the k-th value
        values[rng.random(values.shape) < 0.05] = np.inf
        k = int(rng.integers(1, 30))
        assert np.array_equal(smallest(values, k), np.argsort(values, axis=1, kind="stable")[:, :k])
    distinct = rng.permutation(1000 * 1000).reshape(1000, 1000).astype(np.float64)  # no tie: no fallback
    assert np.array_equal(smallest(distinct, 16), np.argsort(distinct, axis=1)[:, :16])


def test_a_short_window_and_non_finite_scores_fall_back_to_the_quiet_score_and_nan():
    rng = np.random.default_rng(2)
    scores, embeddings, residuals = clean_window(rng, n=40)
    short = score_window(scores, embeddings, residuals, CALIBRATED)
    assert np.isnan(short.parts["sparsity_z"]).all()
    assert np.array_equal(short.score, ((scores - 0.04) / 0.02).astype(np.float32))
    scores, embeddings, residuals = clean_window(rng)
    scores[5] = np.nan
    judged = score_window(scores, embeddings, residuals, RULE)
    assert np.isnan(judged.score[5]) and np.isfinite(np.delete(judged.score, 5)).all()
    alone = score_window(np.delete(scores, 5), np.delete(embeddings, 5, 0), np.delete(residuals, 5, 0), RULE)
    assert np.array_equal(np.delete(judged.score, 5), alone.score)  # a broken sample does not move the others


def clean_reference(rng: np.random.Generator, n: int = 2000, dim: int = 32):
    """Clean images of ten classes, some far harder to draw than others: the decoder's error grows with the class."""
    centres = rng.normal(size=(10, dim))
    classes = rng.integers(0, 10, n)
    embeddings = centres[classes] + 0.3 * rng.normal(size=(n, dim))
    return rng.gamma(4.0, 0.01, n) * (1 + classes), embeddings, centres


def test_the_excess_error_finds_a_triggered_image_that_the_paper_score_hides_among_hard_clean_ones():
    rng = np.random.default_rng(9)
    scores, embeddings, centres = clean_reference(rng)
    reference = CleanReference(embeddings, scores)
    # new clean images of every class, and triggered ones: embedded like class 0 (the target, easy to draw),
    # drawn badly, though no worse than a typical clean image of the hard classes
    clean = rng.integers(0, 10, 500)
    new = np.concatenate([centres[clean], np.repeat(centres[:1], 20, 0)]) + 0.3 * rng.normal(size=(520, 32))
    new_scores = np.concatenate([rng.gamma(4.0, 0.01, 500) * (1 + clean), np.full(20, 0.25)])
    truth = np.arange(520) >= 500
    assert auroc(new_scores, truth) < 0.9
    assert auroc(reference.excess(new_scores, new, k=8), truth) == 1.0
    own = reference.excess(scores, embeddings, k=8, own=True)  # each reference image left out of its neighbours
    assert abs(np.median(own)) < 0.1 and np.isfinite(own).all()


def test_a_clean_reference_is_kept_at_a_false_positive_rate_and_never_from_a_removal_budget():
    rng = np.random.default_rng(10)
    scores, embeddings, _ = clean_reference(rng, n=1000)
    scored = ScoredBatch(scores, embeddings, rng.normal(size=(1000, 192)))
    threshold, rule = calibrate_scored(scored, RULE, fpr=0.01)
    assert rule.reference is not None and rule.reference_k == 8 and 0.5 < rule.excess_scale < 2
    on_reference = score_windows(scores, embeddings, scored.residuals, rule).score  # each its own neighbour now
    assert 0.0 <= float((on_reference > threshold.value).mean()) <= 0.01
    _, budget = calibrate_scored(scored, RULE, fraction=0.02)  # a sample of the data itself may be poisoned
    assert budget.reference is None and budget.excess_scale == 1.0
    # a quiet window scores paper + excess z on the calibration's scales, whatever else the window holds
    judged = score_window(scores[:500], embeddings[:500], scored.residuals[:500], rule)
    alone = score_window(scores[:100], embeddings[:100], scored.residuals[:100], rule)
    excess = (rule.reference.excess(scores[:500], embeddings[:500], 8) - rule.excess_median) / rule.excess_scale
    assert not judged.collapse.any() and not alone.collapse.any()
    assert np.allclose(judged.score, (scores[:500] - rule.paper_median) / rule.paper_scale + excess, atol=1e-5)
    assert np.array_equal(judged.score[:100], alone.score)


def test_a_decoder_that_draws_the_reference_far_worse_than_its_own_images_turns_the_rule_off(caplog):
    rng = np.random.default_rng(11)
    scores, embeddings, _ = clean_reference(rng, n=1000)
    scored = ScoredBatch(scores, embeddings, rng.normal(size=(1000, 192)))
    median = float(np.median(scores))
    threshold, rule = calibrate_scored(scored, RULE, fpr=0.01, own_error=median / 1.5)  # 1.5x worse: it fits
    assert rule is not None and threshold.scale == "window" and misfit(scores, median / 1.5) == pytest.approx(1.5)
    with caplog.at_level("WARNING"):  # 3x worse: trained on other data, so the paper score alone decides
        threshold, rule = calibrate_scored(scored, RULE, fpr=0.01, own_error=median / 3)
    assert rule is None and threshold == calibrate_scored(scored, None, fpr=0.01)[0]
    assert "3.0x worse than its own training images" in caplog.text
    assert calibrate_scored(scored, RULE, fraction=0.02, own_error=median / 3)[1] is None  # a removal budget too
    assert misfit(scores, None) is None and calibrate_scored(scored, RULE, fpr=0.01)[1] is not None  # not measured


def test_windows_follow_the_rule_size_and_are_independent():
    rng = np.random.default_rng(3)
    parts = [clean_window(rng) for _ in range(3)]
    stream = [np.concatenate(p) for p in zip(*parts, strict=True)]
    whole = score_windows(*stream, RULE)
    for i, part in enumerate(parts):
        assert np.array_equal(whole.score[i * 1000:(i + 1) * 1000], score_window(*part, RULE).score)


# --- on real images, through the product ---------------------------------------------------------

@pytest.fixture(scope="module")
def windowed_scorer(encoder, detector, fmnist_test):
    """The suite's small detector, calibrated at 5% FPR on windows of 100 clean test images, as `calibrate` does."""
    images, _ = fmnist_test
    threshold, rule = calibrate(Scorer(encoder, detector), images[7000:8000], WindowRule(size=100), fpr=0.05)
    return Scorer(encoder, detector.with_threshold(threshold, rule))


def test_training_records_the_decoders_own_error_and_a_decoder_trained_on_photos_gets_no_window_rule(
        encoder, detector, fmnist_test, windowed_scorer):
    images, _ = fmnist_test
    assert detector.record["own_error"] == own_error(Scorer(encoder, detector), images[5000:6000])  # its training set
    assert windowed_scorer.detector.window is not None  # trained and calibrated on Fashion-MNIST: it fits
    model, record = train_model(encoder, photo_patches(1000, seed=1), SMALL, log=lambda *_: None)
    on_photos = Scorer(encoder, Detector(model, encoder.name, encoder.fingerprint, record=record))
    threshold, rule = calibrate(on_photos, images[7000:8000], WindowRule(size=100), fpr=0.05)
    assert rule is None and threshold.scale == "paper"  # it draws Fashion-MNIST ~3x worse than its photos
    assert misfit(on_photos.score_array(images[7000:8000], [f"r-{i}" for i in range(1000)]),
                  record["own_error"]) > RULE.max_misfit


def test_a_threshold_on_clean_windows_keeps_its_false_positive_rate_on_other_clean_images(windowed_scorer,
                                                                                         fmnist_test):
    images, _ = fmnist_test
    detector = windowed_scorer.detector
    scores = filter_scores(windowed_scorer, images[8000:9000], [f"c-{i}" for i in range(1000)], detector.window)
    assert 0.02 <= float((scores > detector.threshold.value).mean()) <= 0.09


def test_windowed_parquet_is_identical_for_any_workers_and_batch_size(tmp_path, windowed_scorer, shards):
    tables = []
    for workers, batch in [(0, 64), (2, 64), (0, 100), (2, 30)]:
        out = tmp_path / f"w{workers}-b{batch}"
        filter_shards(shards, windowed_scorer, out, stage=StageConfig(batch_size=batch), num_workers=workers,
                      progress=False)
        tables.append(ds.dataset(str(out / "parquet")).to_table().sort_by("key").to_pylist())
    assert all(table == tables[0] for table in tables[1:])
    assert all(row["sparsity_z"] is not None and row["collapse"] is not None for row in tables[0])
    metadata = json.loads(ds.dataset(str(out / "parquet")).schema.metadata[b"dedefilter"])
    assert metadata["window"] == windowed_scorer.detector.window.to_dict()  # the rule that decided, with the rows
    dropped = [row for row in tables[0] if row["status"] == "dropped"]
    assert dropped and all(row["score"] > row["threshold"] for row in dropped)


def test_the_stage_holds_at_most_one_window(windowed_scorer, shard_data):
    images, _, keys = shard_data
    pulled = 0

    def source():
        nonlocal pulled
        from dedefilter.data import encode_png
        for key, image in zip(keys, images, strict=True):
            pulled += 1
            yield {"__key__": key, "__url__": "one-long-shard", "png": encode_png(image)}

    stage = DeDeFilter(windowed_scorer, config=StageConfig(batch_size=32, drop=False))
    for given, _ in enumerate(islice(stage(source()), 250), start=1):
        assert pulled <= given + windowed_scorer.detector.window.size  # never more than a window ahead


def test_the_dataloader_wrapper_judges_windows_of_whole_batches(windowed_scorer, shard_data):
    images, _, keys = shard_data
    stage = DeDeFilter(windowed_scorer, config=StageConfig(drop=False))
    pixels = torch.from_numpy(images[:200]).permute(0, 3, 1, 2)
    batches = [{"image": pixels[i:i + 50], "__key__": keys[i:i + 50]} for i in range(0, 200, 50)]
    scores = torch.cat([b["dede_score"] for b in stage.filter_batches(batches, image_index="image")]).numpy()
    expected = filter_scores(windowed_scorer, images[:200], keys[:200], windowed_scorer.detector.window)
    assert np.array_equal(scores, expected)  # windows of 100 = two batches of 50 each


def test_a_threshold_on_the_other_scale_is_refused(scorer, windowed_scorer):
    on_paper_scores = for_false_positive_rate(np.linspace(0, 1, 100), 0.05)
    with pytest.raises(ValueError, match="on the paper score's scale but this filter decides on the window"):
        DeDeFilter(scorer, on_paper_scores, StageConfig(window_size=1000))
    with pytest.raises(ValueError, match="on the window score's scale but this filter decides on the paper"):
        DeDeFilter(windowed_scorer, config=StageConfig(window_size=0))
    assert DeDeFilter(windowed_scorer, fixed(0.1), StageConfig(window_size=0)).window is None  # a given cut: any scale
