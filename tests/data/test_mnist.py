"""MNISTDataModule / FashionMNISTDataModule on tiny real-format files, the shipped sample and real data."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import pytest
import torch
from omegaconf import OmegaConf

from capsnets.data import CIFAR10DataModule, FashionMNISTDataModule, MNISTDataModule, SmallNORBDataModule
from capsnets.data.mnist import IDX_FILE_NAMES
from capsnets.errors import ConfigError, DataError

if TYPE_CHECKING:
    from conftest import TinyMNIST

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def tags(dataset) -> set[int]:
    return set(dataset.images[:, 0, 0, 0].tolist())  # first pixel = index in the file (conftest)


def test_setup_split_and_batches(mnist_root: Path, tiny_mnist: TinyMNIST) -> None:
    dm = MNISTDataModule(data_dir=str(mnist_root), val_size=10, batch_size=16, download=False)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.data_train), len(dm.data_val), len(dm.data_test)) == (tiny_mnist.n_train - 10, 10, tiny_mnist.n_test)
    assert tags(dm.data_train).isdisjoint(tags(dm.data_val))
    assert tags(dm.data_train) | tags(dm.data_val) == set(range(tiny_mnist.n_train))
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert sum(len(b[1]) for b in dm.train_dataloader()) == tiny_mnist.n_train - 10  # drop_last=False
    xf, yf = dm.on_after_batch_transfer((x, y), 0)
    assert xf.dtype == torch.float32 and 0.0 <= xf.min() and xf.max() <= 1.0
    assert torch.equal(xf, x.float() / 255) and torch.equal(yf, y)  # no trainer: no shift


def test_split_is_seeded(mnist_root: Path) -> None:
    def val_tags(seed: int) -> set[int]:
        dm = MNISTDataModule(data_dir=str(mnist_root), val_size=10, split_seed=seed, download=False)
        dm.setup("fit")
        return tags(dm.data_val)

    assert val_tags(1) == val_tags(1) != val_tags(2)


def test_shift_only_while_training(mnist_root: Path, tiny_mnist: TinyMNIST) -> None:
    dm = MNISTDataModule(data_dir=str(mnist_root), val_size=0, batch_size=tiny_mnist.n_train, shift_pixels=2, download=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    plain = batch[0].float() / 255
    dm.trainer = SimpleNamespace(training=False)  # stands in for a Trainer validating/testing
    assert torch.equal(dm.on_after_batch_transfer(batch, 0)[0], plain)
    dm.trainer = SimpleNamespace(training=True)
    assert not torch.equal(dm.on_after_batch_transfer(batch, 0)[0], plain)


def test_found_in_data_dir_root_plain_files(tmp_path: Path, tiny_mnist: TinyMNIST) -> None:
    tiny_mnist.write(tmp_path, gz=False)
    dm = MNISTDataModule(data_dir=str(tmp_path), val_size=5, download=False)
    assert dm.find_files()["train_images"] == tmp_path / "train-images-idx3-ubyte"
    dm.setup()
    assert len(dm.data_test) == tiny_mnist.n_test


def test_found_in_search_dir_and_hparams_are_plain(tmp_path: Path, tiny_mnist: TinyMNIST) -> None:
    tiny_mnist.write(tmp_path / "elsewhere")
    search = OmegaConf.create([str(tmp_path / "elsewhere")])  # as Hydra passes lists
    dm = MNISTDataModule(data_dir=str(tmp_path / "empty"), val_size=5, download=False, search_dirs=search)
    dm.setup("test")
    assert len(dm.data_test) == tiny_mnist.n_test and dm.data_train is None
    assert type(dm.hparams["search_dirs"]) is list and dm.hparams["search_dirs"] == [str(tmp_path / "elsewhere")]


def test_shipped_sample(tmp_path: Path) -> None:
    dm = MNISTDataModule(data_dir=str(tmp_path), val_size=1000, download=False, search_dirs=["package:mnist_sample"])
    dm.prepare_data()
    dm.setup()
    assert (len(dm.data_train), len(dm.data_val), len(dm.data_test)) == (7000, 1000, 2000)
    for split in (dm.data_train, dm.data_test):
        assert set(split.labels.tolist()) == set(range(10))
        assert split.images.shape[1:] == (1, 28, 28) and split.images.float().mean() > 10  # real ink


def test_missing_files_error_lists_names_and_folder(tmp_path: Path) -> None:
    dm = MNISTDataModule(data_dir=str(tmp_path), download=False)
    with pytest.raises(DataError) as info:
        dm.prepare_data()
    msg = str(info.value)
    assert all(name in msg for name in IDX_FILE_NAMES.values())
    assert str(tmp_path / "MNIST" / "raw") in msg and "data.download=true" in msg and "data=mnist_sample" in msg
    with pytest.raises(DataError):
        dm.setup("fit")


def test_failed_download_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    def offline(**kwargs: object) -> None:
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: no network")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), search_dirs=[], download=True)
    with pytest.raises(DataError, match="no network") as info:
        dm.prepare_data()
    assert "FashionMNIST" in str(info.value) and "apt-get install dataset-fashion-mnist" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"batch_size": 0}, "data.batch_size"),
        ({"val_size": -1}, "data.val_size"),
        ({"shift_pixels": -1}, "data.shift_pixels"),
        ({"num_workers": -2}, "data.num_workers"),
        ({"in_channels": 3}, "data.in_channels"),
        ({"search_dirs": "/some/dir"}, "data.search_dirs"),
    ],
)
def test_bad_config_values(tmp_path: Path, kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        MNISTDataModule(data_dir=str(tmp_path), **kwargs)


@pytest.mark.parametrize("datamodule", [MNISTDataModule, CIFAR10DataModule, SmallNORBDataModule])
def test_data_dir_that_is_a_file_or_empty(tmp_path: Path, datamodule: type) -> None:
    # every file-backed DataModule checks data.data_dir alike, before reading anything
    path = tmp_path / "file.txt"
    path.write_text("x")
    with pytest.raises(ConfigError, match=r"data\.data_dir must be a folder, but .*file\.txt is a file"):
        datamodule(data_dir=str(path))
    with pytest.raises(ConfigError, match=r"data\.data_dir must be a folder path, got ''"):
        datamodule(data_dir="")


def test_val_size_too_large(mnist_root: Path, tiny_mnist: TinyMNIST) -> None:
    dm = MNISTDataModule(data_dir=str(mnist_root), val_size=tiny_mnist.n_train, download=False)
    with pytest.raises(ConfigError, match="data.val_size"):
        dm.setup("fit")


def test_corrupt_file_is_named(mnist_root: Path, tiny_mnist: TinyMNIST) -> None:
    path = mnist_root / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz"
    tiny_mnist.write(mnist_root / "tmp", n_train=tiny_mnist.n_train - 1)  # labels one short of the images
    path.write_bytes((mnist_root / "tmp" / path.name).read_bytes())
    with pytest.raises(DataError, match="labels") as info:
        MNISTDataModule(data_dir=str(mnist_root), val_size=5, download=False).setup("fit")
    assert str(path) in str(info.value)


def test_a_corrupt_test_file_is_found_before_training(mnist_root: Path) -> None:
    # fitting reads and checks the test files too: a truncated t10k file ends setup("fit"), not the test
    path = mnist_root / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:40])
    dm = MNISTDataModule(data_dir=str(mnist_root), val_size=5, download=False)
    with pytest.raises(DataError) as info:
        dm.setup("fit")
    assert str(path) in str(info.value)


def test_fit_loads_the_test_split_once(mnist_root: Path, tiny_mnist: TinyMNIST) -> None:
    dm = MNISTDataModule(data_dir=str(mnist_root), val_size=5, download=False)
    dm.setup("fit")
    test = dm.data_test
    assert test is not None and len(test) == tiny_mnist.n_test
    dm.setup("test")
    assert dm.data_test is test  # not read again


@pytest.mark.realdata
@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason=f"{FASHION_DIR} absent (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_from_debian_package(tmp_path: Path) -> None:
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), download=False)
    dm.prepare_data()
    assert dm.find_files()["train_images"].parent == FASHION_DIR
    dm.setup()
    assert (len(dm.data_train), len(dm.data_val), len(dm.data_test)) == (55000, 5000, 10000)
    assert torch.bincount(dm.data_test.labels).tolist() == [1000] * 10
