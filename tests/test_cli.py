"""End-to-end through the real command lines: train -> checkpoint -> eval -> resume."""

from __future__ import annotations

import os
import re

import pytest
import torch

from capsnets.utils.allocator import find_jemalloc

from helpers import SMALL_DR_CAPS, last_metric, synthetic_run, write_tiny_mnist

pytestmark = pytest.mark.slow


def test_train_eval_resume_on_synthetic(cli, tmp_path):
    run1 = tmp_path / "run1"
    proc = cli("train.py", *synthetic_run(tmp_path, "run1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = run1 / "checkpoints" / "last.ckpt"
    best = next((run1 / "checkpoints").glob("epoch_*.ckpt"))
    assert last.is_file()
    assert "Best checkpoint" in proc.stdout and str(run1) in proc.stdout
    # train.py re-executed itself with jemalloc where the machine has it (capsnets/utils/allocator.py)
    assert f"CPU memory allocator: {'jemalloc' if find_jemalloc(os.environ) else 'system'}" in proc.stdout
    test_acc = last_metric(run1, "test/acc")

    # the checkpoint is plain data: PyTorch's default weights_only=True reads it
    ckpt = torch.load(last, map_location="cpu")
    assert ckpt["capsnets"]["model_class"] == "capsnets.models.dr_caps.DRCapsModule"
    assert ckpt["capsnets"]["samples_seen"] == 128
    steps_epoch1 = ckpt["global_step"]
    assert steps_epoch1 == 4  # 128 samples / batch 32

    # eval.py on the best checkpoint reproduces the test accuracy logged by train.py
    proc = cli("eval.py", f"ckpt_path={best}", f"paths.log_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'eval'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    match = re.search(r"test/acc: ([0-9.]+)", proc.stdout)
    assert match, proc.stdout[-2000:]
    assert float(match.group(1)) == pytest.approx(test_acc, abs=1e-6)

    # resume from last.ckpt: the step count and the samples counter continue
    proc = cli("train.py", *synthetic_run(tmp_path, "run2", "trainer.max_epochs=2", f"ckpt_path={last}"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt2 = torch.load(tmp_path / "run2" / "checkpoints" / "last.ckpt", map_location="cpu")
    assert ckpt2["global_step"] == 2 * steps_epoch1
    assert ckpt2["capsnets"]["samples_seen"] == 256
    assert ckpt2["epoch"] == 1


def test_train_on_tiny_idx_files(cli, tmp_path):
    data = tmp_path / "data"
    write_tiny_mnist(data)
    proc = cli(
        "train.py",
        "data=mnist",
        f"data.data_dir={data}",
        "data.download=false",
        "data.val_size=32",
        "data.batch_size=32",
        "data.num_workers=0",
        *SMALL_DR_CAPS,
        "trainer=cpu",
        "trainer.max_epochs=1",
        f"paths.log_dir={tmp_path}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert 0.0 <= last_metric(tmp_path / "run", "test/acc") <= 1.0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.routing.iterations=0"], "model.routing.iterations must be an integer >= 1"),
        (["model/routing=em"], "routing 'em' does not support vector capsules"),
        (["+model.routing.iteration=2"], "iteration is not a setting of routing 'dynamic'"),
        (["model.net.class_dim=0"], "model.net.class_dim must be an integer >= 1"),
        (["model.optimizer.lr=-0.1"], "model.optimizer.lr must be a finite number > 0"),
        (["data.batch_size=0"], "data.batch_size"),
        (["model=does_not_exist"], "Available options"),
        (["ckpt_path=/nonexistent/last.ckpt"], "ckpt_path='/nonexistent/last.ckpt' is not a file"),
        (["model.scheduler.decay_rate=2"], "model.scheduler.decay_rate must be a number in [1e-12, 1.0]"),
        (["nonfinite=ignore"], "nonfinite must be one of stop, skip"),
    ],
)
def test_bad_config_fails_before_training(cli, tmp_path, overrides, message):
    proc = cli("train.py", *synthetic_run(tmp_path, "bad"), *overrides)
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout, (proc.stderr + proc.stdout)[-3000:]
    assert not (tmp_path / "bad" / "checkpoints").exists()
    if overrides != ["model=does_not_exist"]:  # capsnets' own checks: one line, exit 2, no traceback
        assert proc.returncode == 2 and proc.stderr.splitlines()[-1].startswith("Error: ")
        assert "Traceback" not in proc.stderr and "Error executing job" not in proc.stderr


def test_missing_dataset_without_network_names_files_and_fixes(cli, tmp_path):
    proc = cli(
        "train.py",
        "data=mnist",
        f"data.data_dir={tmp_path / 'empty'}",
        "data.download=false",
        f"paths.log_dir={tmp_path}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    out = proc.stderr + proc.stdout
    assert proc.returncode != 0
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        assert name in out
    assert str(tmp_path / "empty") in out and "data=mnist_sample" in out
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_existing_checkpoints_are_not_touched_by_a_failing_run(cli, tmp_path):
    ckpt_dir = tmp_path / "run" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / "last.ckpt").write_bytes(b"precious")
    proc = cli("train.py", *synthetic_run(tmp_path, "run"), "model.routing.iterations=0")
    assert proc.returncode != 0
    assert (ckpt_dir / "last.ckpt").read_bytes() == b"precious"


@pytest.mark.parametrize(
    "extra, produced",
    [
        (["debug=fdr"], None),  # one batch of each split, no checkpoint
        (["debug=limit", "logger=tensorboard"], "tensorboard/version_0/events.out.tfevents.*"),
        (["debug=overfit", "trainer.max_epochs=2", "logger=none", "test=false"], "checkpoints/last.ckpt"),
    ],
)
def test_debug_modes_and_loggers(cli, tmp_path, extra, produced):
    proc = cli("train.py", *synthetic_run(tmp_path, "dbg"), *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if produced is None:
        assert not (tmp_path / "dbg" / "checkpoints").exists()
    else:
        assert list((tmp_path / "dbg").glob(produced)), sorted(str(p) for p in (tmp_path / "dbg").rglob("*"))


@pytest.mark.parametrize(
    "model",
    [
        "cnn_sabour2017",
        "cnn_hinton2018",
        "em_caps_small",
        "em_caps_small model/routing=vb",
        "efficient_caps",
        "ida_caps",
        "ida_caps model/routing=random",
    ],
)
def test_every_other_model_runs_through_the_cli(cli, tmp_path, model):
    model, *routing = model.split()
    proc = cli(
        "train.py",
        f"model={model}",
        *routing,
        "data=synthetic",
        "debug=fdr",
        "data.batch_size=8",
        f"paths.log_dir={tmp_path}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test/acc" in proc.stdout
