"""Picture callbacks: which pictures each model gets and where they go, the cadence, and the numbers
behind the pictures (perturbation grids, routing statistics, confusion counts)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import hydra
import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image

from capsnets.callbacks import (
    ConfusionMatrixPictures,
    ReconstructionPictures,
    RoutingPictures,
    perturbed_capsules,
    perturbed_reconstructions,
    routing_statistics,
)
from capsnets.callbacks.drawing import GRID_PAD, perturbation_grid
from capsnets.errors import ConfigError
from capsnets.nn import ReconstructionDecoder, RoutingCapsules, build_routing
from capsnets.nn.routing import child_assignment_stats, recording, routing_layers
from capsnets.utils.resolvers import CONFIG_DIR

from helpers import SMALL_DR_CAPS, class_layer, conv_layer

SMALL_EM_CAPS = ["model.net.A=8", "model.net.B=4", "model.net.C=4", "model.net.D=4"]
TINY_DATA = ["data=synthetic", "data.num_train=32", "data.num_val=24", "data.num_test=24", "data.batch_size=16"]
PICTURES = ("confusion_matrix", "reconstructions", "routing_pictures")


def build(tmp_path: Path, model: str, *overrides: str):
    """DataModule, LightningModule and the three picture callbacks from the real configs (callbacks=default)."""
    save = [f"callbacks.{name}.save_dir={tmp_path / 'images'}" for name in PICTURES]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model={model}", *TINY_DATA, *save, *overrides])
    dm = hydra.utils.instantiate(cfg.data, _convert_="all")
    module = hydra.utils.instantiate(cfg.model, _convert_="all")
    callbacks = [
        hydra.utils.instantiate(cfg.callbacks[name], _convert_="all") for name in PICTURES if name in cfg.callbacks
    ]
    return dm, module, callbacks


def trainer(
    tmp_path: Path, callbacks: list, *, epochs: int = 1, loggers: list | bool | None = None, **kwargs
) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=loggers if loggers is not None else [CSVLogger(tmp_path, name="csv")],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


def pictures(tmp_path: Path) -> set[str]:
    return {str(p.relative_to(tmp_path / "images")) for p in (tmp_path / "images").rglob("*.png")}


def expected(kinds: set[str], *tags: str) -> set[str]:
    return {f"{kind}/{tag}.png" for kind in kinds for tag in tags}


# --- which pictures for which model --------------------------------------------------------------


@pytest.mark.parametrize(
    "model, overrides, kinds",
    [
        (
            "dr_caps",
            SMALL_DR_CAPS,
            {"reconstructions", "perturbations", "confusion_matrix", "routing", "class_activations"},
        ),
        (
            "dr_caps",
            [*SMALL_DR_CAPS, "model.net.reconstruction=false"],
            {"confusion_matrix", "routing", "class_activations"},
        ),
        ("em_caps_small", SMALL_EM_CAPS, {"confusion_matrix", "routing", "class_activations"}),
        (
            "em_caps_small",
            [*SMALL_EM_CAPS, "model.routing.impl=reference"],
            {"confusion_matrix", "routing", "class_activations"},
        ),
        ("cnn_hinton2018", [], {"confusion_matrix"}),
    ],
    ids=["dr_caps", "dr_caps_no_decoder", "em_caps_small", "em_caps_small_reference", "cnn"],
)
def test_each_model_gets_the_pictures_that_apply(tmp_path, model, overrides, kinds):
    dm, module, callbacks = build(tmp_path, model, *overrides)
    t = trainer(tmp_path, callbacks, limit_train_batches=1)
    t.fit(module, dm)
    t.test(module, dm)
    assert pictures(tmp_path) == expected(kinds, "epoch=000", "test")
    for path in (p for cb in callbacks for p in cb.written):
        with Image.open(path) as image:
            assert image.mode == "RGB" and min(image.size) > 20
    if "routing" in kinds:  # the mean entropy of every iteration is also a metric
        metrics = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0]
        assert "val/routing/" in metrics and "entropy_iter1" in metrics


def test_routing_recording_is_off_outside_the_drawing_pass(tmp_path):
    dm, module, callbacks = build(tmp_path, "em_caps_small", *SMALL_EM_CAPS)
    trainer(tmp_path, callbacks, limit_train_batches=1).fit(module, dm)
    layers = routing_layers(module.net)
    assert list(layers) == ["caps1", "caps2", "classes"]
    assert not any(m.record_trace for m in layers.values()) and all(m.trace is None for m in layers.values())


def test_wandb_and_tensorboard_loggers_receive_the_pictures(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_SILENT", "true")
    dm, module, callbacks = build(
        tmp_path,
        "dr_caps",
        *SMALL_DR_CAPS,
        "callbacks.reconstructions.kinds=[reconstructions]",
        "callbacks.reconstructions.background=true",  # the loggers are called from the picture thread
        "~callbacks.confusion_matrix",
        "~callbacks.routing_pictures",
    )
    wandb_logger = WandbLogger(project="capsnets-tests", save_dir=str(tmp_path), mode="offline")
    tensorboard = TensorBoardLogger(tmp_path, name="tb")
    try:
        trainer(tmp_path, callbacks, loggers=[wandb_logger, tensorboard], limit_train_batches=1).fit(module, dm)
    finally:
        wandb_logger.experiment.finish()
    media = list((tmp_path / "wandb").glob("offline-run-*/files/media/images/pictures/val/reconstructions_*.png"))
    assert len(media) == 1
    events = EventAccumulator(tensorboard.log_dir, size_guidance={"images": 0}).Reload()
    assert events.Tags()["images"] == ["pictures/val/reconstructions"]


# --- cadence -------------------------------------------------------------------------------------


def test_every_n_epochs_draws_at_epochs_1_and_3_never_in_the_sanity_check(tmp_path):
    dm, module, callbacks = build(
        tmp_path,
        "dr_caps",
        *SMALL_DR_CAPS,
        "callbacks.confusion_matrix.every_n_epochs=2",
        "callbacks.reconstructions.every_n_epochs=2",
        "callbacks.reconstructions.kinds=[reconstructions]",
        "~callbacks.routing_pictures",
    )
    t = trainer(tmp_path, callbacks, epochs=4, limit_train_batches=1, num_sanity_val_steps=1, loggers=False)
    t.fit(module, dm)
    assert pictures(tmp_path) == expected({"confusion_matrix", "reconstructions"}, "epoch=001", "epoch=003")
    assert all(len(cb.draw_seconds) == 2 for cb in callbacks)


def test_every_n_epochs_0_draws_only_at_test(tmp_path):
    dm, module, callbacks = build(
        tmp_path, "cnn_hinton2018", *(f"callbacks.{name}.every_n_epochs=0" for name in PICTURES)
    )
    t = trainer(tmp_path, callbacks, epochs=2, limit_train_batches=1)
    t.fit(module, dm)
    assert pictures(tmp_path) == set()
    t.test(module, dm)
    assert pictures(tmp_path) == {"confusion_matrix/test.png"}


# --- the fixed batch -----------------------------------------------------------------------------


def test_fixed_batch_is_the_first_validation_images_converted_like_the_model_sees_them(tmp_path):
    dm, module, callbacks = build(tmp_path, "dr_caps", *SMALL_DR_CAPS, "callbacks.reconstructions.num_samples=20")
    t = trainer(tmp_path, callbacks, epochs=2, limit_train_batches=1)
    t.fit(module, dm)
    x, y = callbacks[1].fixed["val"]  # batches of 16: filled from the first two batches
    assert dm.data_val.images.dtype == torch.uint8
    assert x.dtype == torch.float32 and x.shape == (20, 1, 28, 28)
    assert torch.equal(x, dm.data_val.images[:20].float() / 255.0) and torch.equal(y, dm.data_val.labels[:20])
    assert callbacks[2].fixed["val"][0].shape[0] == 8  # each callback keeps its own num_samples


def fake_trainer(tmp_path: Path, **kwargs) -> SimpleNamespace:
    defaults = dict(
        is_global_zero=True,
        world_size=1,
        sanity_checking=False,
        current_epoch=0,
        global_step=0,
        loggers=[],
        default_root_dir=str(tmp_path),
        datamodule=None,
        strategy=None,
    )
    return SimpleNamespace(**{**defaults, **kwargs})


def run_test_epoch(callback, fake, module, outputs, batch) -> None:
    callback.on_test_epoch_start(fake, module)
    callback.on_test_batch_end(fake, module, outputs, batch, 0)
    callback.on_test_epoch_end(fake, module)


def test_multi_crop_batches_give_their_first_crop_and_pictures_still_draw(tmp_path):
    _, module, _ = build(tmp_path, "dr_caps", *SMALL_DR_CAPS)
    module.train()
    fake = fake_trainer(tmp_path)
    x = torch.rand(4, 5, 1, 28, 28)  # (B, n crops, C, H, W), as smallNORB with data.test_crops=5
    y = torch.tensor([0, 1, 2, 3])
    outputs = {"scores": torch.eye(10)[[0, 1, 2, 2]]}
    confusion = ConfusionMatrixPictures(save_dir=tmp_path / "images", background=False)
    recon = ReconstructionPictures(save_dir=tmp_path / "images", num_samples=3, background=False)
    routing = RoutingPictures(save_dir=tmp_path / "images", num_samples=3, background=False)
    for callback in (confusion, recon, routing):
        run_test_epoch(callback, fake, module, outputs, (x, y))
    fixed_x, fixed_y = recon.fixed["test"]
    assert torch.equal(fixed_x, x[:3, 0]) and torch.equal(fixed_y, y[:3])
    assert pictures(tmp_path) == expected(
        {"reconstructions", "perturbations", "confusion_matrix", "routing", "class_activations"}, "test"
    )
    assert confusion.confusion["test"][3, 2] == 1 and confusion.confusion["test"].sum() == 4
    assert module.training and module.net.training  # drawn in eval mode, training mode restored


def test_nothing_to_draw_is_harmless(tmp_path):
    """A model without inspect(), decoder or class scores: no pictures, no error."""
    probe = torch.nn.Linear(4, 2)
    fake = fake_trainer(tmp_path)
    for callback in (
        ConfusionMatrixPictures(save_dir=tmp_path / "images", background=False),
        ReconstructionPictures(save_dir=tmp_path / "images", background=False),
        RoutingPictures(save_dir=tmp_path / "images", background=False),
    ):
        callback.on_validation_batch_end(fake, probe, torch.tensor(0.5), (torch.rand(3, 4), torch.tensor([0, 1, 0])), 0)
        callback.on_validation_epoch_end(fake, probe)
    assert not (tmp_path / "images").exists()


def test_only_rank_0_draws_and_keeps_images(tmp_path):
    _, module, _ = build(tmp_path, "dr_caps", *SMALL_DR_CAPS)
    callback = ReconstructionPictures(save_dir=tmp_path / "images", kinds=["reconstructions"], background=False)
    fake = fake_trainer(tmp_path, is_global_zero=False)
    callback.on_validation_batch_end(fake, module, None, (torch.rand(2, 1, 28, 28), torch.tensor([0, 1])), 0)
    callback.on_validation_epoch_end(fake, module)
    assert callback.fixed == {} and not (tmp_path / "images").exists()


# --- perturbations -------------------------------------------------------------------------------


def test_perturbation_grid_is_16_dims_by_11_steps():
    torch.manual_seed(0)
    decoder = ReconstructionDecoder(num_classes=10, capsule_dim=16, out_shape=(1, 28, 28), hidden=(32, 64))
    v = torch.randn(2, 10, 16) * 0.3
    labels = torch.tensor([3, 7])
    offsets = torch.linspace(-0.25, 0.25, 11)
    assert torch.allclose(offsets.diff(), torch.full((10,), 0.05))
    images = perturbed_reconstructions(decoder, v, labels, offsets)
    assert images.shape == (2, 16, 11, 1, 28, 28)
    # the middle column (offset 0) is the plain reconstruction, in every row
    plain = decoder(v, labels)  # (2, 1, 28, 28)
    assert torch.allclose(images[:, :, 5], plain[:, None].expand(2, 16, 1, 28, 28), atol=1e-6)
    capsules = perturbed_capsules(v, labels, offsets)  # (S, D, T, K, D)
    change = capsules - v[:, None, None]
    assert change[0, 4, 10, 3, 4] == pytest.approx(0.25) and change[1, 15, 0, 7, 15] == pytest.approx(-0.25)
    change[0, :, :, 3] -= torch.eye(16)[:, None, :] * offsets[None, :, None]
    change[1, :, :, 7] -= torch.eye(16)[:, None, :] * offsets[None, :, None]
    assert change.abs().max() < 1e-7  # only dimension d of the label's capsule moved
    picture = perturbation_grid(images[:1], scale=2)
    tile = 28 * 2 + GRID_PAD
    assert picture.shape == (16 * tile + GRID_PAD, 11 * tile + GRID_PAD, 3)


# --- routing statistics --------------------------------------------------------------------------


def test_dynamic_routing_trace_starts_uniform_and_is_recorded_only_on_request():
    routing = build_routing({"name": "dynamic", "iterations": 3}, kind="vector", out_types=5, role="class")
    layer = RoutingCapsules(in_caps=12, in_dim=4, out_caps=5, out_dim=6, routing=routing, init_std=0.5)
    u = torch.randn(2, 12, 4)
    layer(u)
    assert layer.routing.record_trace is False and layer.routing.trace is None
    with recording(layer) as layers:
        v = layer(u)
        trace = layer.routing.trace
        (stats,) = routing_statistics({name: r.trace for name, r in layers.items()})
    assert list(layers) == ["routing"] and layer.routing.trace is None and not layer.routing.record_trace
    assert torch.allclose(v, layer(u))  # recording does not change the result
    assert len(trace.assignments) == 3 and len(trace.activations) == 3
    assert torch.allclose(trace.activations[-1][:, 0], v.norm(dim=-1))  # a vector capsule's activation is its length
    assert stats.iterations == 3
    assert torch.allclose(stats.entropy[0], torch.full((24,), math.log(5)))  # b = 0: uniform couplings
    assert torch.allclose(stats.uniform, torch.full((24,), math.log(5)))
    assert torch.allclose(stats.largest[0], torch.full((24,), 0.2))
    assert stats.mean_entropy()[2] < stats.mean_entropy()[0]  # agreement concentrates the couplings


def test_em_conv_assignments_start_uniform_over_every_covering_parent():
    torch.manual_seed(0)
    layer = conv_layer(2, 3, 3, 1, iterations=2)
    pose, a = torch.randn(2, 5, 5, 2, 16), torch.rand(2, 5, 5, 2)
    with recording(layer) as layers:
        layer(pose, a)
        trace = layer.routing.trace
        (stats,) = routing_statistics({name: r.trace for name, r in layers.items()})
    assert len(trace.assignments) == 2 and len(trace.activations) == 2
    entropy, uniform, largest = child_assignment_stats(trace.assignments[0], trace.layout)
    # 5x5 input, 3x3 kernel, stride 1: the corner child lies in 1 receptive field, the centre child in 9
    covering = torch.tensor(
        [[1, 2, 3, 2, 1], [2, 4, 6, 4, 2], [3, 6, 9, 6, 3], [2, 4, 6, 4, 2], [1, 2, 3, 2, 1]]
    ).flatten()
    parents = (covering * 3).double()  # x 3 parent types
    assert torch.allclose(uniform[0, :, 0].double(), parents.log(), atol=1e-6)
    assert torch.allclose(entropy, uniform, atol=1e-5)  # R starts uniform over the covering parents
    assert torch.allclose(largest[0, :, 0].double(), 1 / parents, atol=1e-7)
    # the last iteration's assignments: every child's distribution still sums to 1 over its parents
    per_child = trace.layout.child_totals(trace.assignments[1])  # (B, 25, T_in)
    assert torch.allclose(per_child, torch.ones_like(per_child))
    assert stats.name == "routing" and stats.iterations == 2


def test_em_class_layer_entropy_starts_at_log_num_classes_and_names_the_layers(tmp_path):
    layer = class_layer(2, 5, iterations=3)
    with recording(layer) as layers:
        layer(torch.randn(2, 3, 3, 2, 16), torch.rand(2, 3, 3, 2))
        (stats,) = routing_statistics({name: r.trace for name, r in layers.items()})
    assert torch.allclose(stats.entropy[0], torch.full_like(stats.entropy[0], math.log(5)), atol=1e-6)
    _, module, _ = build(tmp_path, "em_caps_small", *SMALL_EM_CAPS)
    view = module.inspect(torch.rand(2, 1, 28, 28))
    assert [s.name for s in routing_statistics(view.traces)] == ["caps1", "caps2", "classes"]
    assert view.class_layer == "classes" and torch.allclose(
        view.traces["classes"].activations[-1][:, 0].float(), view.scores
    )


# --- confusion matrix ----------------------------------------------------------------------------


def test_confusion_matrix_counts_every_validation_and_test_prediction(tmp_path):
    dm, module, callbacks = build(
        tmp_path, "cnn_hinton2018", "~callbacks.reconstructions", "~callbacks.routing_pictures"
    )
    t = trainer(tmp_path, callbacks, limit_train_batches=2)
    t.fit(module, dm)
    t.test(module, dm)
    module.eval()
    for stage, loader in (("val", dm.val_dataloader()), ("test", dm.test_dataloader())):
        by_hand = torch.zeros(10, 10, dtype=torch.int64)
        with torch.no_grad():
            for x, y in loader:
                preds = module(x.float() / 255.0).argmax(-1)
                for true, pred in zip(y.tolist(), preds.tolist()):
                    by_hand[true, pred] += 1  # row = true class, column = predicted
        assert torch.equal(callbacks[0].confusion[stage], by_hand), stage
        assert by_hand.sum() == 24


# --- config --------------------------------------------------------------------------------------


def test_default_callbacks_include_the_pictures_with_the_papers_perturbations():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train")
    assert {name: cfg.callbacks[name]._target_.rsplit(".", 1)[-1] for name in PICTURES} == {
        "confusion_matrix": "ConfusionMatrixPictures",
        "reconstructions": "ReconstructionPictures",
        "routing_pictures": "RoutingPictures",
    }
    recon = cfg.callbacks.reconstructions
    assert recon.perturb_range == 0.25 and recon.perturb_steps == 11 and recon.every_n_epochs == 1


@pytest.mark.parametrize(
    "cls, kwargs, key",
    [
        (ReconstructionPictures, {"kinds": ["recon"]}, "reconstructions.kinds"),
        (RoutingPictures, {"kinds": ["routing", "maps"]}, "routing_pictures.kinds"),
        (ConfusionMatrixPictures, {"every_n_epochs": -1}, "confusion_matrix.every_n_epochs"),
        (ReconstructionPictures, {"perturb_steps": 1}, "reconstructions.perturb_steps"),
        (ReconstructionPictures, {"perturb_range": 0}, "reconstructions.perturb_range"),
        (RoutingPictures, {"num_samples": 0}, "routing_pictures.num_samples"),
        (ConfusionMatrixPictures, {"class_names": "cat"}, "confusion_matrix.class_names"),
    ],
)
def test_bad_values_name_the_key(cls, kwargs, key):
    with pytest.raises(ConfigError, match=f"callbacks.{key}"):
        cls(**kwargs)


def test_background_errors_surface_and_the_callback_pickles_for_ddp_spawn():
    import pickle

    callback = RoutingPictures()
    callback._submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        callback.flush()
    callback._submit(lambda: None)
    restored = pickle.loads(pickle.dumps(callback))  # ddp_spawn sends the callbacks to new processes
    assert restored._executor is None and restored._pending == []
    callback.teardown(None, None, "fit")
    assert callback._executor is None
