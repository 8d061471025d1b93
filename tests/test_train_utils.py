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
