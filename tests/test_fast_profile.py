"""The fast CIFAR-10 victim profile: fast_cifar's fitted whitening, the model contract, the
warmup-then-linear-decay schedule, Nesterov and crop-padding options, and a tiny run from
the command line that fits the whitening at its start and resumes with it."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from support import StopAfter

from backdoors.assembly.artifact import reopen
from backdoors.assembly.build import build, fingerprint, resolved_config
from backdoors.cli import main
from backdoors.config import TrainConfig, from_dict, load_config
from backdoors.data.augment import crop_flip
from backdoors.data.task import TASKS
from backdoors.errors import ConfigError
from backdoors.experiment import Interrupted, run
from backdoors.models import MODELS
from backdoors.models.fast_cifar import FastCifar
from backdoors.runs import RunFolder
from backdoors.training.optim import make_scheduler

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "fast"


def small(input_shape: tuple[int, int, int] = (3, 32, 32), **options: object) -> FastCifar:
    channels = input_shape[0]
    model = MODELS.build("fast_cifar", {"width_scale": 1 / 16, **options}, "model",
                         num_classes=10, input_shape=input_shape, mean=(0.5,) * channels,
                         std=(0.25,) * channels)
    assert isinstance(model, FastCifar)
    return model


def correlated_images(n: int = 64, seed: int = 0) -> torch.Tensor:
    """Smooth colour images in [0, 1]: neighbouring pixels and channels correlate, as in
    natural images, so the patch covariance is far from the identity."""
    g = torch.Generator().manual_seed(seed)
    grey = F.avg_pool2d(torch.rand(n, 1, 36, 36, generator=g), 5, stride=1)
    tint = torch.rand(n, 3, 1, 1, generator=g)
    return (0.6 * grey + 0.3 * tint + 0.2 * torch.rand(n, 3, 32, 32, generator=g)).clamp(0, 1)


def test_fitted_whitening_whitens_the_patches_it_was_fitted_on():
    torch.manual_seed(0)
    model = small()
    images = correlated_images()
    x = model.normalize(images)
    whiten = model.whiten
    before = whiten.patches(x).T.cov()
    assert (before - torch.eye(12)).abs().max() > 0.5  # far from white to begin with
    model.prepare(images)
    out = whiten(x).double()  # [N, 24, 31, 31]
    rows = out.permute(0, 2, 3, 1).reshape(-1, 24)
    first, second = rows[:, :12], rows[:, 12:]
    torch.testing.assert_close(second, -first)  # the negated copy
    assert rows.mean(0).abs().max() < 1e-4  # the bias centres the fitted patches
    eigenvalues = torch.linalg.eigvalsh(whiten.patches(x).double().T.cov())
    expected = torch.diag((eigenvalues / (eigenvalues + whiten.eps)).sort().values)
    cov = first.T.cov()
    # Identity up to eps: each direction's variance is lambda / (lambda + eps).
    torch.testing.assert_close(torch.diag(cov.diagonal().sort().values), expected,
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cov, torch.diag(cov.diagonal()), atol=1e-4, rtol=0)
    strong = cov.diagonal().sort().values[eigenvalues.sort().values > 100 * whiten.eps]
    assert len(strong) >= 9 and (strong - 1).abs().max() < 0.01


def test_whitening_is_a_buffer_that_training_leaves_alone():
    torch.manual_seed(0)
    model = small()
    model.prepare(correlated_images())
    names = dict(model.named_parameters())
    assert "body.0.weight" not in names and "body.0.bias" in names
    assert "body.0.weight" in model.state_dict()
    fitted = model.whiten.weight.clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.85, nesterov=True)
    x, y = correlated_images(8, seed=1), torch.arange(8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    assert torch.equal(model.whiten.weight, fitted)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "head.weight" in changed and "body.0.bias" in changed


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28)])
def test_fast_cifar_stages_fit_the_image_classifier_contract(shape):
    torch.manual_seed(0)
    model = small(shape).eval()
    x = torch.rand(4, *shape)
    with torch.no_grad():
        fmap = model.feature_map(x)
        feats = model.features(x)
        out = model(x)
        assert fmap.shape == (4, 16, 3, 3)
        torch.testing.assert_close(feats, model.pool(fmap))
        torch.testing.assert_close(out, model.head(feats))
        # The head divides the logits by the temperature (9 by default).
        torch.testing.assert_close(out, F.linear(feats, model.head.weight) / 9)
    assert isinstance(model.head, torch.nn.Linear) and model.feature_dim() == 16


def test_full_width_defaults():
    model = MODELS.build("fast_cifar", {}, "model", num_classes=10, input_shape=(3, 32, 32),
                         mean=(0.5,) * 3, std=(0.25,) * 3)
    widths = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert widths == [64, 64, 256, 256, 256, 256]
    assert model.whiten.out_channels == 24 and model.head.in_features == 256


@pytest.mark.parametrize("options", [{"widths": [64, 256]}, {"width_scale": 0},
                                     {"temperature": 0}, {"bn_momentum": 1.5}])
def test_bad_options_are_config_errors(options):
    with pytest.raises(ConfigError):
        small(**options)


def lrs(cfg: TrainConfig, steps_per_epoch: int) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=cfg.lr)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch)
    assert scheduler is not None
    out = []
    for _ in range(steps_per_epoch * cfg.epochs):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_linear_schedule_warms_up_then_decays_to_zero_at_the_last_step():
    cfg = TrainConfig(epochs=4, lr=2.0, scheduler="linear", warmup=0.25)
    curve = lrs(cfg, steps_per_epoch=10)  # 40 steps, 10 of warmup
    assert curve[:10] == pytest.approx([2.0 * (s + 1) / 10 for s in range(10)])
    assert max(curve) == pytest.approx(2.0) and curve.index(max(curve)) == 9
    decay = curve[10:]
    assert decay == pytest.approx([2.0 * (40 - s) / 30 for s in range(10, 40)])
    assert decay[-1] == pytest.approx(2.0 / 30)  # one step from 0
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))


def test_linear_schedule_without_warmup_starts_at_the_peak():
    curve = lrs(TrainConfig(epochs=2, lr=1.0, scheduler="linear", warmup=0.0), 5)
    assert curve[0] == pytest.approx(1.0) and curve[-1] == pytest.approx(0.1)


@pytest.mark.parametrize("bad", [{"nesterov": True, "optimizer": "adam"},
                                 {"nesterov": True, "momentum": 0.0},
                                 {"warmup": 1.0}, {"warmup": -0.1}])
def test_bad_schedule_options_are_config_errors(bad):
    with pytest.raises(ConfigError):
        TrainConfig(**bad)


def test_crop_padding_bounds_the_shift():
    task = TASKS.build("cifar10", {"crop_padding": 2}, "task")
    x = torch.zeros(64, 1, 12, 12)
    x[:, :, 5, 5] = 1.0
    out = task.augmentation()(x, torch.Generator().manual_seed(0))
    rows, cols = out[:, 0].amax(2).argmax(1), out[:, 0].amax(1).argmax(1)
    assert set(rows.tolist()) == {3, 4, 5, 6, 7}
    assert set(cols.tolist()) == {3, 4, 5, 6, 7, 8}  # 5 +/- 2, and its mirror 6 +/- 2
    assert TASKS.build("cifar10", {"augment": False}, "task").augmentation() is None
    with pytest.raises(ConfigError, match="crop_padding"):
        TASKS.build("cifar10", {"crop_padding": -1}, "task")
    torch.testing.assert_close(crop_flip(0)(x, torch.Generator()).sum(), x.sum())


def test_fast_configs_validate():
    names = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
    assert names == ["cifar10_" + a for a in ("badnets", "blend", "bpp", "clean",
                                              "low_frequency", "trojan_nn", "wanet")]
    for path in CONFIGS.glob("*.yaml"):
        assert main(["validate", str(path)]) == 0
        train = yaml.safe_load(path.read_text())["train"]
        assert train["scheduler"] == "linear" and train["nesterov"] is True


def write_tiny_cifar(root: Path, per_batch: int = 32) -> Path:
    """CIFAR-10's binary layout with a few learnable 3x32x32 images per batch: each class
    its own colour, plus noise."""
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (10, 3))
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = np.arange(per_batch) % 10
        pixels = colours[labels][:, :, None] + rng.integers(-40, 40, (per_batch, 3, 1024))
        records = np.concatenate([labels[:, None], pixels.clip(0, 255).reshape(per_batch, -1)],
                                 axis=1).astype(np.uint8)
        (folder / f"{name}.bin").write_bytes(records.tobytes())
    return root




def test_tiny_fast_run_fits_whitening_at_the_start_and_resumes_with_it(tmp_path, one_thread):
    data = write_tiny_cifar(tmp_path / "cifar")
    path = CONFIGS / "cifar10_badnets.yaml"
    overrides = [f"task.data_dir={data}", "model.width_scale=0.0625", "train.epochs=2",
                 "train.batch_size=32", "train.test_batch_size=64", "train.device=cpu",
                 "train.tensorboard=false", "train.progress=false"]
    sets = [a for o in overrides for a in ("--set", o)]
    runs = tmp_path / "runs"
    assert main(["train", str(path), "--out", str(runs), "--name", "full", "--quiet",
                 *sets]) == 0
    whitening = load_file(str(runs / "full" / "checkpoints" / "last.safetensors"))["body.0.weight"]
    identity = torch.eye(12).view(12, 3, 2, 2)
    assert not torch.allclose(whitening[:12], identity)  # fitted, not the unfitted default
    full = [r for r in RunFolder(runs / "full").rows() if r["kind"] == "epoch"]
    # 160 training images, 5 steps an epoch, 10 in all, 2 of warmup: the lr is stepped per
    # batch, so epoch 2 starts on step 5 of the decay from step 2 to 10.
    assert full[0]["lr"] == pytest.approx(0.65 / 2)
    assert full[1]["lr"] == pytest.approx(0.65 * 5 / 8)
    with pytest.raises(Interrupted):
        run(load_config(path, overrides), out=runs, name="part", hooks=[StopAfter(1)],
            quiet=True)
    assert main(["train", "--resume", str(runs / "part"), "--quiet"]) == 0
    part = [r for r in RunFolder(runs / "part").rows() if r["kind"] == "epoch"]
    keys = ("epoch", "lr", "clean_accuracy", "clean_loss", "asr", "train_loss")
    assert [{k: r[k] for k in keys} for r in part] == [{k: r[k] for k in keys} for r in full]
    resumed = load_file(str(runs / "part" / "checkpoints" / "last.safetensors"))
    torch.testing.assert_close(resumed["body.0.weight"], whitening, rtol=0, atol=0)
    # Defenses that retrain from scratch get the run's start: whitening fitted the same way.
    fresh = reopen(RunFolder(runs / "full")).fresh_model()
    torch.testing.assert_close(fresh.state_dict()["body.0.weight"], whitening, rtol=0, atol=0)


def test_new_keys_at_their_defaults_keep_old_runs_fingerprints(tiny):
    config = from_dict(tiny)
    resolved = resolved_config(config, build(config, fresh=False))
    assert resolved["train"]["nesterov"] is False and resolved["task"]["crop_padding"] == 4
    before = copy.deepcopy(resolved)  # as a run made before the keys existed resolves
    for section, key in (("train", "nesterov"), ("train", "warmup"), ("task", "crop_padding")):
        del before[section][key]
    assert fingerprint(resolved) == fingerprint(before)
    resolved["task"]["crop_padding"] = 2
    assert fingerprint(resolved) != fingerprint(before)
