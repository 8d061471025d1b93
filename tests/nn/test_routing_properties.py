"""Property-based routing invariants (hypothesis): random layouts, shapes, scales and near-zero-variance
vote clusters, for every registered routing, and EM fused == EM reference on all of them."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capsnets.nn.conv_caps import conv_child_index
from capsnets.nn.routing import ROUTINGS, ChildLayout, build_routing
from capsnets.nn.routing.em import em_routing as reference_em_routing
from capsnets.nn.routing.em_fused import fused_em_routing

REGISTERED = [
    (name, impl, kind)
    for name, impls in sorted(ROUTINGS.items())
    for impl, cls in sorted(impls.items())
    for kind in cls.kinds
]
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def routing_case(draw, kind: str):  # noqa: ANN001, ANN201
    """(votes (B, P, K, T_in, T_out, D), child activations or None, layout)."""
    conv = draw(st.booleans())
    batch, t_in, t_out = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    if conv:
        size, kernel = draw(st.integers(2, 5)), draw(st.integers(1, 3))
        kernel = min(kernel, size)
        stride = draw(st.integers(1, 2))  # children a strided kernel never covers have no parent
        index = conv_child_index(size, size, kernel_size=kernel, stride=stride)  # (P * K,)
        layout, k = ChildLayout(index, size * size), kernel * kernel
        p = index.numel() // k
    else:
        layout, p, k = ChildLayout(), 1, draw(st.integers(1, 8))
    d = 16 if kind in ("matrix", "pose") else draw(st.sampled_from([4, 8]))  # pose capsules: 16-element poses
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    spread = draw(st.sampled_from([0.0, 1e-7, 1e-4, 1.0]))  # 0: every vote of a parent identical
    g = torch.Generator().manual_seed(seed)
    centre = scale * torch.randn(batch, p, 1, 1, t_out, d, generator=g)
    votes = centre + spread * scale * torch.randn(batch, p, k, t_in, t_out, d, generator=g)
    a_in = None
    if kind == "matrix":
        a_in = torch.rand(batch, p, k, t_in, generator=g)
        if draw(st.booleans()):  # inactive children, down to a single active one
            a_in = torch.where(torch.rand(a_in.shape, generator=g) < 0.7, torch.zeros_like(a_in), a_in)
    return votes, a_in, layout


@pytest.mark.parametrize("name,impl,kind", REGISTERED, ids=["-".join(x) for x in REGISTERED])
def test_routing_invariants_hold_on_random_cases(name, impl, kind):
    @SETTINGS
    @given(case=routing_case(kind))
    def check(case) -> None:  # noqa: ANN001
        votes, a_in, layout = case
        cfg = {"name": name, "impl": impl}
        routing = build_routing(cfg, kind=kind, out_types=votes.shape[4], in_slots=tuple(votes.shape[2:4]))
        votes = votes.clone().requires_grad_(True)
        if a_in is not None:
            a_in = a_in.clone().requires_grad_(True)
        poses, activations, assignments = routing(votes, a_in, layout)
        b, p, k, t_in, t_out, d = votes.shape
        assert poses.shape == (b, p, t_out, d) and activations.shape == (b, p, t_out)
        assert assignments.shape == (b, p, k, t_in, t_out)
        assert all(torch.isfinite(x).all() for x in (poses, activations, assignments))
        assert ((activations >= 0) & (activations <= 1 + 1e-6)).all()  # a squashed length rounds to 1 + 1 ulp
        # each child's assignments: 1 over its parents (per parent type: 1 to each type; per patch: every slot
        # its own child), 0 for a child no patch covers
        normalisation = getattr(routing, "normalisation", "covering") if layout.shared else "covering"
        if normalisation == "patch":
            assert torch.allclose(assignments.sum(dim=-1), torch.ones_like(assignments[..., 0]), atol=1e-5)
        else:
            totals = layout.child_totals(assignments)
            covered = layout.child_totals(torch.ones_like(assignments)) > 0
            per_child = t_out if normalisation == "type" else 1
            assert torch.allclose(totals, per_child * covered.to(totals.dtype), atol=1e-5)
        (poses.sum() + activations.sum()).backward()
        grads = [votes.grad, *(x.grad for x in (a_in,) if x is not None), *(q.grad for q in routing.parameters())]
        assert all(g is None or torch.isfinite(g).all() for g in grads)

    check()


@SETTINGS
@given(case=routing_case("matrix"), normalisation=st.sampled_from(["covering", "type", "patch"]))
def test_em_fused_equals_reference_on_random_cases(case, normalisation):
    votes, a_in, layout = case
    votes, a_in = votes.double().requires_grad_(True), a_in.double().requires_grad_(True)
    t_out = votes.shape[4]
    g = torch.Generator().manual_seed(1)
    beta_u, beta_a = torch.randn(t_out, generator=g).double(), torch.randn(t_out, generator=g).double()
    kwargs = {"beta_u": beta_u, "beta_a": beta_a, "lambdas": [0.01, 0.02, 0.03], "layout": layout}
    outs, grads = [], []
    for route, extra in ((reference_em_routing, {}), (fused_em_routing, {"moment_dtype": torch.float64})):
        out = route(votes, a_in, normalisation=normalisation, **kwargs, **extra)
        outs.append(out)
        grads.append(torch.autograd.grad(out.poses.sum() + out.activations.sum(), (votes, a_in)))
    scale = votes.detach().abs().max().item() + 1.0
    for x, y in zip(outs[0], outs[1]):
        assert torch.allclose(x, y, atol=1e-8 * scale, rtol=1e-6)
    for x, y in zip(grads[0], grads[1]):
        assert torch.allclose(x, y, atol=1e-6 * scale, rtol=1e-4)
