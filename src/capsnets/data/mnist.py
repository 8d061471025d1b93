"""MNIST and Fashion-MNIST DataModules read straight from the IDX files.

Sabour et al. (2017) train on the 60,000 MNIST training images (batch 128) shifted by up to
2 px with zero padding and test on the 10,000 t10k images; Fashion-MNIST (Xiao et al. 2017)
has the same format and sizes. A seeded ``val_size`` subset of the training set is held out
for validation. The four files are looked up in ``<data_dir>/<Name>/raw/`` (torchvision's
layout), then ``<data_dir>``, then each of ``search_dirs`` (``package:NAME`` = a folder
shipped inside ``capsnets.data``, e.g. the offline ``mnist_sample``).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from capsnets.data.base import ImageClassificationDataModule, TensorPairDataset, data_folder, seeded_split
from capsnets.data.idx import read_idx
from capsnets.errors import ConfigError, DataError
from capsnets.registry import register_datamodule
from capsnets.schema import NonNegativeInt, NumClasses, PositiveInt, checked

__all__ = ["FashionMNISTDataModule", "IDX_FILE_NAMES", "MNISTDataModule", "resolve_search_dir"]

IDX_FILE_NAMES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
PACKAGE_PREFIX = "package:"
DOWNLOAD_TIMEOUT_S = 10.0  # per socket operation: fail fast when offline instead of hanging


def resolve_search_dir(entry: str | os.PathLike[str]) -> Path:
    """``package:NAME`` -> the folder NAME inside the installed ``capsnets.data`` package; else a path."""
    text = str(entry)
    if text.startswith(PACKAGE_PREFIX):
        return Path(__file__).resolve().parent / text[len(PACKAGE_PREFIX):]
    return Path(text).expanduser()


@register_datamodule
class MNISTDataModule(ImageClassificationDataModule):
    """MNIST (LeCun et al. 1998) as in-memory uint8 tensors; see the module docstring for lookup.

    Args:
        data_dir: root folder; torchvision downloads into ``<data_dir>/MNIST/raw/``.
        batch_size: samples per batch (128 in Sabour et al. 2017).
        val_size: training images held out for validation (seeded by ``split_seed``).
        num_workers, pin_memory: DataLoader settings.
        shift_pixels: largest random training shift (2 in the paper); 0 disables it.
        download: let torchvision download the files when they are found nowhere.
        split_seed: seed of the train/validation split.
        search_dirs: extra folders to look in after ``data_dir``; ``package:NAME`` allowed.
        in_channels, image_size, num_classes: data shapes (1, 28, 10) that models read.
    """

    folder_name = "MNIST"  # torchvision class and <data_dir>/<folder_name>/raw/
    install_hint: str | None = None

    @checked("data")
    def __init__(
        self,
        data_dir: str | os.PathLike,
        *,
        batch_size: PositiveInt = 128,
        val_size: NonNegativeInt = 5000,
        num_workers: NonNegativeInt = 0,
        pin_memory: bool = False,
        shift_pixels: NonNegativeInt = 2,
        download: bool = True,
        split_seed: NonNegativeInt = 42,
        search_dirs: Sequence[str] = (),
        in_channels: PositiveInt = 1,
        image_size: PositiveInt = 28,
        num_classes: NumClasses = 10,
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
        self.data_dir = data_folder(data_dir)
        self.search_dirs = [str(d) for d in search_dirs]  # ListConfig -> plain list (checkpoint-safe)
        if self.in_channels != 1:
            raise ConfigError(f"data.in_channels must be 1 for grayscale {self.folder_name}, got {in_channels!r}.")
        self.val_size = val_size
        self.split_seed = split_seed
        self.download = download
        self.save_hyperparameters(
            {
                "data_dir": str(data_dir),
                "batch_size": self.batch_size,
                "val_size": self.val_size,
                "num_workers": self.num_workers,
                "pin_memory": self.pin_memory,
                "shift_pixels": self.shift_pixels,
                "download": self.download,
                "split_seed": self.split_seed,
                "search_dirs": list(self.search_dirs),
                "in_channels": self.in_channels,
                "image_size": self.image_size,
                "num_classes": self.num_classes,
            },
            logger=False,  # train.py logs the whole resolved config instead
        )

    # ----------------------------------------------------------------- file lookup
    def candidate_dirs(self) -> list[Path]:
        """Folders searched, in order: torchvision layout, ``data_dir``, then ``search_dirs``."""
        return [self.data_dir / self.folder_name / "raw", self.data_dir, *map(resolve_search_dir, self.search_dirs)]

    def find_files(self) -> dict[str, Path] | None:
        """Return the four IDX files from the first folder holding all of them (plain or .gz), else None."""
        for folder in self.candidate_dirs():
            found = {}
            for key, name in IDX_FILE_NAMES.items():
                hits = [folder / n for n in (name, name + ".gz") if (folder / n).is_file()]
                if hits:
                    found[key] = hits[0]  # plain first: torchvision leaves both, plain reads faster
            if len(found) == len(IDX_FILE_NAMES):
                return found
        return None

    @staticmethod
    def _folder_note(folder: Path) -> str:
        """' (does not exist)' or ' (has only: ...)' for a searched folder with some of the files."""
        if not folder.is_dir():
            return " (does not exist)"
        present = [n for n in IDX_FILE_NAMES.values() if (folder / n).is_file() or (folder / f"{n}.gz").is_file()]
        return f" (has only: {', '.join(present)})" if present else ""

    def _missing_files_error(self, download_error: BaseException | None = None) -> DataError:
        searched = "\n".join(f"  - {d}{self._folder_note(d)}" for d in self.candidate_dirs())
        names = "\n".join(f"  - {n}  (or {n}.gz)" for n in IDX_FILE_NAMES.values())
        raw = self.data_dir / self.folder_name / "raw"
        if download_error is not None:
            why = f"Download with torchvision failed: {type(download_error).__name__}: {download_error}"
        else:
            why = "prepare_data() has not downloaded them." if self.download else "Download is off (data.download=false)."
        fixes = [
            f"connect to the internet and keep data.download=true (torchvision downloads into {raw}/)",
            f"copy the four files into {raw}/",
            "point data.data_dir=<folder> (or data.search_dirs=[<folder>]) at a folder that holds them",
        ]
        if self.install_hint:
            fixes.append(self.install_hint)
        fixes.append("run offline on the shipped MNIST sample with data=mnist_sample")
        return DataError(
            f"{self.folder_name} IDX files not found. Searched, in order:\n{searched}\n"
            f"Expected these 4 files together in one folder:\n{names}\n{why}\nWays to supply them:\n"
            + "\n".join(f"  {i}. {fix}" for i, fix in enumerate(fixes, 1))
        )

    def _download(self) -> None:
        import torchvision.datasets  # deferred: only needed when the files are missing

        dataset_cls = getattr(torchvision.datasets, self.folder_name)
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # torchvision's urlopen has no timeout of its own
        try:
            for train in (True, False):
                dataset_cls(root=str(self.data_dir), train=train, download=True)
        finally:
            socket.setdefaulttimeout(previous)

    # ----------------------------------------------------------------- Lightning hooks
    def prepare_data(self) -> None:
        """Download with torchvision if the files are found nowhere (rank 0 only, per Lightning)."""
        self.require_files(download=self.download)

    def setup(self, stage: str | None = None) -> None:
        """Read the IDX files once into memory; split train/val with ``split_seed``; test = t10k (read and
        checked with the training files, whatever the stage asks for)."""
        need_fit, need_test = self.stages_to_load(stage)
        # fail fast: fitting also reads and checks the test files (10k images, ~8 MB), so a corrupt test
        # file is found before the first training step, not after the whole training
        need_test = need_test or (need_fit and self.data_test is None)
        if not (need_fit or need_test):
            return
        files = self.require_files(download=False)
        if need_fit:
            images, labels = self._load_pair(files["train_images"], files["train_labels"])
            train_idx, val_idx = seeded_split(labels.shape[0], self.val_size, self.split_seed, source=str(files["train_images"]))
            self.data_train = TensorPairDataset(images[train_idx], labels[train_idx])
            self.data_val = TensorPairDataset(images[val_idx], labels[val_idx])
        if need_test:
            self.data_test = TensorPairDataset(*self._load_pair(files["test_images"], files["test_labels"]))

    def _load_pair(self, images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        """Read and cross-check one images/labels pair -> (N, 1, H, W) uint8, (N,) int64."""
        images = read_idx(images_path, expected_ndim=3)  # (N, H, W)
        labels = read_idx(labels_path, expected_ndim=1)  # (N,)
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{images_path} holds {images.shape[0]} images but {labels_path} holds {labels.shape[0]} labels; "
                f"expected equal counts. Fix: copy matching files again."
            )
        size = (self.image_size, self.image_size)
        if tuple(images.shape[1:]) != size:
            raise DataError(
                f"{images_path} holds {tuple(images.shape[1:])} images; "
                f"expected {size} from data.image_size={self.image_size}."
            )
        if labels.numel() and int(labels.max()) >= self.num_classes:
            raise DataError(
                f"{labels_path} holds label {int(labels.max())}; expected labels < data.num_classes={self.num_classes}."
            )
        return images.unsqueeze(1), labels.long()  # (N, 1, H, W), (N,)


@register_datamodule
class FashionMNISTDataModule(MNISTDataModule):
    """Fashion-MNIST (Xiao, Rasul & Vollgraf 2017): same format, sizes and options as :class:`MNISTDataModule`.

    Also looks in ``/usr/share/datasets/fashion-mnist`` (Debian/Ubuntu package
    ``dataset-fashion-mnist``) by default, so an apt-installed copy is used without copying.
    """

    folder_name = "FashionMNIST"
    install_hint = "on Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist (-> /usr/share/datasets/fashion-mnist)"
    DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"

    @checked("data")
    def __init__(
        self, data_dir: str | os.PathLike, *, search_dirs: Sequence[str] = (DEBIAN_DIR,), **kwargs: Any
    ) -> None:
        super().__init__(data_dir, search_dirs=search_dirs, **kwargs)
