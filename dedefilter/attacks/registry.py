"""The attacks the detection benchmark runs, by name: each a recorded recipe that yields an encoder.

``load_or_train(name)`` returns a backdoored :class:`Encoder` and its card, training it once into a
cache directory. Every card carries the recipe, seed, data, trigger description, target class and the
linear-probe figures (attack success rate, clean accuracy) that show the backdoor is real.

Kinds of attack:
- ``bundled``: the committed ``fmnist-badencoder`` checkpoint (nothing to train);
- ``badencoder``: BadEncoder-style fine-tuning of the clean ``fmnist-simclr`` encoder (DRUPE-style when
  its config has a distribution weight);
- ``ssl-poison``: SimCLR on Fashion-MNIST train[:50000] where a fraction of all images are target-class
  images carrying the trigger; the attacker controls only those images, never the training. ``init``
  says whether pretraining continues from ``fmnist-simclr`` (affordable on a CPU) or starts from scratch.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..data import FASHION_MNIST_CLASSES, fashion_mnist
from ..encoders import (
    BACKDOORED_ENCODER,
    CLEAN_ENCODER,
    Encoder,
    build_encoder,
    embed_array,
    load_encoder,
    save_encoder,
)
from ..probe import backdoor_report
from ..ssl import SimCLRConfig, train_simclr
from .badencoder import BadEncoderConfig, train_badencoder
from .triggers import (
    BlendTrigger,
    CTRLTrigger,
    PatchTrigger,
    Trigger,
    poison_target_class,
)

DEFAULT_CACHE = Path(".dedefilter-bench") / "attacks"
PRETRAIN = slice(0, 50_000)  # SSL pretraining / shadow data (Fashion-MNIST train)
PROBE_TRAIN = slice(50_000, 60_000)  # held out of both: the downstream probe's training data
T_SHIRT, TROUSER = 0, 1  # a target many classes resemble (shirt, pullover, coat), and a distinct one


@dataclass(frozen=True)
class AttackSpec:
    """One attack: how its encoder is made. Exactly one of ``badencoder`` / ``simclr`` is set unless bundled."""

    name: str
    kind: str  # "bundled" | "badencoder" | "ssl-poison"
    trigger: Trigger
    target_class: int
    summary: str
    badencoder: BadEncoderConfig | None = None
    simclr: SimCLRConfig | None = None
    poison_fraction: float = 0.0
    init: str | None = None  # ssl-poison: continue from this bundled encoder; None = from scratch
    n_pretrain: int = 50_000  # ssl-poison: pretrain on train[:n_pretrain], poisoned

    def describe(self) -> dict:
        recipe = asdict(self.badencoder) if self.badencoder else asdict(self.simclr) if self.simclr else {}
        description = {"attack": self.name, "kind": self.kind, "summary": self.summary,
                       "trigger": self.trigger.describe(), "target_class": self.target_class,
                       "target_name": FASHION_MNIST_CLASSES[self.target_class], "config": recipe}
        if self.kind == "ssl-poison":
            description.update(poison_fraction=self.poison_fraction, init=self.init, n_pretrain=self.n_pretrain)
        return description


SMALL_TRIGGER = PatchTrigger(size=4, cell=1)  # a 4x4 pixel checkerboard: the case pixel error struggles with
_BADENCODER = BadEncoderConfig(target_class=T_SHIRT)  # the bundled attack's recipe, aimed at T-shirt
_DRUPE = replace(_BADENCODER, distribution_weight=1.0, epochs=8)  # the spread slows the pull: 2x epochs
_SSL_CONTINUED = SimCLRConfig(epochs=2, lr=3e-4)
_SSL_SCRATCH = SimCLRConfig(epochs=50, batch_size=512)  # GPU: larger batches, fewer launches

ATTACKS: dict[str, AttackSpec] = {spec.name: spec for spec in [
    AttackSpec("badencoder-patch-trouser", "bundled", PatchTrigger(), TROUSER,
               "BadEncoder, 6x6 checkerboard patch, distinct target (the bundled fmnist-badencoder)"),
    AttackSpec("badencoder-patch-tshirt", "badencoder", PatchTrigger(), T_SHIRT,
               "BadEncoder, 6x6 checkerboard patch, look-alike target", badencoder=_BADENCODER),
    AttackSpec("badencoder-blend-tshirt", "badencoder", BlendTrigger(), T_SHIRT,
               "BadEncoder, full-image noise blended at alpha 0.2", badencoder=_BADENCODER),
    AttackSpec("drupe-patch-tshirt", "badencoder", PatchTrigger(), T_SHIRT,
               "DRUPE-style: BadEncoder plus sliced-Wasserstein matching of triggered embeddings to the "
               "target class's distribution (stealthy: no collapse)",
               badencoder=_DRUPE),
    AttackSpec("drupe-patch-trouser", "badencoder", PatchTrigger(), TROUSER,
               "DRUPE-style (as drupe-patch-tshirt) aimed at the distinct class",
               badencoder=replace(_DRUPE, target_class=TROUSER)),
    AttackSpec("badencoder-small-tshirt", "badencoder", SMALL_TRIGGER, T_SHIRT,
               "BadEncoder, 4x4 checkerboard patch (small trigger)", badencoder=_BADENCODER),
    AttackSpec("badencoder-ctrl-tshirt", "badencoder", CTRLTrigger(), T_SHIRT,
               "BadEncoder with CTRL's frequency trigger (luma DCT, max 5 grey levels): the frequency trigger "
               "injected by encoder fine-tuning, since data poisoning did not take here", badencoder=_BADENCODER),
    AttackSpec("sslpoison-patch-tshirt", "ssl-poison", PatchTrigger(), T_SHIRT,
               "SimCLR data poisoning: 5% of pretraining images are T-shirts with the patch; "
               "continued pretraining of fmnist-simclr on train[:10000]", simclr=_SSL_CONTINUED,
               poison_fraction=0.05, init=CLEAN_ENCODER, n_pretrain=10_000),
    AttackSpec("ctrl-tshirt", "ssl-poison", CTRLTrigger(), T_SHIRT,
               "CTRL: SimCLR data poisoning with a luma DCT trigger on 5% of pretraining images (T-shirts); "
               "continued pretraining of fmnist-simclr on train[:10000]", simclr=_SSL_CONTINUED,
               poison_fraction=0.05, init=CLEAN_ENCODER, n_pretrain=10_000),
    AttackSpec("sslpoison-patch-tshirt-scratch", "ssl-poison", PatchTrigger(), T_SHIRT,
               "SimCLR data poisoning from scratch (GPU recipe): 5% patched T-shirts",
               simclr=_SSL_SCRATCH, poison_fraction=0.05),
    AttackSpec("ctrl-tshirt-scratch", "ssl-poison", CTRLTrigger(), T_SHIRT,
               "CTRL from scratch (GPU recipe): 5% luma-DCT-triggered T-shirts",
               simclr=_SSL_SCRATCH, poison_fraction=0.05),
]}


def embedding_spread(encoder: Encoder, test_x: np.ndarray, test_y: np.ndarray, trigger: Trigger,
                     target_class: int) -> dict:
    """Mean pairwise cosine of embeddings (centred on the clean test mean): triggered non-target test
    images vs clean target-class ones. Near 1 for triggered = collapsed onto one point (BadEncoder);
    near the target class's own value = spread like real target images (what DRUPE aims for)."""
    clean = embed_array(encoder, test_x)
    centre = clean.mean(0)
    triggered = embed_array(encoder, trigger.apply(test_x[test_y != target_class])) - centre

    def mean_cosine(features: torch.Tensor) -> float:
        unit = torch.nn.functional.normalize(features, dim=1)
        n = len(unit)
        return float(((unit.sum(0).pow(2).sum() - n) / (n * (n - 1))).item())

    return {"triggered_mean_cosine": round(mean_cosine(triggered), 4),
            "target_class_mean_cosine": round(mean_cosine(clean[torch.as_tensor(test_y == target_class)] - centre), 4)}


def train_attack(spec: AttackSpec, device: str = "cpu", log=print) -> tuple[torch.nn.Module, dict]:
    """Run one attack's recipe; returns the backdoored module (CPU) and its card with probe figures."""
    train_x, train_y = fashion_mnist("train")
    test_x, test_y = fashion_mnist("test")
    card = {**spec.describe(), "device": device, "torch": torch.__version__}
    start = time.perf_counter()
    if spec.kind == "badencoder":
        clean = load_encoder(CLEAN_ENCODER)
        module, record = train_badencoder(clean.module, train_x[PRETRAIN], train_y[PRETRAIN], spec.trigger,
                                          spec.badencoder, log, device)
        card.update(base_encoder=CLEAN_ENCODER, base_fingerprint=clean.fingerprint,
                    data="shadow set: Fashion-MNIST train[:50000] sample; reference: target-class images")
    elif spec.kind == "ssl-poison":
        images = train_x[:spec.n_pretrain].copy()
        mask = poison_target_class(images, train_y[:spec.n_pretrain], spec.poison_fraction, spec.target_class,
                                   spec.trigger, np.random.default_rng(spec.simclr.seed))
        init = load_encoder(spec.init) if spec.init else None
        module, record = train_simclr(images, spec.simclr, log, init=init.module if init else None, device=device)
        card.update(n_poisoned=int(mask.sum()), base_encoder=spec.init,
                    base_fingerprint=init.fingerprint if init else None,
                    data=f"Fashion-MNIST train[:{spec.n_pretrain}], poisoned in place (target-class images triggered)")
    else:
        raise ValueError(f"attack {spec.name!r} of kind {spec.kind!r} has no recipe to train")
    card["record"] = record
    card["train_seconds"] = round(time.perf_counter() - start, 1)
    encoder = build_encoder(module, spec.name)
    card["probe"] = backdoor_report(encoder, train_x[PROBE_TRAIN], train_y[PROBE_TRAIN], test_x, test_y,
                                    spec.trigger, spec.target_class)
    card["spread"] = embedding_spread(encoder, test_x, test_y, spec.trigger, spec.target_class)
    log(f"{spec.name}: {json.dumps(card['probe'])} {json.dumps(card['spread'])}")
    return module, card


def load_or_train(name: str, cache_dir: str | Path = DEFAULT_CACHE, device: str = "cpu",
                  log=print) -> tuple[Encoder, dict]:
    """The attack's encoder and card: from ``cache_dir/NAME.pt`` if there, else trained and saved there."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; known: {sorted(ATTACKS)}")
    spec = ATTACKS[name]
    if spec.kind == "bundled":
        encoder = load_encoder(BACKDOORED_ENCODER)
        return encoder, {**spec.describe(), **encoder.card}
    path = Path(cache_dir) / f"{name}.pt"
    if path.exists():
        encoder = load_encoder(str(path))
        expected = json.loads(json.dumps(spec.describe()))
        if any(encoder.card.get(key) != value for key, value in expected.items() if key != "summary"):
            raise ValueError(f"{path} was made by a different recipe than attack {name!r}: delete it to retrain")
        return encoder, encoder.card
    module, card = train_attack(spec, device, log)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".pt.partial")
    save_encoder(module, partial, "small_cnn", card)
    partial.replace(path)
    return load_encoder(str(path)), card
