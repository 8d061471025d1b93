"""Inverted dot-product attention routing (Tsai et al. 2020, Algorithm 1) against a loop reference."""

from __future__ import annotations

import math

import pytest
import torch

from capsnets.errors import ConfigError
from capsnets.nn.conv_caps import conv_child_index
from capsnets.nn.routing import (
    ChildLayout,
    FusedInvertedDotProductRouting,
    RoutingTrace,
    VoteFactors,
    build_routing,
    kernels,
)
from capsnets.nn.routing.base import DEFAULT_IMPLS

CONV = ChildLayout(conv_child_index(4, 4, kernel_size=3, stride=1), 16)


def layer_norm(s, gain, bias):
    mean = s.mean()
    var = ((s - mean) ** 2).mean()
    return (s - mean) / torch.sqrt(var + 1e-5) * gain + bias


def reference_step(V, previous, layout, normalisation, gain, bias):
    """One iteration with loops: agreement with the previous parent poses (none: uniform), a softmax over each
    child's parents (found through the layout), p_j = LayerNorm(sum_i r_ij v_ij)."""
    b_size, p_size, k_size, t_in, t_out, d = V.shape
    slots = [(p, k, i) for p in range(p_size) for k in range(k_size) for i in range(t_in)]

    def child(p, k, i):
        return (int(layout.child_index[p * k_size + k]) if layout.shared else (p, k), i)

    def members(p, k, i, j):
        if normalisation == "patch" or not layout.shared:
            return [(p, k, i, jj) for jj in range(t_out)]
        same = [s for s in slots if child(*s) == child(p, k, i)]
        return [(*s, jj) for s in same for jj in range(t_out) if normalisation == "covering" or jj == j]

    r_of, pose_of = {}, {}
    for b in range(b_size):
        agree = {}
        for p, k, i in slots:
            for j in range(t_out):
                a = 0.0 if previous is None else torch.dot(previous[b, p, j], V[b, p, k, i, j]) / math.sqrt(d)
                agree[(p, k, i, j)] = torch.as_tensor(a, dtype=V.dtype)
        for p, k, i in slots:
            for j in range(t_out):
                z = torch.stack([agree[x] for x in members(p, k, i, j)])
                r_of[(b, p, k, i, j)] = torch.exp(agree[(p, k, i, j)]) / torch.exp(z).sum()
        for p in range(p_size):
            for j in range(t_out):
                s = sum(r_of[(b, p, k, i, j)] * V[b, p, k, i, j] for k in range(k_size) for i in range(t_in))
                pose_of[(b, p, j)] = layer_norm(s, gain, bias)
    r = torch.stack([r_of[key] for key in sorted(r_of)]).view(V.shape[:5])  # keys sort in (b, p, k, i, j) order
    poses = torch.stack([pose_of[key] for key in sorted(pose_of)]).view(b_size, p_size, t_out, d)
    return poses, r


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("normalisation", ["patch", "covering", "type"])
@pytest.mark.parametrize("iterations", [1, 2, 3])
def test_vectorised_equals_the_loop_reference_in_values_and_gradients(iterations, normalisation, impl):
    routing = build_routing(
        {"name": "inverted_dot_product", "impl": impl, "iterations": iterations, "normalisation": normalisation},
        kind="pose",
        out_types=3,
    ).double()
    assert routing.impl == impl
    g = torch.Generator().manual_seed(iterations)
    with torch.no_grad():  # a learned gain and bias that are not the identity
        routing.norm.weight.copy_(1 + 0.3 * torch.randn(16, generator=g, dtype=torch.float64))
        routing.norm.bias.copy_(0.2 * torch.randn(16, generator=g, dtype=torch.float64))
    V = torch.randn(2, 4, 9, 2, 3, 16, generator=g, dtype=torch.float64, requires_grad=True)
    poses, share, r = routing(V, None, CONV)
    gain, bias = routing.norm.weight, routing.norm.bias
    ref, ref_r = reference_step(V, None, CONV, normalisation, gain, bias)
    for _ in range(iterations - 1):
        ref, ref_r = reference_step(V, ref, CONV, normalisation, gain, bias)
    assert torch.allclose(poses, ref, atol=1e-10) and torch.allclose(r, ref_r, atol=1e-12)
    mass = ref_r.sum(dim=(2, 3))
    assert torch.allclose(share, mass / mass.sum(-1, keepdim=True))
    w = torch.randn(poses.shape, generator=g, dtype=torch.float64)
    params = (V, gain, bias)
    for x, y in zip(torch.autograd.grad((poses * w).sum(), params), torch.autograd.grad((ref * w).sum(), params)):
        assert torch.allclose(x, y, atol=1e-9)


def test_parents_compete_for_children_softmax_over_parents_not_children():
    # one parent's previous pose agrees with child 0's vote, the other's with child 1's
    V = torch.zeros(1, 1, 2, 1, 2, 16)
    V[0, 0, 0, 0, :, 0] = 4.0  # child 0 votes e_0 for both parents
    V[0, 0, 1, 0, :, 1] = 4.0  # child 1 votes e_1 for both parents
    previous = torch.zeros(1, 1, 2, 16)
    previous[0, 0, 0, 0], previous[0, 0, 1, 1] = 4.0, 4.0
    routing = build_routing({"name": "inverted_dot_product"}, kind="pose", out_types=2)
    _, _, r = routing.step(V, previous, ChildLayout())
    assert torch.allclose(r.sum(dim=-1), torch.ones(1, 1, 2, 1))  # each child's probabilities over its parents
    assert r[0, 0, 0, 0, 0] > 0.95 and r[0, 0, 1, 0, 1] > 0.95  # each child goes to the parent that agrees


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="model.routing.normalisation"):
        build_routing({"name": "inverted_dot_product", "normalisation": "rows"}, kind="pose", out_types=2)
    with pytest.raises(ConfigError, match="does not support vector capsules.*dynamic"):
        build_routing({"name": "inverted_dot_product"}, kind="vector", out_types=2)
    routing = build_routing({"name": "inverted_dot_product", "pose_dim": 8}, kind="pose", out_types=2)
    with pytest.raises(ValueError, match="built for 8-element poses"):
        routing(torch.randn(1, 1, 3, 1, 2, 16))


@pytest.mark.parametrize("chunk", [None, 1, 200])  # one block, one parent per block, blocks that split an image
@pytest.mark.parametrize("normalisation", ["patch", "type"])
def test_fused_step_equals_the_reference_step_also_through_the_previous_poses(normalisation, chunk, monkeypatch):
    # concurrent routing (ida_caps) calls step() with parents' poses that carry gradients of their own
    if chunk is not None:
        monkeypatch.setattr(kernels, "CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(7)
    V = torch.randn(2, 4, 9, 2, 3, 16, generator=g, dtype=torch.float64).transpose(2, 3)  # strided, as einsum's
    V = V.contiguous().transpose(2, 3).requires_grad_(True)  # (B, P, K, T_in, T_out, D) with K, T_in swapped in memory
    previous = torch.randn(2, 4, 3, 16, generator=g, dtype=torch.float64, requires_grad=True)
    results = []
    for impl in ("reference", "fused"):
        routing = build_routing(
            {"name": "inverted_dot_product", "impl": impl, "normalisation": normalisation}, kind="pose", out_types=3
        ).double()
        with torch.no_grad():
            routing.norm.weight.copy_(1 + 0.3 * torch.randn(16, generator=torch.Generator().manual_seed(1)))
        trace = RoutingTrace(CONV)
        out = routing.step(V, previous, CONV, trace)
        loss = sum((torch.cos(3 * x) * (i + 1)).sum() for i, x in enumerate(out))
        leaves = (V, previous, routing.norm.weight, routing.norm.bias)
        results.append((out, torch.autograd.grad(loss, leaves), trace))
    (ref, ref_grads, ref_trace), (got, got_grads, got_trace) = results
    for x, y in zip(ref, got):
        assert torch.allclose(x, y, atol=1e-12)
    for x, y in zip(ref_grads, got_grads):
        assert x.abs().max() > 0 and torch.allclose(x, y, atol=1e-10)
    assert got_grads[0].stride() == V.stride()  # the votes' gradient written once, in their own strides
    for x, y in zip(ref_trace.assignments + ref_trace.activations, got_trace.assignments + got_trace.activations):
        assert torch.allclose(x, y, atol=1e-12)


def test_fused_is_the_default():
    assert DEFAULT_IMPLS["inverted_dot_product"] == "fused"
    routing = build_routing({"name": "inverted_dot_product"}, kind="pose", out_types=2)
    assert type(routing) is FusedInvertedDotProductRouting


@pytest.mark.parametrize("chunk", [None, 1, 300])  # FactorVotes' blocks: all, one position, straddling images
@pytest.mark.parametrize("iterations", [1, 2])
def test_votes_by_their_factors_equal_the_votes_tensor_in_values_and_gradients(iterations, chunk, monkeypatch):
    # the pose-capsule layers hand the fused routing their votes' factors; it forms the votes itself, block by block
    if chunk is not None:
        monkeypatch.setattr(kernels, "CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(11)
    pose = torch.randn(2, 4, 9, 2, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weight = (0.5 * torch.randn(9, 2, 3, 16, 16, generator=g, dtype=torch.float64)).requires_grad_(True)
    previous = torch.randn(2, 4, 3, 16, generator=g, dtype=torch.float64, requires_grad=True)
    routing = build_routing({"name": "inverted_dot_product", "iterations": iterations}, kind="pose", out_types=3)
    routing = routing.double()
    assert routing.takes_vote_factors
    results = []
    for factors in (False, True):
        votes = VoteFactors(pose, weight)
        route = routing.step(votes if factors else votes.materialise(), previous, CONV)
        seam = routing(votes if factors else votes.materialise(), None, CONV)  # the whole route, from uniform
        out = (*route, *seam)
        loss = sum((torch.cos(3 * x) * (i + 1)).sum() for i, x in enumerate(out))
        results.append((out, torch.autograd.grad(loss, (pose, weight, previous))))
    (ref, ref_grads), (got, got_grads) = results
    for x, y in zip(ref, got):
        assert torch.allclose(x, y, atol=1e-12)
    for x, y in zip(ref_grads, got_grads):
        assert x.abs().max() > 0 and torch.allclose(x, y, atol=1e-10)
