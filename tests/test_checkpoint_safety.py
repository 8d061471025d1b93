"""Checkpoints carry data, never code: eval.py and resume build only registered classes, and every way a
checkpoint file can be wrong (empty, text, truncated, pickled objects, another model, NaN weights) ends in
one readable error, before anything runs or is written."""

from __future__ import annotations

import io
import math
import pickle
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from capsnets.errors import ConfigError
from capsnets.eval import load_checkpoint
from capsnets.registry import registered, resolve
from capsnets.train import check_resume_checkpoint
from capsnets.utils.resolvers import CONFIG_DIR

from helpers import SMALL_DR_CAPS, run_cli

TINY_EM = ["model=em_caps_small", "model.net.A=8", "model.net.B=4", "model.net.C=4", "model.net.D=4"]


def build(*overrides: str):  # noqa: ANN201
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["data=synthetic", *overrides])
    return instantiate(cfg.model, _convert_="all")


def checkpoint_of(model, **meta) -> dict:  # noqa: ANN001
    """What a capsnets run writes: weights, constructor hyper-parameters and the capsnets metadata."""
    return {
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        "epoch": 0,
        "global_step": 0,
        "capsnets": {"model_class": f"{type(model).__module__}.{type(model).__qualname__}", **meta},
    }


@pytest.fixture(scope="module")
def dr_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "dr.ckpt"
    torch.save(checkpoint_of(build("model=dr_caps", *SMALL_DR_CAPS)), path)
    return path


def test_a_good_checkpoint_rebuilds_its_model(dr_ckpt):
    model, meta = load_checkpoint(str(dr_ckpt))
    assert type(model).__name__ == "DRCapsModule" and meta["global_step"] == 0
    saved = torch.load(dr_ckpt, weights_only=True)["state_dict"]
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def test_only_registered_classes_resolve():
    assert resolve("model", "capsnets.models.EMCapsModule", "test").__name__ == "EMCapsModule"
    assert resolve("datamodule", "capsnets.data.mnist.MNISTDataModule", "test").__name__ == "MNISTDataModule"
    assert {cls.__name__ for cls in registered("model").values()} == {
        "DRCapsModule",
        "EMCapsModule",
        "CNNModule",
        "EfficientCapsModule",
        "IDACapsModule",
    }
    for path in ("subprocess.run", "os.system", "builtins.eval", "torch.nn.Linear", "capsnets.models.CapsuleView"):
        with pytest.raises(ConfigError, match="capsnets does not build"):
            resolve("model", path, "test")
    with pytest.raises(ConfigError, match="register_datamodule"):
        resolve("datamodule", ["not", "a", "path"], "test")


def test_a_malicious_checkpoint_runs_nothing(tmp_path):
    # it loads under weights_only=True (plain strings and lists) and names a function with its arguments:
    # an eval.py that imports and calls what a checkpoint names would create the marker file
    marker = tmp_path / "pwned"
    evil = {
        "state_dict": {},
        "hyper_parameters": {"args": ["touch", str(marker)]},
        "capsnets": {"model_class": "subprocess.run", "datamodule_class": "os.system", "datamodule_hparams": {}},
    }
    torch.load(io.BytesIO(_saved(evil)), weights_only=True)  # a "safe" file by PyTorch's standard
    path = tmp_path / "evil.ckpt"
    path.write_bytes(_saved(evil))
    proc = run_cli("eval.py", f"ckpt_path={path}", "logger=none", f"hydra.run.dir={tmp_path / 'eval'}")
    assert not marker.exists()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model class 'subprocess.run', which capsnets does not build" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("*.json"))  # no results file


def test_a_checkpoint_naming_a_foreign_datamodule_is_refused(dr_ckpt, tmp_path):
    checkpoint = torch.load(dr_ckpt, weights_only=True)
    checkpoint["capsnets"].update(datamodule_class="shutil.rmtree", datamodule_hparams={"path": str(tmp_path)})
    path = tmp_path / "evil_data.ckpt"
    torch.save(checkpoint, path)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[f"ckpt_path={path}", "logger=none"])
    from capsnets.eval import evaluate

    with pytest.raises(ConfigError, match="datamodule class 'shutil.rmtree'"):
        evaluate(cfg)
    assert path.exists()


def _saved(obj) -> bytes:  # noqa: ANN001
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _truncated(dr_ckpt: Path) -> bytes:
    return dr_ckpt.read_bytes()[: dr_ckpt.stat().st_size // 2]


class _Payload:
    def __reduce__(self):  # noqa: ANN204
        return (math.sqrt, (4.0,))


@pytest.mark.parametrize(
    "content, message",
    [
        (lambda ckpt: b"", "is an empty file, not a checkpoint"),
        (lambda ckpt: b"epoch: 3\nstate_dict: weights\n", "cannot be read as a checkpoint"),
        (_truncated, "cannot be read as a checkpoint"),
        (lambda ckpt: pickle.dumps(_Payload()), "cannot be read as a checkpoint"),
        (lambda ckpt: _saved({"model": torch.zeros(2)}), "holds no model weights"),
        (lambda ckpt: _saved({"state_dict": {"w": torch.zeros(2)}}), "was not written by a capsnets run"),
        (lambda ckpt: _saved([1, 2, 3]), "holds no model weights"),
    ],
    ids=["empty", "text", "truncated", "pickled_object", "no_state_dict", "no_capsnets_metadata", "a_list"],
)
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_unreadable_checkpoints_give_one_readable_error(dr_ckpt, tmp_path, content, message):
    path = tmp_path / "bad.ckpt"
    path.write_bytes(content(dr_ckpt))
    with pytest.raises(ConfigError, match=message) as info:
        load_checkpoint(str(path))
    assert str(path) in str(info.value) and "Fix:" in str(info.value)
    with pytest.raises(ConfigError, match=message):
        check_resume_checkpoint(str(path), build("model=dr_caps", *SMALL_DR_CAPS))


def test_weights_that_do_not_fit_are_refused_in_one_line(dr_ckpt, tmp_path):
    checkpoint = torch.load(dr_ckpt, weights_only=True)
    first = next(iter(checkpoint["state_dict"]))
    checkpoint["state_dict"][first] = torch.zeros(3)
    del checkpoint["state_dict"][list(checkpoint["state_dict"])[-1]]
    checkpoint["state_dict"]["extra.weight"] = torch.zeros(1)
    path = tmp_path / "mismatch.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(ConfigError, match=r"1 missing .*; 1 unexpected \(e\.g\. extra\.weight\); 1 of another shape"):
        load_checkpoint(str(path))


def test_resume_refuses_another_models_checkpoint_and_another_size(dr_ckpt):
    with pytest.raises(ConfigError, match="holds a DRCapsModule, but the config builds a EMCapsModule"):
        check_resume_checkpoint(str(dr_ckpt), build(*TINY_EM))
    with pytest.raises(ConfigError, match="do not fit DRCapsModule as configured"):
        check_resume_checkpoint(str(dr_ckpt), build("model=dr_caps", *SMALL_DR_CAPS, "model.net.primary_types=8"))
    check_resume_checkpoint(str(dr_ckpt), build("model=dr_caps", *SMALL_DR_CAPS))  # its own model: accepted


def test_non_finite_weights_are_refused(dr_ckpt, tmp_path):
    checkpoint = torch.load(dr_ckpt, weights_only=True)
    name = next(k for k, v in checkpoint["state_dict"].items() if v.is_floating_point())
    checkpoint["state_dict"][name] = torch.full_like(checkpoint["state_dict"][name], float("nan"))
    path = tmp_path / "nan.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(ConfigError, match=f"non-finite weights .*{name}"):
        load_checkpoint(str(path))
    with pytest.raises(ConfigError, match="non-finite weights"):
        check_resume_checkpoint(str(path), build("model=dr_caps", *SMALL_DR_CAPS))


def test_train_refuses_a_wrong_checkpoint_before_writing_anything(dr_ckpt, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(
        "train.py",
        *TINY_EM,
        "data=synthetic",
        "data.num_train=32",
        "data.num_val=16",
        "data.num_test=16",
        f"ckpt_path={dr_ckpt}",
        "logger=csv",
        f"hydra.run.dir={run_dir}",
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "holds a DRCapsModule, but the config builds a EMCapsModule" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "csv").exists()
    assert not (run_dir / "metrics.json").exists()
