"""Contract tests for every registered model: shapes, stages, normalization, gradients,
checkpoints, plus parameter counts against the reference architectures."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from backdoors.errors import ConfigError
from backdoors.models import MODELS, ImageClassifier, Normalize
from backdoors.models.resnet import ResidualBlock

NUM_CLASSES = 7
BATCH = 4
# Options that shrink a model to a few thousand parameters, applied where a model has them.
SMALL: dict[str, Any] = {"width": 4, "width_scale": 1 / 16, "hidden": 16}
# The input each model is meant for, when it is not 3x32x32.
REALISTIC: dict[str, tuple[int, int, int]] = {"simple_net": (1, 28, 28), "tiny_cnn": (3, 16, 16)}


def realistic_shape(name: str) -> tuple[int, int, int]:
    # ImageNet stems divide the input by 32 overall: 64x64 (Tiny-ImageNet size) ends in 2x2.
    return (3, 64, 64) if name.endswith("_imagenet") else REALISTIC.get(name, (3, 32, 32))


# Every model gets its realistic shape, MNIST's 1x28x28 and CIFAR's 3x32x32.
CASES = [
    pytest.param(name, shape, id=f"{name}-{'x'.join(map(str, shape))}")
    for name in MODELS.names()
    for shape in sorted({realistic_shape(name), (1, 28, 28), (3, 32, 32)})
]


def build(
    name: str,
    input_shape: Sequence[int],
    num_classes: int = NUM_CLASSES,
    options: dict[str, Any] | None = None,
) -> ImageClassifier:
    if options is None:
        params = MODELS.parameters(name)
        options = {key: value for key, value in SMALL.items() if key in params}
    channels = input_shape[0]
    model = MODELS.build(
        name, options, "model", num_classes=num_classes, input_shape=input_shape,
        mean=(0.5,) * channels, std=(0.25,) * channels,
    )
    assert isinstance(model, ImageClassifier)
    return model


def pixels(input_shape: Sequence[int], seed: int = 0) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(BATCH, *input_shape, generator=generator)


@pytest.mark.parametrize(("name", "shape"), CASES)
def test_stage_shapes(name: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = build(name, shape).eval()
    x = pixels(shape)
    with torch.no_grad():
        fmap, feats, out = model.feature_map(x), model.features(x), model(x)
    assert out.shape == (BATCH, NUM_CLASSES)
    assert fmap.dim() == 4 and fmap.shape[0] == BATCH
    assert isinstance(model.head, nn.Linear) and model.head.out_features == NUM_CLASSES
    assert feats.shape == (BATCH, model.head.in_features) == (BATCH, model.feature_dim())
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(("name", "shape"), CASES)
def test_forward_is_head_of_pooled_feature_map(name: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = build(name, shape).eval()
    x = pixels(shape)
    with torch.no_grad():
        feats = model.pool(model.feature_map(x))
        torch.testing.assert_close(model.features(x), feats)
        torch.testing.assert_close(model(x), model.head(feats))


@pytest.mark.parametrize(("name", "shape"), CASES)
def test_normalization_is_applied_first(name: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = build(name, shape).eval()
    assert isinstance(model.normalize, Normalize)
    assert next(iter(model.children())) is model.normalize
    x = pixels(shape)
    with torch.no_grad():
        before = model(x)
        model.normalize.mean += 0.1
        after = model(x)
    assert not torch.allclose(before, after)


@pytest.mark.parametrize(("name", "shape"), CASES)
def test_every_parameter_gets_a_gradient(name: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = build(name, shape).train()
    x = pixels(shape)
    y = torch.arange(BATCH) % NUM_CLASSES
    nn.functional.cross_entropy(model(x), y).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not dead, f"parameters without gradient: {dead}"


@pytest.mark.parametrize(("name", "shape"), CASES)
def test_safetensors_round_trip(name: str, shape: tuple[int, int, int], tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build(name, shape).train()
    with torch.no_grad():
        model(pixels(shape, seed=1))  # move BN running statistics off their defaults
    path = tmp_path / "model.safetensors"
    save_file(model.state_dict(), str(path))
    torch.manual_seed(1)
    restored = build(name, shape)
    restored.load_state_dict(load_file(str(path)))
    x = pixels(shape)
    with torch.no_grad():
        torch.testing.assert_close(restored.eval()(x), model.eval()(x), rtol=0, atol=0)


# Full-width counts, checked against the reference implementations.
PARAMETER_COUNTS = [
    # kuangliu/pytorch-cifar and Backdoors 101 ResNet18.
    ("resnet18", 10, 11_173_962),
    # torchvision resnet50 (the paper's 25.6M); the stride placement does not change it.
    ("resnet50_imagenet", 1000, 25_557_032),
    # BackdoorBench's PreActResNet18 has 11,171,146 but no final BN + ReLU; the paper's
    # final BN adds 2 * 512 = 1,024 parameters.
    ("preact_resnet18", 10, 11_172_170),
    # kuangliu VGG16 (BN, one Linear 512 -> 10) has 14,728,266, including conv biases that
    # BN cancels. Without them: 14,728,266 - (2*64 + 2*128 + 3*256 + 6*512 = 4,224).
    ("vgg16", 10, 14_724_042),
]


@pytest.mark.parametrize(("name", "num_classes", "expected"), PARAMETER_COUNTS)
def test_parameter_count(name: str, num_classes: int, expected: int) -> None:
    model = build(name, (3, 32, 32), num_classes=num_classes, options={})
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize(
    ("name", "shape", "side"),
    [
        ("resnet18", (3, 32, 32), 4),  # CIFAR stem keeps resolution: 32 / 8
        ("resnet18_imagenet", (3, 64, 64), 2),  # stride-2 conv and max-pool: 64 / 32
        ("resnet50_imagenet", (1, 28, 28), 1),
        ("preact_resnet18", (3, 32, 32), 4),
        ("vgg16", (3, 32, 32), 1),  # five pools
        ("vgg11", (1, 28, 28), 1),  # 28 -> 14 -> 7 -> 3 -> 1, the fifth pool is skipped
    ],
)
def test_feature_map_resolution(name: str, shape: tuple[int, int, int], side: int) -> None:
    model = build(name, shape).eval()
    with torch.no_grad():
        assert model.feature_map(pixels(shape)).shape[2:] == (side, side)


def test_preact_feature_map_is_post_activation() -> None:
    model = build("preact_resnet18", (3, 32, 32)).train()
    assert isinstance(model.body[-1], nn.ReLU) and isinstance(model.body[-2], nn.BatchNorm2d)
    with torch.no_grad():
        assert (model.feature_map(pixels((3, 32, 32))) >= 0).all()


def test_zero_init_residual_zeroes_last_bn_of_each_block() -> None:
    model = build("resnet50", (3, 32, 32), options={"width": 4, "zero_init_residual": True})
    blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
    assert len(blocks) == 16
    assert all(not block.residual[-1].weight.any() for block in blocks)


@pytest.mark.parametrize(
    ("name", "options"),
    [("resnet18", {"width": 0}), ("preact_resnet18", {"width": -1}), ("vgg11", {"width_scale": 0})],
)
def test_bad_width_is_a_config_error(name: str, options: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="width"):
        build(name, (3, 32, 32), options=options)
