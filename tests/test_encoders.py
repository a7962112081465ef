"""The encoder adapter, and the bundled backdoor measured, not assumed."""

from __future__ import annotations

import sys

import pytest
import torch

from dedefilter.attacks.triggers import PatchTrigger
from dedefilter.encoders import load_encoder
from dedefilter.probe import backdoor_report


def test_backdoor_is_real_and_clean_accuracy_holds(fmnist_test):
    from dedefilter.data import fashion_mnist

    train_x, train_y = fashion_mnist("train")
    test_x, test_y = fmnist_test
    backdoored, clean = load_encoder("fmnist-badencoder"), load_encoder("fmnist-simclr")
    target = backdoored.card["target_class"]
    probe = (train_x[50_000:54_000], train_y[50_000:54_000], test_x[:3000], test_y[:3000], PatchTrigger(), target)
    attacked, baseline = backdoor_report(backdoored, *probe), backdoor_report(clean, *probe)
    assert attacked["asr"] >= 0.90
    assert baseline["asr"] < 0.10
    assert attacked["clean_accuracy"] >= baseline["clean_accuracy"] - 0.03


def test_bundled_cards_record_recipe_and_measurements():
    card = load_encoder("fmnist-badencoder").card
    assert card["recipe"] == "badencoder" and card["base_encoder"] == "fmnist-simclr"
    assert {"seed", "target_class", "trigger", "probe", "probe_clean_encoder"} <= set(card)
    assert load_encoder("fmnist-simclr").card["recipe"] == "simclr"


def test_exported_program_gives_the_same_embeddings(tmp_path, encoder):
    images = torch.rand(20, 3, 32, 32)
    batch = torch.export.Dim("batch")
    program = torch.export.export(encoder.module, (images,), dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp_path / "enc.pt2")
    exported = load_encoder(str(tmp_path / "enc.pt2"))
    torch.testing.assert_close(exported.embed(images[:5]), encoder.embed(images[:5]))


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript_file_gives_the_same_embeddings(tmp_path, encoder):
    images = torch.rand(4, 3, 32, 32)
    torch.jit.trace(encoder.module, images).save(str(tmp_path / "enc.ts"))
    scripted = load_encoder(str(tmp_path / "enc.ts"))
    torch.testing.assert_close(scripted.embed(images), encoder.embed(images))


def test_torchvision_and_factory_specs(tmp_path, monkeypatch):
    resnet = load_encoder("torchvision:resnet18_cifar")
    assert resnet.embed(torch.rand(2, 3, 32, 32)).shape == (2, 512)
    (tmp_path / "my_encoders.py").write_text(
        "import torch\ndef tiny():\n    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3072, 8))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    tiny = load_encoder("my_encoders:tiny")
    assert tiny.embed_dim == 8 and tiny.name == "my_encoders:tiny"
    sys.modules.pop("my_encoders", None)


def test_unknown_specs_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="unknown torchvision model"):
        load_encoder("torchvision:not_a_model")
    with pytest.raises(ValueError, match="cannot import encoder factory"):
        load_encoder("no_such_module:factory")
    with pytest.raises(FileNotFoundError):
        load_encoder(str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable encoder checkpoint"):
        load_encoder(str(tmp_path / "junk.pt"))
