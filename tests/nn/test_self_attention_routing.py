"""Self-attention routing (Mazzia et al. 2021, Efficient-CapsNet, Eqs. 4-7) against a loop reference."""

from __future__ import annotations

import math

import pytest
import torch

from capsnets.errors import ConfigError
from capsnets.nn import efficient_squash, squash
from capsnets.nn.conv_caps import conv_child_index
from capsnets.nn.routing import ChildLayout, build_routing, self_attention_routing


def loop_reference(u_hat, log_prior, layout, squash_name="efficient"):
    """Eqs. 4-7 with explicit loops: the N_l x N_l attention matrix of every parent, a softmax over every parent
    of each child (children found through the layout), s_n = sum_l u_hat (C + B), the paper's squash."""
    b_size, p_size, k_size, t_in, t_out, d = u_hat.shape
    slots = [(p, k, i) for p in range(p_size) for k in range(k_size) for i in range(t_in)]

    def child(p, k, i):  # the identity of the child in slot (p, k) of type i
        return (int(layout.child_index[p * k_size + k]) if layout.shared else (p, k), i)

    C = torch.zeros(u_hat.shape[:5], dtype=u_hat.dtype)
    v = torch.zeros(b_size, p_size, t_out, d, dtype=u_hat.dtype)
    for b in range(b_size):
        logit = {}
        for p in range(p_size):
            for j in range(t_out):
                members = [(k, i) for k in range(k_size) for i in range(t_in)]
                U = torch.stack([u_hat[b, p, k, i, j] for k, i in members])  # (N_l, D)
                A = U @ U.T / math.sqrt(d)  # Eq. 4, (N_l, N_l)
                for row, (k, i) in enumerate(members):
                    logit[(p, k, i, j)] = A[row].sum()  # sum_l' A_n[l, l']
        for p, k, i in slots:  # Eq. 5: softmax over every parent of the child, wherever it sits
            me = child(p, k, i)
            parents = [(q, m, i2, j) for q, m, i2 in slots if child(q, m, i2) == me for j in range(t_out)]
            z = torch.stack([logit[x] for x in parents])
            for j in range(t_out):
                C[b, p, k, i, j] = torch.exp(logit[(p, k, i, j)]) / torch.exp(z).sum()
        for p in range(p_size):
            for j in range(t_out):
                s = torch.zeros(d, dtype=u_hat.dtype)
                for k in range(k_size):
                    for i in range(t_in):
                        prior = log_prior[k, i, j] if log_prior is not None else 0.0
                        s = s + u_hat[b, p, k, i, j] * (C[b, p, k, i, j] + prior)  # Eq. 6
                if squash_name == "efficient":  # Eq. 7 written out
                    n = torch.sqrt((s * s).sum() + 1e-8)
                    v[b, p, j] = (1 - 1 / torch.exp(n)) * s / n
                else:
                    v[b, p, j] = squash(s)
    return v, C


CASES = {
    "fc": ((1, 7, 1), ChildLayout()),
    "fc_types": ((1, 4, 3), ChildLayout()),
    "conv": ((4, 9, 2), ChildLayout(conv_child_index(4, 4, kernel_size=3, stride=1), 16)),
}


@pytest.mark.parametrize("squash_name", ["efficient", "sabour"])
@pytest.mark.parametrize("case", list(CASES))
def test_vectorised_equals_the_loop_reference_in_values_and_gradients(case, squash_name):
    (p, k, t_in), layout = CASES[case]
    g = torch.Generator().manual_seed(3)
    u_hat = torch.randn(2, p, k, t_in, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    prior = (0.1 * torch.randn(k, t_in, 4, generator=g, dtype=torch.float64)).requires_grad_(True)
    v, c = self_attention_routing(u_hat, log_prior=prior, squash=squash_name, layout=layout)
    v_ref, c_ref = loop_reference(u_hat, prior, layout, squash_name)
    assert torch.allclose(v, v_ref, atol=1e-12) and torch.allclose(c, c_ref, atol=1e-12)
    weights = torch.randn(v.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((v * weights).sum() + c[..., 0].sum(), (u_hat, prior))
    grads_ref = torch.autograd.grad((v_ref * weights).sum() + c_ref[..., 0].sum(), (u_hat, prior))
    for got, want in zip(grads, grads_ref):
        assert torch.allclose(got, want, atol=1e-10)


def test_couplings_are_a_softmax_over_parents_that_favours_agreeing_children():
    # 3 children, 2 parents: for parent 0 two children agree and one disagrees; for parent 1 all are noise
    u_hat = torch.zeros(1, 1, 3, 1, 2, 4)
    u_hat[0, 0, 0, 0, 0] = torch.tensor([2.0, 0, 0, 0])
    u_hat[0, 0, 1, 0, 0] = torch.tensor([2.0, 0, 0, 0])
    u_hat[0, 0, 2, 0, 0] = torch.tensor([-2.0, 0, 0, 0])
    u_hat[0, 0, :, 0, 1] = 0.1 * torch.randn(3, 4)
    v, c = self_attention_routing(u_hat)
    assert torch.allclose(c.sum(dim=-1), torch.ones(1, 1, 3, 1))  # over the parents, not the children
    assert c[0, 0, 0, 0, 0] > 0.8 and c[0, 0, 1, 0, 0] > 0.8  # the agreeing children go to parent 0
    assert c[0, 0, 2, 0, 0] < 0.2  # the dissenter does not
    assert not torch.allclose(c.sum(dim=2), torch.ones(1, 1, 1, 2))  # a softmax over children would give this


def test_efficient_squash_is_the_papers_eq7_with_a_finite_gradient_at_zero():
    s = torch.tensor([[3.0, 4.0], [1e-4, 0.0]], dtype=torch.float64)
    v = efficient_squash(s)
    assert torch.allclose(v[0].norm(), torch.tensor(1 - math.exp(-5.0), dtype=torch.float64))
    assert torch.allclose(v[1].norm(), torch.tensor(1e-4, dtype=torch.float64), rtol=1e-3)  # slope 1 at 0
    zero = torch.zeros(3, requires_grad=True)
    efficient_squash(zero).sum().backward()
    assert torch.isfinite(zero.grad).all()


def test_routing_module_learns_its_log_prior_and_refuses_what_it_cannot_do():
    routing = build_routing({"name": "self_attention"}, kind="vector", out_types=4, role="class", in_slots=(6, 1))
    assert routing.log_prior.shape == (6, 1, 4) and routing.log_prior.abs().sum() == 0  # B initialised to 0
    votes = torch.randn(2, 1, 6, 1, 4, 8)
    poses, activations, _ = routing(votes)
    poses.sum().backward()
    assert routing.log_prior.grad is not None and routing.log_prior.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"built for \(6, 1\) child slots"):
        routing(torch.randn(2, 1, 5, 1, 4, 8))
    with pytest.raises(ConfigError, match="single pass. Fix: model.routing.iterations=1"):
        build_routing({"name": "self_attention", "iterations": 3}, kind="vector", out_types=4, in_slots=(6, 1))
    with pytest.raises(ConfigError, match="model.routing.prior.*Fix: model.routing.prior=false"):
        build_routing({"name": "self_attention"}, kind="vector", out_types=4)
    with pytest.raises(ConfigError, match="model.routing.squash"):
        build_routing({"name": "self_attention", "squash": "relu"}, kind="vector", out_types=4, in_slots=(6, 1))
    no_prior = build_routing({"name": "self_attention", "prior": False}, kind="vector", out_types=4)
    assert list(no_prior.parameters()) == []
