"""CIFAR10DataModule on tiny files in the real binary format, its archive unpacking and its training transform."""

from __future__ import annotations

import hashlib
import io
import tarfile
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir

from capsnets.data import CIFAR10DataModule, random_hflip, read_cifar_bin, write_cifar_bin
from capsnets.data.cifar import CIFAR10_FILES, CIFAR10_FOLDER, CIFAR_RECORD_BYTES, unpack_cifar10
from capsnets.errors import ConfigError, DataError
from capsnets.utils.instantiate import check_model_config
from capsnets.utils.resolvers import CONFIG_DIR

PER_FILE = 8  # images per training batch file: 40 training images, 8 test images


def tiny_images(n: int, offset: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)  # (N, 3, 32, 32)
    images[:, 0, 0, 0] = torch.arange(offset, offset + n, dtype=torch.uint8)  # identity tag: index over all files
    return images, (torch.arange(n) + offset) % 10  # (N,) every class present


def write_tiny_cifar(folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The six batch files in ``folder``; returns what each holds."""
    written = {}
    for i, name in enumerate(CIFAR10_FILES):
        written[name] = tiny_images(PER_FILE, i * PER_FILE, seed=i)
        write_cifar_bin(folder / name, *written[name])
    return written


def tar_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def test_binary_format_round_trip_and_layout(tmp_path: Path) -> None:
    images, labels = tiny_images(5, 0, seed=0)
    path = write_cifar_bin(tmp_path / "data_batch_1.bin", images, labels)
    raw = path.read_bytes()
    assert len(raw) == 5 * CIFAR_RECORD_BYTES
    # record 2: its label byte, then the red plane row by row, then green, then blue
    record = raw[2 * CIFAR_RECORD_BYTES : 3 * CIFAR_RECORD_BYTES]
    assert record[0] == int(labels[2])
    assert list(record[1:33]) == images[2, 0, 0].tolist() and list(record[1 + 1024 : 1 + 1024 + 32]) == images[2, 1, 0].tolist()
    got_images, got_labels = read_cifar_bin(path)
    assert torch.equal(got_images, images) and torch.equal(got_labels, labels)
    assert got_images.dtype == torch.uint8 and got_labels.dtype == torch.int64


def test_bad_files_are_named(tmp_path: Path) -> None:
    images, labels = tiny_images(3, 0, seed=0)
    path = write_cifar_bin(tmp_path / "x.bin", images, labels)
    path.write_bytes(path.read_bytes()[:-7])  # truncated
    with pytest.raises(DataError, match=r"x\.bin has 9212 bytes; expected a whole number of 3073-byte records"):
        read_cifar_bin(path)
    write_cifar_bin(path, images, torch.tensor([3, 57, 1]))  # a label CIFAR-10 does not have
    with pytest.raises(DataError, match="holds label 57 in record 1; expected labels 0..9"):
        read_cifar_bin(path)
    with pytest.raises(DataError, match="does not exist"):
        read_cifar_bin(tmp_path / "missing.bin")


def test_setup_split_and_shapes(tmp_path: Path) -> None:
    written = write_tiny_cifar(tmp_path / CIFAR10_FOLDER)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), val_size=10, batch_size=16, download=False)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.data_train) == 30 and len(dm.data_val) == 10 and len(dm.data_test) == PER_FILE
    # every training image lands in exactly one of train / val, the test file's in test
    train_tags = set(dm.data_train.images[:, 0, 0, 0].tolist()) | set(dm.data_val.images[:, 0, 0, 0].tolist())
    assert train_tags == set(range(5 * PER_FILE))
    assert torch.equal(dm.data_test.images, written["test_batch.bin"][0])
    assert torch.equal(dm.data_test.labels, written["test_batch.bin"][1])
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    # labels stay with their images through the split
    tag = dm.data_train.images[:, 0, 0, 0].long()
    assert torch.equal(dm.data_train.labels, tag % 10)


def test_training_transform_shifts_and_flips_evaluation_does_not(tmp_path: Path) -> None:
    write_tiny_cifar(tmp_path)  # found in data_dir itself
    dm = CIFAR10DataModule(data_dir=str(tmp_path), val_size=0, batch_size=40, download=False, shift_pixels=0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    plain = batch[0].float() / 255
    dm.trainer = SimpleNamespace(training=False)  # stands in for a Trainer validating/testing
    assert torch.equal(dm.on_after_batch_transfer(batch, 0)[0], plain)
    dm.trainer = SimpleNamespace(training=True)
    torch.manual_seed(0)
    out = dm.on_after_batch_transfer(batch, 0)[0]
    flipped = [bool(torch.equal(o, p.flip(-1))) for o, p in zip(out, plain)]
    kept = [bool(torch.equal(o, p)) for o, p in zip(out, plain)]
    assert all(f or k for f, k in zip(flipped, kept)) and 5 < sum(flipped) < 35  # each image: flipped or not
    dm.flip, dm.shift_pixels = False, 4
    grey = torch.full_like(batch[0], 200)  # no black pixel of its own: every 0 below is the shift's fill
    shifted = dm.on_after_batch_transfer((grey, batch[1]), 0)[0]
    values = shifted.unique()
    assert values.tolist() == [0.0, pytest.approx(200 / 255)]  # image pixels and the black fill, nothing else
    rows_kept = (shifted[:, 0] != 0).any(dim=2).sum(dim=1)  # (B,) rows that still hold image pixels
    assert int(rows_kept.min()) >= 32 - 4 and bool((rows_kept < 32).any())  # shifts of at most 4 px, some non-zero


def test_normalisation_after_the_augmentation(tmp_path: Path) -> None:
    write_tiny_cifar(tmp_path)
    mean, std = (0.5, 0.25, 0.75), (0.5, 0.2, 0.1)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), val_size=0, batch_size=40, download=False, normalize=True, mean=mean, std=std)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    mean_t, std_t = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]  # (3, 1, 1)
    assert torch.allclose(dm.eval_batch(batch)[0], (batch[0].float() / 255 - mean_t) / std_t, atol=1e-6)
    # a constant grey batch, shifted while training: each pixel is either normalised grey or the normalised
    # black of the padding (were the shift applied after the normalisation, the padding would be 0)
    dm.trainer = SimpleNamespace(training=True)
    dm.flip = False
    grey = torch.full((40, 3, 32, 32), 200, dtype=torch.uint8)
    shifted = dm.on_after_batch_transfer((grey, batch[1]), 0)[0]
    image = ((200 / 255 - mean_t) / std_t).expand(3, 32, 32)
    pad = ((0.0 - mean_t) / std_t).expand(3, 32, 32)
    is_image = torch.isclose(shifted, image, atol=1e-5)
    is_pad = torch.isclose(shifted, pad, atol=1e-5)
    assert bool((is_image | is_pad).all()) and bool(is_pad.any()) and bool(is_image.any())


def test_random_hflip() -> None:
    x = torch.arange(2 * 1 * 2 * 3, dtype=torch.float32).reshape(2, 1, 2, 3)
    assert torch.equal(random_hflip(x, p=0.0), x) and torch.equal(random_hflip(x, p=1.0), x.flip(-1))
    g = torch.Generator().manual_seed(3)
    assert random_hflip(x, generator=g).shape == x.shape
    with pytest.raises(ValueError, match="p must be in"):
        random_hflip(x, p=2.0)


def test_missing_files_error_names_files_folders_and_fixes(tmp_path: Path) -> None:
    dm = CIFAR10DataModule(data_dir=str(tmp_path), download=False, search_dirs=[str(tmp_path / "elsewhere")])
    with pytest.raises(DataError) as info:
        dm.prepare_data()
    msg = str(info.value)
    assert all(name in msg for name in CIFAR10_FILES) and "data.download=false" in msg
    assert str(tmp_path / CIFAR10_FOLDER) in msg and str(tmp_path / "elsewhere") in msg
    assert "cifar-10-binary.tar.gz" in msg


def test_failed_download_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), download=True)
    with pytest.raises(DataError, match="no network") as info:
        dm.prepare_data()
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz" in str(info.value)
    assert not list(tmp_path.glob("*.tar.gz"))  # nothing half-written keeps the archive's name


def test_archive_in_data_dir_is_unpacked_safely(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "source"
    written = write_tiny_cifar(source)
    members = {f"{CIFAR10_FOLDER}/{name}": (source / name).read_bytes() for name in CIFAR10_FILES}
    members["../escaped.bin"] = b"x"  # a crafted member outside the folder: never written
    members[f"{CIFAR10_FOLDER}/batches.meta.txt"] = b"airplane\n"
    payload = tar_bytes(members)
    root = tmp_path / "root"
    root.mkdir()
    (root / "cifar-10-binary.tar.gz").write_bytes(payload)
    monkeypatch.setattr("capsnets.data.cifar.CIFAR10_MD5", hashlib.md5(payload).hexdigest())

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("the archive is in data_dir: nothing to download")

    monkeypatch.setattr(urllib.request, "urlopen", no_download)
    dm = CIFAR10DataModule(data_dir=str(root), val_size=0, download=False)  # unpacked offline, whatever download
    dm.prepare_data()
    assert sorted(p.name for p in (root / CIFAR10_FOLDER).iterdir()) == sorted(CIFAR10_FILES)
    assert not (tmp_path / "escaped.bin").exists() and not (root / "escaped.bin").exists()
    dm.setup("test")
    assert torch.equal(dm.data_test.images, written["test_batch.bin"][0])


def test_archive_with_another_checksum_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "cifar-10-binary.tar.gz"
    archive.write_bytes(tar_bytes({f"{CIFAR10_FOLDER}/test_batch.bin": b"\0" * CIFAR_RECORD_BYTES}))
    with pytest.raises(DataError, match="has MD5 .*; expected c32a1d4ab5d03f1284b67883e8d87530"):
        unpack_cifar10(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(DataError, match="lacks data_batch_1.bin"):  # the right checksum, files missing
        unpack_cifar10(archive, tmp_path / "out", md5=hashlib.md5(archive.read_bytes()).hexdigest())


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"in_channels": 1}, "data.in_channels"),
        ({"image_size": 28}, "data.image_size"),
        ({"num_classes": 100}, "data.num_classes"),
        ({"std": (0.2, 0.0, 0.2)}, "data.std"),
        ({"mean": (0.5, 0.5)}, "data.mean"),
        ({"flip": "yes"}, "data.flip"),
    ],
)
def test_bad_config_values(tmp_path: Path, kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        CIFAR10DataModule(data_dir=str(tmp_path), **kwargs)


def test_tsai2020_preset_trains_a_step_on_cifar_files(tmp_path: Path) -> None:
    # the preset's data and model together: ida_caps (simple backbone, to keep it small) on the tiny files, one
    # optimiser step through the DataModule's normalised, augmented batches
    write_tiny_cifar(tmp_path / CIFAR10_FOLDER)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[
                "experiment=tsai2020_cifar10",
                f"data.data_dir={tmp_path}",
                "data.val_size=8",
                "data.batch_size=8",
                "data.num_workers=0",
                "model.net.backbone=simple",
                "model.net.backbone_channels=16",
                "model.net.primary_types=4",
                "model.net.caps_types=[4,4]",
            ],
        )
    check_model_config(cfg.model)
    dm = hydra.utils.instantiate(cfg.data, _convert_="all")
    module = hydra.utils.instantiate(cfg.model, _convert_="all")
    dm.prepare_data()
    dm.setup("fit")
    dm.trainer = SimpleNamespace(training=True)
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert batch[0].shape == (8, 3, 32, 32) and float(batch[0].min()) < 0  # normalised
    loss = module.shared_step(batch, "train")[0]
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters() if p.requires_grad)


def test_hparams_are_plain_values_that_rebuild_the_datamodule(tmp_path: Path) -> None:
    # eval.py rebuilds the DataModule from the checkpoint's hparams, read with weights_only=True
    dm = CIFAR10DataModule(data_dir=str(tmp_path), normalize=True, mean=[0.1, 0.2, 0.3], search_dirs=[str(tmp_path)])
    path = tmp_path / "hparams.pt"
    torch.save(dict(dm.hparams), path)
    hparams = torch.load(path, weights_only=True)
    again = CIFAR10DataModule(**hparams)
    assert (again.normalize, again.mean, again.std, again.flip) == (True, (0.1, 0.2, 0.3), dm.std, True)
    assert again.search_dirs == [str(tmp_path)] and again.shift_pixels == 4
