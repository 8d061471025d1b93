"""Common base of the in-memory image-classification DataModules (MNIST, Fashion-MNIST, synthetic).

Images are held as one uint8 tensor (N, C, H, W) per split and batches travel to the device
as ``(x_uint8, y_int64)``: four times less host-to-device traffic than float32, and no
per-sample transform in the workers. :meth:`on_after_batch_transfer` then converts to float
in [0, 1] on the device and, during training only, applies the random shift of Sabour et
al. (2017) to the whole batch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from capsnets.data.transforms import random_shift
from capsnets.errors import ConfigError
from capsnets.schema import NonNegativeInt, NumClasses, PositiveInt, checked

__all__ = [
    "EVAL_SPLITS",
    "EvalSplit",
    "ImageClassificationDataModule",
    "TensorPairDataset",
    "data_folder",
    "seeded_split",
]

EvalSplit = Literal["test", "val", "train"]  # what the test/predict dataloaders may serve (eval.py split=)
EVAL_SPLITS: tuple[str, ...] = get_args(EvalSplit)


def data_folder(data_dir: str | os.PathLike[str]) -> Path:
    """``data.data_dir`` as a path: a folder, or one still to be made; ConfigError for an empty value or a file."""
    if not str(data_dir):
        raise ConfigError(f"data.data_dir must be a folder path, got {data_dir!r}. Fix: data.data_dir=<folder>.")
    folder = Path(data_dir).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"data.data_dir must be a folder, but {folder} is a file. Fix: data.data_dir=<dir>.")
    return folder


def seeded_split(n: int, val_size: int, seed: int, *, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Hold out ``val_size`` of ``n`` training rows, reproducibly from ``seed`` (data.split_seed).

    Returns (fit indices, val indices), each sorted. ``source`` names the training data in the
    error raised when ``val_size`` leaves nothing to train on.
    """
    if val_size >= n:
        raise ConfigError(
            f"data.val_size must be < the {n} training images in {source}, got {val_size}. "
            f"Fix: pass data.val_size=<0..{n - 1}>."
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))  # (N,)
    return perm[val_size:].sort().values, perm[:val_size].sort().values


class TensorPairDataset(Dataset):
    """Images (N, C, H, W) and labels (N,) in memory, fetched a whole batch at a time.

    ``__getitems__`` lets the DataLoader index both tensors once per batch instead of
    stacking ``batch_size`` single samples.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.dim() != 4 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
            shapes = f"{tuple(images.shape)} and {tuple(labels.shape)}"
            raise ValueError(f"TensorPairDataset needs images (N, C, H, W) and labels (N,), got {shapes}")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.images[idx], self.labels[idx]  # (B, C, H, W) uint8, (B,) int64


def collate_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate for :class:`TensorPairDataset`: the batch is already stacked by ``__getitems__``."""
    if isinstance(batch, tuple) and len(batch) == 2 and all(isinstance(t, torch.Tensor) for t in batch):
        return batch
    images, labels = zip(*batch)  # a list of samples, e.g. from a dataset without __getitems__
    return torch.stack(images), torch.stack(labels)


class ImageClassificationDataModule(LightningDataModule):
    """Dataloaders and the device-side batch transform shared by every image DataModule.

    Subclasses fill ``data_train``, ``data_val`` and ``data_test`` (:class:`TensorPairDataset`
    of uint8 images) in ``setup``. The test and predict dataloaders serve the test split unless
    :meth:`set_eval_split` picks the validation or training split (``eval.py split=val``).

    Args:
        batch_size: samples per batch (128 in Sabour et al. 2017).
        num_workers: DataLoader worker processes; workers persist across epochs when > 0.
        pin_memory: pin host memory for faster copies to the GPU.
        shift_pixels: largest random training shift in pixels (2 in the paper); 0 disables it.
        in_channels, image_size, num_classes: the data shapes models read from the config.
    """

    @checked("data")
    def __init__(
        self,
        *,
        batch_size: PositiveInt,
        num_workers: NonNegativeInt,
        pin_memory: bool,
        shift_pixels: NonNegativeInt,
        in_channels: PositiveInt,
        image_size: PositiveInt,
        num_classes: NumClasses,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shift_pixels = shift_pixels
        self.in_channels = in_channels
        self.image_size = image_size
        self.num_classes = num_classes
        self.pin_memory = pin_memory
        self.data_train: TensorPairDataset | None = None
        self.data_val: TensorPairDataset | None = None
        self.data_test: TensorPairDataset | None = None
        self.eval_split = "test"

    # --- which split trainer.test / trainer.predict see --------------------------------------
    @checked()
    def set_eval_split(self, split: EvalSplit) -> None:
        """Serve ``split`` (one of :data:`EVAL_SPLITS`: test, val, train) from the test and predict
        dataloaders, in evaluation form (no augmentation). The default is ``test``; the training
        split is served unshuffled and without the random training transform."""
        self.eval_split = split

    # --- evaluation options (eval.py): which rows of the test split, how they are scored ------
    @property
    def viewpoint_protocol(self) -> str | None:
        """The novel-viewpoint protocol the training split follows (smallNORB: azimuth/elevation), else None."""
        return None

    def set_test_viewpoints(self, viewpoints: str) -> None:
        """Test on the ``novel``, ``familiar`` or ``all`` viewpoints of a novel-viewpoint protocol;
        datasets without one refuse, naming the fix (smallNORB implements it)."""
        raise ConfigError(
            f"viewpoints={viewpoints}: {type(self).__name__} has no novel-viewpoint protocol; familiar/novel "
            f"viewpoints exist only for smallNORB trained with data.split=azimuth or elevation. Fix: drop viewpoints=, "
            f"or evaluate on a protocol's test viewpoints with data=smallnorb_azimuth (or +data_overrides.split=azimuth)."
        )

    def eval_dataset(self) -> TensorPairDataset | None:
        """The dataset of :attr:`eval_split` (None before ``setup``)."""
        return {"test": self.data_test, "val": self.data_val, "train": self.data_train}[self.eval_split]

    # --- datasets read from files (MNIST, smallNORB): find -> download -> clear error ------
    def find_files(self) -> Any:
        """The dataset's files if all are present, else None (file-backed subclasses)."""
        raise NotImplementedError

    def _download(self) -> None:
        raise NotImplementedError

    def _missing_files_error(self, download_error: BaseException | None = None) -> Exception:
        raise NotImplementedError

    def require_files(self, *, download: bool) -> Any:
        """``find_files()``, downloading first when allowed; a DataError naming the files and fixes otherwise."""
        files = self.find_files()
        if files is not None:
            return files
        download_error: BaseException | None = None
        if download:
            try:
                self._download()
            except Exception as err:  # noqa: BLE001 - any network/HTTP/IO failure ends in the same DataError
                download_error = err
        files = self.find_files()
        if files is None:
            raise self._missing_files_error(download_error)
        return files

    def stages_to_load(self, stage: str | None) -> tuple[bool, bool]:
        """(fit/validate data needed, test/predict data needed) for ``setup(stage)``, skipping loaded ones.

        The test and predict stages need the training data instead of the test data when
        :meth:`set_eval_split` chose ``val`` or ``train``."""
        evaluating = stage in ("test", "predict")
        need_fit = (stage in (None, "fit", "validate") or (evaluating and self.eval_split != "test")) and self.data_train is None
        need_test = (stage is None or (evaluating and self.eval_split == "test")) and self.data_test is None
        return need_fit, need_test

    def _loader(self, dataset: TensorPairDataset | None, *, shuffle: bool, split: str) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.{split}_dataloader() called before setup().")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_batch,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.data_train, shuffle=True, split="train")

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.data_val, shuffle=False, split="val")

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.eval_dataset(), shuffle=False, split="test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.eval_dataset(), shuffle=False, split="predict")

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 -> float32 in [0, 1] on the device; random shift while training (never val/test)."""
        x, y = self.eval_batch(batch)
        trainer = self.trainer
        if trainer is not None and trainer.training and self.shift_pixels > 0:
            x = random_shift(x, self.shift_pixels)
        return x, y

    def eval_batch(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of the evaluation loaders, already on the device, in the form the model scores (no augmentation)."""
        x, y = batch
        if not torch.is_floating_point(x):
            x = x.float() / 255.0
        return x, y
