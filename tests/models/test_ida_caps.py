"""Capsules with inverted dot-product attention routing (Tsai et al. 2020): parameter count, concurrent routing
against an independent reference of the schedule, routing choices, traces, a learning step."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from capsnets.errors import ConfigError
from capsnets.models import IDACapsModule, IDACapsNet
from capsnets.nn.routing import recording, routing_layers

TINY = dict(
    in_channels=1,
    image_size=8,
    num_classes=4,
    backbone="simple",
    backbone_channels=8,
    backbone_stride=1,
    primary_types=2,
    caps_types=[3],
    caps_kernels=[3],
    caps_strides=[2],
)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_release_cifar10_configuration_has_the_expected_parameter_count():
    net = IDACapsNet(in_channels=3, image_size=32, num_classes=10)
    conv = lambda i, o, k: i * o * k * k  # noqa: E731  (no bias: every conv of the ResNet backbone is followed by BN)
    block = lambda i, o: conv(i, o, 3) + conv(o, o, 3) + 4 * o + ((conv(i, o, 1) + 2 * o) if i != o else 0)  # noqa: E731
    backbone = conv(3, 64, 3) + 2 * 64 + 3 * block(64, 64) + block(64, 128) + 3 * block(128, 128)
    primary = conv(128, 32 * 16, 1) + 2 * 16  # 1x1 conv to 32 x 16 pose elements, LayerNorm gain and bias
    caps = 2 * (9 * 32 * 32 * 16 + 2 * 16)  # two 3x3 conv capsule layers of 4x4 W, each routing's LayerNorm
    classes = 5 * 5 * 32 * 10 * 16 + 2 * 16  # 5x5 grid of 32 types to 10 classes
    assert n_params(net) == backbone + primary + caps + classes + 17 == 1_828_817  # + the shared 16 -> 1 classifier
    assert [layer.output_size(s) for layer, s in zip(net.caps, (16, 7))] == [7, 5]  # the release's 16 -> 7 -> 5 grids


def reference_votes(pose, weight, kernel, stride):
    """v_ij = M_i W_ij by explicit 4x4 products, for every patch (fully connected: kernel None)."""
    b, h, w, t_in, _ = pose.shape
    M = pose.view(b, h, w, t_in, 4, 4)
    W = weight  # (K, T_in, T_out, 4, 4)
    if kernel is None:
        children = [(y, x) for y in range(h) for x in range(w)]
        patch = torch.stack([M[:, y, x] for y, x in children], dim=1)  # (B, K, T_in, 4, 4)
        votes = torch.einsum("bkiac,kijcd->bkijad", patch, W).reshape(b, 1, len(children), t_in, W.shape[2], 16)
        return votes
    out = (h - kernel) // stride + 1
    patches = []
    for oy in range(out):
        for ox in range(out):
            kids = [M[:, oy * stride + ky, ox * stride + kx] for ky in range(kernel) for kx in range(kernel)]
            patches.append(torch.einsum("bkiac,kijcd->bkijad", torch.stack(kids, dim=1), W))
    return torch.stack(patches, dim=1).reshape(b, out * out, kernel * kernel, t_in, W.shape[2], 16)


def reference_step(votes, previous, norm):
    if previous is None:
        r = torch.full(votes.shape[:5], 1.0 / votes.shape[4], dtype=votes.dtype)
    else:
        r = torch.softmax((votes * previous[:, :, None, None]).sum(-1) / 4.0, dim=-1)  # patch: over the types
    return F.layer_norm((r[..., None] * votes).sum(dim=(2, 3)), (16,), norm.weight, norm.bias)


@pytest.mark.parametrize("iterations", [1, 2, 3])
def test_concurrent_routing_follows_the_papers_schedule(iterations):
    torch.manual_seed(iterations)
    net = IDACapsNet(**TINY, routing={"name": "inverted_dot_product", "iterations": iterations}).double().eval()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    layers = [net.caps[0], net.classes]
    specs = [(3, 2), (None, 1)]
    p0 = net.primary_capsules(x)  # (B, 8, 8, 2, 16)
    grids = [(3, 3), (1, 1)]  # the parents' grid of each layer

    def route(i, below, previous):  # layer i's parents from the poses below and its parents' previous poses
        votes = reference_votes(below, layers[i].weight, *specs[i])
        prev = previous.reshape(votes.shape[0], votes.shape[1], -1, 16) if previous is not None else None
        return reference_step(votes, prev, layers[i].routing.norm).reshape(2, *grids[i], -1, 16)

    values = [p0]
    for i in range(2):  # initialising pass, layer after layer
        values.append(route(i, values[i], None))
    for _ in range(iterations - 1):  # every layer from the previous round's poses
        values = [p0] + [route(i, values[i], values[i + 1]) for i in range(2)]
    poses, logits = net(x)
    assert torch.allclose(poses, values[-1].reshape(2, 4, 16), atol=1e-10)
    assert torch.allclose(logits, net.classifier(values[-1].reshape(2, 4, 16)).squeeze(-1), atol=1e-10)
    sequential = IDACapsNet(
        **TINY, routing_mode="sequential", routing={"name": "inverted_dot_product", "iterations": iterations}
    )
    sequential.load_state_dict(net.state_dict())
    same = torch.allclose(sequential.double().eval()(x)[0], poses, atol=1e-10)
    assert same == (iterations == 1)  # one iteration: both schedules are the uniform pass; more: they differ


def test_traces_record_every_iteration_of_every_layer_in_both_schedules():
    for mode in ("concurrent", "sequential"):
        net = IDACapsNet(**TINY, routing_mode=mode, routing={"name": "inverted_dot_product", "iterations": 3})
        with recording(net) as layers:
            net(torch.rand(2, 1, 8, 8))
            traces = {name: layer.trace for name, layer in layers.items()}
        assert set(traces) == {"caps.0", "classes"}, mode
        assert all(len(t.assignments) == 3 and len(t.activations) == 3 for t in traces.values()), mode
        assert all(layer.trace is None for layer in routing_layers(net).values())


def test_any_pose_routing_fits_and_other_kinds_are_refused():
    for routing in ({"name": "uniform"}, {"name": "random", "seed": 3}):
        net = IDACapsNet(**TINY, routing=routing)
        assert net(torch.rand(2, 1, 8, 8))[1].shape == (2, 4)
        assert {r.name for r in routing_layers(net).values()} == {routing["name"]}
    with pytest.raises(ConfigError, match="does not support pose capsules.*inverted_dot_product, random, uniform"):
        IDACapsNet(**TINY, routing={"name": "dynamic"})
    with pytest.raises(ConfigError, match="model.net.routing_mode"):
        IDACapsNet(**{**TINY, "routing_mode": "parallel"})
    with pytest.raises(ConfigError, match="too small for the capsule layers"):
        IDACapsNet(**{**TINY, "image_size": 2})


def test_a_few_steps_lower_the_cross_entropy_on_a_fixed_batch():
    torch.manual_seed(0)
    module = IDACapsModule(net=TINY, optimizer={"name": "adam", "lr": 3e-3}, scheduler={"name": "none"}, routing=None)
    x, y = torch.rand(16, 1, 8, 8), torch.arange(16) % 4
    opt = torch.optim.Adam(module.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss, scores, parts = module.shared_step((x, y), "train")
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert math.isclose(losses[0], math.log(4), rel_tol=0.2)  # chance at the start
    assert losses[-1] < 0.6 * losses[0] and torch.allclose(scores.sum(-1), torch.ones(16))


@pytest.mark.parametrize("mode", ["concurrent", "sequential"])
def test_fused_and_reference_routing_train_the_network_alike(mode):
    # the fused implementation (the default) in the network's own schedules: same poses, logits and gradients of
    # every parameter (concurrent routing hands each step parents' poses that carry gradients)
    nets = []
    for impl in ("reference", "fused"):
        torch.manual_seed(0)
        routing = {"name": "inverted_dot_product", "impl": impl, "iterations": 3}
        nets.append(IDACapsNet(**TINY, routing_mode=mode, routing=routing).double().train())
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    results = []
    for net in nets:
        poses, logits = net(x)
        loss = (torch.cos(2 * poses)).sum() + F.cross_entropy(logits, torch.tensor([0, 1, 3]))
        results.append((poses, logits, torch.autograd.grad(loss, list(net.parameters()))))
    (p0, l0, g0), (p1, l1, g1) = results
    assert torch.allclose(p0, p1, atol=1e-10) and torch.allclose(l0, l1, atol=1e-10)
    assert all(torch.allclose(a, b, atol=1e-9) for a, b in zip(g0, g1))
    assert sum(a.abs().sum() for a in g0) > 0
