"""The research architectures (VGG-19-BN, MobileNetV3, EfficientNet-B0, ConvNeXt-T,
DenseNet-121, ViTs): reference parameter counts, the stage contract on every input size
the framework meets, one training step, the CLI on the quickstart task, and one defense
of each stage on a finished run of each model.

test_models.py already runs its generic contract (shapes, stages, normalization, gradient
on every parameter, checkpoints) over every registered model, these included.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_defenses import SYNTHETIC, _train
from test_models import build, pixels
from torch import nn

from backdoors.assembly.defending import defend
from backdoors.cli import main
from backdoors.defenses import (
    DEFENSES,
    DatasetSanitizer,
    InputDetector,
    ModelInspector,
    ModelRepair,
)
from backdoors.errors import ConfigError
from backdoors.models import MODELS
from backdoors.models.vit import VisionTransformer

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
RESEARCH = ["vgg19_bn", "mobilenet_v3_large", "mobilenet_v3_small", "efficientnet_b0",
            "convnext_tiny", "densenet121", "vit_tiny", "vit_small", "vit_b_16"]
SMALL = {"width_scale": 1 / 16}  # 8-channel MobileNets, 2-channel DenseNet growth, D 12-48
# Published counts at 1000 classes and 3x224x224 (torchvision; timm's DeiT for the small
# ViTs). Ours omits vgg19_bn's 16 conv biases (5,504 parameters), which BN cancels.
REFERENCE = {
    "vgg19_bn": 143_678_248 - 5_504,
    "mobilenet_v3_large": 5_483_032,
    "mobilenet_v3_small": 2_542_856,
    "efficientnet_b0": 5_288_548,
    "convnext_tiny": 28_589_128,
    "densenet121": 7_978_856,
    "vit_tiny": 5_717_416,
    "vit_small": 22_050_664,
    "vit_b_16": 86_567_656,
}
# One cheap defense per stage, with the smallest budgets that still run every code path.
STAGES: list[tuple[str, dict[str, Any], type]] = [
    ("fine_pruning", {"epochs": 1, "granularity": "channel"}, ModelRepair),
    ("strip", {"n": 4}, InputDetector),
    ("neural_cleanse", {"steps": 3, "repair": False}, ModelInspector),
    ("spectral_signatures", {}, DatasetSanitizer),
]


def test_every_research_model_is_registered():
    assert set(RESEARCH) <= set(MODELS.names())


@pytest.mark.parametrize("name", RESEARCH)
def test_reference_parameter_count(name: str) -> None:
    # On the meta device nothing is allocated: vit_b_16 and vgg19_bn build in milliseconds.
    with torch.device("meta"):
        model = build(name, (3, 224, 224), num_classes=1000, options={})
    assert sum(p.numel() for p in model.parameters()) == REFERENCE[name]


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28), (3, 64, 64), (3, 224, 224)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", RESEARCH)
def test_stages_fit_together(name: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = build(name, shape, options=SMALL).eval()
    x = pixels(shape)
    with torch.no_grad():
        fmap, feats, out = model.feature_map(x), model.features(x), model(x)
        torch.testing.assert_close(model.head(feats), out)
        torch.testing.assert_close(model.pool(fmap), feats)
    assert out.shape == (len(x), 7) and fmap.dim() == 4 and fmap.shape[2:] != (0, 0)
    assert isinstance(model.head, nn.Linear) and feats.shape == (len(x), model.feature_dim())
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", RESEARCH)
def test_one_training_step(name: str) -> None:
    torch.manual_seed(0)
    model = build(name, (3, 32, 32), options=SMALL).train()
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = pixels((3, 32, 32)), torch.arange(4) % 7
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    optimizer.step()
    changed = {k for k, p in model.named_parameters() if not torch.equal(p, before[k])}
    # The update reaches both ends of the network. Not every tensor need move in one step:
    # ConvNeXt's branches are scaled by a 1e-6 layer scale, so their weights' updates
    # round away in float32 (test_models checks that every parameter gets a gradient).
    first = next(k for k in before if k.startswith("body."))
    assert {"head.weight", "head.bias", first} <= changed and len(changed) > len(before) / 2


@pytest.mark.parametrize(
    ("name", "shape", "side"),
    [
        ("vgg19_bn", (3, 224, 224), 7),  # ImageNet classifier from 224 up
        ("mobilenet_v3_small", (3, 224, 224), 7),
        ("efficientnet_b0", (3, 64, 64), 2),
        ("convnext_tiny", (1, 28, 28), 1),  # 7 -> 4 -> 2 -> 1: odd maps are padded
        ("densenet121", (1, 28, 28), 1),  # ceil-mode transitions, same chain
        ("vit_tiny", (3, 32, 32), 8),  # patch 4 below 128 pixels
        ("vit_tiny", (3, 224, 224), 14),  # patch 16 from 128 up
    ],
)
def test_feature_map_resolution(name: str, shape: tuple[int, int, int], side: int) -> None:
    model = build(name, shape, options=SMALL).eval()
    with torch.no_grad():
        assert model.feature_map(pixels(shape)).shape[2:] == (side, side)


def test_vgg_classifier_follows_the_input_size() -> None:
    small = build("vgg19_bn", (3, 32, 32), num_classes=10, options={})
    large = build("vgg19_bn", (3, 224, 224), options=SMALL)
    assert small.feature_dim() == 512 and isinstance(small.pool[-1], nn.Flatten)
    assert large.feature_dim() == 256 and large.pool[2].in_features == 32 * 7 * 7
    # kuangliu/pytorch-cifar's VGG19 (BN, one Linear 512 -> 10) has 20,040,522, including
    # the 5,504 conv biases that BN cancels.
    assert sum(p.numel() for p in small.parameters()) == 20_040_522 - 5_504
    forced = build("vgg19_bn", (3, 32, 32), options={**SMALL, "classifier": "imagenet"})
    assert forced.feature_dim() == 256


def test_vit_token_readout_is_the_final_class_token() -> None:
    torch.manual_seed(0)
    model = build("vit_tiny", (3, 32, 32), options={**SMALL, "readout": "token"}).eval()
    assert isinstance(model, VisionTransformer)
    tokens: list[torch.Tensor] = []
    model.body.norm.register_forward_hook(lambda _m, _i, out: tokens.append(out))
    x = pixels((3, 32, 32))
    with torch.no_grad():
        fmap, feats = model.feature_map(x), model.features(x)
    assert fmap.shape == (4, 12, 1, 1)
    torch.testing.assert_close(feats, tokens[-1][:, 0])


def test_vit_avg_readout_maps_patch_tokens() -> None:
    torch.manual_seed(0)
    model = build("vit_small", (3, 32, 32), options=SMALL).eval()
    tokens: list[torch.Tensor] = []
    model.body.norm.register_forward_hook(lambda _m, _i, out: tokens.append(out))
    with torch.no_grad():
        fmap = model.feature_map(pixels((3, 32, 32)))
    assert fmap.shape == (4, 24, 8, 8)
    # Patch (row 1, column 2) is token 1 + 1 * 8 + 2 (token 0 is the class token).
    torch.testing.assert_close(fmap[:, :, 1, 2], tokens[-1][:, 11])


def test_vit_resizes_to_image_size() -> None:
    model = build("vit_tiny", (1, 28, 28), options={**SMALL, "image_size": 32,
                                                    "patch_size": 8}).eval()
    with torch.no_grad():
        assert model.feature_map(pixels((1, 28, 28))).shape[2:] == (4, 4)
    with pytest.raises(ConfigError, match="patch_size"):
        build("vit_tiny", (3, 32, 32), options={"patch_size": 5})


@pytest.mark.parametrize(("name", "options"), [
    ("convnext_tiny", {"width_scale": 0}), ("densenet121", {"width_scale": -1}),
    ("vit_b_16", {"readout": "cls"}), ("vgg19_bn", {"classifier": "big"}),
])
def test_bad_options_are_config_errors(name: str, options: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        build(name, (3, 32, 32), options=options)


# -- the framework around the models --------------------------------------------------------


@pytest.mark.parametrize("name", RESEARCH)
def test_cli_trains_the_quickstart_with_the_model(name: str, tmp_path: Path) -> None:
    """configs/quickstart.yaml (digits, blind attack) for 1 epoch with this model at a
    small width; large batches keep it to seconds."""
    overrides = [f"model.name={name}", "model.width_scale=0.0625", "train.epochs=1",
                 "train.batch_size=256", "train.tensorboard=false", "train.progress=false"]
    args = ["train", str(REPO / "configs" / "quickstart.yaml"), "--out", str(tmp_path),
            "--name", "r", "--quiet"]
    assert main(args + [a for o in overrides for a in ("--set", o)]) == 0
    assert (tmp_path / "r" / "checkpoints" / "last.safetensors").is_file()
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["status"] == "completed"


@pytest.fixture(scope="module")
def attack_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return {"out": tmp_path_factory.mktemp("attacked")}


# One model per family: the others of a family share every line of code with it.
FAMILIES = ["vgg19_bn", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny",
            "densenet121", "vit_tiny"]


@pytest.mark.parametrize("name", FAMILIES)
def test_one_defense_of_each_stage_runs(name: str, attack_runs: dict[str, Any]) -> None:
    """test_defenses.py's attack (10% data poisoning of the synthetic task, so a dataset
    sanitiser has poison to find), 1 epoch on a quarter of the data, this model."""
    cfg = {**SYNTHETIC, "task": {"name": "synthetic", "train_size": 256, "test_size": 128},
           "train": {**SYNTHETIC["train"], "epochs": 1}}
    folder = _train(cfg, attack_runs["out"], name, model={"name": name, **SMALL})
    for defense, options, stage in STAGES:
        assert issubclass(DEFENSES.get(defense), stage)
        result = defend(folder, defense, options)
        assert result["defense"] == defense and result["stage"] == stage.stage
        if stage in (InputDetector, DatasetSanitizer):
            assert 0.0 <= result["auroc"] <= 1.0, result
        if stage is ModelInspector:
            assert len(result["anomaly_index"]) == 4
        if stage is ModelRepair:
            assert 0.0 <= result["after"]["clean_accuracy"] <= 1.0
