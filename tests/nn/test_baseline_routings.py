"""No-routing baselines (Paik et al. 2019): uniform and random assignments, on vector and matrix capsules."""

from __future__ import annotations

import pytest
import torch

from capsnets.errors import ConfigError
from capsnets.nn import squash
from capsnets.nn.conv_caps import conv_child_index
from capsnets.nn.routing import ChildLayout, build_routing
from capsnets.nn.routing.baselines import fixed_logits
from capsnets.nn.routing.em import m_step

CONV = ChildLayout(conv_child_index(4, 4, kernel_size=3, stride=1), 16)


def make(name, kind, **settings):
    return build_routing({"name": name, **settings}, kind=kind, out_types=3, role="hidden")


def loop_vector_parents(u_hat, c):
    """s_j = sum_i c_ij u_hat_{j|i}, v_j = squash(s_j), with loops over examples, patches and parents."""
    b_size, p_size, k_size, t_in, t_out, d = u_hat.shape
    v = torch.zeros(b_size, p_size, t_out, d, dtype=u_hat.dtype)
    for b in range(b_size):
        for p in range(p_size):
            for j in range(t_out):
                s = sum(c[b, p, k, i, j] * u_hat[b, p, k, i, j] for k in range(k_size) for i in range(t_in))
                v[b, p, j] = squash(s)
    return v


def test_uniform_vector_splits_each_child_equally_over_every_parent_it_votes_for():
    u_hat = torch.randn(2, 4, 9, 2, 3, 5, dtype=torch.float64, requires_grad=True)
    poses, activations, c = make("uniform", "vector")(u_hat, None, CONV)
    covering = CONV.covering().index_select(0, CONV.child_index).view(4, 9)  # patches holding each slot's child
    assert torch.allclose(c, (1.0 / (3 * covering.double()))[None, :, :, None, None].expand_as(c))
    v_ref = loop_vector_parents(u_hat, c.detach())
    assert torch.allclose(poses, v_ref, atol=1e-12) and torch.allclose(activations, v_ref.norm(dim=-1))
    g, g_ref = (torch.autograd.grad(x.pow(2).sum(), u_hat)[0] for x in (poses, loop_vector_parents(u_hat, c.detach())))
    assert torch.allclose(g, g_ref, atol=1e-12)


def test_uniform_on_vector_capsules_is_dynamic_routing_with_one_iteration():
    u_hat = torch.randn(3, 1, 10, 1, 4, 6, dtype=torch.float64)
    uniform = make("uniform", "vector")(u_hat)
    dynamic = make("dynamic", "vector", iterations=1)(u_hat)
    assert all(torch.allclose(x, y, atol=1e-12) for x, y in zip(uniform, dynamic))


@pytest.mark.parametrize("normalisation", ["covering", "type", "patch"])
def test_uniform_on_matrix_capsules_is_em_routing_with_one_iteration(normalisation):
    """One M-step from uniform R is EM's first iteration (with the release's type normalisation the baseline
    normalises per type from the start; EM starts that M-step from 1/T_out per slot, so they differ there)."""
    V = torch.randn(2, 4, 9, 2, 3, 16, dtype=torch.float64, requires_grad=True)
    a_in = torch.rand(2, 4, 9, 2, dtype=torch.float64, requires_grad=True)
    settings = dict(iterations=1, normalisation=normalisation, moment_dtype="float64", class_lambda_scale=0.25)
    uniform, em = make("uniform", "matrix", **settings), make("em", "matrix", impl="reference", **settings)
    with torch.no_grad():
        for r in (uniform, em):
            r.beta_u.copy_(torch.tensor([0.3, -0.2, 0.1]))
            r.beta_a.copy_(torch.tensor([-0.5, 0.4, 0.0]))
    got, want = uniform(V, a_in, CONV), em(V, a_in, CONV)
    if normalisation == "type":  # one unit per parent type, split equally over the covering positions: the M-step on it
        R = (1.0 / CONV.covering().index_select(0, CONV.child_index).double()).view(1, 4, 9, 1, 1).expand(2, 4, 9, 2, 3)
        assert torch.allclose(got.assignments, R)
        mu, _, logits = m_step(
            R, a_in, V, beta_u=em.beta_u, beta_a=em.beta_a, lambda_=em.lambdas[-1], var_floor=5e-4, eps=1e-8
        )
        want = (mu, torch.sigmoid(logits), R)
    for x, y in zip(got, want):
        assert torch.allclose(x, y, atol=1e-12)
    gx = torch.autograd.grad(got.poses.sum() + got.activations.sum(), (V, a_in, uniform.beta_u, uniform.beta_a))
    gy = torch.autograd.grad(want[0].sum() + want[1].sum(), (V, a_in, em.beta_u, em.beta_a))
    assert all(torch.allclose(x, y, atol=1e-10) for x, y in zip(gx, gy))


def test_matrix_baselines_default_to_capsnets_em_settings_and_the_last_iterations_lambda():
    uniform = make("uniform", "matrix")
    assert uniform.normalisation == "type" and uniform.class_lambda_scale == 1.0 and uniform.iterations == 2
    assert uniform.lambdas[-1] == pytest.approx(0.01 * (1 - 0.95**2))  # em_capsnets' final M-step
    assert {n for n, _ in uniform.named_parameters()} == {"beta_u", "beta_a"}


def test_random_assignments_are_a_fixed_softmax_of_gaussian_logits_over_each_childs_parents():
    routing = make("random", "vector", logit_std=2.0, seed=7)
    u_hat = torch.randn(2, 4, 9, 2, 3, 5, dtype=torch.float64)
    _, _, c = routing(u_hat, None, CONV)
    logits = fixed_logits(7, (4, 9, 2, 3), "hidden")
    assert abs(logits.mean()) < 0.2 and abs(logits.std() - 1) < 0.2  # standard normal draws ...
    assert torch.allclose(c, CONV.softmax(2.0 * logits).expand_as(c))  # ... scaled by logit_std, over the parents
    other_layer = fixed_logits(7, (4, 9, 2, 4), "hidden")  # another shape: an independent draw, not the same stream
    assert not torch.allclose(other_layer.flatten()[:50], logits.flatten()[:50])
    assert torch.allclose(CONV.child_totals(c), torch.ones(2, 16, 2, dtype=torch.float64))
    assert torch.equal(c[0], c[1]) and c.std() > 0.05  # one draw, shared by the examples, not uniform
    routing.train()
    assert torch.equal(routing(u_hat, None, CONV).assignments, c)  # the same at every call and step
    assert not torch.allclose(make("random", "vector", seed=8)(u_hat, None, CONV).assignments, c)


def test_random_redraw_draws_per_example_in_training_and_evaluates_with_the_fixed_draw():
    routing = make("random", "vector", redraw=True)
    u_hat = torch.randn(2, 1, 6, 1, 3, 4)
    routing.train()
    first, second = routing(u_hat).assignments, routing(u_hat).assignments
    assert not torch.allclose(first, second) and not torch.allclose(first[0], first[1])
    routing.eval()
    assert torch.equal(routing(u_hat).assignments, make("random", "vector")(u_hat).assignments)


def test_vector_baselines_have_no_parameters_and_refuse_matrix_settings():
    for name in ("uniform", "random"):
        assert list(make(name, "vector").parameters()) == []
    with pytest.raises(ConfigError, match="lambda_value is a setting of the matrix-capsule M-step.*'uniform'"):
        make("uniform", "vector", lambda_value=0.1)
    with pytest.raises(ConfigError, match="normalisation is a setting.*takes only logit_std, redraw, seed"):
        make("random", "vector", normalisation="type")
    with pytest.raises(ConfigError, match="model.routing.logit_std"):
        make("random", "matrix", logit_std=-1.0)
    with pytest.raises(ConfigError, match="model.routing.redraw must be true or false"):
        make("random", "vector", redraw="no")


def test_uniform_on_pose_capsules_is_inverted_dot_product_routing_with_one_iteration():
    votes = torch.randn(2, 4, 9, 2, 3, 16, dtype=torch.float64, requires_grad=True)
    uniform = make("uniform", "pose").double()
    inverted = make("inverted_dot_product", "pose", iterations=1).double()
    with torch.no_grad():
        for r in (uniform, inverted):  # the same learned LayerNorm gain and bias
            r.norm.weight.copy_(torch.linspace(0.5, 1.5, 16))
            r.norm.bias.copy_(torch.linspace(-0.2, 0.2, 16))
    got, want = uniform(votes, None, CONV), inverted(votes, None, CONV)
    assert all(torch.allclose(x, y, atol=1e-12) for x, y in zip(got, want))
    assert torch.allclose(got.assignments.sum(-1), torch.ones(2, 4, 9, 2, dtype=torch.float64))  # per slot (patch)
    assert {n for n, _ in uniform.named_parameters()} == {"norm.weight", "norm.bias"}
    with pytest.raises(ConfigError, match="pose_dim is a setting of routings on pose capsules only"):
        make("uniform", "vector", pose_dim=16)
