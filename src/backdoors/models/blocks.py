"""Building blocks shared by several model families: channel rounding, stochastic depth,
squeeze-excitation and a channels-first LayerNorm. One place per mechanism, so MobileNetV3,
EfficientNet, ConvNeXt and the ViTs cannot drift apart."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

Activation = Callable[[], nn.Module]


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a scaled channel count to the nearest multiple of `divisor` (at least
    `divisor`), never going more than 10% below `value`.

    The rule of the MobileNet and EfficientNet reference code: hardware prefers channel
    counts in multiples of 8, and the 10% guard keeps a width multiplier from shrinking a
    layer much more than asked.
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def check_width_scale(width_scale: float) -> None:
    if width_scale <= 0:
        raise ValueError(f"width_scale must be positive, got {width_scale}")


class StochasticDepth(nn.Module):
    """Drop a residual branch per sample with probability `p` during training
    (Huang et al., "Deep Networks with Stochastic Depth", ECCV 2016, arXiv 1603.09382).

    Kept samples are scaled by 1 / (1 - p) so the expected output matches evaluation,
    where the branch is always kept. Per sample ("row" mode), not per batch: a batch then
    always trains every block a little, which is what EfficientNet, ConvNeXt and DeiT use.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        mask = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class SqueezeExcitation(nn.Module):
    """Channel attention (Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018,
    arXiv 1709.01507): global average pool -> 1x1 conv to `squeeze` channels -> `act` ->
    1x1 conv back -> `gate` -> rescale the input channels.

    MobileNetV3 uses ReLU and hard-sigmoid, EfficientNet SiLU and sigmoid; the squeeze
    width is each family's own rule, so the caller passes it.
    """

    def __init__(self, channels: int, squeeze: int, act: Activation, gate: Activation) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeeze, 1)
        self.act = act()
        self.expand = nn.Conv2d(squeeze, channels, 1)
        self.gate = gate()

    def forward(self, x: Tensor) -> Tensor:
        scale = self.gate(self.expand(self.act(self.reduce(F.adaptive_avg_pool2d(x, 1)))))
        return x * scale


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a [N, C, H, W] map, at every position (ConvNeXt's
    "channels first" LayerNorm before each downsampling conv and in its head)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def conv_bn_act(
    in_channels: int,
    out_channels: int,
    kernel: int,
    stride: int = 1,
    groups: int = 1,
    act: Activation | None = None,
    eps: float = 1e-5,
) -> nn.Sequential:
    """kxk conv ("same" padding, no bias: BN cancels it) -> BN -> optional activation."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups,
                  bias=False),
        nn.BatchNorm2d(out_channels, eps=eps),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


def grouped_fan_out_init(model: nn.Module) -> None:
    """He-normal conv weights with fan_out = (out_channels / groups) * kernel area, the
    reference TensorFlow init of MobileNetV3 and EfficientNet.

    torch's `kaiming_normal_` counts a depthwise conv's fan_out as channels * k * k (it
    ignores groups), which makes depthwise weights sqrt(channels) times too small; the
    signal of an untrained network then fades by about 20x per block, and in evaluation
    mode (BN still at its initial statistics) a fresh model maps every input to the same
    logits. Counting per group keeps it near unit scale.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            fan_out = module.out_channels // module.groups * kh * kw
            nn.init.normal_(module.weight, 0.0, (2.0 / fan_out) ** 0.5)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
