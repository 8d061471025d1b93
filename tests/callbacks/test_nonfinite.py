"""NaN/Inf guard: a non-finite loss is caught at its step; stop keeps the last good state, skip steps over it,
and no checkpoint with non-finite weights is ever written."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from capsnets.callbacks import NonFiniteError, NonFiniteGuard
from capsnets.errors import ConfigError
from capsnets.utils.resolvers import CONFIG_DIR

from helpers import SMALL_DR_CAPS, quiet_trainer, run_cli

SYNTHETIC = ["data=synthetic", "data.num_train=192", "data.num_val=32", "data.num_test=32", "data.batch_size=32"]


def build():  # noqa: ANN201
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["model=dr_caps", *SMALL_DR_CAPS, *SYNTHETIC])
    L.seed_everything(3)
    return instantiate(cfg.data, _convert_="all"), instantiate(cfg.model, _convert_="all")


class PoisonBatches(L.Callback):
    """Makes the loss of the given training batches NaN (a forward hook on the first layer)."""

    def __init__(self, batches: set[int]) -> None:
        self.batches, self.handle = batches, None
        self.before: dict[int, dict[str, torch.Tensor]] = {}
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self.before[batch_idx] = {k: v.clone() for k, v in pl_module.state_dict().items()}
        if batch_idx in self.batches:
            first = next(m for m in pl_module.net.modules() if isinstance(m, torch.nn.Conv2d))
            self.handle = first.register_forward_hook(lambda m, i, out: out * float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.after[batch_idx] = {k: v.clone() for k, v in pl_module.state_dict().items()}
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def fit(tmp_path, guard: NonFiniteGuard, poison: PoisonBatches, epochs: int = 1) -> L.Trainer:  # noqa: ANN001
    dm, model = build()
    trainer = quiet_trainer(max_epochs=epochs, default_root_dir=tmp_path, callbacks=[poison, guard])
    trainer.fit(model, datamodule=dm)
    return trainer


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_stop_keeps_the_last_good_state_and_names_the_batch(tmp_path):
    poison = PoisonBatches({2})
    with pytest.raises(NonFiniteError, match=r"non-finite values in the loss .* at step 2 \(epoch 0, batch 2\)"):
        fit(tmp_path, NonFiniteGuard("stop"), poison)
    saved = torch.load(tmp_path / "checkpoints" / "nonfinite.ckpt", weights_only=True)
    assert same(saved["state_dict"], poison.before[2])  # the state before the poisoned batch, not after it
    assert all(v.isfinite().all() for v in saved["state_dict"].values() if v.is_floating_point())
    report = json.loads((tmp_path / "nonfinite.json").read_text())
    assert report["batch_idx"] == 2 and report["global_step"] == 2 and report["nonfinite_loss"] is True
    assert report["nonfinite_gradients"]  # NaN reached every gradient


def test_skip_steps_over_a_bad_batch_and_training_goes_on(tmp_path):
    poison, guard = PoisonBatches({1, 3}), NonFiniteGuard("skip", max_skips=2)
    trainer = fit(tmp_path, guard, poison)
    assert guard.skips == 2 and trainer.global_step == 6  # 192 / 32 batches, two of them without an update
    assert same(poison.after[1], poison.before[1]) and same(poison.after[3], poison.before[3])
    assert not same(poison.after[2], poison.before[2])  # the good batches still train
    assert all(v.isfinite().all() for v in poison.after[5].values() if v.is_floating_point())
    assert not (tmp_path / "nonfinite.json").exists()


def test_skip_stops_after_consecutive_bad_steps(tmp_path):
    with pytest.raises(NonFiniteError, match="after 3 consecutive skipped steps"):
        fit(tmp_path, NonFiniteGuard("skip", max_skips=3), PoisonBatches({1, 2, 3, 4}))
    assert json.loads((tmp_path / "nonfinite.json").read_text())["batch_idx"] == 3


def test_a_checkpoint_with_non_finite_weights_is_never_written(tmp_path):
    trainer = fit(tmp_path, NonFiniteGuard("stop"), PoisonBatches(set()))
    trainer.save_checkpoint(tmp_path / "good.ckpt")
    with torch.no_grad():
        next(trainer.lightning_module.parameters())[0] = float("inf")
    with pytest.raises(NonFiniteError, match="refusing to save a checkpoint with non-finite weights"):
        trainer.save_checkpoint(tmp_path / "bad.ckpt")
    assert (tmp_path / "good.ckpt").exists() and not (tmp_path / "bad.ckpt").exists()


@pytest.mark.parametrize("policy, max_skips, key", [("ignore", 10, "nonfinite"), ("stop", 0, "nonfinite_max_skips")])
def test_bad_settings_name_the_key(policy, max_skips, key):
    with pytest.raises(ConfigError, match=key):
        NonFiniteGuard(policy, max_skips=max_skips)


def test_a_diverging_run_exits_2_without_saving_nan_weights(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(
        "train.py",
        "model=dr_caps",
        *SMALL_DR_CAPS,
        *SYNTHETIC,
        "model.optimizer.lr=1e8",
        "trainer.max_epochs=2",
        "logger=csv",
        "callbacks=default",
        f"hydra.run.dir={run_dir}",
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "resume with ckpt_path=" in proc.stderr
    assert not (run_dir / "metrics.json").exists()
    for ckpt in (run_dir / "checkpoints").glob("*.ckpt"):  # nonfinite.ckpt, and nothing poisoned
        weights = torch.load(ckpt, weights_only=True)["state_dict"]
        assert all(v.isfinite().all() for v in weights.values() if v.is_floating_point()), ckpt
    assert (run_dir / "checkpoints" / "nonfinite.ckpt").exists()
