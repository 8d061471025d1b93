"""Efficient-CapsNet (Mazzia et al. 2021): the paper's parameter count, shapes, routing choices, a learning step."""

from __future__ import annotations

import pytest
import torch

from capsnets.errors import ConfigError
from capsnets.models import CapsNet, EfficientCapsModule, EfficientCapsNet
from capsnets.nn.routing import routing_layers

MNIST = dict(in_channels=1, image_size=28, num_classes=10)
OPT = {"name": "adam", "lr": 5e-4, "weight_decay": 0.0}
SCHED = {"name": "exponential", "decay_rate": 0.97, "decay_samples": 60000}
LOSS = {"m_plus": 0.9, "m_minus": 0.1, "down_weight": 0.5, "recon_weight": 0.0005}


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def test_efficient_capsnet_has_the_papers_parameter_count():
    net = EfficientCapsNet(**MNIST, reconstruction=False)
    assert n_params(net) == 161_824 and round(n_params(net) / 1e3) == 162  # paper: "161K"
    assert net.digit.weight.shape == (16, 10, 16, 8)  # 16 primary capsules of 8D -> 10 of 16D
    assert net.digit.routing.name == "self_attention" and net.digit.routing.log_prior.shape == (16, 1, 10)
    with_decoder = EfficientCapsNet(**MNIST)
    assert n_params(with_decoder) - n_params(with_decoder.decoder) == 161_824
    # the He-normal init of W as the release draws it: fan-in N_out x N_in x D_in = 1280
    assert abs(net.digit.weight.std().item() - (2 / 1280) ** 0.5) < 0.003


def test_shapes_follow_the_data_and_any_vector_routing_fits():
    net = EfficientCapsNet(in_channels=3, image_size=32, num_classes=5)
    v = net(torch.rand(2, 3, 32, 32))
    assert v.shape == (2, 5, 16) and (v.norm(dim=-1) < 1).all()
    assert net.digit.weight.shape[0] == 3 * 3 * 16  # a 3x3 grid after the 9x9 depthwise conv: 16 capsules per cell
    assert net.decoder(v).shape == (2, 3, 32, 32)
    for routing in ({"name": "dynamic", "iterations": 3}, {"name": "uniform"}, {"name": "random"}):
        net = EfficientCapsNet(**MNIST, routing=routing, reconstruction=False)
        assert net(torch.rand(2, 1, 28, 28)).shape == (2, 10, 16)
        assert [r.name for r in routing_layers(net).values()] == [routing["name"]]


def test_self_attention_routing_on_the_dr_caps_backbone():
    net = CapsNet(**MNIST, conv1_channels=16, primary_types=4, reconstruction=False, routing={"name": "self_attention"})
    assert net.digit.routing.log_prior.shape == (4 * 6 * 6, 1, 10)
    assert net(torch.rand(2, 1, 28, 28)).shape == (2, 10, 16)


@pytest.mark.parametrize(
    "override, match",
    [
        ({"conv_channels": [32, 64], "conv_kernels": [5, 3, 3]}, "same length"),
        ({"conv_channels": [32, 64, 64, 100]}, "multiple of model.net.primary_dim"),
        ({"image_size": 16}, "too small"),
        ({"conv_strides": [1, 1, 0, 2]}, r"model.net.conv_strides\[2\]"),
        ({"weight_init_std": -1.0}, "model.net.weight_init_std"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        EfficientCapsNet(**{**MNIST, **override})


def test_a_few_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    module = EfficientCapsModule(net={**MNIST}, loss=LOSS, optimizer=OPT, scheduler=SCHED)
    x, y = torch.rand(16, 1, 28, 28), torch.arange(16) % 10
    opt = torch.optim.Adam(module.parameters(), lr=2e-3)
    first = None
    for _ in range(15):
        loss, lengths, parts = module.shared_step((x, y), "train")
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert {"margin_loss", "recon_loss"} <= set(parts) and lengths.shape == (16, 10)
    assert loss.item() < 0.7 * first
