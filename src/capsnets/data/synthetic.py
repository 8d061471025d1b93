"""A tiny generated dataset with learnable class structure, for tests and debugging.

Every class gets a fixed prototype of a few soft strokes drawn from ``seed``; each sample is
its class prototype shifted by up to ``max_shift`` px (zero fill, as the MNIST augmentation
of Sabour et al. 2017) plus Gaussian noise, clamped to [0, 1] and stored as uint8. Batches
therefore take exactly the same path as MNIST (:class:`ImageClassificationDataModule`), and
a small CNN, or even a linear classifier, learns the classes within a few dozen steps.
"""

from __future__ import annotations

import torch

from capsnets.data.base import ImageClassificationDataModule, TensorPairDataset
from capsnets.data.transforms import shift_images
from capsnets.registry import register_datamodule
from capsnets.schema import Fraction, NonNegativeInt, NumClasses, PositiveInt, checked

__all__ = ["SyntheticDataModule", "make_prototypes"]


def make_prototypes(
    *,
    num_classes: int,
    in_channels: int,
    image_size: int,
    generator: torch.Generator,
    strokes: int = 3,
    margin: int = 4,
) -> torch.Tensor:
    """Draw ``strokes`` soft line segments per class and channel -> prototypes (K, C, S, S) in [0, 1].

    Endpoints keep ``margin`` px from the border so shifted samples stay inside the frame.
    """
    s = image_size
    margin = min(margin, max(s // 4, 0))
    span = max(s - 1 - 2 * margin, 0)
    ends = margin + span * torch.rand(num_classes, in_channels, strokes, 2, 2, generator=generator)  # (K, C, T, 2, 2)
    a, b = ends[..., 0, :], ends[..., 1, :]  # (K, C, T, 2) segment endpoints as (row, col)
    coords = torch.arange(s, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(coords, coords, indexing="ij"), dim=-1).reshape(-1, 2)  # (S*S, 2)
    ab = (b - a)[..., None, :]  # (K, C, T, 1, 2)
    ap = grid - a[..., None, :]  # (K, C, T, S*S, 2)
    t = ((ap * ab).sum(-1) / (ab * ab).sum(-1).clamp_min(1e-6)).clamp(0, 1)  # (K, C, T, S*S) projection
    dist_sq = (ap - t[..., None] * ab).pow(2).sum(-1)  # (K, C, T, S*S) squared distance to the segment
    width = max(s / 28.0, 0.5)  # ~2-3 px wide strokes at 28x28, like pen strokes in MNIST
    ink = torch.exp(-dist_sq / (2 * width**2)).amax(dim=2)  # (K, C, S*S): union of the strokes
    return ink.reshape(num_classes, in_channels, s, s)  # (K, C, S, S)


@register_datamodule
class SyntheticDataModule(ImageClassificationDataModule):
    """Generated stroke images, deterministic given ``seed``; no files, no download.

    Args:
        num_train, num_val, num_test: samples per split (classes balanced, order shuffled).
        batch_size, num_workers, pin_memory: DataLoader settings.
        image_size, in_channels, num_classes: data shapes that models read.
        noise: standard deviation of the additive Gaussian pixel noise.
        max_shift: largest shift (px, per axis) of a sample relative to its prototype.
        seed: seeds the prototypes and every split.
        shift_pixels: extra random training shift applied on the device per batch (0 = off).
    """

    @checked("data")
    def __init__(
        self,
        *,
        num_train: PositiveInt = 512,
        num_val: NonNegativeInt = 128,
        num_test: NonNegativeInt = 128,
        batch_size: PositiveInt = 32,
        image_size: PositiveInt = 28,
        in_channels: PositiveInt = 1,
        num_classes: NumClasses = 10,
        noise: Fraction = 0.1,
        max_shift: NonNegativeInt = 2,
        seed: NonNegativeInt = 0,
        num_workers: NonNegativeInt = 0,
        pin_memory: bool = False,
        shift_pixels: NonNegativeInt = 0,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            shift_pixels=shift_pixels,
            in_channels=in_channels,
            image_size=image_size,
            num_classes=num_classes,
        )
        self.num_train = num_train
        self.num_val = num_val
        self.num_test = num_test
        self.noise = float(noise)
        self.max_shift = max_shift
        self.seed = seed
        self.prototypes: torch.Tensor | None = None
        self.save_hyperparameters(
            {
                "num_train": self.num_train,
                "num_val": self.num_val,
                "num_test": self.num_test,
                "batch_size": self.batch_size,
                "image_size": self.image_size,
                "in_channels": self.in_channels,
                "num_classes": self.num_classes,
                "noise": self.noise,
                "max_shift": self.max_shift,
                "seed": self.seed,
                "num_workers": self.num_workers,
                "pin_memory": self.pin_memory,
                "shift_pixels": self.shift_pixels,
            },
            logger=False,  # train.py logs the whole resolved config instead
        )

    def _make_split(self, n: int, generator: torch.Generator) -> TensorPairDataset:
        assert self.prototypes is not None
        labels = (torch.arange(n) % self.num_classes)[torch.randperm(n, generator=generator)]  # (N,) balanced
        dy, dx = torch.randint(-self.max_shift, self.max_shift + 1, (2, n), generator=generator)  # (N,) each
        x = shift_images(self.prototypes[labels], dy, dx, max_shift=self.max_shift)  # (N, C, S, S)
        x = x + self.noise * torch.randn(x.shape, generator=generator)
        images = (x.clamp(0, 1) * 255).round().to(torch.uint8)  # (N, C, S, S) uint8, like MNIST files
        return TensorPairDataset(images, labels)

    def setup(self, stage: str | None = None) -> None:
        """Generate the prototypes and all three splits (once; cheap)."""
        if self.data_train is not None:
            return
        generator = torch.Generator().manual_seed(self.seed)
        self.prototypes = make_prototypes(
            num_classes=self.num_classes, in_channels=self.in_channels, image_size=self.image_size, generator=generator
        )
        # one derived seed per split, so changing num_train leaves val/test unchanged
        split_seeds = torch.randint(0, 2**62, (3,), generator=generator).tolist()
        sizes = (self.num_train, self.num_val, self.num_test)
        self.data_train, self.data_val, self.data_test = (
            self._make_split(n, torch.Generator().manual_seed(s)) for n, s in zip(sizes, split_seeds)
        )
