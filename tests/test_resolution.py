"""Real resolutions end to end: the decoder at its own size, the encoder at its own input size and
normalisation, both views cut from one decoded image (issue: `train --encoder torchvision:resnet18
--image-size 64 --patch-size 8` ended in an IndexError, and every encoder saw 32x32 thumbnails)."""

from __future__ import annotations

import json

import pyarrow.dataset as ds
import pytest
import torch

from dedefilter import Detector, Scorer, load_encoder
from dedefilter.cli import main
from dedefilter.encoders import IMAGENET_MEAN, IMAGENET_STD, EncoderInput
from dedefilter.shards import decode_shards

TINY = ["--dim", "32", "--heads", "2", "--encoder-depth", "1", "--decoder-depth", "1", "--epochs", "1",
        "--batch-size", "32"]


def run_filter(tmp_path, shards: list[str], encoder: str, detector: str, capsys) -> dict:
    capsys.readouterr()
    assert main(["filter", *shards, "--encoder", encoder, "--detector", detector, "--out", str(tmp_path / "out"),
                 "--workers", "0", "--batch-size", "16"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def parquet_scores(tmp_path) -> dict[str, float]:
    """The paper score of each key, as the filter recorded it."""
    table = ds.dataset(str(tmp_path / "out" / "parquet"), format="parquet").to_table(columns=["key", "paper_score"])
    return dict(zip(table["key"].to_pylist(), table["paper_score"].to_pylist(), strict=True))


@pytest.mark.parametrize(("size", "patch"), [(32, 4), (64, 8), (96, 8)])
def test_train_calibrate_filter_at_any_decoder_size(tmp_path, fmnist_test, capsys, size, patch):
    shards, det = tmp_path / "shards", str(tmp_path / "det.pt")
    assert main(["shards", "--out", str(shards), "--limit", "40", "--shard-size", "20", "--image-size", "64"]) == 0
    assert main(["train", "--encoder", "fmnist-badencoder", "--aux", "fashion-mnist:train", "--n-aux", "64",
                 "--image-size", str(size), "--patch-size", str(patch), *TINY, "--out", det]) == 0
    assert main(["calibrate", "--detector", det, "--encoder", "fmnist-badencoder", "--reference", "photos",
                 "--n-reference", "48", "--fpr", "0.1"]) == 0
    urls = sorted(map(str, shards.glob("*.tar")))
    summary = run_filter(tmp_path, urls, "fmnist-badencoder", det, capsys)
    assert summary["kept"] + summary["dropped"] == 40 and summary["error"] == 0
    detector = Detector.load(det)
    assert (detector.config.image_size, detector.config.patch_size) == (size, patch)
    assert detector.encoder_input == EncoderInput(32)  # the bundled encoder's own input, whatever the decoder's size
    # the stage decodes once at the larger size and scores exactly what the Scorer gives for those pixels
    scorer = Scorer(load_encoder("fmnist-badencoder"), detector)
    assert scorer.decode_size == max(32, size)
    keys = [f"fmnist-test-{i:05d}" for i in range(40)]
    expected = scorer.score(decode_shards(urls, size=scorer.decode_size), keys).scores
    assert [parquet_scores(tmp_path)[k] for k in keys] == expected.tolist()


def test_a_224_encoder_end_to_end_on_real_images(tmp_path, fmnist_test, capsys):
    """The issue's command (a torchvision ResNet-18, decoder 64 with patch 8) on Fashion-MNIST upsampled
    and the bundled photos; the backbone gets 224x224 with ImageNet normalisation, the decoder 64x64."""
    import torchvision

    shards, det = tmp_path / "shards", str(tmp_path / "det.pt")
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet18.pt")  # a user's weights
    spec = f"torchvision:resnet18@{tmp_path / 'resnet18.pt'}"
    assert main(["shards", "--out", str(shards), "--limit", "24", "--shard-size", "12", "--image-size", "256"]) == 0
    assert main(["train", "--encoder", spec, "--aux", "fashion-mnist:train", "--n-aux", "32",
                 "--image-size", "64", "--patch-size", "8", *TINY, "--out", det]) == 0
    assert main(["calibrate", "--detector", det, "--encoder", spec, "--reference", "photos",
                 "--n-reference", "32", "--contamination", "0.1"]) == 0
    urls = sorted(map(str, shards.glob("*.tar")))
    summary = run_filter(tmp_path, urls, spec, det, capsys)
    assert summary["kept"] + summary["dropped"] == 24 and summary["error"] == 0
    detector = Detector.load(det)
    assert detector.encoder_input == EncoderInput(224, 256, IMAGENET_MEAN, IMAGENET_STD)

    scorer = Scorer(load_encoder(spec), detector)
    assert scorer.decode_size == 256
    seen: dict[str, list] = {"encoder": [], "decoder": []}
    hooks = [scorer.encoder.module.register_forward_pre_hook(lambda _, a: seen["encoder"].append(a[0])),
             scorer.detector.model.register_forward_pre_hook(lambda _, a: seen["decoder"].append(a[0]))]
    images = decode_shards(urls, size=256)[:16]
    scorer.score(images, [str(i) for i in range(16)])
    for hook in hooks:
        hook.remove()
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(seen["encoder"][0], (pixels[..., 16:240, 16:240] - mean) / std)  # its crop, its normalisation
    patches = seen["decoder"][0]
    assert patches.shape == (16, 64, 3 * 8 * 8)  # 64x64 in 8x8 patches
    assert abs(patches.mean().item() - pixels.mean().item()) < 0.01  # the whole image, unnormalised


def test_a_patch_size_that_does_not_divide_fails_at_config_time(tmp_path, capsys):
    code = main(["train", "--encoder", "torchvision:resnet18", "--image-size", "60", "--patch-size", "8",
                 "--out", str(tmp_path / "det.pt")])
    assert code == 2 and not (tmp_path / "det.pt").exists()
    assert "the decoder's image size 60 is not a multiple of its patch size 8" in capsys.readouterr().err


def test_demo_size_flags_are_checked_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--image-size", "60", "--patch-size", "8"]) == 2
    assert "the decoder's image size 60 is not a multiple of its patch size 8" in capsys.readouterr().err
    assert not (tmp_path / ".dedefilter-demo").exists()
