"""LR schedules, per optimiser step: exponential and step decay in samples seen, and cosine over the planned run."""

from __future__ import annotations

import math

import lightning as L
import pytest
from hydra import compose, initialize_config_dir

from capsnets.errors import ConfigError
from capsnets.utils.instantiate import build as instantiate_as_capsnets
from capsnets.utils.resolvers import CONFIG_DIR

from helpers import SMALL_DR_CAPS, quiet_trainer

STEPS_PER_EPOCH = 3


def build(*overrides: str):  # noqa: ANN201
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[
                "model=dr_caps",
                *SMALL_DR_CAPS,
                "data=synthetic",
                f"data.num_train={32 * STEPS_PER_EPOCH}",
                "data.num_val=32",
                "data.num_test=32",
                "data.batch_size=32",
                "model.optimizer.lr=0.01",
                *overrides,
            ],
        )
    L.seed_everything(0)
    return instantiate_as_capsnets(cfg.data, _convert_="all"), instantiate_as_capsnets(cfg.model, _convert_="all")


class LRs(L.Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self.values.append(trainer.optimizers[0].param_groups[0]["lr"])


def lrs(*overrides: str, epochs: int | None = 2, max_steps: int = -1) -> list[float]:
    dm, model = build(*overrides)
    seen = LRs()
    trainer = quiet_trainer(max_epochs=epochs, max_steps=max_steps, limit_val_batches=0, callbacks=[seen])
    trainer.fit(model, datamodule=dm)
    return seen.values


def test_cosine_decays_to_the_final_fraction_over_the_planned_run():
    got = lrs("model.scheduler.name=cosine", "model.scheduler.final_fraction=0.1")
    total = 2 * STEPS_PER_EPOCH
    want = [0.01 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t / total))) for t in range(total)]
    assert got == pytest.approx(want, rel=1e-6)


def test_exponential_decays_per_sample_seen():
    got = lrs("model.scheduler.name=exponential", "model.scheduler.decay_rate=0.5", "model.scheduler.decay_samples=64")
    assert got == pytest.approx([0.01 * 0.5 ** (32 * t / 64) for t in range(2 * STEPS_PER_EPOCH)], rel=1e-6)


def test_cosine_needs_a_planned_length():
    with pytest.raises(ConfigError, match="model.scheduler.name=cosine decays over the planned run"):
        lrs("model.scheduler.name=cosine", epochs=-1)
    with pytest.raises(ConfigError, match="model.scheduler.final_fraction"):
        build("model.scheduler.name=cosine", "model.scheduler.final_fraction=2")


def test_multistep_decays_at_each_milestone_in_samples_seen():
    # 80 training images in batches of 32, 32, 16: samples seen at each batch start 0, 32, 64 | 80, 112, 144.
    # The drops come at 64 and 90 samples seen (a count of full batches would place the second at 96, a batch early)
    got = lrs(
        "data.num_train=80",
        "model.scheduler.name=multistep",
        "model.scheduler.decay_rate=0.1",
        "+model.scheduler.milestone_samples=[64,90]",
    )
    assert got == pytest.approx([0.01, 0.01, 0.001, 0.001, 0.0001, 0.0001], rel=1e-6)


def test_multistep_resumes_by_samples_seen_with_another_batch_size(tmp_path):
    # one epoch of 80 images in batches of 32 (seen: 80), then resumed in batches of 16: the LR follows the samples
    milestones = ["model.scheduler.name=multistep", "model.scheduler.decay_rate=0.1"]
    milestones += ["+model.scheduler.milestone_samples=[64,100]"]
    dm, model = build("data.num_train=80", *milestones)
    first = quiet_trainer(max_epochs=1, limit_val_batches=0)
    first.fit(model, datamodule=dm)
    first.save_checkpoint(tmp_path / "epoch1.ckpt")
    dm, model = build("data.num_train=80", "data.batch_size=16", *milestones)
    seen = LRs()
    quiet_trainer(max_epochs=2, limit_val_batches=0, callbacks=[seen]).fit(
        model, datamodule=dm, ckpt_path=tmp_path / "epoch1.ckpt"
    )
    # batch starts at 80, 96, 112, 128, 144 samples seen: the first drop (64) was before the resume, the second at 100
    assert seen.values == pytest.approx([0.001, 0.001, 0.0001, 0.0001, 0.0001], rel=1e-6)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.scheduler.name=multistep"], "multiplies the LR by decay_rate at each of milestone_samples"),
        (["model.scheduler.name=multistep", "+model.scheduler.milestone_samples=[160,64]"], "must increase"),
        (
            ["model.scheduler.name=multistep", "+model.scheduler.milestone_samples=[0]"],
            r"milestone_samples\[0\] must be",
        ),
    ],
)
def test_multistep_settings_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build(*overrides)
