"""SmallNORBDataModule on a tiny fake smallNORB written in the real file format (Hinton et al. 2018 protocol)."""

from __future__ import annotations

import inspect
import logging
import os
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from capsnets.data import SmallNORBDataModule, write_norb
from capsnets.data import smallnorb as smallnorb_module
from capsnets.data.smallnorb import SMALLNORB_FILES, SMALLNORB_URL, multi_crop_offsets
from capsnets.errors import ConfigError, DataError
from capsnets.utils.resolvers import CONFIG_DIR

from helpers import INSTANCES, N, PREFIX, Probe, fake_part, write_fake_smallnorb

@pytest.fixture(scope="module")
def norb_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple[torch.Tensor, ...]]]:
    """A data_dir with the six gzipped files; tests share its caches (built by the first one)."""
    root = tmp_path_factory.mktemp("norb")
    return root, write_fake_smallnorb(root)


def make(root: Path, **kwargs) -> SmallNORBDataModule:
    return SmallNORBDataModule(data_dir=str(root), download=False, **{"val_size": 6, **kwargs})


def expected_images(raw: torch.Tensor) -> torch.Tensor:
    """The preprocessing spelled out: 96 -> 48 by 2x2 averages, then per-image, per-camera standardisation."""
    x = raw.double().reshape(*raw.shape[:2], 48, 2, 48, 2).mean(dim=(3, 5))  # (n, 2, 48, 48)
    mean, std = x.mean(dim=(2, 3), keepdim=True), x.std(dim=(2, 3), keepdim=True, unbiased=False)
    return ((x - mean) / std).float()


def keys(info: torch.Tensor) -> set[tuple[int, ...]]:
    return {tuple(row) for row in info.tolist()}


def test_standard_split_rows_and_preprocessing(norb_root) -> None:
    root, parts = norb_root
    dm = make(root)
    dm.prepare_data()
    dm.setup()
    assert (len(dm.data_train), len(dm.data_val), len(dm.data_test)) == (N - 6, 6, N)
    assert dm.data_train.images.dtype == torch.float16 and dm.data_train.images.shape == (N - 6, 1, 48, 48)
    assert len(keys(parts["training"][2])) == N  # every fake example has its own info row
    assert keys(dm.info_train) | keys(dm.info_val) == keys(parts["training"][2])
    assert keys(dm.info_train).isdisjoint(keys(dm.info_val))
    rows = [parts["training"][2].tolist().index(r) for r in dm.info_train.tolist()]
    want = expected_images(parts["training"][0][rows][:, :1])  # (n, 1, 48, 48) camera 0
    torch.testing.assert_close(dm.data_train.images.float(), want, atol=2e-2, rtol=1e-2)
    assert dm.data_train.labels.tolist() == parts["training"][1][rows].long().tolist()
    x = dm.data_test.images.float()  # preprocessed: zero mean, unit std per image
    torch.testing.assert_close(x.mean(dim=(2, 3)), torch.zeros(N, 1), atol=1e-2, rtol=0)
    torch.testing.assert_close(x.std(dim=(2, 3), unbiased=False), torch.ones(N, 1), atol=1e-2, rtol=0)


@pytest.mark.parametrize(
    ("split", "column", "train_values", "test_values"),
    [
        ("azimuth", 2, {30, 32, 34, 0, 2, 4}, set(range(6, 29, 2))),  # 300..40 deg / 60..280 deg
        ("elevation", 1, {0, 1, 2}, set(range(3, 9))),
    ],
)
def test_viewpoint_splits(norb_root, split: str, column: int, train_values: set[int], test_values: set[int]) -> None:
    root, parts = norb_root
    dm = make(root, split=split, val_size=3)
    dm.setup()
    seen_train = torch.cat([dm.info_train, dm.info_val])[:, column]
    assert set(seen_train.tolist()) == train_values and set(dm.info_test[:, column].tolist()) == test_values
    n_train = int(torch.isin(parts["training"][2][:, column], torch.tensor(sorted(train_values))).sum())
    n_test = int(torch.isin(parts["testing"][2][:, column], torch.tensor(sorted(test_values))).sum())
    assert (len(dm.data_train) + len(dm.data_val), len(dm.data_test)) == (n_train, n_test)
    assert set(dm.info_train[:, 0].tolist()) <= set(INSTANCES["training"])
    assert set(dm.info_test[:, 0].tolist()) <= set(INSTANCES["testing"])


def test_val_split_seeded(norb_root) -> None:
    root, _ = norb_root

    def val_keys(seed: int) -> set[tuple[int, ...]]:
        dm = make(root, split_seed=seed)
        dm.setup("fit")
        assert dm.data_test is None and keys(dm.info_val).isdisjoint(keys(dm.info_train))
        return keys(dm.info_val)

    assert val_keys(1) == val_keys(1) != val_keys(2)


def test_cache_built_once_reused_and_rebuilt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_fake_smallnorb(tmp_path, gz=False)
    caplog.set_level(logging.INFO, logger="capsnets.data.smallnorb")
    make(tmp_path).prepare_data()
    assert sum("Building" in r.message for r in caplog.records) == 2  # training and testing
    caches = sorted((tmp_path / "smallnorb" / "cache").glob("*.pt"))
    mtimes = [p.stat().st_mtime_ns for p in caches]
    caplog.clear()
    dm = make(tmp_path)
    dm.setup()
    assert not any("Building" in r.message for r in caplog.records)
    assert sum("Reusing" in r.message for r in caplog.records) == 2
    assert [p.stat().st_mtime_ns for p in caches] == mtimes
    info_path = tmp_path / "smallnorb" / f"{PREFIX['testing']}-info.mat"
    info = fake_part("testing", 1)[2]
    info[:, 3] = 5 - info[:, 3]  # a changed source file: different lighting labels
    write_norb(info_path, info)
    os.utime(info_path, ns=(time.time_ns(), info_path.stat().st_mtime_ns + 10**9))  # even on coarse clocks
    caplog.clear()
    dm = make(tmp_path)
    dm.setup("test")
    built = [r.message for r in caplog.records if "Building" in r.message]
    assert len(built) == 1 and "testing" in built[0]
    assert torch.equal(dm.info_test[:, 3], info[:, 3].long())  # the new contents are used
    assert len(list((tmp_path / "smallnorb" / "cache").glob("testing-*.pt"))) == 1  # stale cache removed


def test_stereo_two_channels(norb_root) -> None:
    root, _ = norb_root
    dm = make(root, stereo=True, in_channels=2)
    dm.setup("test")
    x = dm.data_test.images
    assert x.shape == (N, 2, 48, 48) and not torch.equal(x[:, 0], x[:, 1])
    xb, _ = dm.on_after_batch_transfer(next(iter(dm.test_dataloader())), 0)
    assert xb.shape == (32, 2, 32, 32) and xb.dtype == torch.float32


def test_train_batches_random_crops(norb_root) -> None:
    root, _ = norb_root
    dm = make(root, batch_size=16, brightness=0.0, contrast=[1.0, 1.0])
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 48, 48) and x.dtype == torch.float16 and y.dtype == torch.int64
    dm.trainer = SimpleNamespace(training=True)
    out, out_y = dm.on_after_batch_transfer((x, y), 0)
    assert out.shape == (16, 1, 32, 32) and out.dtype == torch.float32 and torch.equal(out_y, y)
    windows = x.float().unfold(2, 32, 1).unfold(3, 32, 1)  # (B, 1, 17, 17, 32, 32): every possible crop
    match = (windows == out[:, :, None, None]).flatten(-2).all(-1)[:, 0]  # (B, 17, 17)
    assert bool(match.flatten(1).any(1).all())  # each output is an exact crop of its own image
    offsets = {tuple(m.nonzero()[0].tolist()) for m in match}
    assert len(offsets) > 1  # each image its own offset
    assert not torch.equal(dm.on_after_batch_transfer((x, y), 0)[0], out)


def test_brightness_and_contrast(tmp_path: Path) -> None:
    dm = SmallNORBDataModule(str(tmp_path), image_size=48, brightness=0.5, contrast=[1.0, 1.0])  # no crop freedom
    x = torch.randn(64, 1, 48, 48)
    delta = dm.train_transform(x) - x  # (B, 1, 48, 48): one constant per image
    assert torch.allclose(delta, delta[:, :, :1, :1].expand_as(delta), atol=1e-5)
    assert delta.abs().max() <= 0.5 and delta[:, 0, 0, 0].std() > 0.1
    dm = SmallNORBDataModule(str(tmp_path), image_size=48, brightness=0.0, contrast=[0.5, 1.5])
    out = dm.train_transform(x)
    dev_in, dev_out = x - x.mean(dim=(2, 3), keepdim=True), out - out.mean(dim=(2, 3), keepdim=True)
    factor = dev_out.std(dim=(2, 3), keepdim=True) / dev_in.std(dim=(2, 3), keepdim=True)  # (B, 1, 1, 1)
    torch.testing.assert_close(dev_out, factor * dev_in, atol=1e-5, rtol=1e-4)  # deviations scaled per image
    assert 0.5 <= factor.min() and factor.max() <= 1.5 and factor.flatten().std() > 0.1
    torch.testing.assert_close(out.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=1e-5, rtol=0)


def test_eval_centre_crop_and_multi_crop(norb_root) -> None:
    root, _ = norb_root
    dm = make(root, batch_size=8)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    x = batch[0].float()
    for trainer in (None, SimpleNamespace(training=False)):
        dm.trainer = trainer
        out = dm.on_after_batch_transfer(batch, 0)[0]
        assert out.dtype == torch.float32 and torch.equal(out, x[:, :, 8:40, 8:40])
    dm5 = make(root, batch_size=8, test_crops=5)
    out = dm5.on_after_batch_transfer(batch, 0)[0]
    assert out.shape == (8, 5, 1, 32, 32)
    corners = [x[..., 8:40, 8:40], x[..., :32, :32], x[..., :32, 16:], x[..., 16:, :32], x[..., 16:, 16:]]
    assert all(torch.equal(out[:, k], want) for k, want in enumerate(corners))
    assert make(root, test_crops=9).on_after_batch_transfer(batch, 0)[0].shape == (8, 9, 1, 32, 32)


def test_multi_crop_offsets() -> None:
    assert multi_crop_offsets(1, 16) == [(8, 8)]
    assert multi_crop_offsets(5, 16) == [(8, 8), (0, 0), (0, 16), (16, 0), (16, 16)]
    assert set(multi_crop_offsets(9, 16)) == {(r, c) for r in (0, 8, 16) for c in (0, 8, 16)}
    every = multi_crop_offsets(17 * 17, 16)
    assert len(set(every)) == 289 and all(0 <= r <= 16 and 0 <= c <= 16 for r, c in every)
    assert multi_crop_offsets(1, 0) == [(0, 0)]
    with pytest.raises(ValueError):
        multi_crop_offsets(5, 1)


def test_missing_files_name_files_and_url(tmp_path: Path) -> None:
    dm = SmallNORBDataModule(str(tmp_path), download=False)
    with pytest.raises(DataError) as info:
        dm.prepare_data()
    msg = str(info.value)
    assert all(name in msg for name in SMALLNORB_FILES) and SMALLNORB_URL in msg
    assert str(tmp_path / "smallnorb") in msg and "data.download" in msg
    with pytest.raises(DataError):
        dm.setup("fit")


def test_failed_download_is_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(smallnorb_module, "SMALLNORB_URL", "http://127.0.0.1:9/")  # connection refused
    start = time.monotonic()
    with pytest.raises(DataError, match="failed") as info:
        SmallNORBDataModule(str(tmp_path)).prepare_data()
    assert time.monotonic() - start < 2.0 and SMALLNORB_FILES[0] in str(info.value)
    assert not list((tmp_path / "smallnorb").glob("*.gz"))  # no half-written file under a real name


def test_train_test_overlap_detected(tmp_path: Path) -> None:
    write_fake_smallnorb(tmp_path)
    folder = tmp_path / "smallnorb"
    for kind in ("dat", "cat", "info"):  # the training part copied over the testing part
        source = folder / f"{PREFIX['training']}-{kind}.mat.gz"
        (folder / f"{PREFIX['testing']}-{kind}.mat.gz").write_bytes(source.read_bytes())
    with pytest.raises(DataError, match="disjoint"):
        make(tmp_path).setup("fit")


@pytest.mark.parametrize(
    ("kwargs", "keys_named"),
    [
        ({"stereo": True}, ("data.in_channels", "data.stereo")),
        ({"in_channels": 2}, ("data.in_channels", "data.stereo")),
        ({"split": "lighting"}, ("data.split", "azimuth", "elevation")),
        ({"image_size": 50}, ("data.image_size", "data.resize")),
        ({"test_crops": 290}, ("data.test_crops", "289")),
        ({"contrast": [1.5, 0.5]}, ("data.contrast[1]",)),
        ({"contrast": 0.5}, ("data.contrast",)),
        ({"brightness": -1}, ("data.brightness",)),
        ({"num_classes": 10}, ("data.num_classes",)),
        ({"stereo": "yes"}, ("data.stereo",)),
    ],
)
def test_config_errors(tmp_path: Path, kwargs: dict, keys_named: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as info:
        SmallNORBDataModule(str(tmp_path), **kwargs)
    assert all(key in str(info.value) for key in keys_named)


def test_hparams_are_plain(tmp_path: Path) -> None:
    dm = SmallNORBDataModule(str(tmp_path), contrast=OmegaConf.create([0.6, 1.4]))
    assert type(dm.hparams["contrast"]) is list and dm.hparams["contrast"] == [0.6, 1.4]
    torch.save(dict(dm.hparams), tmp_path / "h.pt")
    assert torch.load(tmp_path / "h.pt", weights_only=True)["split"] == "standard"


@pytest.mark.parametrize("name", ["smallnorb", "smallnorb_azimuth", "smallnorb_elevation"])
def test_configs(tmp_path: Path, name: str) -> None:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"data={name}", f"paths.data_dir={tmp_path}"])
    params = set(inspect.signature(SmallNORBDataModule.__init__).parameters) - {"self"}
    assert set(cfg.data) - {"_target_"} == params
    dm = instantiate(cfg.data)
    want = {"smallnorb": "standard", "smallnorb_azimuth": "azimuth", "smallnorb_elevation": "elevation"}[name]
    assert dm.split == want and dm.data_dir == tmp_path
    assert (dm.in_channels, dm.image_size, dm.num_classes, dm.resize, dm.batch_size) == (1, 32, 5, 48, 32)


def test_inside_trainer_with_multi_crop(norb_root, tmp_path: Path) -> None:
    root, _ = norb_root
    dm = make(root, batch_size=8, test_crops=5)
    model = Probe(32 * 32, 5)
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_steps=2,
        limit_val_batches=1,
        limit_test_batches=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm, verbose=False)
    assert model.seen["train"][:2] == ((1, 32, 32), torch.float32)
    assert model.seen["val"][:2] == model.seen["test"][:2] == ((5, 1, 32, 32), torch.float32)
    trainer.save_checkpoint(tmp_path / "probe.ckpt")
    ckpt = torch.load(tmp_path / "probe.ckpt", weights_only=True)
    assert ckpt["datamodule_hyper_parameters"]["contrast"] == [0.5, 1.5]
