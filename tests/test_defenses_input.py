"""Input detectors of defense catalogue 2, group 3 (SCALE-UP, IBD-PSC, TeCo, Beatrix,
Cognitive Distillation): behaviour on small finished attack runs and planted models, and
unit tests of the maths each adds, on hand-sized inputs."""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from backdoors.assembly.artifact import reopen
from backdoors.config import from_dict
from backdoors.data.dataset import ArrayDataset
from backdoors.defenses import DEFENSES, DefenseData, InputDetector
from backdoors.defenses.beatrix import Beatrix, deviation, gram_features, median_mad
from backdoors.defenses.cognitive_distillation import (
    CognitiveDistillation,
    distillation_loss,
    mask_of,
    total_variation,
)
from backdoors.defenses.corruptions import (
    CORRUPTIONS,
    box_resize,
    corrupt,
    disk_kernel,
    elastic_transform,
    motion_offsets,
    plasma_fractal,
)
from backdoors.defenses.ibd_psc import (
    IbdPsc,
    amplified,
    batch_norms,
    confidence_consistency,
    first_above,
    psc_strength,
)
from backdoors.defenses.jpeg import jpeg, quant_table
from backdoors.defenses.runner import clean_budget
from backdoors.defenses.scale_up import (
    amplify,
    class_statistics,
    consistency,
    standardize,
)
from backdoors.defenses.scores import auroc
from backdoors.defenses.teco import TeCo, first_flip
from backdoors.defenses.teco import deviation as teco_deviation
from backdoors.errors import ConfigError
from backdoors.experiment import run
from backdoors.runs import RunFolder

pytestmark = pytest.mark.usefixtures("one_thread")

# The synthetic task (tiny_cnn), 10% data poisoning with the pattern trigger: as in
# tests/test_defenses_detect.py.
SYNTHETIC: dict[str, Any] = {
    "name": "g3", "seed": 0, "task": {"name": "synthetic"},
    "train": {"epochs": 4, "lr": 0.05, "tensorboard": False, "progress": False},
    "synthesizer": {"name": "pattern", "target": 1},
    "attack": {"name": "data", "ratio": 0.1},
}
# IBD-PSC needs residual blocks with batch norm: the tiny_cnn above keeps every clean
# prediction whatever its batch-norm layers are scaled by (no error to select layers by);
# ResNet-18 (width 8) on the 8x8 digits shows the paper's phenomenon.
DIGITS_RESNET: dict[str, Any] = {
    "name": "g3-digits", "seed": 0, "task": {"name": "digits"},
    "model": {"name": "resnet18", "width": 8},
    "train": {"epochs": 8, "lr": 0.05, "batch_size": 32, "tensorboard": False,
              "progress": False},
    "synthesizer": {"name": "pattern", "target": 1},
    "attack": {"name": "data", "ratio": 0.1},
}


def _train(cfg: dict[str, Any], out: Path) -> Path:
    run(from_dict(copy.deepcopy(cfg)), out=out, name="run", quiet=True)
    return out / "run"


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(SYNTHETIC, tmp_path_factory.mktemp("g3-synthetic"))


def _detection(path: Path, detector: InputDetector, n: int = 96) -> float:
    """AUROC of `detector` (fitted on a 5% clean budget) on up to n clean non-target test
    inputs against the same inputs carrying the trigger."""
    target = reopen(RunFolder(path))
    data = DefenseData(clean=clean_budget(target, 0.05), num_classes=target.num_classes,
                       input_shape=target.input_shape, device=target.device,
                       generator=torch.Generator().manual_seed(0))
    detector.fit(target.model, data)
    batch = next(iter(target.test_loader))
    clean = batch.select(batch.labels != target.synthesizer.backdoor_target())
    clean = clean.select(torch.arange(len(clean)) < n)
    triggered = target.synthesizer.apply(clean, 1.0, torch.Generator().manual_seed(0))
    scores = torch.cat([detector.score(target.model, clean.inputs),
                        detector.score(target.model, triggered.inputs)])
    return auroc(scores, torch.arange(len(scores)) >= len(clean))


# -- behaviour -------------------------------------------------------------------------------


def test_scale_up_separates_triggered_inputs(synthetic_run):
    scale_up = DEFENSES.build("scale_up", {"data_limited": False}, "scale_up")
    assert _detection(synthetic_run, scale_up) > 0.9


def test_teco_separates_triggered_inputs(synthetic_run):
    teco = TeCo(corruptions=["gaussian_noise", "impulse_noise", "defocus_blur", "contrast",
                             "pixelate", "jpeg_compression"])
    assert _detection(synthetic_run, teco, n=48) > 0.9


def test_beatrix_separates_triggered_inputs(synthetic_run):
    assert _detection(synthetic_run, Beatrix()) > 0.9


def test_ibd_psc_separates_triggered_inputs_on_a_resnet(tmp_path_factory):
    path = _train(DIGITS_RESNET, tmp_path_factory.mktemp("g3-digits"))
    detector = IbdPsc()
    assert _detection(path, detector) > 0.85
    # The adaptive selection found a depth at which amplification breaks clean accuracy.
    assert detector.figures["selected"] is not None


class _Gated(nn.Module):
    """A planted backdoor: the logits are a fixed random linear map of all 64 pixels, unless
    the 2x2 top-left patch is white, when they are a fixed target vector (a smooth gate, so
    masks get gradients). Keeping a triggered output needs only the patch; a clean one
    needs the whole image: Cognitive Distillation's premise."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 64, generator=torch.Generator().manual_seed(0)))
        self.register_buffer("target", torch.tensor([10.0, -10.0, -10.0]))

    def forward(self, x: Tensor) -> Tensor:
        gate = torch.sigmoid(40 * (x[:, 0, :2, :2].mean((1, 2)) - 0.9))[:, None]
        return (1 - gate) * (x.flatten(1) @ self.weight.T) + gate * self.target


def _planted() -> tuple[Tensor, Tensor, DefenseData]:
    g = torch.Generator().manual_seed(1)
    clean = torch.rand(12, 1, 8, 8, generator=g) * 0.8
    triggered = clean.clone()
    triggered[:, :, :2, :2] = 1.0
    budget = ArrayDataset((torch.rand(8, 1, 8, 8, generator=g) * 204).to(torch.uint8),
                          torch.zeros(8, dtype=torch.long))
    data = DefenseData(clean=budget, num_classes=3, input_shape=(1, 8, 8),
                       device=torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    return clean, triggered, data


def test_cognitive_distillation_needs_a_smaller_mask_for_a_planted_trigger():
    model = _Gated()
    clean, triggered, data = _planted()
    cd = CognitiveDistillation(steps=40)
    cd.fit(model, data)
    scores = torch.cat([cd.score(model, clean), cd.score(model, triggered)])
    assert auroc(scores, torch.arange(24) >= 12) > 0.95
    assert model.weight.grad is None  # only the masks were optimised
    assert cd.figures["budget_mask_l1_mean"] > 0


# -- SCALE-UP ------------------------------------------------------------------------------


def test_scale_up_amplifies_and_clips_pixels():
    x = torch.tensor([0.0, 0.1, 0.3, 0.9])
    assert torch.allclose(amplify(x, 3), torch.tensor([0.0, 0.3, 0.9, 1.0]))


def test_scale_up_consistency_is_the_share_of_scaled_copies_keeping_the_label():
    scaled = torch.tensor([[0, 1, 2], [0, 1, 1], [0, 2, 1], [1, 1, 1]])  # [S=4, N=3]
    assert torch.allclose(consistency(scaled, torch.tensor([0, 1, 2])),
                          torch.tensor([0.75, 0.75, 0.25], dtype=torch.float64))


def test_scale_up_class_statistics_and_standardisation():
    spc = torch.tensor([0.2, 0.4, 0.6, 1.0, 0.8])
    labels = torch.tensor([0, 0, 0, 1, 2])  # class 1 and 2: one sample each -> all samples
    mean, std = class_statistics(spc, labels, 4)
    assert torch.allclose(mean, torch.tensor([0.4, 0.6, 0.6, 0.6], dtype=torch.float64))
    assert torch.allclose(std[0], torch.tensor(0.2, dtype=torch.float64))
    assert torch.allclose(std[1:], spc.double().std().expand(3))
    z = standardize(torch.tensor([0.8, 0.4]), torch.tensor([0, 0]), mean, std)
    assert torch.allclose(z, torch.tensor([2.0, 0.0], dtype=torch.float64), atol=1e-6)
    flat = standardize(torch.tensor([1.0]), torch.tensor([0]), torch.ones(1), torch.zeros(1))
    assert torch.isfinite(flat).all()  # a zero spread is floored, not divided by


def test_scale_up_options_are_checked():
    with pytest.raises(ValueError, match="scales"):
        DEFENSES.get("scale_up")(scales=[1.0, 3.0])


# -- IBD-PSC -------------------------------------------------------------------------------


def _bn_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Conv2d(2, 2, 3),
                         nn.BatchNorm2d(2), nn.Flatten(), nn.LazyLinear(3))


def test_ibd_psc_amplifies_the_last_batch_norm_layers_of_a_copy():
    model = _bn_model()
    model(torch.zeros(1, 1, 8, 8))
    for bn in batch_norms(model):
        nn.init.constant_(bn.bias, 0.5)
    twin = amplified(model, 1, 1.5)
    first, last = batch_norms(twin)
    assert torch.equal(first.weight, batch_norms(model)[0].weight)
    assert torch.allclose(last.weight, 1.5 * batch_norms(model)[1].weight)
    assert torch.allclose(last.bias, torch.full((2,), 0.75))
    assert torch.allclose(batch_norms(model)[1].bias, torch.full((2,), 0.5))  # untouched


def test_ibd_psc_layer_selection_and_confidence_consistency():
    assert first_above([0.1, 0.5, 0.7, 0.9], 0.6) == 3
    assert first_above([0.1, 0.2], 0.6) is None
    probs = torch.tensor([[[0.9, 0.1], [0.3, 0.7]],   # amplified model 1: [N=2, K=2]
                          [[0.5, 0.5], [0.9, 0.1]]])  # amplified model 2
    psc = confidence_consistency(probs, torch.tensor([0, 1]))
    assert torch.allclose(psc, torch.tensor([0.7, 0.4]))
    strength = psc_strength(probs.double().log(), torch.tensor([0, 1]))
    assert torch.allclose(strength, -(1 - psc.double()).log())  # -log(1 - PSC)
    # Sure copies: PSC rounds to 1 for both, the log-space score still ranks them.
    sure = torch.tensor([[[0.0, -50.0], [0.0, -80.0]]]).double()  # log-probs, 1 copy
    assert torch.allclose(sure.exp()[..., 0], torch.ones(1, 2).double())
    assert psc_strength(sure, torch.tensor([0, 0])).tolist() == [50.0, 80.0]


def test_ibd_psc_refuses_a_model_without_batch_norm():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    _, _, data = _planted()
    with pytest.raises(ConfigError, match="batch-norm"):
        IbdPsc().fit(model, data)


# -- TeCo ----------------------------------------------------------------------------------


def test_teco_first_flip_severity_and_its_deviation():
    original = torch.tensor([3, 3])
    preds = torch.tensor([  # [K=2 corruptions, S=5 severities, N=2 inputs]
        [[3, 3], [1, 3], [1, 3], [3, 3], [2, 3]],   # input 0 flips at 2; input 1 never
        [[3, 0], [3, 0], [3, 0], [3, 0], [0, 0]],   # input 0 flips at 5; input 1 at 1
    ])
    flips = first_flip(preds, original)
    assert flips.tolist() == [[2, 6], [5, 1]]
    assert torch.allclose(teco_deviation(flips), torch.tensor([1.5, 2.5], dtype=torch.float64))


def test_corruptions_keep_shape_range_and_8_bit_levels_and_grow_with_severity():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 16, 16, generator=g)
    for name in CORRUPTIONS:
        change = []
        for severity in range(1, 6):
            y = corrupt(x, name, severity, torch.Generator().manual_seed(1))
            assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1, name
            assert torch.allclose(y * 255, (y * 255).round(), atol=1e-4), name
            change.append(float((y - x).abs().mean()))
        assert change[-1] > change[0], name  # severity 5 corrupts more than severity 1


def test_corruption_constants_and_closed_forms():
    x = torch.full((1, 1, 4, 4), 0.5)
    assert torch.allclose(corrupt(x, "brightness", 2, torch.Generator()), torch.full_like(x, 0.7),
                          atol=1 / 255)
    ramp = torch.linspace(0, 1, 16).view(1, 1, 4, 4)
    lowered = corrupt(ramp, "contrast", 1, torch.Generator())  # c = 0.4 around the mean
    assert torch.allclose(lowered, 0.5 + 0.4 * (ramp - 0.5), atol=1 / 255)
    kernel = disk_kernel(3, 0.1)
    assert kernel.shape == (17, 17) and torch.isclose(kernel.sum(), torch.tensor(1.0).double())
    dy, dx = motion_offsets(torch.tensor([0.0, 90.0]), 2)
    assert dx[0].tolist() == [0, -1, -2, -3, -4] and dy[0].abs().sum() == 0
    assert dy[1].tolist() == [0, -1, -2, -3, -4]
    assert quant_table(tuple(range(1, 65)), 50)[0, :2].tolist() == [1.0, 2.0]  # scale 100
    haze = plasma_fractal(3, 16, 2.0, torch.Generator().manual_seed(0))
    assert haze.shape == (3, 16, 16)
    assert torch.allclose(haze.flatten(1).amin(1), torch.zeros(3).double())
    assert torch.allclose(haze.flatten(1).amax(1), torch.ones(3).double())
    flat = torch.full((2, 3, 12, 12), 0.25)  # a warp of a uniform image changes nothing
    assert torch.allclose(elastic_transform(flat, 5, torch.Generator()), flat, atol=1e-6)


def _pil(image: np.ndarray, fn: Any) -> np.ndarray:
    return np.asarray(fn(Image.fromarray(image))).astype(np.float64)


def test_jpeg_and_pixelate_follow_pil():
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 6, 6, generator=g), size=(24, 24),
                                             mode="bilinear")
    smooth = (smooth * 255).round() / 255
    for channels in (1, 3):
        x = smooth[:, :channels]
        arr = (x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8).squeeze()

        def save(img: Image.Image) -> Image.Image:
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=15)
            return Image.open(buf)

        ours = jpeg(x, 15)[0].permute(1, 2, 0).numpy().squeeze() * 255
        assert np.abs(ours - _pil(arr, save)).mean() < 1.5
    grey = (smooth[0, 0].numpy() * 255).round().astype(np.uint8)
    for size in (14, 9):
        ref = _pil(grey, lambda im, s=size: im.resize((s, s), Image.BOX))
        ours = box_resize(torch.tensor(grey, dtype=torch.float64)[None, None], size, size)
        assert np.abs(ours[0, 0].numpy() - ref).max() <= 1.0


def test_teco_options_are_checked():
    with pytest.raises(ValueError, match="corruptions"):
        TeCo(corruptions=["gaussian_noise", "snow"])


# -- Beatrix -------------------------------------------------------------------------------


def test_beatrix_gram_features_of_each_order():
    fmap = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])  # [N=1, C=2, h=1, w=2]
    # order 1: [[1+4, 3], [3, 9]] -> upper triangle (5, 3, 9)
    assert gram_features(fmap, 1).tolist() == [[5.0, 3.0, 9.0]]
    # order 2: squares (1, 4), (9, 0): [[1+16, 9], [9, 81]] -> square roots
    assert torch.allclose(gram_features(fmap, 2),
                          torch.tensor([[17.0, 9.0, 81.0]]).double().sqrt())


def test_beatrix_median_mad_range_and_deviation():
    values = torch.tensor([[1.0], [2.0], [4.0], [10.0]])
    median, mad = median_mad(values)
    assert median.tolist() == [2.0] and mad.tolist() == [1.0]  # |.-2| = 1, 0, 2, 8
    low, high = torch.tensor([1.0, 1.0]), torch.tensor([3.0, 3.0])
    g = torch.tensor([[2.0, 2.0], [0.5, 4.5]])
    # inside: 0; outside: (1 - 0.5) / 1 and (4.5 - 3) / 3, averaged over the 2 entries
    assert torch.allclose(deviation(g, low, high), torch.tensor([0.0, 0.5]), atol=1e-5)


def test_beatrix_names_a_missing_layer():
    _, _, data = _planted()
    with pytest.raises(ConfigError, match="no module 'nope'"):
        Beatrix(layer="nope").fit(_bn_model(), data)


# -- Cognitive Distillation ------------------------------------------------------------------


def test_cognitive_distillation_objective_terms():
    mask = torch.tensor([[[[0.0, 1.0], [1.0, 1.0]]]])
    # squared neighbour differences: vertical (1) + horizontal (1), over C*H*W = 4
    assert torch.allclose(total_variation(mask), torch.tensor([0.5]))
    assert torch.allclose(mask_of(torch.zeros(1)), torch.tensor([0.5]))
    out, target = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]])
    loss = distillation_loss(out, target, mask, alpha=0.1, beta=2.0, p=1.0)
    assert torch.allclose(loss, torch.tensor([1.5 + 0.1 * 3 + 2.0 * 0.5]))


def test_cognitive_distillation_options_are_checked():
    with pytest.raises(ValueError, match="steps"):
        CognitiveDistillation(steps=0)


# -- what the detectors report -------------------------------------------------------------


def test_teco_describes_first_flips_of_clean_and_triggered_inputs():
    teco = TeCo(corruptions=["gaussian_noise", "contrast"])
    kept = torch.tensor([[1, 3], [3, 5], [6, 6], [6, 2]])  # [N=4, K=2] first-flip severities
    teco.describe(kept, torch.tensor([False, False, True, True]))
    assert teco.figures["first_flip_clean"] == {"gaussian_noise": 2.0, "contrast": 4.0}
    assert teco.figures["first_flip_triggered"] == {"gaussian_noise": 6.0, "contrast": 4.0}
    assert teco.artifacts["first_flip_triggered"].tolist() == [6.0, 4.0]


def test_cognitive_distillation_describes_masks_and_patterns():
    cd = CognitiveDistillation()
    patterns = torch.zeros(3, 1, 2, 2)
    masks = torch.stack([torch.ones(1, 2, 2), torch.ones(1, 2, 2), torch.zeros(1, 2, 2)])
    cd.describe(torch.cat([patterns, masks], 1), torch.tensor([False, False, True]))
    assert cd.figures["clean_mask_l1_mean"] == 4.0 and cd.figures["triggered_mask_l1_mean"] == 0
    assert cd.artifacts["patterns_clean"].shape == (2, 1, 2, 2)
    assert cd.artifacts["patterns_triggered"].shape == (1, 1, 2, 2)
