"""The encoder adapter, and the bundled backdoor measured, not assumed."""

from __future__ import annotations

import sys

import pytest
import torch

from dedefilter.attacks.triggers import PatchTrigger
from dedefilter.encoders import IMAGENET_MEAN, IMAGENET_STD, EncoderInput, fingerprint, load_encoder
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


def test_a_torchvision_weights_file_loads_strictly(tmp_path):
    import torchvision

    source = torchvision.models.resnet18(weights=None)  # stands in for trained weights: a full state dict, head included
    torch.save(source.state_dict(), tmp_path / "resnet18.pt")
    loaded = load_encoder(f"torchvision:resnet18@{tmp_path / 'resnet18.pt'}")
    source.fc = torch.nn.Identity()
    assert loaded.fingerprint == fingerprint(source)
    images = torch.rand(2, 3, 224, 224)
    torch.testing.assert_close(loaded.module(images), source.eval()(images))


@pytest.mark.parametrize("wrong", ["another model", "not a state dict"])
def test_a_wrong_torchvision_weights_file_is_refused(tmp_path, wrong):
    import torchvision

    state = torchvision.models.resnet34(weights=None).state_dict() if wrong == "another model" else {"model": {}}
    torch.save(state, tmp_path / "weights.pt")
    # on main: loaded with strict=False, a random resnet18 with a valid fingerprint and no word
    with pytest.raises(ValueError, match=r"weights.pt (does not hold torchvision resnet18 weights|is not a state dict)"):
        load_encoder(f"torchvision:resnet18@{tmp_path / 'weights.pt'}")


def test_torchvision_specs_carry_their_weights_transforms():
    assert load_encoder("torchvision:resnet50").input == EncoderInput(224, 232, IMAGENET_MEAN, IMAGENET_STD)
    assert load_encoder("torchvision:resnet18_cifar").input == EncoderInput(32, None, IMAGENET_MEAN, IMAGENET_STD)
    assert load_encoder("fmnist-badencoder").input == EncoderInput(32)


def test_the_encoder_receives_its_own_size_and_normalisation():
    """torchvision's own transforms on a real photo give exactly what reaches the backbone."""
    from torchvision.transforms import v2

    from dedefilter.data import load_photo

    encoder = load_encoder("torchvision:resnet18")
    seen = []
    hook = encoder.module.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    photo = torch.from_numpy(load_photo("astronaut")).permute(2, 0, 1)[None].float() / 255  # 512x512
    encoder.embed(photo)
    hook.remove()
    reference = v2.Compose([v2.Resize(256, antialias=True), v2.CenterCrop(224), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    assert seen[0].shape == (1, 3, 224, 224)
    torch.testing.assert_close(seen[0], reference(photo))
