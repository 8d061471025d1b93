"""Dynamic routing (Sabour et al. 2017, Procedure 1)."""

import pytest
import torch

from capsnets.nn import RoutingCapsules, build_routing, squash
from capsnets.nn.routing import ChildLayout, RoutingTrace, kernels
from capsnets.nn.routing import dynamic_routing as routing_in_layout
from capsnets.nn.routing.dynamic import fused_dynamic_routing
from capsnets.nn.routing.layout import softmax_last

# the two implementations of Procedure 1 (impl: reference / fused), each held to the loop reference below
IMPLS = {"reference": routing_in_layout, "fused": fused_dynamic_routing}


def dynamic_routing(u_hat: torch.Tensor, impl: str = "reference", **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """DigitCaps case: u_hat (B, N_in, N_out, D) -> v (B, N_out, D), c (B, N_in, N_out)."""
    v, c = IMPLS[impl](u_hat[:, None, :, None], **kwargs)  # (B, 1, N_in, 1, N_out, D)
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


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("iterations", [1, 2, 3, 5])
def test_vectorised_equals_loop(iterations, impl):
    torch.manual_seed(iterations)
    u_hat = torch.randn(3, 7, 4, 5, dtype=torch.float64)
    v, c = dynamic_routing(u_hat, impl, iterations=iterations)
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


@pytest.mark.parametrize("impl", IMPLS)
def test_detach_switch_controls_gradient_path(impl):
    torch.manual_seed(2)
    u_hat = torch.randn(2, 5, 3, 4, dtype=torch.float64)

    def grad(detach: bool, iterations: int) -> torch.Tensor:
        x = u_hat.clone().requires_grad_(True)
        v, _ = dynamic_routing(x, impl, iterations=iterations, detach_inner=detach)
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


@pytest.mark.parametrize("impl", IMPLS)
def test_conv_layout_normalises_each_child_over_every_covering_parent(impl):
    # dynamic routing on a convolutional layout: 1-D input of 4 positions, kernel 2, stride 1 ->
    # 3 patches; the middle children sit in 2 patches each, so their couplings span 2 x T_out parents
    torch.manual_seed(4)
    child_index = torch.tensor([0, 1, 1, 2, 2, 3])  # (P*K,) patches (0,1) (1,2) (2,3)
    layout = ChildLayout(child_index, 4)
    u_hat = torch.randn(2, 3, 2, 1, 3, 5, dtype=torch.float64)  # (B, P=3, K=2, T_in=1, T_out=3, D)
    trace = RoutingTrace(layout)
    v, c = IMPLS[impl](u_hat, iterations=3, layout=layout, trace=trace)
    assert v.shape == (2, 3, 3, 5)
    totals = layout.child_totals(c)  # (B, 4 children, 1)
    assert torch.allclose(totals, torch.ones_like(totals))
    assert torch.allclose(
        trace.assignments[0][0, 0, 1, 0], torch.full((3,), 1 / 6, dtype=torch.float64)
    )  # child 1: 2 patches


# ParentVotes copies the predictions into the parents' layout in blocks of about vote_passes.CHUNK_ELEMENTS: the
# default (all images in one block here), one position per block (1, 100), one image per block (200), and two
# images per block with a last block of one (400; an image holds 168 / 180 elements in the two cases)
@pytest.mark.parametrize("chunk", [None, 1, 100, 200, 400])
@pytest.mark.parametrize("detach_inner", [False, True])
@pytest.mark.parametrize("conv", [False, True])
def test_fused_equals_reference_in_values_gradients_and_trace(conv, detach_inner, chunk, monkeypatch):
    if chunk is not None:
        monkeypatch.setattr(kernels, "CHUNK_ELEMENTS", chunk)
    torch.manual_seed(5)
    if conv:  # 4 input positions, kernel 2, stride 1: the middle children sit in 2 patches
        layout = ChildLayout(torch.tensor([0, 1, 1, 2, 2, 3]), 4)
        shape = (2, 3, 2, 2, 3, 5)  # (B, P, K, T_in, T_out, D)
    else:
        layout, shape = ChildLayout(), (3, 1, 7, 1, 4, 6)
    # the predictions in the strides a capsule layer's einsum leaves them in (not contiguous)
    u_hat = torch.randn(shape[2], *shape[:2], *shape[3:], dtype=torch.float64).permute(1, 2, 0, 3, 4, 5)
    u_hat.requires_grad_(True)
    g_v = torch.randn(shape[0], shape[1], shape[4], shape[5], dtype=torch.float64)
    g_c = torch.randn(shape[:5], dtype=torch.float64)
    results = {}
    for impl, route in IMPLS.items():
        trace = RoutingTrace(layout)
        v, c = route(u_hat, iterations=3, detach_inner=detach_inner, layout=layout, trace=trace)
        (grad,) = torch.autograd.grad((v * g_v).sum() + (c * g_c).sum(), u_hat)
        results[impl] = (v, c, grad, trace)
    (v, c, grad, trace), (v_f, c_f, grad_f, trace_f) = results["reference"], results["fused"]
    torch.testing.assert_close(v_f, v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c_f, c, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_f, grad, rtol=1e-10, atol=1e-12)
    assert grad_f.stride() == u_hat.stride()  # written once, in the predictions' own strides
    assert len(trace_f.assignments) == len(trace.assignments) == 3
    for x, y in zip(trace_f.assignments + trace_f.activations, trace.assignments + trace.activations):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_fused_is_the_default_and_the_reference_a_setting():
    fused = build_routing({"name": "dynamic"}, kind="vector", out_types=4, role="class")
    reference = build_routing({"name": "dynamic", "impl": "reference"}, kind="vector", out_types=4, role="class")
    assert (fused.impl, reference.impl) == ("fused", "reference")
    u_hat = torch.randn(2, 1, 6, 1, 4, 3)
    out_f, out_r = fused(u_hat), reference(u_hat)
    torch.testing.assert_close(out_f.poses, out_r.poses)
    torch.testing.assert_close(out_f.assignments, out_r.assignments)


@pytest.mark.parametrize(
    "shape,perm",
    [((2, 1, 4, 3, 5), (0, 1, 3, 4, 2)), ((3, 6, 5), (0, 2, 1)), ((5, 7), (1, 0)), ((2, 3, 1, 4), (0, 2, 3, 1))],
)
def test_softmax_in_memory_order_equals_torch_softmax_over_the_last_dimension(shape, perm):
    torch.manual_seed(6)
    dense = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    x = dense.permute(perm)  # e.g. logits kept in the parents' layout, viewed in the children's
    ours, plain = softmax_last(x), torch.softmax(x, dim=-1)
    torch.testing.assert_close(ours, plain, rtol=1e-14, atol=1e-15)
    assert torch.allclose(ours.sum(dim=-1), torch.ones(()).double())
    g = torch.randn_like(plain)
    torch.testing.assert_close(
        torch.autograd.grad((ours * g).sum(), dense)[0], torch.autograd.grad((plain * g).sum(), dense)[0]
    )


def test_fused_refuses_second_derivatives_naming_the_reference_which_computes_them():
    torch.manual_seed(7)
    u_hat = torch.randn(2, 1, 5, 1, 3, 4, dtype=torch.float64, requires_grad=True)
    v, _ = fused_dynamic_routing(u_hat, iterations=2)
    with pytest.raises(RuntimeError, match="impl=reference"):
        torch.autograd.grad(v.sum(), u_hat, create_graph=True)
    assert torch.autograd.gradgradcheck(
        lambda x: routing_in_layout(x, iterations=2)[0], (u_hat,), fast_mode=True
    )  # a gradient penalty through routing: impl: reference
