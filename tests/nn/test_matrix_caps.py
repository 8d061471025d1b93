"""Matrix capsule layers (Hinton et al. 2018): shapes, parameter counts, coordinate addition,
the vector-pose ablation and numerical health."""

from __future__ import annotations

import pytest
import torch

from capsnets.nn.class_caps import coordinate_offsets
from capsnets.nn.matrix_caps import PrimaryMatrixCapsules, capsule_votes

from helpers import class_layer, conv_layer, final_assignments


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_primary_shapes_range_and_params():
    layer = PrimaryMatrixCapsules(32, num_types=8)
    pose, a = layer(torch.randn(2, 32, 14, 14))
    assert pose.shape == (2, 14, 14, 8, 16) and a.shape == (2, 14, 14, 8)
    assert (a > 0).all() and (a < 1).all()
    assert n_params(layer) == (32 + 1) * 8 * 17  # 1x1 convs with bias: 16 pose + 1 activation channel per type


def test_primary_pose_layout_matches_conv_channels():
    layer = PrimaryMatrixCapsules(3, num_types=2)
    x = torch.randn(1, 3, 4, 5)
    pose, _ = layer(x)
    channels = layer.pose_conv(x)  # (1, T*16, H, W), type-major
    assert torch.equal(pose[0, 2, 3, 1], channels[0, 16:32, 2, 3])


@pytest.mark.parametrize("pose_kind,per_w", [("matrix", 16), ("vector", 256)])
def test_conv_shapes_and_params(pose_kind, per_w):
    layer = conv_layer(32, 32, 3, 2, pose=pose_kind)
    assert n_params(layer) == 3 * 3 * 32 * 32 * per_w + 2 * 32
    assert layer.weight.shape[-2:] == ((4, 4) if pose_kind == "matrix" else (16, 16))
    small = conv_layer(4, 3, 3, 2, pose=pose_kind)
    (pose, a), R = final_assignments(small, torch.randn(2, 7, 7, 4, 16), torch.rand(2, 7, 7, 4))
    assert pose.shape == (2, 3, 3, 3, 16) and a.shape == (2, 3, 3, 3)
    assert R.shape == (2, 9, 9, 4, 3)  # (B, P = 3x3 positions, K = 3x3 offsets, T_in, T_out)


@pytest.mark.parametrize("pose_kind,per_w", [("matrix", 16), ("vector", 256)])
def test_class_shapes_and_params(pose_kind, per_w):
    layer = class_layer(32, 5, pose=pose_kind)
    assert n_params(layer) == 32 * 5 * per_w + 2 * 5
    (pose, a), R = final_assignments(layer, torch.randn(3, 4, 4, 32, 16), torch.rand(3, 4, 4, 32))
    assert pose.shape == (3, 5, 16) and a.shape == (3, 5)
    assert (a > 0).all() and (a < 1).all()
    assert torch.allclose(R.sum(-1), torch.ones(3, 1, 16, 32), atol=1e-5)


def test_votes_are_pose_times_w():
    M, W = torch.randn(2, 3, 5, 2, 16), torch.randn(5, 2, 3, 4, 4)  # (B, N, K, T_in, 16), (K, T_in, T_out, 4, 4)
    V = capsule_votes(M, W)
    assert V.shape == (2, 3, 5, 2, 3, 16)
    assert torch.allclose(V[1, 2, 4, 1, 2], (M[1, 2, 4, 1].view(4, 4) @ W[4, 1, 2]).flatten(), atol=1e-6)
    W16 = torch.randn(5, 2, 3, 16, 16)
    V16 = capsule_votes(M, W16, pose_kind="vector")
    assert torch.allclose(V16[1, 2, 4, 1, 2], M[1, 2, 4, 1] @ W16[4, 1, 2], atol=1e-5)


@pytest.mark.parametrize("pose_kind,elements", [("matrix", (3, 7)), ("vector", (0, 1))])
def test_coordinate_addition_adds_scaled_centre_to_two_elements_only(pose_kind, elements):
    torch.manual_seed(0)
    h, w = 3, 5
    layer = class_layer(2, 4, pose=pose_kind)
    pose = torch.randn(2, h, w, 2, 16)
    with_coords = layer.votes(pose)
    layer.coordinate_addition = False
    diff = with_coords - layer.votes(pose)  # (B, H*W, T_in, K, 16)
    expected = torch.zeros(h, w, 16)
    expected[:, :, elements[0]] = ((torch.arange(h) + 0.5) / h)[:, None]  # row of the centre
    expected[:, :, elements[1]] = ((torch.arange(w) + 0.5) / w)[None, :]  # column of the centre
    assert torch.allclose(diff, expected.view(1, h * w, 1, 1, 16).expand_as(diff), atol=1e-6)
    assert torch.allclose(coordinate_offsets(h, w, pose=pose_kind), expected.view(h * w, 16))
    assert diff[0, 1 * w + 4, 0, 0, elements[0]].item() == pytest.approx(1.5 / 3)
    assert diff[0, 1 * w + 4, 0, 0, elements[1]].item() == pytest.approx(4.5 / 5)


def test_coordinate_addition_changes_outputs_only_when_on():
    torch.manual_seed(1)
    pose, a = torch.randn(2, 3, 3, 2, 16), torch.rand(2, 3, 3, 2)
    on = class_layer(2, 3)
    off = class_layer(2, 3, coordinate_addition=False)
    off.load_state_dict(on.state_dict())
    assert not torch.allclose(on(pose, a)[0], off(pose, a)[0])


HEALTH_INPUTS = {
    "zeros": (lambda s: torch.zeros(s), lambda s: torch.rand(s)),
    "constant": (lambda s: torch.full(s, 0.7), lambda s: torch.full(s, 0.5)),
    "huge_1e4": (lambda s: torch.randn(s) * 1e4, lambda s: torch.rand(s)),
    "huge_1e6": (lambda s: torch.randn(s) * 1e6, lambda s: torch.rand(s)),
    "zero_activations": (lambda s: torch.randn(s), lambda s: torch.zeros(s)),
}


def assert_healthy(layer: torch.nn.Module, pose: torch.Tensor, a: torch.Tensor) -> None:
    pose, a = pose.requires_grad_(True), a.requires_grad_(True)
    mu, a_out = layer(pose, a)
    assert mu.dtype == torch.float32 and torch.isfinite(mu).all() and torch.isfinite(a_out).all()
    assert (a_out >= 0).all() and (a_out <= 1).all()
    (mu.sin().sum() + a_out.sum()).backward()
    for name, grad in [("pose", pose.grad), ("a", a.grad)] + [(n, p.grad) for n, p in layer.named_parameters()]:
        assert grad is not None and torch.isfinite(grad).all(), name


@pytest.mark.parametrize("case", list(HEALTH_INPUTS))
@pytest.mark.parametrize("kernel_size,stride", [(3, 1), (3, 2), (1, 1)])
def test_conv_numerical_health(case, kernel_size, stride):
    torch.manual_seed(0)
    make_pose, make_a = HEALTH_INPUTS[case]
    layer = conv_layer(2, 3, kernel_size, stride)
    assert_healthy(layer, make_pose((2, 5, 5, 2, 16)), make_a((2, 5, 5, 2)))


@pytest.mark.parametrize("case", list(HEALTH_INPUTS))
@pytest.mark.parametrize("pose_kind", ["matrix", "vector"])
def test_class_numerical_health(case, pose_kind):
    torch.manual_seed(0)
    make_pose, make_a = HEALTH_INPUTS[case]
    layer = class_layer(2, 3, pose=pose_kind)
    assert_healthy(layer, make_pose((2, 3, 3, 2, 16)), make_a((2, 3, 3, 2)))


@pytest.mark.parametrize("iterations", [1, 2, 3, 5])
@pytest.mark.parametrize("schedule", ["official", "fixed"])
def test_iterations_and_schedules_stay_finite(iterations, schedule):
    torch.manual_seed(iterations)
    conv = conv_layer(2, 2, 3, 1, iterations=iterations, lambda_schedule=schedule)
    head = class_layer(2, 3, iterations=iterations, lambda_schedule=schedule)
    pose, a = torch.randn(2, 5, 5, 2, 16), torch.rand(2, 5, 5, 2)
    mu, a_mid = conv(pose, a)
    mu, a_out = head(mu, a_mid)
    a_out.sum().backward()
    assert torch.isfinite(mu).all() and ((a_out > 0) & (a_out < 1)).all()
    assert all(torch.isfinite(p.grad).all() for p in [*conv.parameters(), *head.parameters()])


def test_conv_gradcheck_float64():
    torch.manual_seed(4)
    layer = conv_layer(1, 2, 2, 1, iterations=2, lambda_schedule="fixed", lambda_value=0.1).double()
    pose = torch.randn(1, 3, 3, 1, 16, dtype=torch.float64, requires_grad=True)
    a = torch.rand(1, 3, 3, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p, q: layer(p, q), (pose, a), fast_mode=True)


def test_wrong_shapes_and_too_small_grid_raise():
    layer = conv_layer(2, 2, 3, 1)
    with pytest.raises(ValueError, match="expects poses"):
        layer(torch.randn(1, 4, 4, 3, 16), torch.rand(1, 4, 4, 3))
    with pytest.raises(ValueError, match="smaller than"):
        layer(torch.randn(1, 2, 4, 2, 16), torch.rand(1, 2, 4, 2))


@pytest.mark.parametrize("pose_kind", ["matrix", "vector"])
def test_votes_keep_each_vote_contiguous(pose_kind):
    # EM routing re-lays the votes out per parent in one pass; that pass is fast when each
    # vote's 16 elements are contiguous (a 4x4 einsum would interleave them with T_out)
    side = 4 if pose_kind == "matrix" else 16
    V = capsule_votes(torch.randn(2, 3, 5, 2, 16), torch.randn(5, 2, 3, side, side), pose_kind=pose_kind)
    assert V.shape == (2, 3, 5, 2, 3, 16) and V.stride(-1) == 1 and V.stride(-2) == 16


@pytest.mark.parametrize("pose_kind", ["matrix", "vector"])
def test_the_layers_hand_over_kron_transforms_only_as_matrix_poses(pose_kind, monkeypatch):
    # VoteFactors.kron lets compiled kernels form each vote element from 4 products: a promise that the weight is
    # kron(I_4, W), which only matrix poses keep (vector poses' 16x16 transforms are general)
    from capsnets.nn.matrix_caps import vote_weight
    from capsnets.nn.routing import kernels

    seen = []
    original = kernels.EagerKernels.factor_votes

    def recording(self, pose, weight, offset, centre, dtype, kron=False):
        seen.append((weight, kron))
        return original(self, pose, weight, offset, centre, dtype, kron)

    monkeypatch.setattr(kernels.EagerKernels, "factor_votes", recording)
    conv, cls = conv_layer(4, 3, 3, 2, pose=pose_kind), class_layer(3, 5, pose=pose_kind)
    conv(torch.randn(2, 7, 7, 4, 16), torch.rand(2, 7, 7, 4))
    cls(torch.randn(2, 3, 3, 3, 16), torch.rand(2, 3, 3, 3))
    assert [kron for _, kron in seen] == [pose_kind == "matrix"] * 2
    for (weight, _), layer in zip(seen, (conv, cls)):  # kron(I_4, W) for matrix poses (the class layer's expanded)
        assert torch.equal(weight, vote_weight(layer.weight, pose_kind=pose_kind).expand_as(weight))
