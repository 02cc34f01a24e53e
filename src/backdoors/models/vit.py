"""Vision Transformers (Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for
Image Recognition at Scale", ICLR 2021, arXiv 2010.11929) at the DeiT sizes (Touvron et
al., "Training data-efficient image transformers & distillation through attention",
ICML 2021, arXiv 2012.12877).

The image is cut into `patch_size` x `patch_size` patches, each embedded linearly (a
strided conv); a learned class token is prepended and a learned position embedding added;
`depth` pre-norm encoder blocks follow (LN -> multi-head self-attention -> +x, LN -> MLP
4x with GELU -> +x), then a final LayerNorm.

Stages for defenses: `feature_map` is the patch tokens after the final LayerNorm,
reshaped to [N, D, H/p, W/p], so Grad-CAM (SentiNet), fine-pruning's channel mask and
every other feature-map defense see a spatial map. With `readout: avg` (the default)
`features` is the global average of that map, the paper's "GAP" classifier (its Appendix
D.3), so `features(x) == pool(feature_map(x))` holds as for every model here and the
logits depend on every patch token. With `readout: token` `features` is the final class
token after the last LayerNorm (the paper's and DeiT's classifier); the patch tokens of
the last block then do not reach the logits at all (their Grad-CAM gradient is exactly
zero), so in that mode `feature_map` is the class token itself, as a [N, D, 1, 1] map.
Both readouts have the same parameters (the class token takes part in attention either way).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from backdoors.models.base import MODELS, ImageClassifier
from backdoors.models.blocks import StochasticDepth, check_width_scale

EPS = 1e-6  # LayerNorm epsilon of the reference ViT and DeiT code
Readout = Literal["avg", "token"]


class SelfAttention(nn.Module):
    """Multi-head self-attention: one Linear for q, k, v, scaled dot products, one output
    Linear."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, drop: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=EPS)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=EPS)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop = StochasticDepth(drop)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.mlp(self.norm2(x)))


class ViTBody(nn.Module):
    """Pixels -> (resize) -> patch tokens + class token -> encoder -> LN -> a [N, D, h, w]
    map of the patch tokens (`readout: avg`) or the class token as [N, D, 1, 1] (`token`)."""

    def __init__(self, in_channels: int, size: tuple[int, int] | None, grid: tuple[int, int],
                 patch: int, dim: int, depth: int, heads: int, drop_path: float,
                 readout: Readout) -> None:
        super().__init__()
        self.size, self.grid, self.readout = size, grid, readout
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Parameter(torch.zeros(1, 1 + grid[0] * grid[1], dim))
        self.blocks = nn.Sequential(*[
            EncoderBlock(dim, heads, drop_path * i / max(1, depth - 1)) for i in range(depth)
        ])
        self.norm = nn.LayerNorm(dim, eps=EPS)

    def forward(self, x: Tensor) -> Tensor:
        if self.size is not None and tuple(x.shape[2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # [N, h*w, D]
        tokens = torch.cat([self.class_token.expand(len(x), -1, -1), tokens], dim=1)
        tokens = self.norm(self.blocks(tokens + self.position))
        if self.readout == "token":
            return tokens[:, 0, :, None, None]
        return tokens[:, 1:].transpose(1, 2).reshape(len(x), -1, *self.grid)


def patch_grid(input_shape: tuple[int, ...], image_size: int | None,
               patch_size: int | None) -> tuple[tuple[int, int] | None, int, tuple[int, int]]:
    """(resize target or None, patch size, token grid) for an input shape and the options.

    No `image_size` keeps the input size; no `patch_size` takes 16 (the ViT-B/16 and DeiT
    patch) for images of 128 pixels or more and 4 below (32x32 -> an 8x8 grid, the usual
    CIFAR choice; 28x28 -> 7x7; 64x64 -> 16x16).
    """
    height, width = input_shape[1:]
    size = None if image_size is None else (image_size, image_size)
    if size is not None:
        height, width = size
    patch = patch_size if patch_size is not None else (16 if min(height, width) >= 128 else 4)
    if patch < 1 or height % patch or width % patch:
        raise ValueError(f"patch_size {patch} must divide the image size {height}x{width} "
                         "(set image_size to resize the input inside the model)")
    return size, patch, (height // patch, width // patch)


class VisionTransformer(ImageClassifier):
    """Shared ViT: registered subclasses fix `dim`, `depth` and `heads`.

    `body` is a ViTBody, `pool` global average pooling of its map, `head` Linear D ->
    classes. Options: `image_size` (resize inputs to this square inside the model, e.g.
    224 for pretrained-style runs; default: keep the input size), `patch_size` (default 16
    from 128 pixels up, else 4), `readout` (avg or token, see the module docstring),
    `width_scale` (scales D, rounded to a multiple of the head count), `depth` (default the
    model's), `drop_path` (stochastic depth, linear up to this in the last block; default 0).
    """

    dim: int
    depth: int
    heads: int

    def __init__(self, image_size: int | None = None, patch_size: int | None = None,
                 readout: Readout = "avg", width_scale: float = 1.0, depth: int | None = None,
                 drop_path: float = 0.0, **base: Any) -> None:
        super().__init__(**base)
        check_width_scale(width_scale)
        if readout not in ("avg", "token"):
            raise ValueError(f"readout must be avg or token, got {readout!r}")
        layers = self.depth if depth is None else depth
        if layers < 1:
            raise ValueError(f"depth must be a positive integer, got {layers}")
        dim = self.heads * max(1, round(self.dim * width_scale / self.heads))
        size, patch, grid = patch_grid(self.input_shape, image_size, patch_size)
        self.body = ViTBody(self.input_shape[0], size, grid, patch, dim, layers, self.heads,
                            drop_path, readout)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(dim, self.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # Truncated normal (std 0.02) for the embeddings and every Linear, zero biases: the
        # DeiT/timm recipe. The head is not zeroed (as the reference code does for
        # fine-tuning), so a fresh model passes gradients to every layer.
        for param in (self.body.class_token, self.body.position):
            nn.init.trunc_normal_(param, std=0.02)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)


@MODELS.register("vit_tiny")
class ViTTiny(VisionTransformer):
    """ViT-Tiny / DeiT-Ti (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021,
    arXiv 2010.11929; Touvron et al., DeiT, ICML 2021, arXiv 2012.12877).

    D 192, 12 blocks, 3 heads, MLP 768. Defaults: image_size = input, patch_size 16 from
    128 pixels up else 4, readout avg, width_scale 1.0, drop_path 0 (5,717,416 parameters
    at 224x224, patch 16, 1000 classes, as timm's deit_tiny_patch16_224).
    """

    dim, depth, heads = 192, 12, 3


@MODELS.register("vit_small")
class ViTSmall(VisionTransformer):
    """ViT-Small / DeiT-S (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021,
    arXiv 2010.11929; Touvron et al., DeiT, ICML 2021, arXiv 2012.12877).

    D 384, 12 blocks, 6 heads, MLP 1536. Defaults: image_size = input, patch_size 16 from
    128 pixels up else 4, readout avg, width_scale 1.0, drop_path 0 (22,050,664 parameters
    at 224x224, patch 16, 1000 classes, as timm's deit_small_patch16_224).
    """

    dim, depth, heads = 384, 12, 6


@MODELS.register("vit_b_16")
class ViTB16(VisionTransformer):
    """ViT-B/16 (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021,
    arXiv 2010.11929).

    D 768, 12 blocks, 12 heads, MLP 3072. Defaults: image_size = input, patch_size 16 from
    128 pixels up else 4, readout avg, width_scale 1.0, drop_path 0 (86,567,656 parameters
    at 224x224, patch 16, 1000 classes, as torchvision's vit_b_16).
    """

    dim, depth, heads = 768, 12, 12
