"""Synthesizer contract (every registered trigger) and the pattern triggers' geometry."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from backdoors.batch import Batch
from backdoors.data.dataset import ArrayDataset
from backdoors.errors import ConfigError
from backdoors.synthesizers import SYNTHESIZERS, Synthesizer

NUM_CLASSES = 10
BATCH = 8
SHAPES = [(1, 28, 28), (3, 32, 32)]
# Triggers that substitute inputs from a pool need a source; they get it from prepare().
POOLED = {"semantic": {"source_class": 0}, "edge_case": {"source_class": 0}}
# Every registered synthesizer with its defaults, plus the dynamic pattern.
VARIANTS = [pytest.param(name, POOLED.get(name, {}), id=name)
            for name in SYNTHESIZERS.names()] + [
    pytest.param("pattern", {"dynamic": True}, id="pattern-dynamic")
]
# Fraction -> rows poisoned out of BATCH (more than 1 means all).
FRACTIONS = [(0.0, 0), (0.25, 2), (0.5, 4), (1.0, 8), (1.1, 8)]

W, B, C = 1.0, 0.0, None  # white, black, clear
PATTERN = [[W, B, W], [C, W, C], [C, C, B], [C, W, C], [W, B, W]]


def build(
    name: str, shape: tuple[int, int, int], num_classes: int = NUM_CLASSES, **kwargs: Any
) -> Synthesizer:
    synth = SYNTHESIZERS.build(name, kwargs, "synthesizer")
    synth.bind(shape, num_classes)
    if name in POOLED:
        synth.prepare(pool_dataset(shape, num_classes), seeded(5))
    return synth


def pool_dataset(shape: tuple[int, int, int], num_classes: int) -> ArrayDataset:
    """A small random training set for triggers that draw inputs from data."""
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (60, *shape), generator=g, dtype=torch.uint8)
    return ArrayDataset(images, torch.arange(60) % num_classes)


def build_all_to_all(name: str, shape: tuple[int, int, int], **kwargs: Any) -> Synthesizer:
    """Build with label_mode all_to_all, skipping triggers that reject it (a substituted
    input has no source label to shift)."""
    try:
        return build(name, shape, label_mode="all_to_all", **kwargs)
    except (ValueError, ConfigError) as exc:
        if "all_to_all" not in str(exc):
            raise
        pytest.skip(f"{name} has no all-to-all mode")


def grey_batch(shape: tuple[int, int, int], n: int = BATCH) -> Batch:
    """Mid-grey rows, each a slightly different shade, so any trigger pixel shows and
    rows cannot be swapped unnoticed."""
    shades = 0.4 + 0.02 * torch.arange(n, dtype=torch.float32)
    inputs = shades.view(n, 1, 1, 1).expand(n, *shape).clone()
    return Batch.make(inputs, torch.arange(n) % NUM_CLASSES, torch.arange(100, 100 + n))


def textured_batch(shape: tuple[int, int, int], n: int = BATCH) -> Batch:
    """grey_batch plus a faint smooth texture, so content-dependent triggers (warps) show
    too: a warp of a flat image is the same flat image."""
    batch = grey_batch(shape, n)
    _, h, w = shape
    rows = torch.arange(h, dtype=torch.float32)[:, None]
    cols = torch.arange(w, dtype=torch.float32)[None, :]
    texture = 0.05 * torch.sin(rows / 2.0) * torch.cos(cols / 3.0)
    return batch.with_(inputs=(batch.inputs + texture).clamp(0, 1))


def clone(batch: Batch) -> Batch:
    return Batch(batch.inputs.clone(), batch.labels.clone(), batch.indices.clone(),
                 batch.poisoned.clone())


def assert_same(a: Batch, b: Batch) -> None:
    for field in ("inputs", "labels", "indices", "poisoned"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def changed(out: Tensor, grey: float = 0.5) -> Tensor:
    """[H, W] mask of pixels differing from the grey background in any channel."""
    return (out != grey).any(0)


# --- contract ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(("fraction", "n"), FRACTIONS)
@pytest.mark.parametrize(("name", "kwargs"), VARIANTS)
def test_apply_poisons_exactly_the_first_rows_and_leaves_the_input_alone(
    name: str, kwargs: dict, shape: tuple[int, int, int], fraction: float, n: int
) -> None:
    synth = build(name, shape, **kwargs)
    batch = textured_batch(shape)
    before = clone(batch)

    out = synth.apply(batch, fraction, seeded())

    assert_same(batch, before)
    assert out.inputs.shape == batch.inputs.shape and out.inputs.dtype == batch.inputs.dtype
    assert 0.0 <= float(out.inputs.min()) and float(out.inputs.max()) <= 1.0
    assert out.poisoned.tolist() == [i < n for i in range(BATCH)]
    assert torch.equal(out.inputs[n:], batch.inputs[n:])
    assert torch.equal(out.labels[n:], batch.labels[n:])
    assert torch.equal(out.indices, batch.indices)
    assert out.labels[:n].tolist() == [synth.target] * n
    if n:
        assert out is not batch
        assert (out.inputs[:n] != batch.inputs[:n]).flatten(1).any(1).all()


@pytest.mark.parametrize(("name", "kwargs"), VARIANTS)
def test_all_to_all_relabels_to_the_next_class(name: str, kwargs: dict) -> None:
    synth = build_all_to_all(name, (1, 28, 28), **kwargs)
    batch = grey_batch((1, 28, 28), 12)
    out = synth.apply(batch, 1.0, seeded())
    assert torch.equal(out.labels, (batch.labels + 1) % NUM_CLASSES)
    assert bool(out.poisoned.all())


@pytest.mark.parametrize(("name", "kwargs"), VARIANTS)
def test_apply_is_deterministic_given_a_seeded_generator(name: str, kwargs: dict) -> None:
    synth = build(name, (3, 32, 32), **kwargs)
    batch = grey_batch((3, 32, 32))
    first, second = synth.apply(batch, 0.5, seeded(7)), synth.apply(batch, 0.5, seeded(7))
    assert_same(first, second)


@pytest.mark.parametrize(("name", "kwargs"), VARIANTS)
def test_target_outside_the_classes_is_rejected_on_bind(name: str, kwargs: dict) -> None:
    with pytest.raises(ValueError, match="target 10 is not a class"):
        build(name, (1, 28, 28), target=10, **kwargs)
    build_all_to_all(name, (1, 28, 28), target=10, **kwargs)


@pytest.mark.parametrize(("name", "kwargs"), VARIANTS)
def test_spec_names_the_trigger(name: str, kwargs: dict) -> None:
    spec = build(name, (1, 28, 28), target=3, **kwargs).spec()
    assert (spec["name"], spec["target"], spec["label_mode"]) == (name, 3, "all_to_one")


def test_apply_with_nothing_to_poison_still_returns_a_new_batch() -> None:
    batch = grey_batch((1, 28, 28))
    out = build("pattern", (1, 28, 28)).apply(batch, 0.0)
    assert out.inputs is not batch.inputs


# --- pattern geometry --------------------------------------------------------------------


def stamp(shape: tuple[int, int, int], seed: int = 0, **kwargs: Any) -> Tensor:
    """One 0.5-grey image of `shape` with the pattern applied."""
    synth = build(kwargs.pop("name", "pattern"), shape, **kwargs)
    x = torch.full((1, *shape), 0.5)
    batch = Batch.make(x, torch.zeros(1, dtype=torch.long))
    return synth.apply(batch, 1.0, seeded(seed)).inputs[0]


def expected_pattern(shape: tuple[int, int, int], row: int, col: int) -> Tensor:
    """A 0.5-grey image with PATTERN's cells at (row, col), written cell by cell."""
    out = torch.full(shape, 0.5)
    for i, cells in enumerate(PATTERN):
        for j, cell in enumerate(cells):
            if cell is not None:
                out[:, row + i, col + j] = cell
    return out


def test_pattern_matches_the_backdoors101_grid_at_row_3_col_23() -> None:
    out = stamp((1, 28, 28))
    assert torch.equal(out, expected_pattern((1, 28, 28), 3, 23))
    rows, cols = changed(out).nonzero().T
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (3, 7, 23, 25)
    assert int(changed(out).sum()) == 9


def test_pattern_paints_every_channel_the_same() -> None:
    out = stamp((3, 32, 32))
    assert torch.equal(out, expected_pattern((3, 32, 32), 3, 23))
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])


def test_pattern_at_a_custom_position() -> None:
    out = stamp((1, 28, 28), position=[10, 2])
    assert torch.equal(out, expected_pattern((1, 28, 28), 10, 2))


def test_pattern_moves_inside_small_images() -> None:
    out = stamp((1, 8, 8))
    assert torch.equal(out, expected_pattern((1, 8, 8), 3, 5))


@pytest.mark.parametrize(
    ("shape", "kwargs"),
    [
        ((1, 4, 4), {}),
        ((1, 28, 28), {"position": [24, 0]}),
        ((1, 28, 28), {"position": [0, 26]}),
        ((1, 28, 28), {"position": [-1, 0]}),
        ((1, 8, 8), {"dynamic": True}),
    ],
)
def test_pattern_that_does_not_fit_is_rejected_on_bind(
    shape: tuple[int, int, int], kwargs: dict
) -> None:
    with pytest.raises(ValueError, match="does not fit|exceeds image height"):
        build("pattern", shape, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [{"pattern": [[1, 2]]}, {"pattern": [1, 0]}, {"min_size": 6, "max_size": 5}, {"min_size": 0}],
)
def test_invalid_pattern_options_are_rejected(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SYNTHESIZERS.get("pattern")(**kwargs)


def test_dynamic_pattern_wider_than_the_image_is_rejected_on_bind() -> None:
    # size 10 scales the 5x3 grid to 10x6, which cannot fit 4 columns.
    with pytest.raises(ValueError):
        build("pattern", (1, 10, 4), dynamic=True)


def scaled_grids(height: int, width: int) -> list[Tensor]:
    """PATTERN scaled to height x width (nearest neighbour), in each flip, with NaN clear."""
    grid = torch.tensor([[float("nan") if c is None else c for c in r] for r in PATTERN])
    scaled = F.interpolate(grid[None, None], size=(height, width), mode="nearest")[0, 0]
    return [scaled, scaled.flip(0), scaled.flip(1), scaled.flip(0, 1)]


def test_dynamic_pattern_varies_size_position_and_flip_and_keeps_clear_cells_clear() -> None:
    heights, corners, orientations = set(), set(), set()
    for seed in range(150):
        out = stamp((1, 28, 28), seed, dynamic=True)
        mask = changed(out)
        rows, cols = mask.nonzero().T
        top, left = int(rows.min()), int(cols.min())
        height, width = int(rows.max()) - top + 1, int(cols.max()) - left + 1
        assert 5 <= height <= 10
        assert abs(width - height * 3 / 5) <= 0.5
        box = (slice(top, top + height), slice(left, left + width))
        painted = torch.where(mask[box], out[0][box], torch.nan)
        matches = [i for i, g in enumerate(scaled_grids(height, width))
                   if torch.equal(g.isnan(), painted.isnan())
                   and torch.equal(g.nan_to_num(), painted.nan_to_num())]
        assert matches, f"seed {seed}: stamp is not a flipped, scaled pattern"
        # Never the full rectangle: clear cells leave the grey background alone.
        assert int(mask.sum()) < height * width
        heights.add(height)
        corners.add((top, left))
        orientations.add(matches[0] in (0, 1))  # unmirrored or mirrored left-right
    assert heights == set(range(5, 11))
    assert len(corners) > 50
    assert orientations == {True, False}


def test_dynamic_pattern_is_the_same_for_a_seed_and_differs_across_seeds() -> None:
    assert torch.equal(stamp((1, 28, 28), 3, dynamic=True), stamp((1, 28, 28), 3, dynamic=True))
    outs = [stamp((1, 28, 28), seed, dynamic=True) for seed in range(5)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


def test_single_pixel_whitens_exactly_pixel_3_23() -> None:
    out = stamp((3, 32, 32), name="single_pixel")
    expected = torch.full((3, 32, 32), 0.5)
    expected[:, 3, 23] = 1.0
    assert torch.equal(out, expected)


def test_single_pixel_moves_inside_small_images() -> None:
    out = stamp((1, 8, 8), name="single_pixel")
    assert changed(out).nonzero().tolist() == [[3, 7]]
