"""The same seeds give the same numbers: train losses and validation loss of three steps on data=synthetic,
pinned from the implementation before the routing seam (nn/routing/) was introduced.

A change that alters what dr_caps or em_caps_small (with the paper's EM semantics, both implementations)
compute shows up here. Tolerance: float32 arithmetic differs in the last bits between CPUs.
"""

from __future__ import annotations

import lightning as L
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning import Callback

from capsnets.utils.resolvers import CONFIG_DIR

from helpers import SMALL_DR_CAPS

EM_PAPER = [
    "model=em_caps_small",
    "model.net.A=16",
    "model.net.B=4",
    "model.net.C=4",
    "model.net.D=4",
    "model/routing=em",
    "model.routing.normalisation=covering",
    "model.routing.lambda_schedule=official",
    "model.routing.lambda_value=0.01",
    "model.routing.var_floor=0.0005",
    "model.routing.moment_dtype=float64",
    "model.routing.iterations=3",
    "model.routing.class_lambda_scale=0.25",
    "model.loss.margin_schedule.schedule=linear",
    "model.net.coordinate_scale=1.0",
    "model.net.conv1_norm=none",
]
PINNED = {  # (train loss of steps 1-3, val loss after step 3), measured at commit a124171
    "dr_caps": ([0.8852311968803406, 0.8847833871841431, 0.8803818225860596], 0.8684858679771423),
    "em_caps_small": ([0.3647134304046631, 1.6925288438796997, 3.981377124786377], 3.9858696460723877),
}


class Losses(Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(float(outputs["loss"]))


def three_steps(overrides: list[str]) -> tuple[list[float], float]:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=["data=synthetic", "data.num_train=96", "data.num_val=32", "data.num_test=32", *overrides],
        )
    L.seed_everything(7, workers=True)
    dm, model = instantiate(cfg.data, _convert_="all"), instantiate(cfg.model, _convert_="all")
    losses = Losses()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[losses],
        limit_val_batches=1,
        val_check_interval=3,
    )
    trainer.fit(model, datamodule=dm)
    return losses.values, float(trainer.callback_metrics["val/loss"])


@pytest.mark.parametrize(
    "model, overrides",
    [
        ("dr_caps", ["model=dr_caps", *SMALL_DR_CAPS]),
        ("em_caps_small", EM_PAPER),
        ("em_caps_small", [*EM_PAPER, "model.routing.impl=reference"]),
    ],
    ids=["dr_caps", "em_caps_small-fused", "em_caps_small-reference"],
)
def test_same_seed_same_numbers_as_before_the_routing_seam(model, overrides):
    train_losses, val_loss = three_steps(overrides)
    pinned_train, pinned_val = PINNED[model]
    assert train_losses == pytest.approx(pinned_train, rel=1e-4)
    assert val_loss == pytest.approx(pinned_val, rel=1e-4)
