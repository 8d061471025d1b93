"""Every model x data config composes and instantiates; every option group file is valid."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
from hydra import compose, initialize_config_dir
from lightning import LightningDataModule, LightningModule

from capsnets.utils.resolvers import CONFIG_DIR

MODELS = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))
DATA = sorted(p.stem for p in (CONFIG_DIR / "data").glob("*.yaml"))


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def test_groups_are_populated():
    assert "dr_caps" in MODELS
    assert {"mnist", "fashion_mnist", "mnist_sample", "synthetic"} <= set(DATA)


def test_defaults_are_paper_setup():
    cfg = compose_train([])
    assert cfg.data._target_.endswith("MNISTDataModule") and "Fashion" not in cfg.data._target_
    assert cfg.model._target_ == "capsnets.models.DRCapsModule"
    assert cfg.model.net.routing_iterations == 3 and cfg.model.loss.recon_weight == 0.0005
    assert cfg.model.optimizer.lr == 0.001 and cfg.data.batch_size == 128
    assert Path(cfg.paths.data_dir) == CONFIG_DIR.parent / "data"


@pytest.mark.parametrize("data", DATA)
@pytest.mark.parametrize("model", MODELS)
def test_model_x_data_instantiates(model, data):
    cfg = compose_train([f"model={model}", f"data={data}"])
    dm = hydra.utils.instantiate(cfg.data, _convert_="all")
    module = hydra.utils.instantiate(cfg.model, _convert_="all")
    assert isinstance(dm, LightningDataModule) and isinstance(module, LightningModule)
    assert cfg.model.net.num_classes == cfg.data.num_classes
    assert cfg.model.net.image_size == cfg.data.image_size


@pytest.mark.parametrize("group", ["trainer", "callbacks", "logger", "debug"])
def test_every_option_composes(group):
    for option in sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml")):
        cfg = compose_train([f"{group}={option}"])
        assert cfg.trainer._target_ == "lightning.Trainer", option
