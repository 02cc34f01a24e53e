"""Image corruptions of ImageNet-C (Hendrycks & Dietterich, ICLR 2019, arXiv 1903.12261) in
plain torch, batched, for TeCo.

Each corruption takes pixels [N, C, H, W] in [0, 1], a severity 1..5 and a generator, and
returns corrupted pixels in [0, 1] at 8-bit levels (the reference returns uint8 images).
The constants are those of the `imagecorruptions` package (Michaelis et al., arXiv
1907.07484), which TeCo's official code calls: ImageNet-C's, used unchanged on small
images, except the elastic transform, which that package scales to the image size. Where
the reference calls OpenCV, scikit-image, SciPy or PIL the operation is re-derived here:
the defocus disk blurred by a 3x3 (5x5 above radius 8) Gaussian; motion blur as the
package's own shift-and-add kernel; zoom blur and the elastic field resampled
bilinearly (grid_sample); pixelate as PIL's BOX downsizing and NEAREST upsizing (weight
matrices); fog's diamond-square plasma; JPEG in defenses/jpeg.py. A grey image is treated
as one channel (the package stacks it to RGB: the same for every corruption here).
Not implemented: glass blur (sequential pixel swaps, no batched equivalent), snow and
frost (needs the package's frost photographs).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from backdoors.defenses.jpeg import jpeg

Corruption = Callable[[Tensor, int, torch.Generator], Tensor]

GAUSSIAN = (0.08, 0.12, 0.18, 0.26, 0.38)
SHOT = (60.0, 25.0, 12.0, 5.0, 3.0)
IMPULSE = (0.03, 0.06, 0.09, 0.17, 0.27)
DEFOCUS = ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))
MOTION = ((10, 3.0), (15, 5.0), (15, 8.0), (15, 12.0), (20, 15.0))
ZOOM = ((1.11, 0.01), (1.16, 0.01), (1.21, 0.02), (1.26, 0.02), (1.31, 0.03))
BRIGHTNESS = (0.1, 0.2, 0.3, 0.4, 0.5)
CONTRAST = (0.4, 0.3, 0.2, 0.1, 0.05)
PIXELATE = (0.6, 0.5, 0.4, 0.3, 0.25)
JPEG_QUALITY = (25, 18, 15, 10, 7)
FOG = ((1.5, 2.0), (2.0, 2.0), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4))
ELASTIC_ALPHA = (12.5, 16.25, 21.25, 25.0, 30.0)  # 250 * (0.05, 0.065, 0.085, 0.1, 0.12)


def _rand(shape: tuple[int, ...], g: torch.Generator, like: Tensor) -> Tensor:
    """Uniform noise drawn on the CPU from `g` (the same numbers on every device)."""
    return torch.rand(shape, generator=g, dtype=torch.float64).to(like.device, like.dtype)


def gaussian_noise(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    noise = torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.device, x.dtype)
    return x + GAUSSIAN[severity - 1] * noise


def shot_noise(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    c = SHOT[severity - 1]
    return torch.poisson((x * c).double().cpu(), generator=g).to(x.device, x.dtype) / c


def impulse_noise(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    """Salt and pepper: a share `amount` of the values flipped, half to 1, half to 0."""
    amount = IMPULSE[severity - 1]
    u = _rand(tuple(x.shape), g, x)
    return torch.where(u < amount / 2, 1.0, torch.where(u < amount, 0.0, x))


def gaussian_kernel1d(size: int, sigma: float) -> Tensor:
    """OpenCV's Gaussian kernel of odd `size` (normalised to sum 1)."""
    t = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    k = torch.exp(-(t**2) / (2 * sigma**2))
    return k / k.sum()


def filter2d(x: Tensor, kernel: Tensor) -> Tensor:
    """Each channel correlated with the square `kernel`, borders mirrored (OpenCV's
    default, BORDER_REFLECT_101), or replicated when the image is smaller than the
    kernel's reach."""
    pad = kernel.shape[-1] // 2
    mode = "reflect" if pad < min(x.shape[-2:]) else "replicate"
    c = x.shape[1]
    weight = kernel.to(x.device, x.dtype).expand(c, 1, *kernel.shape)
    return F.conv2d(F.pad(x, (pad,) * 4, mode=mode), weight, groups=c)


def disk_kernel(radius: int, alias_blur: float) -> Tensor:
    """ImageNet-C's defocus kernel: a disk of `radius` normalised to sum 1, then blurred by
    a small Gaussian (`alias_blur`) against aliasing."""
    reach, ksize = (8, 3) if radius <= 8 else (radius, 5)
    t = torch.arange(-reach, reach + 1, dtype=torch.float64)
    disk = ((t[:, None] ** 2 + t[None, :] ** 2) <= radius**2).double()
    disk = disk / disk.sum()
    g1 = gaussian_kernel1d(ksize, alias_blur)
    blurred = filter2d(disk[None, None], torch.outer(g1, g1))[0, 0]
    return blurred


def defocus_blur(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    return filter2d(x, disk_kernel(*DEFOCUS[severity - 1]))


def motion_offsets(angles: Tensor, radius: int) -> tuple[Tensor, Tensor]:
    """(dy, dx) [N, 2 * radius + 1]: the integer offset of each tap of imagecorruptions'
    motion kernel along the direction of each angle (degrees)."""
    taps = torch.arange(2 * radius + 1, dtype=torch.float64)
    rad = torch.deg2rad(angles.double())[:, None]
    # The reference rounds i * sin / i * cos with ceil(v - 0.5) and then negates.
    dy = -torch.ceil(taps * torch.sin(rad) - 0.5)
    dx = -torch.ceil(taps * torch.cos(rad) - 0.5)
    return dy.long(), dx.long()


def motion_blur(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    """One-sided motion blur at a random angle in [-45, 45] degrees per image: the image
    shifted along the angle by 0 .. 2r pixels (edges replicated), weighted by a
    half-Gaussian of `sigma`; taps shifted by a whole image or more are dropped."""
    radius, sigma = MOTION[severity - 1]
    n, _, h, w = x.shape
    angles = _rand((n,), g, x).double().cpu() * 90 - 45
    dy, dx = motion_offsets(angles, radius)
    weights = gaussian_kernel1d(4 * radius + 1, sigma)[2 * radius:]  # the half from 0 up
    weights = (weights / weights.sum()).to(x.device, x.dtype)
    valid = ((dy.abs() < h) & (dx.abs() < w)).to(x.device)
    rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = torch.zeros_like(x)
    for i in range(2 * radius + 1):
        r = (rows[None] - dy[:, i, None].to(x.device)).clamp(0, h - 1)  # [N, H]
        c = (cols[None] - dx[:, i, None].to(x.device)).clamp(0, w - 1)  # [N, W]
        shifted = x.permute(0, 2, 3, 1)[batch, r[:, :, None], c[:, None, :]].permute(0, 3, 1, 2)
        out = out + weights[i] * valid[:, i, None, None, None] * shifted
    return out


def zoom(x: Tensor, factor: float) -> Tensor:
    """The image magnified `factor` times about its centre (bilinear), same size."""
    theta = torch.tensor([[1 / factor, 0, 0], [0, 1 / factor, 0]], dtype=x.dtype,
                         device=x.device).expand(len(x), 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def zoom_blur(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    stop, step = ZOOM[severity - 1]
    factors = torch.arange(1.0, stop, step, dtype=torch.float64).tolist()
    return (x + sum(zoom(x, f) for f in factors)) / (len(factors) + 1)


def brightness(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    """The HSV value channel raised by c: with hue and saturation fixed, every channel
    scales with the value (the maximum over channels)."""
    value = x.amax(1, keepdim=True)
    raised = (value + BRIGHTNESS[severity - 1]).clamp(0, 1)
    return torch.where(value > 0, x * raised / value.clamp(min=1e-12), raised)


def contrast(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    mean = x.mean((2, 3), keepdim=True)
    return (x - mean) * CONTRAST[severity - 1] + mean


def box_resize_matrix(n_in: int, n_out: int) -> Tensor:
    """[n_out, n_in] weights of PIL's BOX resampling along one axis: output pixel o
    averages the input pixels whose centres fall in the window of width max(scale, 1)
    centred at (o + 0.5) * scale (scale = n_in / n_out; half-open as PIL's filter), so
    upsampling is nearest-neighbour."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    centre = (torch.arange(n_out, dtype=torch.float64) + 0.5) * scale
    offset = (torch.arange(n_in, dtype=torch.float64)[None] + 0.5 - centre[:, None]) / support
    inside = ((offset > -0.5) & (offset <= 0.5)).double()
    return inside / inside.sum(1, keepdim=True)


def box_resize(x: Tensor, h: int, w: int) -> Tensor:
    rh = box_resize_matrix(x.shape[-2], h).to(x.device, x.dtype)
    rw = box_resize_matrix(x.shape[-1], w).to(x.device, x.dtype)
    return torch.einsum("oh,nchw,pw->ncop", rh, x, rw)


def pixelate(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    c = PIXELATE[severity - 1]
    h, w = x.shape[-2:]
    small = box_resize(x, max(1, int(h * c)), max(1, int(w * c)))
    return box_resize(small, h, w)


def jpeg_compression(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    return jpeg(x, JPEG_QUALITY[severity - 1])


def plasma_fractal(n: int, size: int, decay: float, g: torch.Generator) -> Tensor:
    """[n, size, size] diamond-square height maps in [0, 1] (`size` a power of two), as
    ImageNet-C's fog draws them: each level's new points are the mean of their four
    neighbours plus uniform noise of a range shrinking by `decay` per level."""
    a = torch.zeros(n, size, size, dtype=torch.float64)
    step, wibble = size, 100.0

    def wibbled(t: Tensor) -> Tensor:
        return t / 4 + wibble * (torch.rand(t.shape, generator=g, dtype=t.dtype) * 2 - 1) * wibble

    while step >= 2:
        half = step // 2
        corners = a[:, ::step, ::step]
        acc = corners + corners.roll(-1, 1)
        a[:, half::step, half::step] = wibbled(acc + acc.roll(-1, 2))
        centres, corners = a[:, half::step, half::step], a[:, ::step, ::step]
        a[:, ::step, half::step] = wibbled(centres + centres.roll(1, 1) + corners
                                           + corners.roll(-1, 2))
        a[:, half::step, ::step] = wibbled(centres + centres.roll(1, 2) + corners
                                           + corners.roll(-1, 1))
        step, wibble = half, wibble / decay
    a = a - a.flatten(1).amin(1)[:, None, None]
    return a / a.flatten(1).amax(1)[:, None, None]


def fog(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    """A plasma-fractal haze added, then the image rescaled to keep its maximum."""
    strength, decay = FOG[severity - 1]
    n, _, h, w = x.shape
    size = 1 << (max(h, w) - 1).bit_length()
    haze = plasma_fractal(n, size, decay, g)[:, None, :h, :w].to(x.device, x.dtype)
    top = x.flatten(1).amax(1)[:, None, None, None]
    return (x + strength * haze) * top / (top + strength)


def elastic_transform(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    """imagecorruptions' size-relative elastic transform: per-pixel uniform displacements
    of up to 0.5% of the height, smoothed by a Gaussian of 1% of the image size (truncated
    at 3 sigma), times alpha; the image resampled bilinearly there, borders mirrored."""
    n, _, h, w = x.shape
    reach = 0.005 * h
    fields = []
    for _ in range(2):  # dx, then dy, as the reference draws them
        field = (_rand((n, 1, h, w), g, x) * 2 - 1) * reach
        for dim, sigma in ((2, 0.01 * h), (3, 0.01 * w)):
            k = gaussian_kernel1d(2 * int(3 * sigma + 0.5) + 1, sigma).to(x.device, x.dtype)
            shape = (1, 1, len(k), 1) if dim == 2 else (1, 1, 1, len(k))
            pad = (0, 0, len(k) // 2, len(k) // 2) if dim == 2 else (len(k) // 2,) * 2 + (0, 0)
            # Replicated borders: for the 1-pixel reach of small images, the same as the
            # reference's half-sample mirror.
            field = F.conv2d(F.pad(field, pad, mode="replicate"), k.view(shape))
        fields.append(field[:, 0] * ELASTIC_ALPHA[severity - 1])
    dx, dy = fields
    rows = torch.arange(h, device=x.device, dtype=x.dtype)[None, :, None] + dy
    cols = torch.arange(w, device=x.device, dtype=x.dtype)[None, None, :] + dx
    grid = torch.stack([(2 * cols + 1) / w - 1, (2 * rows + 1) / h - 1], -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection",
                         align_corners=False)


CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": gaussian_noise, "shot_noise": shot_noise, "impulse_noise": impulse_noise,
    "defocus_blur": defocus_blur, "motion_blur": motion_blur, "zoom_blur": zoom_blur,
    "fog": fog, "brightness": brightness, "contrast": contrast,
    "elastic_transform": elastic_transform, "pixelate": pixelate,
    "jpeg_compression": jpeg_compression,
}


def corrupt(x: Tensor, name: str, severity: int, g: torch.Generator) -> Tensor:
    """`x` [N, C, H, W] in [0, 1] with corruption `name` at `severity` (1..5), clipped and
    truncated to 8-bit levels as the reference's uint8 cast (a hair above each level, so
    float error never drops a whole one)."""
    if not 1 <= severity <= 5:
        raise ValueError(f"severity must be in 1..5, got {severity}")
    out = CORRUPTIONS[name](x, severity, g)
    return torch.floor(out.clamp(0, 1) * 255 + 1e-4) / 255
