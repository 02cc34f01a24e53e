"""Loader over in-memory and streaming datasets, and the batched crop/flip augmentation."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from backdoors.batch import Batch
from backdoors.data.augment import random_crop_flip
from backdoors.data.dataset import ArrayDataset
from backdoors.data.loader import Loader

CPU = torch.device("cpu")
N = 23


def dataset(with_aux: bool = False) -> ArrayDataset:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (N, 2, 4, 4), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, 10, (N,), generator=gen)
    aux = torch.arange(N * 2).view(N, 2) if with_aux else None
    return ArrayDataset(images, labels, aux)


def order(batches: list[Batch]) -> list[int]:
    return torch.cat([b.indices for b in batches]).tolist()


def test_one_pass_covers_every_index_once_in_order_without_shuffle() -> None:
    batches = list(Loader(dataset(), batch_size=5, device=CPU))
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
    assert order(batches) == list(range(N))
    assert len(Loader(dataset(), batch_size=5, device=CPU)) == 5


def test_batches_carry_the_rows_their_indices_name_as_floats_in_unit_range() -> None:
    ds = dataset(with_aux=True)
    loader = Loader(ds, 4, CPU, shuffle=True, generator=torch.Generator().manual_seed(1))
    for batch in loader:
        idx = batch.indices
        assert batch.inputs.dtype == torch.float32
        assert torch.equal(batch.inputs, ds.images[idx].float() / 255)
        assert torch.equal(batch.labels, ds.labels[idx])
        assert torch.equal(batch.aux, ds.aux[idx])
        assert not bool(batch.poisoned.any())


def test_shuffled_passes_cover_every_index_and_differ_between_passes() -> None:
    loader = Loader(dataset(), 6, CPU, shuffle=True, generator=torch.Generator().manual_seed(0))
    first, second = order(list(loader)), order(list(loader))
    assert sorted(first) == sorted(second) == list(range(N))
    assert first != second != list(range(N))


def test_shuffle_order_is_reproducible_from_the_generator_seed() -> None:
    def shuffled(seed: int) -> list[int]:
        gen = torch.Generator().manual_seed(seed)
        return order(list(Loader(dataset(), 6, CPU, shuffle=True, generator=gen)))

    assert shuffled(3) == shuffled(3)
    assert shuffled(3) != shuffled(4)


def test_max_batches_stops_each_pass_early() -> None:
    loader = Loader(dataset(), 5, CPU, max_batches=2)
    assert len(loader) == 2
    assert order(list(loader)) == list(range(10))
    assert len(Loader(dataset(), 5, CPU, max_batches=9)) == 5


def test_augment_receives_the_batch_and_the_loader_generator() -> None:
    gen = torch.Generator().manual_seed(0)
    seen = []

    def augment(x: Tensor, g: torch.Generator) -> Tensor:
        seen.append(g)
        return 1 - x

    ds = dataset()
    batch = next(iter(Loader(ds, 5, CPU, generator=gen, augment=augment)))
    assert seen == [gen]
    assert torch.equal(batch.inputs, 1 - ds.images[:5].float() / 255)


class Stream:
    """A streaming dataset: float images, labels and no auxiliary labels (-1)."""

    def __init__(self, ds: ArrayDataset) -> None:
        self.ds, self.labels = ds, ds.labels

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        return self.ds.images[i].float() / 255, int(self.ds.labels[i]), -1


def test_streaming_dataset_batches_match_their_indices() -> None:
    ds = dataset()
    gen = torch.Generator().manual_seed(2)
    batches = list(Loader(Stream(ds), 5, CPU, shuffle=True, generator=gen))  # type: ignore[arg-type]
    assert sorted(order(batches)) == list(range(N))
    for batch in batches:
        assert torch.equal(batch.inputs, ds.images[batch.indices].float() / 255)
        assert torch.equal(batch.labels, ds.labels[batch.indices])
        assert batch.aux is None
    limited = Loader(Stream(ds), 5, CPU, max_batches=2)  # type: ignore[arg-type]
    assert order(list(limited)) == list(range(10))


# --- random_crop_flip --------------------------------------------------------------------


def images(n: int = 64, shape: tuple[int, int, int] = (2, 10, 12)) -> Tensor:
    """Images with no zero pixels, so zero fill and shifts are unambiguous."""
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(0)) * 0.9 + 0.1


def shifted(x: Tensor, dy: int, dx: int) -> Tensor:
    """x moved down by dy and right by dx, zero filled."""
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    out[..., max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = x[
        ..., max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)
    ]
    return out


def find_shift(out: Tensor, x: Tensor, padding: int) -> tuple[int, int] | None:
    for dy in range(-padding, padding + 1):
        for dx in range(-padding, padding + 1):
            if torch.equal(out, shifted(x, dy, dx)):
                return dy, dx
    return None


def test_no_padding_and_no_flip_is_the_identity() -> None:
    x = images()
    assert torch.equal(random_crop_flip(x, padding=0, flip=False), x)


def test_flip_mirrors_some_images_exactly_and_keeps_the_rest() -> None:
    x = images()
    out = random_crop_flip(x, padding=0, flip=True, generator=torch.Generator().manual_seed(0))
    flipped = [torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x, strict=True)]
    kept = [torch.equal(o, xi) for o, xi in zip(out, x, strict=True)]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))
    assert 10 < sum(flipped) < 54


def test_padding_shifts_each_image_by_at_most_the_padding_with_zero_fill() -> None:
    x = images()
    out = random_crop_flip(x, padding=4, flip=False, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    shifts = [find_shift(o, xi, 4) for o, xi in zip(out, x, strict=True)]
    assert None not in shifts
    assert len(set(shifts)) > 20
    assert {dy for dy, _ in shifts} == set(range(-4, 5))  # type: ignore[misc]


def test_a_marker_pixel_moves_by_at_most_the_padding() -> None:
    x = torch.zeros(200, 1, 16, 16)
    x[:, 0, 8, 8] = 1.0
    out = random_crop_flip(x, padding=4, flip=False, generator=torch.Generator().manual_seed(1))
    positions = torch.stack([o[0].nonzero()[0] for o in out])
    assert bool(((positions - 8).abs() <= 4).all())
    assert out.sum((1, 2, 3)).tolist() == [1.0] * 200
    assert set(positions[:, 0].tolist()) == set(positions[:, 1].tolist()) == set(range(4, 13))


def test_crop_and_flip_together_give_shifted_copies_of_the_image_or_its_mirror() -> None:
    x = images(32)
    out = random_crop_flip(x, padding=2, generator=torch.Generator().manual_seed(0))
    for o, xi in zip(out, x, strict=True):
        assert find_shift(o, xi, 2) is not None or find_shift(o, xi.flip(-1), 2) is not None


@pytest.mark.parametrize(("padding", "flip"), [(4, True), (0, True), (3, False)])
def test_augmentation_is_deterministic_under_a_seeded_generator(padding: int, flip: bool) -> None:
    x = images()
    first = random_crop_flip(x, padding, flip, torch.Generator().manual_seed(5))
    second = random_crop_flip(x, padding, flip, torch.Generator().manual_seed(5))
    other = random_crop_flip(x, padding, flip, torch.Generator().manual_seed(6))
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
