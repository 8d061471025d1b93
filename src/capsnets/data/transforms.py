"""Batched, device-side image transforms.

Sabour, Frosst & Hinton (2017), Sec. 5: "Training is performed on 28x28 MNIST images that
have been shifted by up to 2 pixels in each direction with zero padding. No other data
augmentation/deformation is used." :func:`random_shift` does exactly that for a whole batch
in two gathers on whatever device the batch lives on, so augmentation never becomes a
per-image Python loop in a dataloader worker.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["random_hflip", "random_shift", "shift_images"]


def shift_images(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, *, max_shift: int) -> torch.Tensor:
    """Translate each image ``x[b]`` by ``(dy[b], dx[b])`` pixels, filling uncovered pixels with zeros.

    A positive ``dy`` moves content down, a positive ``dx`` moves it right:
    ``out[b, :, i, j] = x[b, :, i - dy[b], j - dx[b]]`` (0 where that falls outside the image).

    Args:
        x: images (B, C, H, W), any dtype.
        dy, dx: integer shifts (B,), each with ``|shift| <= max_shift``.
        max_shift: bound on the shifts; sets the zero padding.
    """
    b, c, h, w = x.shape
    m = int(max_shift)
    xp = F.pad(x, (m, m, m, m))  # (B, C, H + 2m, W + 2m); x[i, j] sits at xp[i + m, j + m]
    rows = torch.arange(h, device=x.device) + m - dy.to(x.device).long()[:, None]  # (B, H)
    xp = xp.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * m))  # (B, C, H, W + 2m)
    cols = torch.arange(w, device=x.device) + m - dx.to(x.device).long()[:, None]  # (B, W)
    return xp.gather(3, cols[:, None, None, :].expand(b, c, h, w))  # (B, C, H, W)


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shift every image of a batch by its own random integer offset in ``[-max_shift, max_shift]``.

    The x and y offsets are drawn independently and uniformly per image; pixels moved in
    from outside the frame are zero ("shifted by up to 2 pixels in each direction with zero
    padding", Sabour et al. 2017). Runs as one batched op on ``x.device``.

    Args:
        x: images (B, C, H, W), any dtype; (C, H, W) is treated as a batch of one.
        max_shift: largest shift in pixels along each axis, >= 0; 0 returns ``x`` unchanged.
        generator: optional RNG for reproducible shifts; it may live on the CPU or on
            ``x.device`` (offsets are drawn on the generator's device, then moved).

    Returns:
        Tensor with the shape, dtype and device of ``x``.
    """
    if isinstance(max_shift, bool) or int(max_shift) != max_shift or max_shift < 0:
        raise ValueError(f"random_shift: max_shift must be an integer >= 0, got {max_shift!r}.")
    max_shift = int(max_shift)
    if max_shift == 0 or x.numel() == 0:
        return x
    if x.dim() == 3:
        return random_shift(x[None], max_shift, generator)[0]
    if x.dim() != 4:
        raise ValueError(f"random_shift expects images (B, C, H, W), got shape {tuple(x.shape)}.")
    device = generator.device if generator is not None else x.device
    shifts = torch.randint(-max_shift, max_shift + 1, (2, x.shape[0]), generator=generator, device=device)  # (2, B)
    return shift_images(x, shifts[0], shifts[1], max_shift=max_shift)


def random_hflip(x: torch.Tensor, p: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each image of a batch left-right with probability ``p``, independently per image (CIFAR training).

    Args:
        x: images (B, C, H, W), any dtype.
        p: probability of flipping an image, in [0, 1].
        generator: optional RNG for reproducible draws, on the CPU or on ``x.device``.

    Returns:
        Tensor with the shape, dtype and device of ``x``.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"random_hflip: p must be in [0, 1], got {p!r}.")
    if x.dim() != 4:
        raise ValueError(f"random_hflip expects images (B, C, H, W), got shape {tuple(x.shape)}.")
    device = generator.device if generator is not None else x.device
    flip = torch.rand(x.shape[0], generator=generator, device=device).to(x.device) < p  # (B,)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)  # (B, C, H, W)
