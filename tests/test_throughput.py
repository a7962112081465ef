"""The throughput benchmark's own parts (official-loop reference, memory sampler, harness) and the speed options it measures."""

from __future__ import annotations

import platform
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import SMALL

from benchmarks.official_loop import official_errors, shuffled_visible
from benchmarks.procmem import PeakSampler
from benchmarks.throughput import parts_lines, run_loader, run_parts, verdicts
from dedefilter import DeDeConfig, Detector, Scorer
from dedefilter.encoders import to_float
from dedefilter.job import keep_freed_memory
from dedefilter.masking import key_seeds, keyed_visible
from dedefilter.model import DeDeModel, patchify, unpatchify


def test_unpatchify_inverts_patchify(fmnist_test):
    pixels = to_float(fmnist_test[0][:4])
    assert torch.equal(unpatchify(patchify(pixels, 4), 4), pixels)


def test_official_loop_error_is_the_scorer_score_times_the_masked_pixel_count(scorer, fmnist_test):
    images, keys = fmnist_test[0][:48], [f"k{i}" for i in range(48)]
    ours = scorer.score(images, keys).scores
    batches = [to_float(images[i:i + 16]) for i in range(0, 48, 16)]
    errors, grids = official_errors(batches, scorer.encoder.embed, scorer.detector.model, scorer.config)
    masked_pixels = 3 * 4 * 4 * scorer.config.n_patches  # the paper's scoring ratio shows no patch
    np.testing.assert_allclose(np.array(errors) / masked_pixels, ours, rtol=1e-5)
    assert len(grids) == 3 and grids[0].shape == (3 * 16, 3, 32, 32)  # every reconstruction kept


def test_official_loop_with_the_same_masks_matches_keyed_scoring(encoder, fmnist_test):
    config = replace(SMALL, score_mask_ratio=0.9)  # 6 visible patches of 64
    torch.manual_seed(0)
    detector = Detector(DeDeModel(config, encoder.embed_dim).eval(), encoder.name, encoder.fingerprint)
    images, keys = fmnist_test[0][:16], [f"k{i}" for i in range(16)]
    ours = Scorer(encoder, detector).score(images, keys).scores
    n_visible = config.n_visible(config.score_mask_ratio)
    masks = keyed_visible(key_seeds(keys, config.seed), config.n_patches, n_visible)
    errors, _ = official_errors([to_float(images)], encoder.embed, detector.model, config, visible=lambda _: masks)
    np.testing.assert_allclose(np.array(errors) / (48 * (config.n_patches - n_visible)), ours, rtol=1e-5)


def test_official_masks_are_random_per_sample_and_per_run():
    np.random.seed(0)
    first, second = shuffled_visible(8, 64, 6), shuffled_visible(8, 64, 6)
    assert first.shape == (8, 6)
    assert len({tuple(row) for row in first.tolist()}) == 8
    assert not torch.equal(first, second)


def test_peak_sampler_counts_a_child_process():
    child = "import time; block = bytearray(200 * 2**20); time.sleep(1.0)"
    with PeakSampler(interval_s=0.02) as sampler:
        subprocess.run([sys.executable, "-c", child], check=True)
    assert sampler.peak.processes >= 2
    assert sampler.peak.rss >= 200 * 2**20 and sampler.peak.pss >= 200 * 2**20


def test_filter_and_official_loop_count_every_sample(shards):
    common = {"encoder": "demo", "workers": 0, "batch": 64, "device": "cpu", "urls": shards}
    for mode in ("c", "d"):
        result = run_loader(common | {"mode": mode})
        assert result["samples"] == 300
        assert result["peak_pss_mib"] > 0


def test_verdicts_fail_when_the_filter_costs_too_much():
    must = {"encoder": "resnet18", "workers": 2, "batch": 256, "c_over_b_rounds": [1.5, 1.4, 1.6],
            "c_over_b_median": 1.5, "e_over_b_rounds": [1.1, 1.2, 1.0], "e_over_b_median": 1.1}
    row = {"encoder": "resnet18", "workers": 2, "batch": 256, "samples": 100}
    one_worker = row | {"workers": 1}
    rows = [row | {"mode": "c", "seconds": 6.0}, row | {"mode": "d", "seconds": 8.0},  # faster where it counts
            one_worker | {"mode": "c", "seconds": 10.0}, one_worker | {"mode": "d", "seconds": 8.0}]
    growth = [{"mode": m, "samples": n, "peak_pss_mib": p} for m, n, p in
              (("c", 10, 500), ("c", 40, 510), ("d", 10, 500), ("d", 40, 900))]
    holds = [ok for _, _, ok in verdicts({"loader": {"must_show": must, "rows": rows, "growth": growth}})]
    # (c)/(b) fp32, (e)/(b) bf16, (c) vs (d) at the must-show setting, (c) vs (d) everywhere, memory growth
    assert holds == [False, True, True, False, True]


def test_the_shipped_verdict_is_judged_at_the_largest_size_with_the_smaller_shown_beside_it():
    def at(w: float, x: float) -> dict:
        medians = {"c_over_b": 1.0, "w_over_b": w, "e_over_b": 1.0, "x_over_b": x}
        return {"medians": medians, "cpu_medians": medians, "ratios": {k: [v] for k, v in medians.items()}}

    found = verdicts({"shipped": {"by_samples": {"2048": at(1.5, 1.4), "8192": at(1.25, 1.2)}}})
    assert [ok for _, _, ok in found] == [True, False]  # fp32 1.25 <= 1.3; bf16 1.2 > 1.15
    assert all("8,192 samples" in claim and "at 2,048 samples" in figure for claim, figure, _ in found)


def test_the_parts_count_the_paper_size_models_multiply_accumulates_and_add_up():
    parts = run_parts({"encoder": "demo", "images": 32, "rounds": 1, "window": 64})
    config = DeDeConfig()
    n, dim, pixels = config.n_patches, config.dim, 3 * config.patch_size ** 2
    # the decoder's blocks over n + 1 tokens (qkv, proj, the MLP: 12 dim^2 per token), the embedding's projection
    # (the demo encoder's 256 dimensions) and the head; no patch is visible at the paper's scoring mask
    linear = config.decoder_depth * (n + 1) * 12 * dim ** 2 + 256 * dim + n * dim * pixels
    assert parts["mmac_per_sample"]["model"] == pytest.approx(linear / 1e6, abs=0.05)
    ms = parts["ms_per_chunk"]
    for precision in ("fp32", "bf16"):
        assert parts["one_thread_ratio"][precision] == pytest.approx(
            1 + (ms[f"model_{precision}"] + ms["window"]) / ms["encoder"], rel=2e-3)  # ms rounded to 0.01
    assert f"{parts['one_thread_ratio']['fp32']}x in fp32" in "\n".join(parts_lines(parts))


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_filter_workers_can_keep_their_freed_memory_on_glibc():
    assert keep_freed_memory()  # glibc accepted both mallopt settings (a wrong parameter returns 0)


def test_bf16_scores_are_close_to_fp32_and_the_same_in_any_batch_layout(encoder, detector, fmnist_test):
    images, keys = fmnist_test[0][:40], [f"k{i}" for i in range(40)]
    fp32 = Scorer(encoder, detector).score(images, keys).scores
    bf16 = Scorer(encoder, detector, precision="bf16")
    whole = bf16.score(images, keys).scores
    split = np.concatenate([bf16.score(images[:13], keys[:13]).scores, bf16.score(images[13:], keys[13:]).scores])
    assert np.array_equal(whole, split)
    np.testing.assert_allclose(whole, fp32, rtol=0.03)
    assert not np.array_equal(whole, fp32)


def test_scorer_refuses_an_unknown_precision(encoder, detector):
    with pytest.raises(ValueError, match="fp32 or bf16"):
        Scorer(encoder, detector, precision="fp16")
