"""End-to-end for matrix capsules: smallNORB files in the real format, the margin schedule
under real 2-process DDP (gloo), and resume."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from helpers import write_fake_smallnorb

pytestmark = pytest.mark.slow

TINY_EM = ["model.net.A=8", "model.net.B=4", "model.net.C=4", "model.net.D=4"]


def metric_rows(run_dir: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(open(next(run_dir.glob("csv/version_*/metrics.csv")))))


def test_em_caps_trains_on_smallnorb_files(cli, tmp_path):
    write_fake_smallnorb(tmp_path / "data")
    proc = cli(
        "train.py",
        "model=em_caps",
        "data=smallnorb",
        f"data.data_dir={tmp_path / 'data'}",
        "data.download=false",
        "data.val_size=6",
        "data.batch_size=16",
        *TINY_EM,
        "trainer=cpu",
        "trainer.max_epochs=1",
        "trainer.log_every_n_steps=1",
        f"paths.log_dir={tmp_path}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = metric_rows(tmp_path / "run")
    assert any(r.get("test/acc") for r in rows) and any(r.get("train/margin") for r in rows)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu")
    assert ckpt["capsnets"]["model_class"] == "capsnets.models.em_caps.EMCapsModule"
    assert ckpt["capsnets"]["datamodule_hparams"]["split"] == "standard"


def margins_by_samples(run_dir: Path, samples_per_step: int) -> dict[int, float]:
    """train/margin logged before each step, keyed by the samples seen at that step."""
    return {
        int(r["step"]) * samples_per_step: float(r["train/margin"])
        for r in metric_rows(run_dir)
        if r.get("train/margin")
    }


def em_synthetic(tmp_path: Path, name: str, *extra: str) -> list[str]:
    return [
        "model=em_caps",
        "data=synthetic",
        *TINY_EM,
        "data.image_size=20",
        "data.num_train=256",
        "data.num_val=32",
        "data.num_test=32",
        "model.loss.margin_schedule.schedule=linear",  # the paper's ramp: visibly moves in 512 samples
        "model.loss.margin_schedule.ramp_samples=512",
        "trainer.log_every_n_steps=1",
        "test=false",
        f"paths.log_dir={tmp_path}",
        f"hydra.run.dir={tmp_path / name}",
        *extra,
    ]


def test_margin_schedule_same_for_batch64_one_device_and_batch32_two_ddp_processes(cli, tmp_path):
    single = cli(
        "train.py", *em_synthetic(tmp_path, "single", "trainer=cpu", "data.batch_size=64", "trainer.max_epochs=2")
    )
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = cli(
        "train.py", *em_synthetic(tmp_path, "ddp", "trainer=ddp_sim", "data.batch_size=32", "trainer.max_epochs=2")
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    m_single = margins_by_samples(tmp_path / "single", 64)
    m_ddp = margins_by_samples(tmp_path / "ddp", 64)  # 2 processes x 32 per step
    assert sorted(m_single) == sorted(m_ddp) == [0, 64, 128, 192, 256, 320, 384, 448]
    for samples, margin in m_single.items():
        assert m_ddp[samples] == pytest.approx(margin)
        assert margin == pytest.approx(0.2 + 0.7 * min(samples / 512, 1.0))
    ckpt = torch.load(tmp_path / "ddp" / "checkpoints" / "last.ckpt", map_location="cpu")
    assert ckpt["capsnets"]["samples_seen"] == 512


def test_margin_schedule_continues_exactly_after_resume(cli, tmp_path):
    first = cli("train.py", *em_synthetic(tmp_path, "a", "trainer=cpu", "data.batch_size=64", "trainer.max_epochs=1"))
    assert first.returncode == 0, first.stderr[-3000:]
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    resumed = cli(
        "train.py",
        *em_synthetic(tmp_path, "b", "trainer=cpu", "data.batch_size=64", "trainer.max_epochs=2", f"ckpt_path={last}"),
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    margins = margins_by_samples(tmp_path / "b", 64)
    assert sorted(margins) == [256, 320, 384, 448]
    for samples, margin in margins.items():
        assert margin == pytest.approx(0.2 + 0.7 * min(samples / 512, 1.0))
