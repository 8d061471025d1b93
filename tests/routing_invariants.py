"""The invariants every routing procedure must satisfy (timm-style: checked for each registered routing).

Each check builds the routing for one capsule kind and runs it on votes in the routing layout
(``capsnets.nn.routing.base``): a fully connected layout (one patch) and a convolutional one
(3x3 kernels, stride 1, on a 4x4 grid, so children sit in up to 9 patches).

Each check takes ``build``: (P, K, T_in) -> a fresh routing for that layout (given its child slots
``in_slots = (K, T_in)``, as a capsule layer gives them), so procedures with per-slot parameters are
checked on every layout too.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from capsnets.nn.conv_caps import conv_child_index
from capsnets.nn.routing import ChildLayout, Routing, build_routing

T_OUT = 3


def make(name: str, impl: str, kind: str, role: str = "hidden", in_slots=None, **settings) -> Routing:
    cfg = {"name": name, "impl": impl, **settings}
    return build_routing(cfg, kind=kind, out_types=T_OUT, role=role, in_slots=in_slots)


Build = Callable[[tuple[int, int, int]], Routing]


def layouts() -> dict[str, tuple[tuple[int, int, int], ChildLayout]]:
    """name -> ((P, K, T_in), layout)."""
    return {
        "fc": ((1, 6, 2), ChildLayout()),
        "conv": ((4, 9, 2), ChildLayout(conv_child_index(4, 4, kernel_size=3, stride=1), 16)),
        "single_child": ((1, 1, 1), ChildLayout()),
    }


def inputs(kind: str, shape: tuple[int, int, int], case: str = "randn", batch: int = 2, seed: int = 0):
    """Votes (B, P, K, T_in, T_out, D) and child activations (matrix capsules) or None (vector and pose capsules)."""
    g = torch.Generator().manual_seed(seed)
    p, k, t_in = shape
    d = 8 if kind == "vector" else 16  # vector capsules: 8D here; matrix and pose capsules: 16 pose elements
    size = (batch, p, k, t_in, T_OUT, d)
    votes = {
        "randn": torch.randn(size, generator=g),
        "zeros": torch.zeros(size),
        "constant": torch.full(size, 0.7),
        "huge": 1e4 * torch.randn(size, generator=g),
    }[case]
    a_in = torch.rand(size[:4], generator=g) if kind == "matrix" else None
    return votes, a_in


def check_shapes_and_assignments(build: Build, kind: str) -> None:
    for name, (shape, layout) in layouts().items():
        routing = build(shape)
        votes, a_in = inputs(kind, shape)
        poses, activations, assignments = routing(votes, a_in, layout)
        b, p, k, t_in, t_out, d = votes.shape
        assert poses.shape == (b, p, t_out, d), name
        assert activations.shape == (b, p, t_out) and assignments.shape == (b, p, k, t_in, t_out), name
        assert poses.dtype == activations.dtype == assignments.dtype == votes.dtype, name
        assert ((activations >= 0) & (activations <= 1)).all(), name
        # each child's assignments sum to 1 over its parents; normalised per parent type, 1 to each type;
        # per patch, every slot is its own child
        normalisation = getattr(routing, "normalisation", "covering") if layout.shared else "covering"
        totals = layout.child_totals(assignments) if normalisation != "patch" else assignments.sum(dim=-1)
        expected = torch.full_like(totals, T_OUT if normalisation == "type" else 1)
        assert torch.allclose(totals, expected, atol=1e-5), (name, normalisation)
        if kind == "vector":  # vector capsules: the activation is the length
            assert torch.allclose(activations, poses.norm(dim=-1), atol=1e-6), name


def check_finite_on_adversarial_inputs(build: Build, kind: str) -> None:
    for case in ("zeros", "constant", "huge", "randn"):
        for name, (shape, layout) in layouts().items():
            routing = build(shape)
            votes, a_in = inputs(kind, shape, case)
            votes.requires_grad_(True)
            if a_in is not None:
                a_in.requires_grad_(True)
            poses, activations, assignments = routing(votes, a_in, layout)
            assert all(torch.isfinite(x).all() for x in (poses, activations, assignments)), (case, name)
            routing.zero_grad()
            (poses.sum() + activations.sum()).backward()
            grads = [votes.grad, *(a.grad for a in (a_in,) if a is not None), *(q.grad for q in routing.parameters())]
            assert all(g is None or torch.isfinite(g).all() for g in grads), (case, name)


def check_float32_under_autocast(build: Build, kind: str) -> None:
    shape, layout = layouts()["conv"]
    routing = build(shape)
    votes, a_in = inputs(kind, shape)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = routing(votes.bfloat16(), a_in.bfloat16() if a_in is not None else None, layout)
    assert all(x.dtype == torch.float32 for x in out)


def check_trace_only_on_request(build: Build, kind: str) -> None:
    shape, layout = layouts()["conv"]
    routing = build(shape)
    votes, a_in = inputs(kind, shape)
    plain = routing(votes, a_in, layout)
    assert routing.trace is None and routing.record_trace is False
    routing.record_trace = True
    try:
        traced = routing(votes, a_in, layout)
        trace = routing.trace
    finally:
        routing.record_trace = False
    assert all(torch.equal(x, y) for x, y in zip(plain, traced))  # recording changes nothing
    assert trace is not None and len(trace.assignments) == len(trace.activations) >= 1
    assert trace.layout is layout
    assert all(R.shape == plain.assignments.shape and not R.requires_grad for R in trace.assignments)
    assert all(a.shape == plain.activations.shape for a in trace.activations)
    routing(votes, a_in, layout)
    assert routing.trace is None  # not kept once recording is off


ALL_CHECKS = (
    check_shapes_and_assignments,
    check_finite_on_adversarial_inputs,
    check_float32_under_autocast,
    check_trace_only_on_request,
)


def check_routing(name: str, impl: str, kind: str, **settings) -> None:
    """Run every invariant on routing ``name`` / ``impl`` (with ``settings``) for capsule ``kind`` (both roles)."""
    for role in ("hidden", "class"):
        for check in ALL_CHECKS:
            check(lambda shape, role=role: make(name, impl, kind, role, in_slots=shape[1:], **settings), kind)
