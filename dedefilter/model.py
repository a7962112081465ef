"""The DeDe model: an MAE-style ViT that reconstructs an image from a few visible patches and the
frozen encoder's embedding, which replaces the class token (linear projection, no bias), and its loss
(:func:`masked_patch_mse`), which training minimises and scoring reports."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .config import DeDeConfig


class Block(nn.Module):
    """Pre-norm transformer block with fused attention (``scaled_dot_product_attention``)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(attended)
        return x + self.mlp(self.norm2(x))


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, C * patch * patch), patches in row-major order."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpatchify(patches: torch.Tensor, patch: int, channels: int = 3) -> torch.Tensor:
    """The inverse of :func:`patchify`: (B, N, C * patch * patch) -> (B, C, H, W) for square images."""
    b, n, _ = patches.shape
    side = int(round(n ** 0.5))
    x = patches.reshape(b, side, side, channels, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels, side * patch, side * patch)


def masked_patch_mse(predicted: torch.Tensor, patches: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE over the masked patches only (the visible ones are pasted back when scoring)."""
    masked = torch.ones(patches.shape[:2], dtype=patches.dtype, device=patches.device).scatter_(1, visible, 0.0)
    per_patch = (predicted - patches).square().mean(-1)
    return (per_patch * masked).sum(1) / masked.sum(1)


class DeDeModel(nn.Module):
    def __init__(self, config: DeDeConfig, embed_dim: int):
        super().__init__()
        self.config = config
        n, dim, pixels = config.n_patches, config.dim, 3 * config.patch_size ** 2
        self.patch_embed = nn.Linear(pixels, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.encoder_pos = nn.Parameter(torch.zeros(1, n, dim))
        self.encoder = nn.Sequential(*[Block(dim, config.heads) for _ in range(config.encoder_depth)])
        self.encoder_norm = nn.LayerNorm(dim)
        self.project = nn.Linear(embed_dim, dim, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.decoder_pos = nn.Parameter(torch.zeros(1, n + 1, dim))
        self.decoder = nn.Sequential(*[Block(dim, config.heads) for _ in range(config.decoder_depth)])
        self.head = nn.Linear(dim, pixels)
        for p in (self.cls_token, self.encoder_pos, self.mask_token, self.decoder_pos):
            nn.init.trunc_normal_(p, std=0.02)

    def forward(self, patches: torch.Tensor, embeddings: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Predict every patch (B, N, 3*p*p) from the visible ones (indexes (B, V)) and the embeddings."""
        b, n, _ = patches.shape
        dim = self.config.dim
        gather = visible.unsqueeze(-1).expand(-1, -1, dim)
        tokens = self.patch_embed(patches.gather(1, visible.unsqueeze(-1).expand(-1, -1, patches.shape[2])))
        tokens = tokens + self.encoder_pos.expand(b, -1, -1).gather(1, gather)
        if visible.shape[1]:  # with no visible patch the encoder's output would be replaced anyway
            encoded = self.encoder_norm(self.encoder(torch.cat([self.cls_token.expand(b, -1, -1), tokens], 1)))[:, 1:]
        else:
            encoded = tokens
        full = self.mask_token.expand(b, n, dim).scatter(1, gather, encoded)
        sequence = torch.cat([self.project(embeddings).unsqueeze(1), full], 1) + self.decoder_pos
        return self.head(self.decoder(sequence)[:, 1:])


class PackedLinear(nn.Module):
    """An inference-only :class:`torch.nn.Linear` whose weight oneDNN has laid out once for its own GEMM in ``dtype``
    (and, with ``gelu``, the exact GELU that follows it fused in): on the CPUs measured fp32 runs the DeDe model's
    shapes ~2x faster than torch's default CPU matmul, which lays the weight out again at every call, and bf16 ~2x
    faster again where the CPU computes bf16 natively. The input is cast to ``dtype``; the output is float32 unless
    ``feeds_packed`` (the MLP's hidden layer, whose output only the next packed layer reads). In fp32 the outputs
    agree with ``nn.Linear`` to float rounding (~1e-6)."""

    def __init__(self, linear: nn.Linear, rows: int, gelu: bool = False, dtype: torch.dtype = torch.float32,
                 feeds_packed: bool = False):
        super().__init__()
        self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().to(dtype), rows)
        self.bias = None if linear.bias is None else linear.bias.detach().to(dtype)
        self.activation = ("gelu", "none") if gelu else ("none", "")  # oneDNN's (attr, algorithm): "none" = erf
        self.feeds_packed = feeds_packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attr, algorithm = self.activation
        out = torch.ops.mkldnn._linear_pointwise(x.to(self.weight.dtype), self.weight, self.bias, attr, [], algorithm)
        return out if self.feeds_packed else out.float()


def can_pack(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this torch's oneDNN can run :class:`PackedLinear` in ``dtype`` on this CPU (bf16: natively)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_inference_copy(model: nn.Module, rows: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A copy of ``model`` for inference on a CPU, every linear layer a :class:`PackedLinear` in ``dtype`` laid out
    for inputs of ``rows`` rows (any row count works), an exact GELU right after one fused into it. In bf16 only the
    linear layers compute in bf16 and the MLP's hidden activations stay bf16; layer norms, attention and the
    residual stream stay fp32 (in bf16 they ran no faster on the CPU measured, attention ~2x slower). ``model``
    itself when :func:`can_pack` says no. The packed weights cannot be pickled: build the copy in the process
    that scores."""
    if not can_pack(dtype):
        return model
    packed = copy.deepcopy(model).eval()
    for module in list(packed.modules()):
        children = list(module.named_children())
        followers = [child for _, child in children[1:]] + [None]
        for (name, child), after in zip(children, followers):
            if isinstance(child, nn.Linear):
                gelu = isinstance(module, nn.Sequential) and isinstance(after, nn.GELU) and after.approximate == "none"
                feeds_packed = gelu and int(name) + 2 < len(module) and isinstance(module[int(name) + 2], nn.Linear)
                setattr(module, name, PackedLinear(child, rows, gelu, dtype, feeds_packed))
                if gelu:
                    module[int(name) + 1] = nn.Identity()  # now inside the linear layer
    return packed
