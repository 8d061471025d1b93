"""CIFAR-10 (Krizhevsky 2009) from its binary version, with the training transform of CIFAR capsule work.

Format (the "CIFAR-10 binary version", https://www.cs.toronto.edu/~kriz/cifar.html): each of ``data_batch_1.bin``
.. ``data_batch_5.bin`` (50,000 training images) and ``test_batch.bin`` (10,000) holds records of 3,073 bytes: the
label (0-9), then the 1,024 red, 1,024 green and 1,024 blue values of a 32x32 image in row-major order. capsnets
reads this version only: the "Python version" is pickled, and a data file must never run code.

Training transform (the release of Tsai et al. 2020, "Capsules with inverted dot-product attention routing", and
most CIFAR work since ResNets): a random 32x32 crop of the image zero-padded by 4 px, which is a random shift of up
to 4 px per axis with zero fill (``shift_pixels``), and a random horizontal flip (``flip``); then, when
``normalize`` is set, per-channel standardisation with ``mean`` / ``std`` (the release's CIFAR-10 statistics).
All of it runs batched on the device in :meth:`CIFAR10DataModule.on_after_batch_transfer`, after the shift and
flip on [0, 1] images, so padded pixels are black before normalisation, as with torchvision's ``RandomCrop``.

Lookup: ``<data_dir>``, then each of ``search_dirs``, each followed by its ``cifar-10-batches-bin/`` (the
archive's layout). When the files are found nowhere, the archive ``cifar-10-binary.tar.gz`` in ``data_dir`` is
unpacked, offline; without it, and with ``download`` on, it is first downloaded there from :data:`CIFAR10_URL`.
Unpacking checks the archive's MD5 and writes its six batch files only, each by name, never a path the archive
names.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from capsnets.data.base import ImageClassificationDataModule, TensorPairDataset, data_folder, seeded_split
from capsnets.data.mnist import resolve_search_dir
from capsnets.data.transforms import random_hflip, random_shift
from capsnets.errors import ConfigError, DataError
from capsnets.registry import register_datamodule
from capsnets.schema import BoundedFloat, NonNegativeInt, NumClasses, PositiveFloat, PositiveInt, checked

__all__ = [
    "CIFAR10DataModule",
    "CIFAR10_FILES",
    "CIFAR10_MD5",
    "CIFAR10_URL",
    "CIFAR_RECORD_BYTES",
    "read_cifar_bin",
    "unpack_cifar10",
    "write_cifar_bin",
]

log = logging.getLogger(__name__)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"  # of the archive, as the dataset's page lists it
CIFAR10_ARCHIVE = "cifar-10-binary.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-bin"  # the archive's top folder
TRAIN_FILES: tuple[str, ...] = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILE = "test_batch.bin"
CIFAR10_FILES: tuple[str, ...] = (*TRAIN_FILES, TEST_FILE)
CIFAR_SIDE = 32
CIFAR_RECORD_BYTES = 1 + 3 * CIFAR_SIDE * CIFAR_SIDE  # label byte + R, G, B planes = 3,073
CIFAR10_CLASSES = 10
DOWNLOAD_TIMEOUT_S = 10.0  # per socket operation: fail fast offline instead of hanging
# per-channel statistics of the CIFAR-10 training images that the inverted dot-product attention release
# (and most CIFAR code) normalises with
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)


def read_cifar_bin(path: str | Path, *, num_classes: int = CIFAR10_CLASSES) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one CIFAR-10 binary batch file -> images (N, 3, 32, 32) uint8, labels (N,) int64.

    Raises :class:`~capsnets.errors.DataError` naming the file for a missing or unreadable file, a size that is
    not a whole number of 3,073-byte records, or a label >= ``num_classes``.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError as err:
        raise DataError(f"CIFAR-10 file {path} does not exist.") from err
    except OSError as err:
        raise DataError(f"Cannot read CIFAR-10 file {path}: {err}.") from err
    if len(raw) == 0 or len(raw) % CIFAR_RECORD_BYTES:
        raise DataError(
            f"CIFAR-10 file {path} has {len(raw)} bytes; expected a whole number of {CIFAR_RECORD_BYTES}-byte records "
            f"(10,000 records = 30,730,000 bytes per batch file). Is it truncated, or a file of the Python version? "
            f"Fix: unpack {CIFAR10_ARCHIVE} (the binary version) again."
        )
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, CIFAR_RECORD_BYTES)  # (N, 3073)
    labels = torch.from_numpy(records[:, 0].astype(np.int64))  # (N,)
    images = torch.from_numpy(records[:, 1:].reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE).copy())  # (N, 3, 32, 32)
    if int(labels.max()) >= num_classes:
        row = int(labels.argmax())
        raise DataError(
            f"CIFAR-10 file {path} holds label {int(labels[row])} in record {row}; expected labels 0..{num_classes - 1}. "
            f"Is it a CIFAR-100 file (whose records start with two label bytes)?"
        )
    return images, labels


def write_cifar_bin(path: str | Path, images: torch.Tensor, labels: torch.Tensor) -> Path:
    """Write images (N, 3, 32, 32) uint8 and labels (N,) as a CIFAR-10 binary batch file (tests, exports)."""
    path = Path(path)
    if images.dtype != torch.uint8 or tuple(images.shape[1:]) != (3, CIFAR_SIDE, CIFAR_SIDE):
        raise ValueError(f"write_cifar_bin needs uint8 images (N, 3, 32, 32), got {images.dtype} {tuple(images.shape)}")
    if labels.shape != images.shape[:1] or int(labels.min()) < 0 or int(labels.max()) > 255:
        raise ValueError(f"write_cifar_bin needs one label 0..255 per image, got labels {tuple(labels.shape)}")
    records = torch.cat([labels.to(torch.uint8)[:, None], images.reshape(images.shape[0], -1)], dim=1)  # (N, 3073)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(records.numpy().tobytes())
    return path


@register_datamodule
class CIFAR10DataModule(ImageClassificationDataModule):
    """CIFAR-10 as in-memory uint8 tensors; see the module docstring for the format, lookup and transform.

    Args:
        data_dir: root folder; the archive unpacks into ``<data_dir>/cifar-10-batches-bin/``.
        batch_size: samples per batch (the inverted dot-product attention release: 128).
        val_size: training images held out for validation (seeded by ``split_seed``).
        num_workers, pin_memory: DataLoader settings.
        shift_pixels: largest random training shift with zero fill (4 = the usual padded random crop); 0 = off.
        flip: random horizontal flip of training images.
        normalize: standardise every channel with ``mean`` and ``std`` (after the shift and flip).
        mean, std: per-channel statistics (R, G, B) of ``normalize``.
        download: download the archive from :data:`CIFAR10_URL` when the files are found nowhere.
        split_seed: seed of the train/validation split.
        search_dirs: extra folders to look in after ``data_dir``; ``package:NAME`` allowed.
        in_channels, image_size, num_classes: data shapes (3, 32, 10) that models read.
    """

    @checked("data")
    def __init__(
        self,
        data_dir: str | os.PathLike,
        *,
        batch_size: PositiveInt = 128,
        val_size: NonNegativeInt = 5000,
        num_workers: NonNegativeInt = 0,
        pin_memory: bool = False,
        shift_pixels: NonNegativeInt = 4,
        flip: bool = True,
        normalize: bool = False,
        mean: tuple[BoundedFloat, BoundedFloat, BoundedFloat] = CIFAR10_MEAN,
        std: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = CIFAR10_STD,
        download: bool = True,
        split_seed: NonNegativeInt = 42,
        search_dirs: Sequence[str] = (),
        in_channels: PositiveInt = 3,
        image_size: PositiveInt = CIFAR_SIDE,
        num_classes: NumClasses = CIFAR10_CLASSES,
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
        for key, value, want in (("in_channels", in_channels, 3), ("image_size", image_size, CIFAR_SIDE)):
            if value != want:
                raise ConfigError(f"data.{key} must be {want} for CIFAR-10's 3x32x32 colour images, got {value!r}.")
        if num_classes != CIFAR10_CLASSES:
            raise ConfigError(f"data.num_classes must be 10 (CIFAR-10's classes), got {num_classes!r}.")
        self.flip = flip
        self.normalize = normalize
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.val_size = val_size
        self.split_seed = split_seed
        self.download = download
        self.search_dirs = [str(d) for d in search_dirs]  # ListConfig -> plain list (checkpoint-safe)
        self.save_hyperparameters(
            {
                "data_dir": str(data_dir),
                "batch_size": self.batch_size,
                "val_size": self.val_size,
                "num_workers": self.num_workers,
                "pin_memory": self.pin_memory,
                "shift_pixels": self.shift_pixels,
                "flip": self.flip,
                "normalize": self.normalize,
                "mean": list(self.mean),  # plain lists: the checkpoint loads with weights_only=True
                "std": list(self.std),
                "download": self.download,
                "split_seed": self.split_seed,
                "search_dirs": list(self.search_dirs),
                "in_channels": self.in_channels,
                "image_size": self.image_size,
                "num_classes": self.num_classes,
            },
            logger=False,  # train.py logs the whole resolved config instead
        )

    # ----------------------------------------------------------------- files, download, unpacking
    def candidate_dirs(self) -> list[Path]:
        """Folders searched, in order: ``data_dir`` then each of ``search_dirs``, each followed by its
        ``cifar-10-batches-bin/`` (the archive's layout)."""
        roots = [self.data_dir, *map(resolve_search_dir, self.search_dirs)]
        return [folder for root in roots for folder in (root, root / CIFAR10_FOLDER)]

    def find_files(self) -> dict[str, Path] | None:
        """The six batch files from the first folder holding all of them, else None."""
        for folder in self.candidate_dirs():
            if all((folder / name).is_file() for name in CIFAR10_FILES):
                return {name: folder / name for name in CIFAR10_FILES}
        return None

    def require_files(self, *, download: bool) -> dict[str, Path]:
        """The six files; an archive already in ``data_dir`` is unpacked first, offline (whatever ``download``)."""
        archive = self.data_dir / CIFAR10_ARCHIVE
        if self.find_files() is None and archive.is_file():
            unpack_cifar10(archive, self.data_dir / CIFAR10_FOLDER)
        return super().require_files(download=download)

    def _download(self) -> None:
        archive = self.data_dir / CIFAR10_ARCHIVE
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log.info("Downloading %s into %s", CIFAR10_URL, self.data_dir)
        partial = archive.with_name(f"{archive.name}.part")
        with urllib.request.urlopen(CIFAR10_URL, timeout=DOWNLOAD_TIMEOUT_S) as response:
            with partial.open("wb") as out:
                shutil.copyfileobj(response, out, length=1 << 20)
        os.replace(partial, archive)  # only a complete file gets the real name
        unpack_cifar10(archive, self.data_dir / CIFAR10_FOLDER)

    def _missing_files_error(self, download_error: BaseException | None = None) -> DataError:
        searched = "\n".join(f"  - {d}{'' if d.is_dir() else ' (does not exist)'}" for d in self.candidate_dirs())
        names = "\n".join(f"  - {n}" for n in CIFAR10_FILES)
        if download_error is not None:
            why = f"Download or unpacking of {CIFAR10_URL} failed: {type(download_error).__name__}: {download_error}"
        else:
            why = "Download is off (data.download=false)." if not self.download else "prepare_data() has not run."
        fixes = [
            f"connect to the internet and keep data.download=true (fetches {CIFAR10_URL}, 162 MB, into {self.data_dir}/)",
            f"put {CIFAR10_ARCHIVE} (the binary version) into {self.data_dir}/: it is unpacked there, offline",
            "point data.data_dir=<folder> (or data.search_dirs=[<folder>]) at a folder that holds the six files",
        ]
        return DataError(
            f"CIFAR-10 binary files not found. Searched, in order:\n{searched}\nExpected these 6 files together in one "
            f"folder:\n{names}\n{why}\nWays to supply them:\n" + "\n".join(f"  {i}. {fix}" for i, fix in enumerate(fixes, 1))
        )

    # ----------------------------------------------------------------- Lightning hooks
    def prepare_data(self) -> None:
        """Unpack (and download first if needed) when the files are found nowhere (one process per node)."""
        self.require_files(download=self.download)

    def setup(self, stage: str | None = None) -> None:
        """Read the batch files into memory; hold out ``val_size`` of the 50,000 training images (seeded); test =
        ``test_batch.bin`` (read with the training files when fitting, so a bad test file fails before training)."""
        need_fit, need_test = self.stages_to_load(stage)
        need_test = need_test or (need_fit and self.data_test is None)
        if not (need_fit or need_test):
            return
        files = self.require_files(download=False)
        if need_fit:
            parts = [read_cifar_bin(files[name], num_classes=self.num_classes) for name in TRAIN_FILES]
            images = torch.cat([p[0] for p in parts])  # (N, 3, 32, 32)
            labels = torch.cat([p[1] for p in parts])  # (N,)
            fit_idx, val_idx = seeded_split(labels.shape[0], self.val_size, self.split_seed, source=str(files[TRAIN_FILES[0]].parent))
            self.data_train = TensorPairDataset(images[fit_idx], labels[fit_idx])
            self.data_val = TensorPairDataset(images[val_idx], labels[val_idx])
        if need_test:
            self.data_test = TensorPairDataset(*read_cifar_bin(files[TEST_FILE], num_classes=self.num_classes))

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """On the device: [0, 1] floats; while training the random shift (padded crop) and flip; then normalisation."""
        x, y = super().eval_batch(batch)  # [0, 1] floats
        trainer = self.trainer
        if trainer is not None and trainer.training:
            if self.shift_pixels > 0:
                x = random_shift(x, self.shift_pixels)
            if self.flip:
                x = random_hflip(x)
        return self.standardise(x), y

    def eval_batch(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch as validation and test see it: [0, 1] floats, normalised when ``normalize`` is set."""
        x, y = super().eval_batch(batch)  # [0, 1] floats
        return self.standardise(x), y

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std`` per channel of ``x`` (B, 3, H, W) when ``normalize`` is set, else ``x``."""
        if not self.normalize:
            return x
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device)[:, None, None]  # (3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device)[:, None, None]
        return (x - mean) / std


def unpack_cifar10(archive: Path, folder: Path, *, md5: str | None = None) -> Path:
    """Check ``archive`` against ``md5`` (default :data:`CIFAR10_MD5`) and write its six batch files into ``folder``.

    Only regular-file members named ``cifar-10-batches-bin/<one of the six>`` are read, and each is written to
    ``folder / <name>``: no path from the archive is ever used, so a crafted archive cannot write elsewhere.
    """
    digest = hashlib.md5(usedforsecurity=False)
    with archive.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    expected = md5 or CIFAR10_MD5
    if digest.hexdigest() != expected:
        raise DataError(
            f"{archive} has MD5 {digest.hexdigest()}; expected {expected} (the binary version's archive). "
            f"Fix: delete it and download {CIFAR10_URL} again."
        )
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {f"{CIFAR10_FOLDER}/{name}": name for name in CIFAR10_FILES}
    written = set()
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            name = wanted.get(member.name)
            if name is None or not member.isfile():
                continue
            source = tar.extractfile(member)
            if source is None:
                continue
            partial = folder / f"{name}.part"
            with source, partial.open("wb") as out:
                shutil.copyfileobj(source, out, length=1 << 20)
            os.replace(partial, folder / name)
            written.add(name)
    missing = sorted(set(CIFAR10_FILES) - written)
    if missing:
        raise DataError(f"{archive} lacks {', '.join(missing)} under {CIFAR10_FOLDER}/. Fix: download {CIFAR10_URL} again.")
    return folder
