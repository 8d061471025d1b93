"""LearningCurve: points every N samples (and at the start and the end), scored exactly as trainer.test scores."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from capsnets.callbacks import LearningCurve
from capsnets.errors import ConfigError
from capsnets.utils.resolvers import CONFIG_DIR

from helpers import SMALL_DR_CAPS, quiet_trainer


def build(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[
                "model=dr_caps",
                *SMALL_DR_CAPS,
                "data=synthetic",
                "data.num_train=96",
                "data.num_val=32",
                "data.num_test=48",
                *overrides,
            ],
        )
    L.seed_everything(3)
    return instantiate(cfg.data, _convert_="all"), instantiate(cfg.model, _convert_="all")


def fit(tmp_path, dm, model, curve: LearningCurve, epochs: int = 2) -> L.Trainer:
    trainer = quiet_trainer(max_epochs=epochs, default_root_dir=tmp_path, callbacks=[curve])
    trainer.fit(model, datamodule=dm)
    return trainer


def test_points_at_start_every_n_samples_and_at_the_end_scored_like_trainer_test(tmp_path):
    dm, model = build()
    curve = LearningCurve(every_samples=64)
    trainer = fit(tmp_path, dm, model, curve)  # 2 epochs of 3 batches of 32: 192 samples
    assert [p["samples"] for p in curve.curve] == [0, 64, 128, 192]
    assert all(0.0 <= p["acc"] <= 1.0 for p in curve.curve)
    tested = trainer.test(model, datamodule=dm, verbose=False)[0]["test/acc"]
    assert curve.curve[-1]["acc"] == pytest.approx(tested)  # the same weights, the same scoring


def test_max_samples_scores_the_same_first_samples_of_the_split_at_every_point(tmp_path):
    dm, model = build("data.batch_size=16")
    curve = LearningCurve(every_samples=48, max_samples=20)  # 20 = one batch of 16 and 4 of the next
    trainer = fit(tmp_path, dm, model, curve, epochs=1)
    xs, ys = zip(*(dm.eval_batch(b) for b in dm.test_dataloader()), strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    model.eval()
    with torch.no_grad():
        right = (model.scores(x).argmax(dim=-1) == y).float()
    assert len(y) == 48
    assert curve.curve[-1]["acc"] == pytest.approx(right[:20].mean().item())
    assert LearningCurve(max_samples=5).accuracy(trainer, model) == pytest.approx(right[:5].mean().item())
    assert LearningCurve().accuracy(trainer, model) == pytest.approx(right.mean().item())  # null: the whole split


def test_state_round_trip_continues_the_curve():
    curve = LearningCurve(every_samples=100)
    curve.curve, curve._next = [{"samples": 0, "acc": 0.1}, {"samples": 100, "acc": 0.5}], 200
    restored = LearningCurve(every_samples=100)
    restored.load_state_dict(curve.state_dict())
    assert restored.curve == curve.curve and restored._next == 200


def test_testing_an_earlier_checkpoint_keeps_the_whole_curve(tmp_path):
    # train.py tests the best checkpoint, which can be epochs older than the end of training; restoring it
    # restores the callbacks' state too, which truncated metrics.json's curve at the best epoch
    dm, model = build()
    curve = LearningCurve(every_samples=64)
    trainer = fit(tmp_path, dm, model, curve, epochs=1)
    trainer.save_checkpoint(tmp_path / "early.ckpt")
    early = list(curve.curve)
    trainer.fit_loop.max_epochs = 3
    trainer.fit(model, datamodule=dm)  # two more epochs, the same run
    full = list(curve.curve)
    assert len(full) > len(early) and full[: len(early)] == early
    trainer.test(model, datamodule=dm, ckpt_path=str(tmp_path / "early.ckpt"), verbose=False)
    assert curve.curve == full
    fresh = LearningCurve(every_samples=64)  # a resumed run (a new process) takes the stored curve
    fresh.load_state_dict(torch.load(tmp_path / "early.ckpt", weights_only=True)["callbacks"]["LearningCurve"])
    assert fresh.curve == early


@pytest.mark.parametrize(
    "kwargs, key",
    [({"every_samples": 0}, "every_samples"), ({"split": "train"}, "split"), ({"max_samples": 0}, "max_samples")],
)
def test_bad_values_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=f"callbacks.learning_curve.{key}"):
        LearningCurve(**kwargs)


def test_callbacks_learning_curve_option_composes_the_defaults_and_the_curve():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["callbacks=learning_curve"])
    assert {"model_checkpoint", "routing_pictures", "learning_curve"} <= set(cfg.callbacks)
    assert isinstance(instantiate(cfg.callbacks.learning_curve), LearningCurve)
