"""CapsNet (Sabour et al. 2017): architecture, parameter counts, config validation, loss."""

import pytest
import torch

from capsnets.errors import ConfigError
from capsnets.models import CapsNet, DRCapsModule

MNIST = dict(in_channels=1, image_size=28, num_classes=10)
SMALL = dict(conv1_channels=16, primary_types=4, primary_dim=4, class_dim=8, decoder_hidden=[32, 64])
OPT = {"name": "adam", "lr": 1e-3, "weight_decay": 0.0}
SCHED = {"name": "exponential", "decay_rate": 0.96, "decay_samples": 256000}
LOSS = {"m_plus": 0.9, "m_minus": 0.1, "down_weight": 0.5, "recon_weight": 0.0005}


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_paper_parameter_counts_on_mnist():
    net = CapsNet(**MNIST)
    total, decoder = n_params(net), n_params(net.decoder)
    assert total == 8_215_568 and round(total / 1e6, 1) == 8.2
    assert total - decoder == 6_804_224 and round((total - decoder) / 1e6, 1) == 6.8
    assert n_params(CapsNet(**MNIST, reconstruction=False)) == 6_804_224
    assert net.digit.weight.shape == (1152, 10, 16, 8)


def test_shapes_follow_data_config():
    net = CapsNet(in_channels=3, image_size=32, num_classes=5, **SMALL)
    v = net(torch.rand(2, 3, 32, 32))
    assert v.shape == (2, 5, 8)
    assert net.decoder(v).shape == (2, 3, 32, 32)


@pytest.mark.parametrize(
    "override, key",
    [
        ({"primary_dim": 0}, "model.net.primary_dim"),
        ({"class_dim": -3}, "model.net.class_dim"),
        ({"conv1_channels": 2.5}, "model.net.conv1_channels"),
        ({"image_size": 12}, "image_size 12 is too small"),
    ],
)
def test_invalid_net_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        CapsNet(**{**MNIST, **override})


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"optimizer": {**OPT, "lr": 0}}, "model.optimizer.lr"),
        ({"optimizer": {**OPT, "lr": -1e-3}}, "model.optimizer.lr"),
        ({"optimizer": {**OPT, "name": "lbfgs"}}, "model.optimizer.name"),
        ({"scheduler": {**SCHED, "decay_rate": 1.5}}, "model.scheduler.decay_rate"),
        ({"loss": {**LOSS, "recon_weight": -1}}, "model.loss.recon_weight"),
    ],
)
def test_invalid_module_values_name_the_key(kwargs, key):
    args = {"net": {**MNIST, **SMALL}, "loss": LOSS, "optimizer": OPT, "scheduler": SCHED, **kwargs}
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        DRCapsModule(**args)


def make_module(**loss):
    return DRCapsModule(
        net={**MNIST, **SMALL},
        loss={**LOSS, **loss},
        optimizer=OPT,
        scheduler=SCHED,
        routing={"name": "dynamic", "iterations": 3, "detach_inner": False},
    )


def test_loss_is_margin_plus_weighted_reconstruction():
    torch.manual_seed(0)
    module = make_module(recon_weight=0.5)
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    loss, lengths, parts = module.shared_step((x, y), "train")
    assert lengths.shape == (4, 10)
    assert torch.allclose(loss, parts["margin_loss"] + 0.5 * parts["recon_loss"])


def test_decoder_masked_by_label_in_training_and_by_prediction_in_eval(monkeypatch):
    module = make_module()
    seen = []
    original = module.net.decoder.forward

    def spy(v, labels=None):
        seen.append(labels)
        return original(v, labels)

    monkeypatch.setattr(module.net.decoder, "forward", spy)
    batch = (torch.rand(2, 1, 28, 28), torch.tensor([3, 4]))
    module.shared_step(batch, "train")
    module.shared_step(batch, "val")
    module.shared_step(batch, "test")
    assert torch.equal(seen[0], torch.tensor([3, 4]))
    assert seen[1] is None and seen[2] is None


def test_hparams_are_plain_values():
    module = make_module()
    for value in module.hparams.values():
        assert isinstance(value, dict)
        assert all(isinstance(v, (int, float, str, bool, list, type(None))) for v in value.values())


def test_multi_crop_batches_average_scores_over_crops():
    torch.manual_seed(0)
    module = make_module().eval()
    x, y = torch.rand(2, 3, 1, 28, 28), torch.tensor([1, 7])  # (B, n_crops, C, H, W)
    with torch.no_grad():
        _, scores, _ = module._crops_step((x, y), "test")
        per_crop = module.net(x.flatten(0, 1)).norm(dim=-1).view(2, 3, 10)
    assert scores.shape == (2, 10)
    assert torch.allclose(scores, per_crop.mean(dim=1), atol=1e-6)
