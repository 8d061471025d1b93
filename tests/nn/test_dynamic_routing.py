"""Dynamic routing (Sabour et al. 2017, Procedure 1)."""

import pytest
import torch

from capsnets.nn import RoutingCapsules, build_routing, squash
from capsnets.nn.routing import ChildLayout, RoutingTrace
from capsnets.nn.routing import dynamic_routing as routing_in_layout


def dynamic_routing(u_hat: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """DigitCaps case: u_hat (B, N_in, N_out, D) -> v (B, N_out, D), c (B, N_in, N_out)."""
    v, c = routing_in_layout(u_hat[:, None, :, None], **kwargs)  # (B, 1, N_in, 1, N_out, D)
    return v[:, 0], c[:, 0, :, 0]


def digit_caps(
    in_caps: int, in_dim: int, out_caps: int, out_dim: int, iterations: int = 3, **kwargs
) -> RoutingCapsules:
    routing = build_routing(
        {"name": "dynamic", "iterations": iterations}, kind="vector", out_types=out_caps, role="class"
    )
    return RoutingCapsules(
        in_caps=in_caps, in_dim=in_dim, out_caps=out_caps, out_dim=out_dim, routing=routing, **kwargs
    )


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
    layer = digit_caps(1152, 8, 10, 16, iterations=3)
    assert sum(p.numel() for p in layer.parameters()) == 1152 * 10 * 16 * 8
    layer.routing.record_trace = True
    v = layer(torch.randn(2, 1152, 8))
    assert v.shape == (2, 10, 16)
    assert (v.norm(dim=-1) < 1).all()
    assert layer.routing.trace.assignments[-1].shape == (2, 1, 1152, 1, 10)


def test_routing_layer_predictions_are_w_times_u():
    layer = digit_caps(3, 2, 2, 4)
    u = torch.randn(5, 3, 2)
    u_hat = layer.predictions(u)
    assert torch.allclose(u_hat[4, 2, 1], layer.weight[2, 1] @ u[4, 2], atol=1e-6)


def test_gradients_finite_for_zero_input():
    layer = digit_caps(6, 4, 3, 5)
    u = torch.zeros(2, 6, 4, requires_grad=True)
    layer(u).norm(dim=-1).sum().backward()
    assert torch.isfinite(u.grad).all() and torch.isfinite(layer.weight.grad).all()


def test_routing_stays_float32_under_autocast():
    layer = digit_caps(6, 4, 3, 5)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        layer.routing.record_trace = True
        v = layer(torch.randn(2, 6, 4).to(torch.bfloat16))
    assert v.dtype == torch.float32 and layer.routing.trace.assignments[-1].dtype == torch.float32


def test_routing_layer_in_float64():
    layer = digit_caps(6, 4, 3, 5).double()
    assert layer(torch.randn(2, 6, 4, dtype=torch.float64)).dtype == torch.float64


def test_conv_layout_normalises_each_child_over_every_covering_parent():
    # dynamic routing on a convolutional layout: 1-D input of 4 positions, kernel 2, stride 1 ->
    # 3 patches; the middle children sit in 2 patches each, so their couplings span 2 x T_out parents
    torch.manual_seed(4)
    child_index = torch.tensor([0, 1, 1, 2, 2, 3])  # (P*K,) patches (0,1) (1,2) (2,3)
    layout = ChildLayout(child_index, 4)
    u_hat = torch.randn(2, 3, 2, 1, 3, 5, dtype=torch.float64)  # (B, P=3, K=2, T_in=1, T_out=3, D)
    trace = RoutingTrace(layout)
    v, c = routing_in_layout(u_hat, iterations=3, layout=layout, trace=trace)
    assert v.shape == (2, 3, 3, 5)
    totals = layout.child_totals(c)  # (B, 4 children, 1)
    assert torch.allclose(totals, torch.ones_like(totals))
    assert torch.allclose(
        trace.assignments[0][0, 0, 1, 0], torch.full((3,), 1 / 6, dtype=torch.float64)
    )  # child 1: 2 patches
