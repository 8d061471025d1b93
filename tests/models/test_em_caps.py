"""Matrix capsules with EM routing (Hinton et al. 2018): parameter counts, losses, callbacks."""

import pytest
import torch

from capsnets.callbacks import SpreadMarginSchedule
from capsnets.errors import ConfigError
from capsnets.models import DRCapsModule, EMCapsModule, EMCapsNet

NORB = dict(in_channels=1, image_size=32, num_classes=5)
TINY = dict(A=8, B=4, C=4, D=4)
OPT = {"name": "adam", "lr": 3e-3, "weight_decay": 0.0}
SCHED = {"name": "none"}
SPREAD = {"name": "spread", "margin_schedule": {"schedule": "linear", "ramp_samples": 1000}}


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_paper_parameter_counts_on_smallnorb():
    # Conv1 (25A + A) + primary ((A+1) B 17) + ConvCaps (9 in out 16 + 2 out) x 2 + class (D K 16 + 2K)
    main = n_params(EMCapsNet(**NORB))
    small = n_params(EMCapsNet(**NORB, A=64, B=8, C=16, D=16))
    assert main == 832 + 33 * 32 * 17 + 2 * (9 * 32 * 32 * 16 + 64) + 32 * 5 * 16 + 10 == 316_394
    assert small == 1_664 + 65 * 8 * 17 + (9 * 8 * 16 * 16 + 32) + (9 * 16 * 16 * 16 + 32) + 16 * 5 * 16 + 10 == 67_154
    # the paper's rounded "310K" and "68K"
    assert abs(main - 310_000) / 310_000 < 0.025 and abs(small - 68_000) / 68_000 < 0.015


def test_vector_pose_ablation_has_16x16_transforms():
    net = EMCapsNet(**NORB, **TINY, pose="vector")
    assert net.caps1.weight[0, 0, 0].shape == (16, 16)
    pose, a = net(torch.randn(2, 1, 32, 32))
    assert pose.shape == (2, 5, 16) and a.shape == (2, 5)


def test_shapes_follow_data_config_and_grid_check():
    _, a = EMCapsNet(in_channels=2, image_size=40, num_classes=7, **TINY)(torch.randn(2, 2, 40, 40))
    assert a.shape == (2, 7) and ((a >= 0) & (a <= 1)).all()
    with pytest.raises(ConfigError, match="image_size 12 is too small"):
        EMCapsNet(in_channels=1, image_size=12, num_classes=5)


@pytest.mark.parametrize(
    "override, key",
    [
        ({"routing": {"name": "em", "iterations": 0}}, "model.routing.iterations"),
        ({"pose": "tensor"}, "model.net.pose"),
        ({"routing": {"name": "em", "lambda_schedule": "cosine"}}, "model.routing.lambda_schedule"),
        ({"routing": {"name": "em", "var_floor": 0.0}}, "model.routing.var_floor"),
        ({"A": 0}, "model.net.A"),
    ],
)
def test_invalid_net_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        EMCapsNet(**NORB, **{**TINY, **override})


def make(loss):
    return EMCapsModule(net={**NORB, **TINY}, loss=loss, optimizer=OPT, scheduler=SCHED)


def test_spread_loss_model_supplies_its_margin_schedule():
    module = make(SPREAD)
    callbacks = module.configure_callbacks()
    assert len(callbacks) == 1 and isinstance(callbacks[0], SpreadMarginSchedule)
    assert callbacks[0].ramp_samples == 1000 and module.spread_margin == pytest.approx(0.2)
    margin = make({"name": "margin", "m_plus": 0.9, "m_minus": 0.1, "down_weight": 0.5})
    assert margin.configure_callbacks() == []
    dr = DRCapsModule(
        net=dict(
            in_channels=1,
            image_size=28,
            num_classes=10,
            conv1_channels=8,
            primary_types=2,
            primary_dim=4,
            class_dim=4,
            decoder_hidden=[8],
        ),
        loss=dict(m_plus=0.9, m_minus=0.1, down_weight=0.5, recon_weight=0.0005),
        optimizer=OPT,
        scheduler=SCHED,
    )
    assert not dr.configure_callbacks()


@pytest.mark.parametrize(
    "loss", [SPREAD, {"name": "margin", "m_plus": 0.9, "m_minus": 0.1, "down_weight": 0.5}, {"name": "cross_entropy"}]
)
def test_each_loss_gives_finite_gradients(loss):
    torch.manual_seed(0)
    module = make(loss)
    x, y = torch.randn(4, 1, 32, 32), torch.tensor([0, 1, 2, 3])
    value, scores, _ = module.shared_step((x, y), "train")
    value.backward()
    assert torch.isfinite(value) and scores.shape == (4, 5)
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)


def test_spread_loss_uses_current_margin():
    torch.manual_seed(0)
    module = make(SPREAD)
    batch = (torch.randn(4, 1, 32, 32), torch.tensor([0, 1, 2, 3]))
    low = module.shared_step(batch, "train")[0]
    module.spread_margin = 0.9
    assert module.shared_step(batch, "train")[0] > low


def test_bad_loss_settings_fail_early():
    with pytest.raises(ConfigError, match="model.loss.name"):
        make({"name": "hinge"})
    with pytest.raises(ConfigError, match="model.loss.margin_schedule.schedule"):
        make({"name": "spread", "margin_schedule": {"schedule": "cosine"}})


@pytest.mark.parametrize("images", ["zeros", "constant", "huge"])
def test_adversarial_images_stay_finite(images):
    torch.manual_seed(0)
    module = make(SPREAD)
    x = {
        "zeros": torch.zeros(3, 1, 32, 32),
        "constant": torch.full((3, 1, 32, 32), 0.7),
        "huge": torch.randn(3, 1, 32, 32) * 1e4,
    }[images]
    loss, scores, _ = module.shared_step((x, torch.tensor([0, 1, 2])), "train")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(scores).all()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)


def test_routing_config_reaches_every_routing_layer():
    net = EMCapsNet(
        **NORB, **TINY, routing={"name": "em", "impl": "reference", "moment_dtype": "float32", "iterations": 2}
    )
    layers = (net.caps1.routing, net.caps2.routing, net.classes.routing)
    assert {(r.impl, r.moment_dtype, r.iterations) for r in layers} == {("reference", "float32", 2)}
    assert [r.role for r in layers] == ["hidden", "hidden", "class"]
    assert len({id(r.beta_a) for r in layers}) == 3  # each layer its own learned betas
    default = EMCapsNet(**NORB, **TINY).caps1.routing
    assert (default.name, default.impl, default.moment_dtype) == ("em", "fused", "float32")  # fast and exact by default
    with pytest.raises(ConfigError, match="model.routing.moment_dtype"):
        EMCapsNet(**NORB, **TINY, routing={"name": "em", "moment_dtype": "float16"})
    with pytest.raises(ConfigError, match="does not support matrix capsules"):
        EMCapsNet(**NORB, **TINY, routing={"name": "dynamic"})


def test_init_std_and_coordinate_scale_reach_their_layers():
    torch.manual_seed(0)
    net = EMCapsNet(**NORB, A=8, B=8, C=16, D=16, caps_init_std=0.3, class_init_std=0.01, coordinate_scale=0.16)
    assert abs(net.caps1.weight.std().item() - 0.3) < 0.02 and abs(net.caps2.weight.std().item() - 0.3) < 0.02
    assert abs(net.classes.weight.std().item() - 0.01) < 0.002
    default = EMCapsNet(**NORB, A=8, B=8, C=16, D=16)
    assert abs(default.caps1.weight.std().item() - 0.5) < 0.03 and default.classes.coordinate_scale == 1.0
    pose = torch.zeros(1, 2, 2, 16, 16)
    votes = net.classes.votes(pose)  # zero poses: the votes are the scaled coordinates alone
    assert torch.allclose(votes[0, 3, 0, 0, [3, 7]], torch.tensor([0.75, 0.75]) * 0.16)
    with pytest.raises(ConfigError, match="model.net.class_init_std"):
        EMCapsNet(**NORB, **TINY, class_init_std=0.0)


def test_conv1_norm_batch_adds_batchnorm_to_conv1_and_changes_nothing_else():
    torch.manual_seed(0)
    plain = EMCapsNet(**NORB, **TINY)
    torch.manual_seed(0)
    normed = EMCapsNet(**NORB, **TINY, conv1_norm="batch")
    assert [type(m) for m in plain.conv1] == [torch.nn.Conv2d, torch.nn.ReLU]
    assert [type(m) for m in normed.conv1] == [torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.ReLU]
    assert plain.conv1[0].bias is not None and normed.conv1[0].bias is None  # BN's shift replaces the conv bias
    A = plain.conv1[0].out_channels
    assert n_params(normed) - n_params(plain) == 2 * A - A  # BN gain + shift, minus the conv bias
    rest = lambda net: {k: v for k, v in net.state_dict().items() if not k.startswith("conv1.")}  # noqa: E731
    assert rest(plain).keys() == rest(normed).keys()
    # training-mode features after Conv1 are normalised per channel (before the ReLU)
    normed.train()
    x = torch.rand(8, 1, 32, 32)
    pre = normed.conv1[1](normed.conv1[0](x))
    assert torch.allclose(pre.mean((0, 2, 3)), torch.zeros(A), atol=1e-5)
    with pytest.raises(ConfigError, match="model.net.conv1_norm"):
        EMCapsNet(**NORB, **TINY, conv1_norm="layer")
