"""smallNORB (LeCun et al. 2004) prepared as in Hinton, Sabour & Frosst (2018), "Matrix capsules with EM routing".

Preprocessing (Hinton et al. 2018, "Experiments"): every 96x96 image is downsampled to 48x48
(``resize``; area average) and standardised to zero mean and unit variance (per image, per
camera). This runs once per source-file version into ``<data_dir>/smallnorb/cache/`` (float16,
both cameras); ``stereo`` picks one camera (the left, channel 0) or both at load time.
Training batches get a random ``image_size`` (32) crop per image plus random brightness and
contrast; validation and test batches the centre crop, or ``test_crops`` crops for the
paper's multi-crop testing. These run batched on the device in :meth:`on_after_batch_transfer`.

Splits: ``standard`` trains on the training file and tests on the testing file (disjoint
object instances). The novel-viewpoint protocols of Hinton et al. (2018, "Generalization to
novel viewpoints") train on familiar viewpoints of the training file and test on unseen ones
of the testing file:
``azimuth`` trains on azimuths 300, 320, 340, 0, 20, 40 degrees and tests on 60..280;
``elevation`` trains on the 3 lowest elevations (indices 0-2) and tests on the other 6.
The paper compares models on both halves of the testing file: :meth:`SmallNORBDataModule.set_test_viewpoints`
makes the test split the ``novel`` viewpoints (the protocol's test set, the default), the
``familiar`` ones (testing-file images at the training viewpoints) or ``all`` of them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import urllib.request
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from capsnets.data.base import ImageClassificationDataModule, TensorPairDataset, data_folder, seeded_split
from capsnets.data.norb import INFO_LIMITS, NUM_CATEGORIES, preprocess_smallnorb
from capsnets.errors import ConfigError, DataError
from capsnets.registry import register_datamodule
from capsnets.schema import NonNegativeFloat, NonNegativeInt, NumClasses, PositiveInt, checked

__all__ = [
    "SMALLNORB_FILES",
    "SMALLNORB_URL",
    "SmallNORBDataModule",
    "VIEWPOINTS",
    "crop_images",
    "multi_crop_offsets",
    "viewpoint_mask",
]

log = logging.getLogger(__name__)

SMALLNORB_URL = "https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/"
PART_PREFIXES = {
    "training": "smallnorb-5x46789x9x18x6x2x96x96-training",
    "testing": "smallnorb-5x01235x9x18x6x2x96x96-testing",
}
KINDS = ("dat", "cat", "info")
SMALLNORB_FILES: tuple[str, ...] = tuple(f"{p}-{kind}.mat" for p in PART_PREFIXES.values() for kind in KINDS)
Split = Literal["standard", "azimuth", "elevation"]
SPLITS: tuple[str, ...] = get_args(Split)
Viewpoints = Literal["novel", "familiar", "all"]  # test rows of a novel-viewpoint protocol (set_test_viewpoints)
VIEWPOINTS: tuple[str, ...] = get_args(Viewpoints)
AZIMUTH_TRAIN_DEGREES = (300, 320, 340, 0, 20, 40)  # Hinton et al. 2018, novel viewpoints; test: 60..280
ELEVATION_TRAIN_INDICES = (0, 1, 2)  # the 3 lowest (30, 35, 40 degrees); test: indices 3..8
CACHE_VERSION = 1  # bump when the preprocessing changes: every old cache is then rebuilt
DOWNLOAD_TIMEOUT_S = 5.0  # per socket operation: fail fast offline instead of hanging


def viewpoint_mask(info: torch.Tensor, split: str, *, train: bool) -> torch.Tensor:
    """Rows (N,) bool of an ``info`` matrix (N, 4) that ``split`` trains on (``train``) or tests on."""
    if split == "standard":
        return torch.ones(info.shape[0], dtype=torch.bool)
    if split == "azimuth":
        degrees = info[:, 2] * 10
        familiar = torch.tensor(AZIMUTH_TRAIN_DEGREES, dtype=degrees.dtype)
        return torch.isin(degrees, familiar) if train else (degrees >= 60) & (degrees <= 280)
    if split == "elevation":
        elevation = info[:, 1]
        familiar = torch.tensor(ELEVATION_TRAIN_INDICES, dtype=elevation.dtype)
        return torch.isin(elevation, familiar) if train else elevation >= 3
    raise ValueError(f"unknown smallNORB split {split!r}; expected one of {SPLITS}")


def crop_images(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: int) -> torch.Tensor:
    """Windows ``x[b, :, top[b, k]:+size, left[b, k]:+size]`` of ``x`` (B, C, H, W) -> (B, K, C, size, size)."""
    steps = torch.arange(size, device=x.device)
    rows = (top.to(x.device)[:, :, None] + steps)[:, :, :, None]  # (B, K, S, 1)
    cols = (left.to(x.device)[:, :, None] + steps)[:, :, None, :]  # (B, K, 1, S)
    batch = torch.arange(x.shape[0], device=x.device)[:, None, None, None]  # (B, 1, 1, 1)
    crops = x.permute(0, 2, 3, 1)[batch, rows, cols]  # (B, K, S, S, C): one gather for the whole batch
    return crops.permute(0, 1, 4, 2, 3).contiguous()  # (B, K, C, S, S)


def multi_crop_offsets(n: int, max_offset: int) -> list[tuple[int, int]]:
    """(top, left) of ``n`` distinct crops: the centre, the corners (TL, TR, BL, BR), then the new points of
    ever finer evenly spaced k x k grids (k = 3, 4, ...) in row-major order. n = 9 gives the 3x3 grid."""
    m, c = max_offset, max_offset // 2
    offsets = list(dict.fromkeys([(c, c), (0, 0), (0, m), (m, 0), (m, m)]))
    k = 3
    while len(offsets) < n and k <= m + 1:
        grid = sorted({round(i * m / (k - 1)) for i in range(k)})
        offsets += [p for p in ((r, q) for r in grid for q in grid) if p not in offsets]
        k += 1
    if len(offsets) < n:
        raise ValueError(f"only {len(offsets)} distinct crops fit a max offset of {m}; asked for {n}")
    return offsets[:n]


@register_datamodule
class SmallNORBDataModule(ImageClassificationDataModule):
    """smallNORB with the preprocessing and viewpoint splits of Hinton et al. (2018); see the module docstring.

    Args:
        data_dir: root folder; the six files live in (or are downloaded into) ``<data_dir>/smallnorb/``.
        batch_size, num_workers, pin_memory: DataLoader settings.
        val_size: training images held out for validation (seeded by ``split_seed``).
        download: download the six ``.mat.gz`` files from :data:`SMALLNORB_URL` when absent.
        split_seed: seed of the train/validation split.
        split: ``standard``, ``azimuth`` or ``elevation`` (novel-viewpoint protocols).
        stereo: False = left camera only (1 channel); True = both cameras (2 channels).
        image_size: crop size fed to the model (32). resize: side after downsampling (48).
        brightness: max |delta| of the random brightness added in training (standardised units).
        contrast: [low, high] range of the random contrast factor in training.
        test_crops: 1 = centre crop; n > 1 = :func:`multi_crop_offsets` crops, eval batches (B, n, C, S, S).
        in_channels, num_classes: data shapes models read (in_channels = 2 if stereo else 1; 5 classes).
    """

    @checked("data")
    def __init__(
        self,
        data_dir: str | os.PathLike,
        *,
        batch_size: PositiveInt = 32,
        val_size: NonNegativeInt = 1000,
        num_workers: NonNegativeInt = 0,
        pin_memory: bool = False,
        download: bool = True,
        split_seed: NonNegativeInt = 42,
        split: Split = "standard",
        stereo: bool = False,
        image_size: PositiveInt = 32,
        resize: PositiveInt = 48,
        brightness: NonNegativeFloat = 0.2,
        contrast: tuple[NonNegativeFloat, NonNegativeFloat] = (0.5, 1.5),
        test_crops: PositiveInt = 1,
        in_channels: PositiveInt = 1,
        num_classes: NumClasses = 5,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            shift_pixels=0,  # smallNORB crops instead of shifting
            in_channels=in_channels,
            image_size=image_size,
            num_classes=num_classes,
        )
        self.data_dir = data_folder(data_dir)
        self.folder = self.data_dir / "smallnorb"
        self.split = split
        self.stereo = stereo
        want = 2 if stereo else 1
        if self.in_channels != want:
            raise ConfigError(
                f"data.in_channels={in_channels} does not match data.stereo={str(stereo).lower()}, which gives {want} "
                f"channel(s). Fix: data.in_channels={want} (or data.stereo={str(not stereo).lower()})."
            )
        if self.num_classes != NUM_CATEGORIES:
            raise ConfigError(f"data.num_classes must be 5 (smallNORB's categories), got {num_classes!r}.")
        self.resize = resize
        if not self.image_size <= self.resize <= 96:
            raise ConfigError(
                f"need data.image_size <= data.resize <= 96, got data.image_size={image_size}, data.resize={resize}. "
                f"Fix: e.g. data.resize=48 data.image_size=32 (Hinton et al. 2018)."
            )
        self.brightness = float(brightness)
        if contrast[1] < contrast[0]:
            raise ConfigError(
                f"data.contrast[1]={contrast[1]} is below data.contrast[0]={contrast[0]}: the contrast factor is drawn "
                f"from [low, high]. Fix: data.contrast=[{contrast[1]},{contrast[0]}]."
            )
        self.contrast = (float(contrast[0]), float(contrast[1]))
        self.test_crops = test_crops
        max_crops = (self.resize - self.image_size + 1) ** 2
        if self.test_crops > max_crops:
            raise ConfigError(
                f"data.test_crops must be in 1..{max_crops} (distinct {self.image_size}px crops of a "
                f"{self.resize}px image), got {test_crops}."
            )
        self.val_size = val_size
        self.split_seed = split_seed
        self.download = download
        self.info_train: torch.Tensor | None = None  # (N, 4) info rows of each split, e.g. for per-viewpoint errors
        self.info_val: torch.Tensor | None = None
        self.info_test: torch.Tensor | None = None
        self.test_viewpoints = "novel" if self.split != "standard" else "all"
        self.save_hyperparameters(
            {
                "data_dir": str(data_dir),
                "batch_size": self.batch_size,
                "val_size": self.val_size,
                "num_workers": self.num_workers,
                "pin_memory": self.pin_memory,
                "download": self.download,
                "split_seed": self.split_seed,
                "split": self.split,
                "stereo": self.stereo,
                "image_size": self.image_size,
                "resize": self.resize,
                "brightness": self.brightness,
                "contrast": list(self.contrast),  # ListConfig -> plain list: loads with weights_only=True
                "test_crops": self.test_crops,
                "in_channels": self.in_channels,
                "num_classes": self.num_classes,
            },
            logger=False,  # train.py logs the whole resolved config instead
        )

    # ----------------------------------------------------------------- test viewpoints
    @property
    def viewpoint_protocol(self) -> str | None:
        """``azimuth`` or ``elevation`` for a novel-viewpoint protocol, None for the standard split."""
        return None if self.split == "standard" else self.split

    @checked()
    def set_test_viewpoints(self, viewpoints: Viewpoints) -> None:
        """Which rows of the testing file form the test split of a novel-viewpoint protocol
        (Hinton et al. 2018 report both): ``novel`` = the viewpoints never trained on (the
        protocol's test set, the default); ``familiar`` = the testing file's images at the
        training viewpoints; ``all`` = the whole testing file. Takes effect at the next ``setup``."""
        if self.viewpoint_protocol is None:
            raise ConfigError(
                f"viewpoints={viewpoints}: {type(self).__name__} with data.split=standard has no novel-viewpoint protocol. "
                f"Fix: drop viewpoints=, or use data.split=azimuth or data.split=elevation (+data_overrides.split=azimuth)."
            )
        if viewpoints != self.test_viewpoints:
            self.data_test = self.info_test = None  # reselected by the next setup
        self.test_viewpoints = viewpoints

    def test_mask(self, info: torch.Tensor) -> torch.Tensor:
        """Rows (N,) bool of the testing file's ``info`` (N, 4) in the test split (``split`` and test viewpoints)."""
        if self.test_viewpoints == "all":
            return torch.ones(info.shape[0], dtype=torch.bool)
        return viewpoint_mask(info, self.split, train=self.test_viewpoints == "familiar")

    # ----------------------------------------------------------------- files, download, cache
    def find_files(self) -> dict[str, dict[str, Path]] | None:
        """``{part: {kind: path}}`` for parts training/testing and kinds dat/cat/info (plain before .gz), or None."""
        found: dict[str, dict[str, Path]] = {part: {} for part in PART_PREFIXES}
        for part, prefix in PART_PREFIXES.items():
            for kind in KINDS:
                names = (f"{prefix}-{kind}.mat", f"{prefix}-{kind}.mat.gz")
                hits = [self.folder / name for name in names if (self.folder / name).is_file()]
                if not hits:
                    return None
                found[part][kind] = hits[0]
        return found

    def _missing_files_error(self, download_error: BaseException | None = None) -> DataError:
        present = [n for n in SMALLNORB_FILES if (self.folder / n).is_file() or (self.folder / f"{n}.gz").is_file()]
        note = "does not exist" if not self.folder.is_dir() else f"has: {', '.join(present) or 'none of them'}"
        names = "\n".join(f"  - {n}  (or {n}.gz)" for n in SMALLNORB_FILES)
        if download_error is not None:
            why = f"Download from {SMALLNORB_URL} failed: {type(download_error).__name__}: {download_error}"
        else:
            why = "Download is off (data.download=false)." if not self.download else "prepare_data() has not run."
        fixes = [
            f"connect to the internet and keep data.download=true (fetches the six .mat.gz files from {SMALLNORB_URL})",
            f"download them yourself from {SMALLNORB_URL} (e.g. wget {SMALLNORB_URL}{SMALLNORB_FILES[0]}.gz) "
            f"into {self.folder}/",
            "point data.data_dir=<folder> at a folder whose smallnorb/ subfolder holds them",
        ]
        return DataError(
            f"smallNORB files not found in {self.folder} ({note}).\nExpected these 6 files there:\n{names}\n{why}\n"
            "Ways to supply them:\n" + "\n".join(f"  {i}. {fix}" for i, fix in enumerate(fixes, 1))
        )

    def _download(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for name in SMALLNORB_FILES:
            target = self.folder / f"{name}.gz"
            if (self.folder / name).is_file() or target.is_file():
                continue
            log.info("Downloading %s%s.gz into %s", SMALLNORB_URL, name, self.folder)
            partial = target.with_name(f"{target.name}.part")
            with urllib.request.urlopen(f"{SMALLNORB_URL}{name}.gz", timeout=DOWNLOAD_TIMEOUT_S) as response:
                with partial.open("wb") as out:
                    shutil.copyfileobj(response, out, length=1 << 20)
            os.replace(partial, target)  # only complete files get the real name

    def cache_path(self, part: str, files: dict[str, Path]) -> Path:
        """Cache file of ``part``, named by a fingerprint of the sources (name, size, mtime_ns), ``resize``, version."""
        digest = hashlib.sha1(f"v{CACHE_VERSION};resize={self.resize}".encode())
        for kind in KINDS:
            stat = files[kind].stat()
            digest.update(f";{files[kind].name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        return self.folder / "cache" / f"{part}-r{self.resize}-{digest.hexdigest()[:16]}.pt"

    def load_part(self, part: str, files: dict[str, Path]) -> dict[str, torch.Tensor]:
        """Preprocessed ``part`` (training/testing) from its cache (memory-mapped); built first when stale."""
        path = self.cache_path(part, files)
        if path.is_file():
            try:
                data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                log.info("Reusing smallNORB %s cache %s", part, path)
                return data
            except Exception as err:  # noqa: BLE001 - an unreadable cache is rebuilt, never fatal
                log.warning("Rebuilding unreadable smallNORB cache %s (%s)", path, err)
        log.info("Building smallNORB %s cache %s (96 -> %d px, standardised)", part, path, self.resize)
        data = preprocess_smallnorb(files, self.resize)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.part")
        torch.save(data, partial)
        os.replace(partial, path)  # atomic: concurrent ranks never read half a file
        for stale in path.parent.glob(f"{part}-r{self.resize}-*.pt"):
            if stale != path:
                log.info("Removing stale smallNORB cache %s", stale)
                stale.unlink(missing_ok=True)
        return data

    # ----------------------------------------------------------------- Lightning hooks
    def prepare_data(self) -> None:
        """Download the files if absent, then build both caches (one process per node, per Lightning)."""
        files = self.require_files(download=self.download)
        for part in PART_PREFIXES:
            self.load_part(part, files[part])

    def setup(self, stage: str | None = None) -> None:
        """Select the split's rows (test: the chosen test viewpoints), check that train and test share no
        example, hold out ``val_size`` (seeded)."""
        need_fit, need_test = self.stages_to_load(stage)
        if not (need_fit or need_test):
            return
        files = self.require_files(download=False)
        train, test = self.load_part("training", files["training"]), self.load_part("testing", files["testing"])
        train_rows = viewpoint_mask(train["info"], self.split, train=True).nonzero().squeeze(1)  # (N_train,)
        test_rows = self.test_mask(test["info"]).nonzero().squeeze(1)  # (N_test,)
        self._check_disjoint(example_keys(train, train_rows), example_keys(test, test_rows), files)
        if need_fit:
            fit_idx, val_idx = seeded_split(
                train_rows.shape[0], self.val_size, self.split_seed, source=f"data.split={self.split} of the training files"
            )
            fit_rows, val_rows = train_rows[fit_idx], train_rows[val_idx]
            self.data_train, self.info_train = self._dataset(train, fit_rows), train["info"][fit_rows]
            self.data_val, self.info_val = self._dataset(train, val_rows), train["info"][val_rows]
        if need_test:
            self.data_test, self.info_test = self._dataset(test, test_rows), test["info"][test_rows]

    def _dataset(self, part: dict[str, torch.Tensor], rows: torch.Tensor) -> TensorPairDataset:
        images = part["images"][rows, : self.in_channels]  # (n, C, R, R) float16; mono = camera 0 (left)
        return TensorPairDataset(images.contiguous(), part["labels"][rows])

    @staticmethod
    def _check_disjoint(train_keys: torch.Tensor, test_keys: torch.Tensor, files: dict[str, dict[str, Path]]) -> None:
        overlap = torch.isin(train_keys, test_keys)
        if bool(overlap.any()):
            raise DataError(
                f"{int(overlap.sum())} training examples of {files['training']['dat']} have the same (category, "
                f"instance, elevation, azimuth, lighting) as test examples of {files['testing']['dat']}; expected "
                f"disjoint object instances (train 4,6,7,8,9; test 0,1,2,3,5). Are the two parts' files mixed up?"
            )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 crops on the device: random crop, brightness and contrast while training, else centre/multi-crop."""
        x, y = batch
        trainer = self.trainer
        if trainer is not None and trainer.training:
            return self.train_transform(x.float()), y  # x: (B, C, R, R) standardised
        return self.eval_batch(batch)

    def eval_batch(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Centre (or multi-) crops of a batch on the device, as validation and test see them."""
        x, y = batch
        return self.eval_transform(x.float()), y

    def train_transform(self, x: torch.Tensor) -> torch.Tensor:
        """Random crop per image, then + U(-brightness, brightness) and contrast x U(lo, hi) (Hinton et al. 2018)."""
        b, s = x.shape[0], self.image_size
        top = torch.randint(0, x.shape[-2] - s + 1, (b, 1), device=x.device)  # (B, 1): each image its own window
        left = torch.randint(0, x.shape[-1] - s + 1, (b, 1), device=x.device)
        x = crop_images(x, top, left, s)[:, 0]  # (B, C, S, S)
        if self.brightness > 0:
            x = x + torch.empty(b, 1, 1, 1, device=x.device).uniform_(-self.brightness, self.brightness)
        if self.contrast != (1.0, 1.0):
            mean = x.mean(dim=(-2, -1), keepdim=True)  # (B, C, 1, 1): per camera, as tf.image.adjust_contrast
            factor = torch.empty(b, 1, 1, 1, device=x.device).uniform_(*self.contrast)
            x = (x - mean) * factor + mean
        return x

    def eval_transform(self, x: torch.Tensor) -> torch.Tensor:
        """Centre crop (B, C, S, S); for ``test_crops`` = n > 1 the :func:`multi_crop_offsets` crops (B, n, C, S, S)."""
        offsets = torch.tensor(multi_crop_offsets(self.test_crops, x.shape[-1] - self.image_size), device=x.device)
        offsets = offsets.expand(x.shape[0], -1, -1)  # (B, n, 2): the same windows for every image
        crops = crop_images(x, offsets[..., 0], offsets[..., 1], self.image_size)  # (B, n, C, S, S)
        return crops[:, 0] if self.test_crops == 1 else crops


def example_keys(part: dict[str, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """One int64 per example (n,): the mixed-radix code of (category, instance, elevation, azimuth, lighting)."""
    key = part["labels"][rows]
    for column, base in enumerate(INFO_LIMITS.values()):
        key = key * base + part["info"][rows, column]
    return key
