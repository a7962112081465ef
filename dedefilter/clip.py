"""A small CLIP that trains on 2 CPU cores: the image tower is the bundled encoder's architecture
(:class:`~dedefilter.encoders.SmallCNN`), the text tower an embedding bag over CLIP's own BPE
tokenizer (the vocabulary shipped inside the ``open_clip_torch`` wheel: nothing is downloaded).

Trained with the symmetric InfoNCE loss and a learned temperature (Radford et al., 2021). Zero-shot
classification compares an image's embedding with each class's prompt embeddings (averaged over
templates); the attack success rate (ASR) is the share of triggered non-target images it sends to
the target. The image tower alone is a plain ``small_cnn`` encoder, so ``--encoder tower.pt`` works
in every ``dedefilter`` command.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .encoders import SmallCNN, load_encoder, to_float

CLIP_FORMAT = "dedefilter-clip/1"
VOCAB_SIZE = 49408  # CLIP's BPE vocabulary (open_clip's SimpleTokenizer)
PROMPT_TEMPLATES = ("a photo of a {}.", "a black and white photo of the {}.", "a small image of a {}.")


def tokenize(texts: Sequence[str], context_length: int) -> torch.Tensor:
    """CLIP's BPE tokenizer (lower-cased, ``<start>`` ... ``<end>``, zero padded): (N, context_length) int64."""
    try:
        from open_clip.tokenizer import tokenize as bpe_tokenize
    except ImportError as err:
        raise ImportError(f"the CLIP text tower needs CLIP's tokenizer: pip install 'dedefilter[clip]' ({err})") from err
    return bpe_tokenize(list(texts), context_length=context_length)


@dataclass(frozen=True)
class ClipConfig:
    """Model and training settings of one small CLIP; stored in its checkpoint."""

    embed_dim: int = 128  # the shared image-text space
    text_width: int = 128
    context_length: int = 24
    init: str | None = "fmnist-simclr"  # start the image tower from this encoder (None: random)
    epochs: int = 8
    batch_size: int = 256
    lr: float = 1e-3
    tower_lr: float = 3e-4  # the image tower's (pretrained) learning rate
    weight_decay: float = 1e-4
    init_temperature: float = 0.07
    seed: int = 0


class TextTower(nn.Module):
    """Mean of the caption's token embeddings (padding excluded), then a linear layer."""

    def __init__(self, width: int, embed_dim: int):
        super().__init__()
        self.tokens = nn.EmbeddingBag(VOCAB_SIZE, width, mode="mean", padding_idx=0)
        self.proj = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, embed_dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(self.tokens(tokens))


class SmallCLIP(nn.Module):
    def __init__(self, config: ClipConfig = ClipConfig()):
        super().__init__()
        self.config = config
        self.image = SmallCNN()
        self.image_proj = nn.Linear(self.image.embed_dim, config.embed_dim)
        self.text = TextTower(config.text_width, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / config.init_temperature)))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> L2-normalised (B, embed_dim)."""
        return F.normalize(self.image_proj(self.image(images)), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(tokens), dim=-1)


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: pair i's image should pick caption i among the batch, and vice versa."""
    logits = logit_scale.exp().clamp(max=100) * image_emb @ text_emb.T
    targets = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def train_clip(images: np.ndarray, captions: Sequence[str], config: ClipConfig = ClipConfig(),
               log=print) -> tuple[SmallCLIP, dict]:
    """Train a :class:`SmallCLIP` on uint8 images (N, 32, 32, 3) and their captions; returns it and its record."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model = SmallCLIP(config)
    if config.init:
        model.image.load_state_dict(load_encoder(config.init).module.state_dict())
    tower = list(model.image.parameters())
    rest = [p for name, p in model.named_parameters() if not name.startswith("image.")]
    optimizer = torch.optim.AdamW([{"params": tower, "lr": config.tower_lr}, {"params": rest, "lr": config.lr}],
                                  weight_decay=config.weight_decay)
    data, tokens = to_float(images), tokenize(captions, config.context_length)
    steps_per_epoch = len(data) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(data)} pairs are fewer than one batch of {config.batch_size}")
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, [config.tower_lr, config.lr],
                                                   total_steps=config.epochs * steps_per_epoch, pct_start=0.1)
    start, losses = time.perf_counter(), []
    model.train()
    for epoch in range(config.epochs):
        order = torch.randperm(len(data), generator=generator)
        total = torch.zeros(())
        for step in range(steps_per_epoch):
            idx = order[step * config.batch_size:(step + 1) * config.batch_size]
            loss = clip_loss(model.encode_image(data[idx]), model.encode_text(tokens[idx]), model.logit_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.detach()
        losses.append(round(float(total) / steps_per_epoch, 4))
        log(f"clip epoch {epoch + 1}/{config.epochs} loss {losses[-1]:.4f} "
            f"temperature {1 / model.logit_scale.exp().item():.4f} ({time.perf_counter() - start:.0f}s)")
    record = {"recipe": "clip (symmetric InfoNCE, learned temperature)", **asdict(config), "n_pairs": len(images),
              "losses": losses, "temperature": round(1 / model.logit_scale.exp().item(), 5),
              "train_seconds": round(time.perf_counter() - start, 1),
              "tokenizer": "CLIP BPE (open_clip_torch SimpleTokenizer, vocabulary bundled in the wheel)"}
    return model.eval(), record


@torch.inference_mode()
def embed_images(model: SmallCLIP, images: np.ndarray, batch_size: int = 1024) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> normalised image embeddings (N, embed_dim)."""
    model.eval()
    return torch.cat([model.encode_image(to_float(images[i:i + batch_size])) for i in range(0, len(images), batch_size)])


@torch.inference_mode()
def class_embeddings(model: SmallCLIP, names: Sequence[str],
                     templates: Sequence[str] = PROMPT_TEMPLATES) -> torch.Tensor:
    """One normalised text embedding per class: the mean over prompt templates (CLIP's prompt ensembling)."""
    prompts = [template.format(name) for name in names for template in templates]
    text = model.encode_text(tokenize(prompts, model.config.context_length))
    return F.normalize(text.view(len(names), len(templates), -1).mean(1), dim=-1)


def zero_shot_predict(image_emb: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
    """The class whose prompt embedding is nearest (cosine) to each image embedding."""
    return (F.normalize(image_emb, dim=-1) @ F.normalize(class_emb, dim=-1).T).argmax(1)


def attack_success_rate(predictions: np.ndarray, true_labels: np.ndarray, target: int) -> float:
    """Share of the non-target-class images (all triggered) that are classified as the target."""
    source = np.asarray(true_labels) != target
    if not source.any():
        raise ValueError("ASR needs images whose true class is not the target")
    return float((np.asarray(predictions)[source] == target).mean())


def zero_shot_report(model: SmallCLIP, names: Sequence[str], test_x: np.ndarray, test_y: np.ndarray,
                     trigger, target: int) -> dict:
    """Zero-shot clean accuracy on the test images and ASR on their triggered non-target copies."""
    classes = class_embeddings(model, names)
    clean = zero_shot_predict(embed_images(model, test_x), classes).numpy()
    source = test_y != target
    triggered = zero_shot_predict(embed_images(model, trigger.apply(test_x[source])), classes).numpy()
    return {"zero_shot_accuracy": round(float((clean == test_y).mean()), 4),
            "zero_shot_asr": round(attack_success_rate(triggered, test_y[source], target), 4),
            "n_test": len(test_x), "n_triggered": int(source.sum()), "prompts": list(PROMPT_TEMPLATES)}


def save_clip(model: SmallCLIP, path: str | Path, card: dict) -> None:
    """The whole CLIP (both towers, for zero-shot use), with its config and card."""
    torch.save({"format": CLIP_FORMAT, "config": json.dumps(asdict(model.config)), "state_dict": model.state_dict(),
                "card": json.dumps(card, sort_keys=True)}, path)


def load_clip(path: str | Path) -> tuple[SmallCLIP, dict]:
    """Load a :func:`save_clip` checkpoint (weights only, strict)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CLIP_FORMAT:
        raise ValueError(f"{path} is not a dedefilter CLIP checkpoint (no format {CLIP_FORMAT!r})")
    model = SmallCLIP(ClipConfig(**json.loads(checkpoint["config"])))
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval(), json.loads(checkpoint["card"])
