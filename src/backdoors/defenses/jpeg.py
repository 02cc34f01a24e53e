"""Baseline JPEG compression in plain torch, batched (TeCo's `jpeg_compression`).

What PIL (libjpeg) does when it saves at a quality: grey images as one luminance plane;
colour images in YCbCr (JFIF) with Cb and Cr averaged over 2x2 pixels (4:2:0), each
plane cut into 8x8 blocks (edges replicated up to whole blocks), transformed by the DCT,
quantised by the Annex K tables scaled to the quality as the IJG code scales them, and
decoded back, chroma upsampled by libjpeg's triangle filter. Within about one grey level
of PIL's output (tests/test_defenses_input.py compares them).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# JPEG Annex K quantisation tables (luminance, chrominance), row-major 8x8.
LUMA = (16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
        14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
        18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
        49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99)
CHROMA = (17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99,
          24, 26, 56, 99, 99, 99, 99, 99, 47, 66, 99, 99, 99, 99, 99, 99) + (99,) * 32


def quant_table(base: tuple[int, ...], quality: int) -> Tensor:
    """The IJG (libjpeg, PIL) scaling of a base table to `quality` (1..100), baseline
    entries clamped to 1..255."""
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    table = torch.tensor(base, dtype=torch.float64).view(8, 8)
    return ((table * scale + 50) // 100).clamp(1, 255)


def dct_matrix() -> Tensor:
    """The orthonormal 8-point DCT-II (JPEG's transform: D @ block @ D.T)."""
    k, n = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    d = torch.cos((2 * n + 1) * k * math.pi / 16) * math.sqrt(2 / 8)
    d[0] = math.sqrt(1 / 8)
    return d.double()


def jpeg_plane(plane: Tensor, table: Tensor) -> Tensor:
    """One channel [N, H, W] (0..255) through 8x8 DCT, quantisation and back; edges are
    replicated up to whole blocks, as libjpeg pads."""
    n, h, w = plane.shape
    ph, pw = -h % 8, -w % 8
    padded = F.pad(plane[:, None], (0, pw, 0, ph), mode="replicate")[:, 0] if ph or pw \
        else plane
    bh, bw = padded.shape[1] // 8, padded.shape[2] // 8
    blocks = padded.reshape(n, bh, 8, bw, 8).transpose(2, 3) - 128
    d = dct_matrix().to(plane.device, plane.dtype)
    t = table.to(plane.device, plane.dtype)
    coef = torch.round(d @ blocks @ d.T / t) * t
    back = (d.T @ coef @ d + 128).transpose(2, 3).reshape(n, bh * 8, bw * 8)
    return back[:, :h, :w]


def jpeg(x: Tensor, quality: int) -> Tensor:
    """Baseline JPEG at `quality` as PIL saves it: grey images as one luminance plane;
    colour images in YCbCr with Cb and Cr averaged over 2x2 pixels (4:2:0)."""
    v = (x.double() * 255).round()
    if x.shape[1] != 3:
        planes = [jpeg_plane(v[:, c], quant_table(LUMA, quality)) for c in range(x.shape[1])]
        return (torch.stack(planes, 1).round().clamp(0, 255) / 255).to(x.dtype)
    r, g, b = v.unbind(1)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 128
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 128
    h, w = x.shape[-2:]
    chroma = F.pad(torch.stack([cb, cr], 1), (0, w % 2, 0, h % 2), mode="replicate")
    small = F.avg_pool2d(chroma, 2)
    ctable = quant_table(CHROMA, quality)
    small = torch.stack([jpeg_plane(small[:, i], ctable) for i in range(2)], 1)
    # libjpeg's default "fancy" upsampling: a triangle filter, i.e. bilinear at 2x.
    up = F.interpolate(small, scale_factor=2, mode="bilinear", align_corners=False)
    cb, cr = up[..., :h, :w].unbind(1)
    y = jpeg_plane(y, quant_table(LUMA, quality))
    rgb = torch.stack([y + 1.402 * (cr - 128),
                       y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                       y + 1.772 * (cb - 128)], 1)
    return (rgb.round().clamp(0, 255) / 255).to(x.dtype)
