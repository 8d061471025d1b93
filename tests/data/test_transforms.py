"""random_shift: exact zero-filled translations, bounded, independent per image."""

from __future__ import annotations

import pytest
import torch

from capsnets.data import random_shift, shift_images


def shift_reference(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Slow, obviously correct: out[i, j] = img[i - dy, j - dx], zero outside."""
    c, h, w = img.shape
    out = torch.zeros_like(img)
    for i in range(h):
        for j in range(w):
            if 0 <= i - dy < h and 0 <= j - dx < w:
                out[:, i, j] = img[:, i - dy, j - dx]
    return out


def recover_shift(orig: torch.Tensor, out: torch.Tensor, max_shift: int) -> list[tuple[int, int]]:
    """All (dy, dx) with |d| <= max_shift whose reference translation equals ``out``."""
    r = range(-max_shift, max_shift + 1)
    return [(dy, dx) for dy in r for dx in r if torch.equal(shift_reference(orig, dy, dx), out)]


def test_shift_images_matches_reference() -> None:
    x = torch.rand(5, 2, 7, 9)
    dy, dx = torch.tensor([0, 1, -2, 3, -3]), torch.tensor([0, -1, 2, 3, 1])
    out = shift_images(x, dy, dx, max_shift=3)
    for b in range(5):
        assert torch.equal(out[b], shift_reference(x[b], int(dy[b]), int(dx[b])))


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_each_image_is_an_exact_bounded_translation(dtype: torch.dtype) -> None:
    max_shift = 2
    # distinct positive pixels: a translation is recoverable and the zero fill is visible
    x = (torch.randperm(64 * 10 * 10)[: 64 * 100].reshape(64, 1, 10, 10) % 250 + 1).to(dtype)
    out = random_shift(x, max_shift, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    shifts = []
    for b in range(x.shape[0]):
        found = recover_shift(x[b], out[b], max_shift)
        assert len(found) == 1, f"image {b} is not a zero-filled translation by <= {max_shift} px"
        shifts.append(found[0])
    dys, dxs = zip(*shifts)
    # independent per image and per axis: with 64 images every offset shows up, x and y differ
    assert set(dys) == set(dxs) == set(range(-max_shift, max_shift + 1))
    assert dys != dxs


def test_generator_makes_it_reproducible() -> None:
    x = torch.rand(16, 1, 28, 28)
    a = random_shift(x, 2, generator=torch.Generator().manual_seed(3))
    b = random_shift(x, 2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, x)


def test_max_shift_zero_is_identity() -> None:
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(random_shift(x, 0), x)


def test_large_shift_and_unbatched_input() -> None:
    x = torch.ones(3, 5, 5)  # (C, H, W): treated as a batch of one
    out = random_shift(x, 7, generator=torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.sum() <= x.sum()


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_bad_max_shift(bad: object) -> None:
    with pytest.raises(ValueError):
        random_shift(torch.zeros(1, 1, 4, 4), bad)  # type: ignore[arg-type]
