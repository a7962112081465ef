"""The DeDe method's settings, with the paper's defaults (official code: tardisblue9/DeDe)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeDeConfig:
    """Model, masking and training settings of one detector; stored inside its checkpoint.

    With 4x4 patches at 32x32 there are 64 patches: the training ratio 0.9 keeps 6 visible, the
    scoring ratio 0.99 keeps int(64 * 0.01) = 0, so the paper's score reconstructs the whole image from
    the encoder's embedding alone. ``score_masks`` > 1 averages the score over that many masks.

    ``image_size`` is the decoder's view of an image (its side in pixels), a method choice independent
    of the encoder's own input size (:class:`dedefilter.encoders.EncoderInput`); the patch size must
    divide it.
    """

    image_size: int = 32
    patch_size: int = 4
    dim: int = 192
    heads: int = 3
    encoder_depth: int = 12  # MAE side over visible patches; the official training script's default
    decoder_depth: int = 4
    train_mask_ratio: float = 0.9
    score_mask_ratio: float = 0.99
    score_masks: int = 1
    lr: float = 1e-3
    weight_decay: float = 1e-6
    batch_size: int = 256
    epochs: int = 20
    seed: int = 0
    train_precision: str = "auto"  # "bf16" autocast (2x faster on CPUs with native bf16), "fp32", or "auto"

    def __post_init__(self) -> None:
        if self.image_size < 1 or self.patch_size < 1:
            raise ValueError(f"image size and patch size must be positive, got {self.image_size} and {self.patch_size}")
        if self.image_size % self.patch_size:
            fits = [p for p in range(2, self.image_size // 2 + 1) if self.image_size % p == 0]
            raise ValueError(f"the decoder's image size {self.image_size} is not a multiple of its patch size "
                             f"{self.patch_size}: choose a patch size that divides it ({', '.join(map(str, fits[:8]))}) "
                             "or another image size")
        if self.dim % self.heads:
            raise ValueError(f"the DeDe model's width {self.dim} is not a multiple of its {self.heads} heads")

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def n_visible(self, mask_ratio: float) -> int:
        """Visible patches at a mask ratio, as the official code counts them: int(N * (1 - ratio))."""
        return int(self.n_patches * (1 - mask_ratio))
