"""Fixtures that write tiny MNIST-format IDX files (real format, fake pixels)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from capsnets.data import write_idx


@dataclass(frozen=True)
class TinyMNIST:
    """Writer of the four standard IDX files with ``n_train`` / ``n_test`` random 28x28 images."""

    n_train: int = 60
    n_test: int = 20

    def write(self, folder: Path, *, gz: bool = True, n_train: int | None = None, seed: int = 0) -> Path:
        """Write into ``folder``; image n's first pixel encodes n, so tests can track the split."""
        g = torch.Generator().manual_seed(seed)
        suffix = ".gz" if gz else ""
        for prefix, n in (("train", n_train or self.n_train), ("t10k", self.n_test)):
            images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)  # (N, 28, 28)
            images[:, 0, 0] = torch.arange(n, dtype=torch.uint8)  # identity tag
            labels = (torch.arange(n) % 10).to(torch.uint8)  # (N,) every class present
            write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
            write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
        return folder


@pytest.fixture
def tiny_mnist() -> TinyMNIST:
    return TinyMNIST()


@pytest.fixture
def mnist_root(tmp_path: Path, tiny_mnist: TinyMNIST) -> Path:
    """A data_dir with tiny gzipped MNIST files in torchvision's layout <root>/MNIST/raw/."""
    tiny_mnist.write(tmp_path / "MNIST" / "raw")
    return tmp_path
