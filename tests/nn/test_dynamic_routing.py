"""Dynamic routing (Sabour et al. 2017, Procedure 1)."""

import pytest
import torch

from capsnets.nn import RoutingCapsules, dynamic_routing, squash


def slow_routing(u_hat: torch.Tensor, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Procedure 1 written with explicit loops over examples, children and parents."""
    batch, n_in, n_out, dim = u_hat.shape
    v_all = torch.zeros(batch, n_out, dim, dtype=u_hat.dtype)
    c_all = torch.zeros(batch, n_in, n_out, dtype=u_hat.dtype)
    for b in range(batch):
        logits = [[0.0] * n_out for _ in range(n_in)]
        for r in range(iterations):
            c = torch.zeros(n_in, n_out, dtype=u_hat.dtype)
            for i in range(n_in):
                row = torch.tensor(logits[i], dtype=u_hat.dtype)
                c[i] = torch.exp(row) / torch.exp(row).sum()  # softmax over parents
            v = torch.zeros(n_out, dim, dtype=u_hat.dtype)
            for j in range(n_out):
                s_j = torch.zeros(dim, dtype=u_hat.dtype)
                for i in range(n_in):
                    s_j = s_j + c[i, j] * u_hat[b, i, j]
                v[j] = squash(s_j)
            if r < iterations - 1:
                for i in range(n_in):
                    for j in range(n_out):
                        logits[i][j] += float(torch.dot(u_hat[b, i, j], v[j]))
        v_all[b], c_all[b] = v, c
    return v_all, c_all


@pytest.mark.parametrize("iterations", [1, 2, 3, 5])
def test_vectorised_equals_loop(iterations):
    torch.manual_seed(iterations)
    u_hat = torch.randn(3, 7, 4, 5, dtype=torch.float64)
    v, c = dynamic_routing(u_hat, iterations=iterations)
    v_ref, c_ref = slow_routing(u_hat, iterations)
    assert torch.allclose(v, v_ref, atol=1e-10)
    assert torch.allclose(c, c_ref, atol=1e-10)


def test_couplings_sum_to_one_over_parents_not_children():
    # 6 children, 3 parents: a softmax over children would make columns, not rows, sum to 1
    torch.manual_seed(0)
    _, c = dynamic_routing(torch.randn(2, 6, 3, 4), iterations=3)
    assert torch.allclose(c.sum(dim=2), torch.ones(2, 6), atol=1e-6)
    assert not torch.allclose(c.sum(dim=1), torch.ones(2, 3), atol=1e-3)


def test_routing_moves_coupling_towards_agreeing_parent():
    # every child predicts the same vector for parent 0; for parent 1 the predictions cancel
    # (alternating signs), so v_1 = 0: agreement raises every c_i0 above its uniform 1/2
    u_hat = torch.zeros(1, 8, 2, 4)
    u_hat[:, :, 0] = torch.tensor([2.0, 0.0, 0.0, 0.0])
    u_hat[:, 0::2, 1] = torch.tensor([0.0, 2.0, 0.0, 0.0])
    u_hat[:, 1::2, 1] = torch.tensor([0.0, -2.0, 0.0, 0.0])
    _, c1 = dynamic_routing(u_hat, iterations=1)
    _, c3 = dynamic_routing(u_hat, iterations=3)
    assert torch.allclose(c1, torch.full_like(c1, 0.5))
    assert (c3[0, :, 0] > 0.5).all()


def test_golden_two_iterations():
    # 2 children, 2 parents, 1-D predictions, computed by hand:
    # iter 1: c = 0.5 everywhere; s_0 = 0.5*(1+1) = 1 -> v_0 = 0.5; s_1 = 0.5*(1-1) = 0 -> v_1 = 0
    # b = [[0.5, 0], [0.5, 0]]; iter 2: c_i0 = sigmoid(0.5); s_0 = 2 sigmoid(0.5); v_0 = s^2/(1+s^2)
    u_hat = torch.tensor([[[[1.0], [1.0]], [[1.0], [-1.0]]]], dtype=torch.float64)
    v, c = dynamic_routing(u_hat, iterations=2)
    sig = torch.sigmoid(torch.tensor(0.5, dtype=torch.float64))
    s0 = 2 * sig
    assert torch.allclose(c[0, :, 0], torch.stack([sig, sig]))
    assert torch.allclose(v[0, 0, 0], s0**2 / (1 + s0**2), atol=1e-7)
    assert torch.allclose(v[0, 1, 0], torch.zeros((), dtype=torch.float64), atol=1e-7)


def test_detach_switch_controls_gradient_path():
    torch.manual_seed(2)
    u_hat = torch.randn(2, 5, 3, 4, dtype=torch.float64)

    def grad(detach: bool, iterations: int) -> torch.Tensor:
        x = u_hat.clone().requires_grad_(True)
        v, _ = dynamic_routing(x, iterations=iterations, detach_inner=detach)
        (v * torch.arange(v.numel(), dtype=v.dtype).view_as(v)).sum().backward()
        return x.grad

    # one iteration: nothing to detach
    assert torch.allclose(grad(True, 1), grad(False, 1))
    # three iterations: the official (flowing) gradient differs from the detached one ...
    assert not torch.allclose(grad(True, 3), grad(False, 3))
    # ... and the detached one equals the gradient through the last iteration with c fixed
    _, c = dynamic_routing(u_hat, iterations=3)
    x = u_hat.clone().requires_grad_(True)
    v = squash(torch.einsum("bij,bijd->bjd", c, x))
    (v * torch.arange(v.numel(), dtype=v.dtype).view_as(v)).sum().backward()
    assert torch.allclose(grad(True, 3), x.grad)


def test_routing_layer_shapes_and_params():
    layer = RoutingCapsules(in_caps=1152, in_dim=8, out_caps=10, out_dim=16, iterations=3)
    assert sum(p.numel() for p in layer.parameters()) == 1152 * 10 * 16 * 8
    v = layer(torch.randn(2, 1152, 8))
    assert v.shape == (2, 10, 16)
    assert (v.norm(dim=-1) < 1).all()
    assert layer.last_couplings.shape == (2, 1152, 10)


def test_routing_layer_predictions_are_w_times_u():
    layer = RoutingCapsules(in_caps=3, in_dim=2, out_caps=2, out_dim=4)
    u = torch.randn(5, 3, 2)
    u_hat = layer.predictions(u)
    assert torch.allclose(u_hat[4, 2, 1], layer.weight[2, 1] @ u[4, 2], atol=1e-6)


def test_gradients_finite_for_zero_input():
    layer = RoutingCapsules(in_caps=6, in_dim=4, out_caps=3, out_dim=5)
    u = torch.zeros(2, 6, 4, requires_grad=True)
    layer(u).norm(dim=-1).sum().backward()
    assert torch.isfinite(u.grad).all() and torch.isfinite(layer.weight.grad).all()


def test_routing_stays_float32_under_autocast():
    layer = RoutingCapsules(in_caps=6, in_dim=4, out_caps=3, out_dim=5)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        v = layer(torch.randn(2, 6, 4).to(torch.bfloat16))
    assert v.dtype == torch.float32 and layer.last_couplings.dtype == torch.float32


def test_routing_layer_in_float64():
    layer = RoutingCapsules(in_caps=6, in_dim=4, out_caps=3, out_dim=5).double()
    assert layer(torch.randn(2, 6, 4, dtype=torch.float64)).dtype == torch.float64
