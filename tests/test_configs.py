"""Every model x data config composes and instantiates; every option group file is valid."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from lightning import LightningDataModule, LightningModule
from omegaconf import OmegaConf

from capsnets.errors import ConfigError
from capsnets.nn.routing import routing_class, routing_layers, routing_names
from capsnets.utils.instantiate import check_model_config
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
    assert cfg.model.routing.iterations == 3 and cfg.model.loss.recon_weight == 0.0005
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


ROUTING_OPTIONS = sorted(p.stem for p in (CONFIG_DIR / "model" / "routing").glob("*.yaml"))


def test_every_registered_routing_has_a_config_and_every_config_a_routing():
    model = {"dynamic": "dr_caps", "self_attention": "dr_caps", "inverted_dot_product": "ida_caps"}  # of its kind
    names = set()
    for option in ROUTING_OPTIONS:
        cfg = compose_train([f"model={model.get(option, 'em_caps')}", f"model/routing={option}"])
        names.add(cfg.model.routing.name)
    assert names == set(routing_names()) and {"dynamic", "em"} <= names


@pytest.mark.parametrize("option", ROUTING_OPTIONS)
@pytest.mark.parametrize("model", MODELS)
def test_routing_options_build_on_every_model_of_their_kind(model, option):
    """model/routing=<option> composes with every model; one of another capsule kind is refused, naming the options."""
    overrides = [f"model={model}", f"model/routing={option}", "data=synthetic"]
    if model.startswith("cnn"):  # no capsules, no routing to choose
        with pytest.raises(ConfigCompositionException, match="model/routing"):
            compose_train(overrides)
        return
    cfg = compose_train(overrides)
    kind = hydra.utils.get_class(cfg.model._target_).capsule_kind
    cls_kinds = routing_class(cfg.model.routing).kinds
    if kind not in cls_kinds:
        with pytest.raises(ConfigError, match=f"does not support {kind} capsules.*Routings for {kind} capsules"):
            check_model_config(cfg.model)
        return
    check_model_config(cfg.model)
    module = hydra.utils.instantiate(cfg.model, _convert_="all")
    assert {r.name for r in routing_layers(module.net).values()} == {cfg.model.routing.name}


EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
HINTON_ROWS = sorted(p.stem for p in (CONFIG_DIR / "hinton2018_row").glob("*.yaml"))


def test_all_paper_presets_exist():
    assert set(EXPERIMENTS) == {
        "sabour2017_mnist",
        "sabour2017_table1",
        "hinton2018_smallnorb",
        "hinton2018_table1",
        "hinton2018_novel_azimuth",
        "hinton2018_novel_elevation",
        "em_learning",
        "mazzia2021_mnist",
        "ribeiro2020_smallnorb",
        "routing_comparison",
        "tsai2020_cifar10",
    }
    assert len(HINTON_ROWS) == 8


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_instantiates(experiment):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    assert cfg.task_name == experiment and cfg.paper.metric == "test/acc"
    module = hydra.utils.instantiate(cfg.model, _convert_="all")
    dm = hydra.utils.instantiate(cfg.data, _convert_="all")
    assert isinstance(module, LightningModule) and isinstance(dm, LightningDataModule)
    if experiment.startswith("hinton2018"):
        assert cfg.model._target_.endswith("EMCapsModule") and cfg.data.num_classes == 5
    if experiment.endswith("table1"):
        assert str(cfg.hydra.mode) == "RunMode.MULTIRUN" and cfg.hydra.sweeper.params
    if experiment == "ribeiro2020_smallnorb":  # the release's VB recipe: its routing, W scale and learning rate
        assert cfg.model.routing.name == "vb" and cfg.model.routing.transform_init == "xavier"
        assert cfg.model.optimizer.lr == 0.001
    if experiment == "tsai2020_cifar10":  # the release's CIFAR-10 recipe: step decay, normalised padded crops + flips
        assert cfg.model._target_.endswith("IDACapsModule") and cfg.model.scheduler.name == "multistep"
        assert (cfg.data.in_channels, cfg.data.image_size, cfg.data.normalize) == (3, 32, True)
    split = {"hinton2018_novel_azimuth": "azimuth", "hinton2018_novel_elevation": "elevation"}.get(experiment)
    if split:
        assert cfg.data.split == split


COMPARISON_ROWS = sorted(p.stem for p in (CONFIG_DIR / "routing_comparison_row").glob("*.yaml"))
# rows that bring more than their routing: the routing's name and the model settings they set besides
RECIPE_ROWS = {"em_vb_release_lr": ("vb", {"optimizer": {"lr": 0.001}})}


@pytest.mark.parametrize("row", COMPARISON_ROWS)
def test_routing_comparison_rows_swap_only_the_routing_of_their_backbone(row):
    backbone, routing = row.split("_", 1)
    routing, recipe = RECIPE_ROWS.get(row, (routing, {}))
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=["experiment=routing_comparison", f"+routing_comparison_row={row}"],
            return_hydra_config=True,
        )
        model = {"dr": ["model=dr_caps"], "em": ["model=em_caps_small"]}.get(
            backbone,
            [
                "model=ida_caps",
                "model.net.backbone=simple",
                "model.net.primary_types=16",
                "model.net.caps_types=[16,16]",
            ],
        )
        recipe_overrides = [f"model.{group}.{k}={v}" for group, settings in recipe.items() for k, v in settings.items()]
        plain = compose(config_name="train", overrides=["experiment=routing_comparison", *model, *recipe_overrides])
        if recipe:  # the recipe is a difference from the backbone's own settings
            bare = compose(config_name="train", overrides=["experiment=routing_comparison", *model])
            assert bare.model != plain.model
    assert row in str(cfg.hydra.sweeper.params["+routing_comparison_row"]).split(",")  # every row file is swept
    assert str(cfg.hydra.sweeper.params["seed"]) == "1,2,3"
    assert cfg.model.routing.name == routing
    assert {k: v for k, v in cfg.model.items() if k != "routing"} == {
        k: v for k, v in plain.model.items() if k != "routing"
    }
    assert cfg.callbacks.learning_curve.every_samples == 1750 and "throughput" in cfg.callbacks
    check_model_config(cfg.model)
    module = hydra.utils.instantiate(cfg.model, _convert_="all")
    assert {r.name for r in routing_layers(module.net).values()} == {cfg.model.routing.name}


EM_LEARNING_ROWS = sorted(p.stem for p in (CONFIG_DIR / "em_learning_row").glob("*.yaml"))


@pytest.mark.parametrize("row", EM_LEARNING_ROWS)
def test_em_learning_rows_compose_with_the_preset_and_record_curves(row):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=["experiment=em_learning", f"+em_learning_row={row}"],
            return_hydra_config=True,
        )
    assert row in str(cfg.hydra.sweeper.params["+em_learning_row"]).split(",")  # every row file is swept
    assert cfg.data.batch_size == 32 and cfg.callbacks.learning_curve._target_.endswith("LearningCurve")
    check_model_config(cfg.model)
    module = hydra.utils.instantiate(cfg.model, _convert_="all")
    expected = {"em_caps_small_paper": "covering", "em_caps_small_release": "type"}.get(row)
    if expected:
        assert {r.normalisation for r in routing_layers(module.net).values()} == {expected}
    if row.startswith("em_"):  # every EM row routes with the default float32 votes
        assert {r.moment_dtype for r in routing_layers(module.net).values()} == {"float32"}
    assert type(module).__name__ == {"dr_caps": "DRCapsModule", "cnn_hinton2018": "CNNModule"}.get(row, "EMCapsModule")


def test_sabour_table1_sweeps_the_papers_grid():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=sabour2017_table1"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params["model.routing.iterations"] == "1,3" and params["seed"] == "1,2,3"
    assert params["model.net.reconstruction"] == "false,true"


@pytest.mark.parametrize("row", HINTON_ROWS)
def test_every_hinton_table1_row_composes_with_its_target(row):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=hinton2018_table1", f"+hinton2018_row={row}"])
    module = hydra.utils.instantiate(cfg.model, _convert_="all")
    assert 0.9 < cfg.paper.target < 0.99
    if row.startswith("iterations_"):
        assert module.net.caps1.routing.iterations == int(row.split("_")[1])
    expected = {"vector_pose": ("pose", "vector"), "no_coordinate_addition": ("coordinate_addition", False)}.get(row)
    if expected:
        assert cfg.model.net[expected[0]] == expected[1]
    if row.endswith("_loss"):
        assert module.loss_name == row.removesuffix("_loss")


SEARCHES = sorted(p.stem for p in (CONFIG_DIR / "hparams_search").glob("*.yaml"))


@pytest.mark.parametrize("search", SEARCHES)
def test_optuna_searches_compose_with_the_optuna_sweeper_and_valid_params(search):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"hparams_search={search}"], return_hydra_config=True)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.sweeper.direction == "maximize"
    assert cfg.optimized_metric == "val/acc" and str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    for key in cfg.hydra.sweeper.params:  # every searched key exists in the composed config
        assert OmegaConf.select(cfg, key, default="<missing>") != "<missing>", key
    hydra.utils.instantiate(cfg.model, _convert_="all")


@pytest.mark.parametrize("launcher", ["basic", "joblib", "slurm", "submitit_local"])
def test_launchers_compose(launcher):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[f"hydra/launcher={launcher}", "trainer=ddp", "trainer.devices=4"],
            return_hydra_config=True,
        )
    assert launcher.split("_")[0] in cfg.hydra.launcher._target_.lower() or launcher == "slurm"
    if launcher == "slurm":
        assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
        # one task per GPU, so Lightning's DDP maps SLURM tasks to ranks
        assert cfg.hydra.launcher.tasks_per_node == cfg.hydra.launcher.gpus_per_node == 4
        assert cfg.hydra.launcher.nodes == 1


@pytest.mark.parametrize("row", COMPARISON_ROWS)
def test_routing_comparison_rows_train_on_smallnorb_shapes(row):
    # the comparison's other dataset: every row composes with data=smallnorb (32x32, 5 classes) and its model
    # takes a training step on a batch of that shape (the files themselves: tests/data, test_learning.py)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=["experiment=routing_comparison", f"+routing_comparison_row={row}", "data=smallnorb"],
        )
    assert cfg.data.image_size == 32 and cfg.data.num_classes == 5
    check_model_config(cfg.model)
    torch.manual_seed(0)
    module = hydra.utils.instantiate(cfg.model, _convert_="all")
    x = torch.rand(4, cfg.data.in_channels, cfg.data.image_size, cfg.data.image_size)
    y = torch.tensor([0, 1, 2, 4])
    loss = module.shared_step((x, y), "train")[0]
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in module.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    with torch.no_grad():
        assert module.scores(x).shape == (4, 5)
