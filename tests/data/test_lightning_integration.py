"""The DataModules inside a real Trainer: float batches on the device, checkpoints loadable with weights_only."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf

from capsnets.data import MNISTDataModule, SyntheticDataModule

from helpers import Probe

def trainer(tmp_path: Path) -> L.Trainer:
    return L.Trainer(default_root_dir=tmp_path, max_steps=2, limit_val_batches=1, limit_test_batches=1, accelerator="cpu",
                     logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)


def test_fit_test_and_checkpoint(mnist_root: Path, tmp_path: Path) -> None:
    dm = MNISTDataModule(data_dir=str(mnist_root), val_size=10, batch_size=8, download=False,
                         search_dirs=OmegaConf.create(["package:mnist_sample"]))
    model, t = Probe(28 * 28, 10), trainer(tmp_path)
    t.fit(model, datamodule=dm)
    t.test(model, datamodule=dm, verbose=False)
    for stage in ("train", "val", "test"):
        _, dtype, low, high = model.seen[stage]
        assert dtype == torch.float32 and 0.0 <= low and high <= 1.0
    t.save_checkpoint(tmp_path / "probe.ckpt")
    ckpt = torch.load(tmp_path / "probe.ckpt", weights_only=True)
    assert ckpt["datamodule_hyper_parameters"]["search_dirs"] == ["package:mnist_sample"]


def test_synthetic_fit(tmp_path: Path) -> None:
    model = Probe(28 * 28, 10)
    trainer(tmp_path).fit(model, datamodule=SyntheticDataModule(shift_pixels=1))
    assert model.seen["train"][1] == torch.float32
