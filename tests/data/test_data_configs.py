"""conf/data/*.yaml: every constructor key present, and each config instantiates."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from capsnets.data import MNISTDataModule

CONF = Path(__file__).resolve().parents[2] / "conf" / "data"
NAMES = ["mnist", "fashion_mnist", "mnist_sample", "synthetic"]


def constructor_keys(cls: type) -> set[str]:
    keys = set()
    for klass in cls.__mro__:  # FashionMNISTDataModule forwards **kwargs to MNISTDataModule
        if "__init__" in vars(klass) and klass.__module__.startswith("capsnets"):
            params = inspect.signature(klass.__init__).parameters.values()
            keys |= {p.name for p in params if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
            if not any(p.kind == p.VAR_KEYWORD for p in params):
                break
    return keys


@pytest.mark.parametrize("name", NAMES)
def test_config_keys_and_instantiation(name: str, tmp_path: Path) -> None:
    cfg = OmegaConf.create({"paths": {"data_dir": str(tmp_path)}, "data": OmegaConf.load(CONF / f"{name}.yaml")})
    cls = get_class(cfg.data._target_)
    assert set(cfg.data) - {"_target_"} == constructor_keys(cls) - ({"data_dir"} if name == "synthetic" else set())
    assert {"in_channels", "image_size", "num_classes"} <= set(cfg.data)
    assert "paths" not in OmegaConf.load(CONF / f"{name}.yaml")
    dm = instantiate(cfg.data)
    assert (dm.in_channels, dm.image_size, dm.num_classes) == (1, 28, 10)


def test_mnist_sample_config_finds_the_shipped_files(tmp_path: Path) -> None:
    cfg = OmegaConf.create({"paths": {"data_dir": str(tmp_path)}, "data": OmegaConf.load(CONF / "mnist_sample.yaml")})
    dm: MNISTDataModule = instantiate(cfg.data)
    dm.prepare_data()  # download is off: must not touch the network
    assert dm.find_files() is not None
