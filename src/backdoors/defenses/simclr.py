"""SimCLR: self-supervised pre-training of a model's backbone, batched in plain torch.

Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020 (arXiv 2002.05709). Two random views of each image go
through the backbone (`model.features`) and a projection head; the NT-Xent loss pulls the
two views of an image together against every other view in the batch. No label is used,
which is why DBD pre-trains this way: nothing ties the trigger to the target class.

The views are DBD's (its SimCLR configuration, after SimCLR's): a random resized crop
(scale 0.2-1, aspect 3/4-4/3) with a horizontal flip, colour jitter with probability 0.8
(brightness, contrast and saturation 0.4, hue 0.1), grayscale with probability 0.2 and a
Gaussian blur (sigma 0.1-2) with probability 0.5, all per sample on whole batches. Where
torchvision redraws a crop that does not fit, the crop is shrunk to fit, and the jitter
runs in a fixed order (torchvision shuffles it); crops are resampled bilinearly (DBD:
bicubic). Colour operations leave one-channel images as they are, but for brightness and
contrast.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backdoors.data.dataset import ArrayDataset
from backdoors.defenses.base import DefenseData
from backdoors.defenses.semi import batches
from backdoors.execution import LossScaler, autocast

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 weights, as torchvision's grayscale


def _uniform(n: int, low: float, high: float, g: torch.Generator | None) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=g)


def random_resized_crop(x: Tensor, scale: tuple[float, float] = (0.2, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True,
                        generator: torch.Generator | None = None) -> Tensor:
    """Crop a random box of `scale` of the area and `ratio` aspect from each image, resize
    it back to the full size and mirror half of them: one affine grid for the batch."""
    n = len(x)
    area = _uniform(n, *scale, generator)
    aspect = torch.exp(_uniform(n, math.log(ratio[0]), math.log(ratio[1]), generator))
    w = torch.sqrt(area * aspect).clamp(max=1.0)  # box sides as fractions of the image
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (2 * torch.rand(n, generator=generator) - 1) * (1 - w)  # centres, in [-1, 1]
    cy = (2 * torch.rand(n, generator=generator) - 1) * (1 - h)
    sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0) if flip \
        else torch.ones(n)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = w * sign, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def grayscale(x: Tensor) -> Tensor:
    """Luminance of RGB images, kept as three channels; one-channel images as they are."""
    if x.shape[1] != 3:
        return x
    luma = torch.tensor(LUMA, device=x.device).view(1, 3, 1, 1)
    return (x * luma).sum(1, keepdim=True).expand_as(x)


def _rgb_to_hsv(x: Tensor) -> Tensor:
    r, g, b = x.unbind(1)
    top, bottom = x.amax(1), x.amin(1)
    span = top - bottom
    safe = span.clamp(min=1e-8)
    hue = torch.where(top == r, ((g - b) / safe) % 6,
                      torch.where(top == g, (b - r) / safe + 2, (r - g) / safe + 4)) / 6
    hue = torch.where(span > 0, hue, torch.zeros_like(hue))
    sat = torch.where(top > 0, span / top.clamp(min=1e-8), torch.zeros_like(top))
    return torch.stack([hue, sat, top], 1)


def _hsv_to_rgb(x: Tensor) -> Tensor:
    h, s, v = x.unbind(1)
    k = (torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1) + 6 * h[:, None]) % 6
    return v[:, None] - (v * s)[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1))


def color_jitter(x: Tensor, brightness: float = 0.4, contrast: float = 0.4,
                 saturation: float = 0.4, hue: float = 0.1,
                 generator: torch.Generator | None = None) -> Tensor:
    """Per image: scale brightness by U(1 - b, 1 + b), contrast (distance to the mean
    gray) by U(1 - c, 1 + c), saturation (distance to the own gray) by U(1 - s, 1 + s)
    and rotate the hue by U(-h, h) turns, clamping to [0, 1] after each."""
    n, dev = len(x), x.device

    def factor(spread: float) -> Tensor:
        return _uniform(n, 1 - spread, 1 + spread, generator).to(dev).view(n, 1, 1, 1)

    x = (x * factor(brightness)).clamp(0, 1)
    mean = grayscale(x).mean((1, 2, 3), keepdim=True)
    x = ((x - mean) * factor(contrast) + mean).clamp(0, 1)
    if x.shape[1] == 3:
        gray = grayscale(x)
        x = ((x - gray) * factor(saturation) + gray).clamp(0, 1)
        hsv = _rgb_to_hsv(x)
        shift = _uniform(n, -hue, hue, generator).to(dev).view(n, 1, 1)
        hsv = torch.stack([(hsv[:, 0] + shift) % 1.0, hsv[:, 1], hsv[:, 2]], 1)
        x = _hsv_to_rgb(hsv).clamp(0, 1)
    return x


def gaussian_blur(x: Tensor, sigma: tuple[float, float] = (0.1, 2.0),
                  generator: torch.Generator | None = None) -> Tensor:
    """Blur each image with its own sigma ~ U(sigma): a separable kernel of radius
    2 * max sigma, one grouped convolution per direction for the whole batch."""
    n, c, h, w = x.shape
    s = _uniform(n, *sigma, generator).to(x.device)
    radius = min(int(math.ceil(2 * sigma[1])), (min(h, w) - 1) // 2)
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-taps[None] ** 2 / (2 * s[:, None] ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [N*C, k]
    flat = x.reshape(1, n * c, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"),
                    kernel[:, None, None, :], groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"),
                    kernel[:, None, :, None], groups=n * c)
    return flat.reshape(n, c, h, w)


def _some(x: Tensor, changed: Tensor, p: float, g: torch.Generator | None) -> Tensor:
    pick = (torch.rand(len(x), generator=g) < p).to(x.device).view(-1, 1, 1, 1)
    return torch.where(pick, changed, x)


def simclr_view(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One random SimCLR view of every image of the batch (DBD's augmentations)."""
    x = random_resized_crop(x, generator=generator)
    x = _some(x, color_jitter(x, generator=generator), 0.8, generator)
    x = _some(x, grayscale(x), 0.2, generator)
    return _some(x, gaussian_blur(x, generator=generator), 0.5, generator)


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """SimCLR's NT-Xent loss of two views [N, D]: each of the 2N projections is
    classified, by cosine similarity / T, towards its own other view among the 2N - 1
    others; the mean cross-entropy over all 2N anchors."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = len(z1)
    sim = (z @ z.T) / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, partner)


def projection_head(dim: int, out: int = 128) -> nn.Module:
    """SimCLR's two-layer MLP from the backbone features to the contrastive space."""
    return nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(), nn.Linear(dim, out))


def pretrain(model: nn.Module, train: ArrayDataset, data: DefenseData, epochs: int,
             batch_size: int = 512, lr: float = 0.4, temperature: float = 0.5,
             weight_decay: float = 1e-4) -> list[float]:
    """Train `model.features` (everything but the head) with SimCLR on the training images
    without labels: SGD with momentum 0.9 and a cosine schedule over `epochs`. Returns the
    mean loss of each epoch; the projection head is thrown away."""
    head = projection_head(model.head.in_features).to(data.device)
    params = [p for m in (model, head) for p in m.parameters()]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
    steps = max(1, len(train) // min(batch_size, len(train)))
    stream = batches(len(train), batch_size, data.generator)
    scaler = LossScaler(data.precision, data.device)
    losses = []
    model.train()
    head.train()
    for _ in data.progress.phase(range(epochs), "SimCLR pre-training (no labels)"):
        total = 0.0
        for _ in range(steps):
            x = train.images[next(stream)].to(data.device).float().div_(255.0)
            views = torch.cat([simclr_view(x, data.generator), simclr_view(x, data.generator)])
            # The backbone's and head's forward only: the contrastive loss stays fp32.
            with autocast(data.device, data.precision):
                z = head(model.features(views))
            loss = nt_xent(z[:len(x)].float(), z[len(x):].float(), temperature)
            optimizer.zero_grad(set_to_none=True)
            scaler.backward(loss)
            scaler.step(optimizer)
            total += loss.item()
        schedule.step()
        losses.append(total / steps)
    return losses
