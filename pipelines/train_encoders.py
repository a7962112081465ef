"""Reproduce the bundled encoders: SimCLR on Fashion-MNIST, then a BadEncoder-style backdoored copy.

    python pipelines/train_encoders.py simclr       # ~10 min on 2 cores
    python pipelines/train_encoders.py badencoder   # ~3 min, needs the simclr checkpoint

Each checkpoint carries its card: recipe, seed, data, and the linear-probe measurements that show the
backdoor is real (ASR on triggered non-target test images, clean accuracy beside the clean encoder's
and a random-init encoder's).
"""

from __future__ import annotations

import argparse
import json

import torch

from dedefilter.attacks.badencoder import BadEncoderConfig, train_badencoder
from dedefilter.attacks.registry import PROBE_TRAIN  # probe data is held out of SimCLR and the shadow set
from dedefilter.attacks.triggers import PatchTrigger
from dedefilter.data import FASHION_MNIST_CLASSES, fashion_mnist
from dedefilter.encoders import (
    BACKDOORED_ENCODER,
    BUNDLED_DIR,
    CLEAN_ENCODER,
    SmallCNN,
    build_encoder,
    load_encoder,
    save_encoder,
)
from dedefilter.probe import backdoor_report
from dedefilter.ssl import SimCLRConfig, train_simclr

CLEAN, BACKDOORED = CLEAN_ENCODER, BACKDOORED_ENCODER
TARGET_CLASS = 1  # Trouser: a class that looks like no other, so the demo's case is the paper's


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["simclr", "badencoder"])
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    train_x, train_y = fashion_mnist("train")
    test_x, test_y = fashion_mnist("test")
    trigger = PatchTrigger()
    probe_data = (train_x[PROBE_TRAIN], train_y[PROBE_TRAIN], test_x, test_y)
    if args.stage == "simclr":
        config = SimCLRConfig(epochs=8)
        module, record = train_simclr(train_x[:50_000], config)
        card = {"data": "Fashion-MNIST train[:50000] (Debian dataset-fashion-mnist), zero-padded to 32x32",
                **record}
        card["probe"] = backdoor_report(build_encoder(module, CLEAN), *probe_data, trigger, TARGET_CLASS)
        card["probe_random_init"] = backdoor_report(build_encoder(SmallCNN().eval(), "random"), *probe_data,
                                                    trigger, TARGET_CLASS)
        save_encoder(module, BUNDLED_DIR / f"{CLEAN}.pt", "small_cnn", card)
    else:
        clean = load_encoder(CLEAN)
        config = BadEncoderConfig(target_class=TARGET_CLASS)
        module, record = train_badencoder(clean.module, train_x[:50_000], train_y[:50_000], trigger, config)
        card = {"data": "shadow set: Fashion-MNIST train[:50000] sample; reference: target-class images",
                "base_encoder": CLEAN, "base_fingerprint": clean.fingerprint,
                "target_class": TARGET_CLASS, "target_name": FASHION_MNIST_CLASSES[TARGET_CLASS],
                "trigger": trigger.describe(), **record}
        card["probe"] = backdoor_report(build_encoder(module, BACKDOORED), *probe_data, trigger, TARGET_CLASS)
        card["probe_clean_encoder"] = clean.card["probe"]
        save_encoder(module, BUNDLED_DIR / f"{BACKDOORED}.pt", "small_cnn", card)
    print(json.dumps(card["probe"], indent=2))


if __name__ == "__main__":
    main()
