import json
import logging

import pytest

from capsnets.errors import ConfigError
from capsnets.results import metric_value
from capsnets.utils.instantiate import check_ckpt_path


def test_metric_value_returns_metric_or_none_with_warning(caplog):
    assert metric_value({"val/acc": 0.5, "test/acc": 0.4}, "val/acc") == 0.5
    assert metric_value({"val/acc": 0.5}, None) is None
    with caplog.at_level(logging.WARNING):
        assert metric_value({"train/acc": 0.3}, "val/acc") is None
    assert "val/acc" in caplog.text and "train/acc" in caplog.text


def test_metric_value_prefers_the_best_checkpoints_score_over_the_last_epoch():
    # ModelCheckpoint monitors val/acc: the tested checkpoint scored 0.8, the last epoch 0.6
    assert metric_value({"val/acc": 0.6, "val/acc_best": 0.8}, "val/acc") == 0.8
    assert metric_value({"val/loss": 0.3, "val/acc_best": 0.8}, "val/loss") == 0.3


def test_check_ckpt_path(tmp_path):
    assert check_ckpt_path(None) is None
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"x")
    assert check_ckpt_path(str(ckpt)) == str(ckpt.resolve())
    with pytest.raises(ConfigError, match="ckpt_path='.*missing.ckpt' is not a file"):
        check_ckpt_path(str(tmp_path / "missing.ckpt"))
    with pytest.raises(ConfigError, match="is not a file"):
        check_ckpt_path(str(tmp_path))


def test_test_checkpoint_last_tests_the_weights_at_the_end_of_training(tmp_path):
    # two epochs; the monitored checkpoint keeps the LOWER val/acc (mode=min), so on ties and on learning it stays
    # epoch 0's while last.ckpt holds epoch 1's weights: the tested figure must be last.ckpt's, not the best's
    import lightning as L
    from omegaconf import OmegaConf

    from capsnets.utils.instantiate import build

    from helpers import last_metric, quiet_trainer, run_cli, synthetic_run

    overrides = synthetic_run(tmp_path, "run", "trainer.max_epochs=2", "callbacks.model_checkpoint.mode=min")
    proc = run_cli("train.py", *overrides, "logger=csv", "test_checkpoint=last", "model.optimizer.lr=0.01")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "run"
    reported = last_metric(run_dir, "test/loss")
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    checkpoints = run_dir / "checkpoints"
    (best,) = checkpoints.glob("epoch_000*.ckpt")

    def test_loss(ckpt) -> float:
        L.seed_everything(0)
        dm, model = build(cfg.data, _convert_="all"), build(cfg.model, _convert_="all")
        return quiet_trainer().test(model, datamodule=dm, ckpt_path=str(ckpt), verbose=False)[0]["test/loss"]

    last_loss, best_loss = test_loss(checkpoints / "last.ckpt"), test_loss(best)
    assert last_loss != best_loss
    assert reported == pytest.approx(last_loss, rel=1e-5)
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["tested"] == "last" and record["metrics"]["test/loss"] == pytest.approx(last_loss, rel=1e-5)
