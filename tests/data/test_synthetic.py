"""SyntheticDataModule: deterministic, uint8 through the shared batch path, and learnable."""

from __future__ import annotations

import pytest
import torch

from capsnets.data import SyntheticDataModule
from capsnets.errors import ConfigError


def make(**kwargs: object) -> SyntheticDataModule:
    dm = SyntheticDataModule(**kwargs)
    dm.setup("fit")
    return dm


def test_shapes_and_batches() -> None:
    dm = make(num_train=40, num_val=8, num_test=12, batch_size=16, in_channels=2, image_size=20, num_classes=4)
    assert (len(dm.data_train), len(dm.data_val), len(dm.data_test)) == (40, 8, 12)
    assert torch.bincount(dm.data_train.labels).tolist() == [10] * 4  # balanced
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 2, 20, 20) and x.dtype == torch.uint8 and y.dtype == torch.int64
    xf, _ = dm.on_after_batch_transfer((x, y), 0)
    assert xf.dtype == torch.float32 and 0 <= xf.min() and xf.max() <= 1


def test_deterministic_given_seed() -> None:
    a, b, c = make(seed=5), make(seed=5), make(seed=6)
    for split in ("data_train", "data_val", "data_test"):
        assert torch.equal(getattr(a, split).images, getattr(b, split).images)
        assert torch.equal(getattr(a, split).labels, getattr(b, split).labels)
    assert not torch.equal(a.data_train.images, c.data_train.images)
    # the test split does not depend on the size of the training split
    assert torch.equal(make(seed=5, num_train=64).data_test.images, a.data_test.images)


@pytest.mark.parametrize("seed", [0, 1])
def test_classes_are_learnable(seed: int) -> None:
    """A linear classifier trained for 50 steps beats chance (10%) by a wide margin on the test split."""
    dm = make(seed=seed)
    torch.manual_seed(0)
    x_tr = dm.data_train.images.flatten(1).float() / 255  # (N, 784)
    x_te = dm.data_test.images.flatten(1).float() / 255
    model = torch.nn.Linear(x_tr.shape[1], dm.num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(50):
        idx = torch.randint(0, len(x_tr), (32,))
        loss = torch.nn.functional.cross_entropy(model(x_tr[idx]), dm.data_train.labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    accuracy = (model(x_te).argmax(1) == dm.data_test.labels).float().mean().item()
    assert accuracy > 0.6


@pytest.mark.parametrize(("kwargs", "key"), [({"batch_size": 0}, "data.batch_size"), ({"noise": -0.1}, "data.noise"),
                                             ({"num_train": 0}, "data.num_train"), ({"max_shift": -1}, "data.max_shift")])
def test_bad_config_values(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        SyntheticDataModule(**kwargs)
