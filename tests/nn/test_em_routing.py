"""EM routing (Hinton et al. 2018, Procedure 1): both implementations (``reference``, the procedure
as written, and ``fused``) inside the capsule layers against a slow loop implementation over an
explicit list of (child, parent, vote) edges, for every normalisation; fused == reference in
values and gradients; precision of the fused moments."""

from __future__ import annotations

import math

import pytest
import torch

from capsnets.errors import ConfigError
from capsnets.nn.conv_caps import conv_child_index
from capsnets.nn.routing import ChildLayout, VoteFactors, inverse_temperatures, kernels
from capsnets.nn.routing.em import EMVariant
from capsnets.nn.routing.em import em_routing as reference_em_routing
from capsnets.nn.routing.em_fused import fused_em_routing

from helpers import class_layer, conv_layer, em, final_assignments

Edge = tuple[tuple, tuple, torch.Tensor]  # (child, parent = (position, type), vote (16,))
IMPLS = ["reference", "fused"]


def slow_em(
    edges: list[Edge],
    a_child: dict,
    beta_u: torch.Tensor,
    beta_a: torch.Tensor,
    lambdas: list[float],
    var_floor: float,
    eps: float = 1e-8,
    group=None,
    start=None,
    release: dict | None = None,
) -> tuple[dict, dict, dict]:
    """Procedure 1 with Python loops over parents and children and densities as plain products.

    ``group(edge)`` names the set of edges a child's assignments are normalised over (default: the
    child, i.e. every parent it votes for); ``start(edge)`` the initial R (default: uniform in the group).
    ``release``: the authors' release's M-step, ``{log_variance, beta_u_scale, beta_a_scale, mean_smoothing}``.
    """
    rel = {"log_variance": False, "beta_u_scale": 1.0, "beta_a_scale": 1.0, "mean_smoothing": 0.0, **(release or {})}
    previous: dict = {}
    group = group or (lambda e: edges[e][0])
    parents = sorted({p for _, p, _ in edges})
    groups = sorted({group(e) for e in range(len(edges))}, key=repr)
    into = {p: [e for e, (_, q, _) in enumerate(edges) if q == p] for p in parents}
    out_of = {g: [e for e in range(len(edges)) if group(e) == g] for g in groups}
    R = {e: start(e) if start else 1.0 / len(out_of[g]) for g in groups for e in out_of[g]}
    for t, lam in enumerate(lambdas):
        mu, var, a = {}, {}, {}
        for p in parents:  # M-step
            r = {e: R[e] * a_child[edges[e][0]] for e in into[p]}
            total = sum(r.values())
            mu[p] = sum(r[e] * edges[e][2] for e in into[p]) / (total + eps)
            s = rel["mean_smoothing"]  # release: 0.9 new + 0.1 previous (0 before the first iteration)
            mu[p] = (1 - s) * mu[p] + s * previous.get(p, torch.zeros_like(mu[p]))
            var[p] = sum(r[e] * (edges[e][2] - mu[p]) ** 2 for e in into[p]) / (total + eps) + var_floor
            log_spread = [
                torch.log(var[p][h]) if rel["log_variance"] else torch.log(torch.sqrt(var[p][h])) for h in range(16)
            ]
            cost = sum((rel["beta_u_scale"] * beta_u[p[1]] + log_spread[h]) * total for h in range(16))
            a[p] = torch.sigmoid(lam * (rel["beta_a_scale"] * beta_a[p[1]] - cost))
        previous = dict(mu)
        if t == len(lambdas) - 1:
            break
        for c in groups:  # E-step
            weighted = {}
            for e in out_of[c]:
                p, v = edges[e][1], edges[e][2]
                density = 1.0
                for h in range(16):
                    density = (
                        density
                        * torch.exp(-((v[h] - mu[p][h]) ** 2) / (2 * var[p][h]))
                        / torch.sqrt(2 * math.pi * var[p][h])
                    )
                weighted[e] = a[p] * density
            norm = sum(weighted.values())
            for e in out_of[c]:
                R[e] = weighted[e] / norm
    return mu, a, R


def randomise_betas(layer: torch.nn.Module) -> None:
    with torch.no_grad():
        layer.routing.beta_u.normal_(0.0, 0.5)
        layer.routing.beta_a.normal_(0.0, 0.5)


CONV_CASES = [  # (size, stride, schedule, iterations, normalisation)
    *[
        (size, stride, schedule, iterations, "covering")
        for size, stride in [(4, 1), (5, 2), (6, 2)]
        for schedule, iterations in [("official", 3), ("fixed", 2)]
    ],
    (5, 2, "fixed", 3, "type"),
    (4, 1, "fixed", 3, "type"),
    (5, 2, "fixed", 3, "patch"),
    (5, 2, "official", 3, "release"),  # the authors' release: per-type normalisation and its M-step
    (4, 1, "fixed", 2, "covering+release_m_step"),  # the release's M-step with the paper's normalisation
]
RELEASE_M_STEP = {"log_variance": True, "beta_u_scale": 2.5, "beta_a_scale": 30.0, "mean_smoothing": 0.1}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size,stride,schedule,iterations,normalisation", CONV_CASES)
def test_conv_layer_equals_slow_loop(impl, size, stride, schedule, iterations, normalisation):
    torch.manual_seed(size * 10 + stride + iterations)
    t_in, t_out, k = 2, 2, 3
    release = RELEASE_M_STEP if normalisation in ("release", "covering+release_m_step") else None
    normalisation = {"release": "type", "covering+release_m_step": "covering"}.get(normalisation, normalisation)
    layer = conv_layer(
        t_in,
        t_out,
        k,
        stride,
        impl=impl,
        iterations=iterations,
        lambda_schedule=schedule,
        lambda_value=0.05,
        normalisation=normalisation,
        **(release or {}),
    ).double()
    randomise_betas(layer)
    pose = torch.randn(1, size, size, t_in, 16, dtype=torch.float64)
    a = torch.rand(1, size, size, t_in, dtype=torch.float64)
    (mu, a_out), R = final_assignments(layer, pose, a)
    n_out = layer.output_size(size)
    edges = []
    for oy in range(n_out):
        for ox in range(n_out):
            for ky in range(k):
                for kx in range(k):
                    y, x = oy * stride + ky, ox * stride + kx
                    for i in range(t_in):
                        for j in range(t_out):
                            M, W = pose[0, y, x, i].view(4, 4), layer.weight[ky * k + kx, i, j]
                            edges.append((((y, x), i), ((oy, ox), j), (M @ W).flatten().detach()))
    a_child = {((y, x), i): a[0, y, x, i] for y in range(size) for x in range(size) for i in range(t_in)}
    group = {  # what a child's assignments are normalised over
        "covering": None,  # every parent the child votes for (paper)
        "type": lambda e: (edges[e][0], edges[e][1][1]),  # ... of one parent type (the authors' release)
        "patch": lambda e: (edges[e][0], edges[e][1][0]),  # ... at one parent position (per patch)
    }[normalisation]
    start = None if normalisation == "covering" else (lambda e: 1.0 / t_out)  # release / per patch: 1/T_out per slot
    mu_ref, a_ref, R_ref = slow_em(
        edges,
        a_child,
        layer.routing.beta_u.detach(),
        layer.routing.beta_a.detach(),
        layer.routing.lambdas,
        layer.routing.var_floor,
        group=group,
        start=start,
        release=release,
    )
    for (oy, ox), j in mu_ref:
        assert torch.allclose(mu[0, oy, ox, j], mu_ref[(oy, ox), j], atol=1e-10)
        assert torch.allclose(a_out[0, oy, ox, j], a_ref[(oy, ox), j], atol=1e-12)
    R = R.view(1, layer.output_size(size), layer.output_size(size), k * k, t_in, t_out)
    for e, (((y, x), i), ((oy, ox), j), _) in enumerate(edges):
        ky, kx = y - oy * stride, x - ox * stride
        assert torch.allclose(R[0, oy, ox, ky * k + kx, i, j], torch.as_tensor(R_ref[e], dtype=R.dtype), atol=1e-10)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("coordinate_addition", [True, False])
@pytest.mark.parametrize("pose_kind", ["matrix", "vector"])
def test_class_layer_equals_slow_loop(impl, coordinate_addition, pose_kind):
    torch.manual_seed(7)
    h, w, t_in, n_cls = 3, 2, 2, 3
    layer = class_layer(
        t_in,
        n_cls,
        impl=impl,
        coordinate_addition=coordinate_addition,
        pose=pose_kind,
        lambda_schedule="fixed",
        lambda_value=0.2,
    ).double()
    randomise_betas(layer)
    pose = torch.randn(2, h, w, t_in, 16, dtype=torch.float64)
    a = torch.rand(2, h, w, t_in, dtype=torch.float64)
    (mu, a_out), R = final_assignments(layer, pose, a)
    R = R.view(2, h, w, t_in, n_cls)
    for b in range(2):
        edges = []
        for y in range(h):
            for x in range(w):
                for i in range(t_in):
                    for j in range(n_cls):
                        if pose_kind == "matrix":
                            vote = (pose[b, y, x, i].view(4, 4) @ layer.weight[i, j]).detach()
                            if coordinate_addition:
                                vote[0, 3] += (y + 0.5) / h
                                vote[1, 3] += (x + 0.5) / w
                        else:
                            vote = (pose[b, y, x, i] @ layer.weight[i, j]).detach()
                            if coordinate_addition:
                                vote[0] += (y + 0.5) / h
                                vote[1] += (x + 0.5) / w
                        edges.append((((y, x), i), (0, j), vote.flatten()))
        a_child = {((y, x), i): a[b, y, x, i] for y in range(h) for x in range(w) for i in range(t_in)}
        mu_ref, a_ref, R_ref = slow_em(
            edges,
            a_child,
            layer.routing.beta_u.detach(),
            layer.routing.beta_a.detach(),
            layer.routing.lambdas,
            layer.routing.var_floor,
        )
        for j in range(n_cls):
            assert torch.allclose(mu[b, j], mu_ref[0, j], atol=1e-10)
            assert torch.allclose(a_out[b, j], a_ref[0, j], atol=1e-12)
        for e, (((y, x), i), (_, j), _) in enumerate(edges):
            assert torch.allclose(R[b, y, x, i, j], torch.as_tensor(R_ref[e], dtype=torch.float64), atol=1e-10)


def covering_sums(R: torch.Tensor, height: int, width: int, *, kernel_size: int, stride: int) -> torch.Tensor:
    """Sum each child's assignments over every parent that covers it, by explicit loops: (B, H, W, T_in)."""
    b, h_out, w_out, _, t_in, _ = R.shape
    sums = torch.zeros(b, height, width, t_in, dtype=R.dtype)
    for oy in range(h_out):
        for ox in range(w_out):
            for ky in range(kernel_size):
                for kx in range(kernel_size):
                    sums[:, oy * stride + ky, ox * stride + kx] += R[:, oy, ox, ky * kernel_size + kx].sum(-1)
    return sums


@pytest.mark.parametrize("size,stride", [(6, 1), (7, 2), (6, 2)])
def test_conv_assignments_sum_to_one_over_covering_parents_not_per_patch(size, stride):
    torch.manual_seed(stride)
    layer = conv_layer(3, 4, 3, stride, lambda_schedule="fixed", lambda_value=0.1)
    randomise_betas(layer)
    (mu, a_out), R = final_assignments(layer, torch.randn(2, size, size, 3, 16), torch.rand(2, size, size, 3))
    n_out = layer.output_size(size)
    R = R.view(2, n_out, n_out, 9, 3, 4)  # (B, H_out, W_out, 9, T_in, T_out)
    sums = covering_sums(R, size, size, kernel_size=3, stride=stride)
    covered = (
        torch.bincount(conv_child_index(size, size, kernel_size=3, stride=stride), minlength=size * size).view(
            size, size
        )
        > 0
    )
    assert torch.allclose(sums[:, covered], torch.ones_like(sums[:, covered]), atol=1e-5)
    assert (sums[:, ~covered] == 0).all()  # e.g. the last row and column for (6, 2): no assignments, no NaN
    assert (size, stride) != (6, 2) or (~covered).any()
    # a per-patch normalisation would make every patch slot sum to 1 over the out types: it does not
    per_patch = R.sum(-1)  # (B, H_out, W_out, 9, T_in)
    assert not torch.allclose(per_patch, torch.ones_like(per_patch), atol=1e-2)
    assert (a_out > 0).all() and (a_out < 1).all() and torch.isfinite(mu).all()


def test_initial_assignments_uniform_over_covering_parents():
    layer = conv_layer(2, 3, 3, 1, iterations=1)
    _, R = final_assignments(layer, torch.randn(1, 5, 5, 2, 16), torch.rand(1, 5, 5, 2))
    R = R.view(1, 3, 3, 9, 2, 3)  # one iteration: R is still the initial one
    # the centre child (2, 2) is covered by all 9 patches, the corner (0, 0) by one
    assert torch.allclose(R[0, 1, 1, 4], torch.full((2, 3), 1 / 27))
    assert torch.allclose(R[0, 0, 0, 0], torch.full((2, 3), 1 / 3))


@pytest.mark.parametrize("impl", IMPLS)
def test_em_routing_invariants_on_random_votes(impl):
    torch.manual_seed(3)
    V, a_in = torch.randn(4, 1, 10, 3, 5, 16) * 3, torch.rand(4, 1, 10, 3)
    layer = em(5, impl=impl, lambda_schedule="fixed", var_floor=0.01)
    poses, a_out, R = layer(V, a_in)
    assert torch.allclose(R.sum(-1), torch.ones(4, 1, 10, 3), atol=1e-6)
    assert (a_out > 0).all() and (a_out < 1).all()
    assert poses.shape == (4, 1, 5, 16) and a_out.shape == (4, 1, 5)


@pytest.mark.parametrize("route", [reference_em_routing, fused_em_routing], ids=IMPLS)
def test_golden_one_parent_two_children(route):
    # one parent, children votes 1 and 3 (every h), a = 1: mu = 2, sigma^2 = 1 + floor,
    # cost = 16 * (beta_u + 0.5 log(1 + floor)) * 2, a_out = sigmoid(lambda (beta_a - cost))
    V = torch.tensor([1.0, 3.0], dtype=torch.float64).view(1, 1, 2, 1, 1, 1).expand(1, 1, 2, 1, 1, 16)
    kwargs = {"moment_dtype": torch.float64} if route is fused_em_routing else {}
    mu, a_out, _ = route(
        V,
        torch.ones(1, 1, 2, 1, dtype=torch.float64),
        beta_u=torch.tensor([0.1], dtype=torch.float64),
        beta_a=torch.tensor([2.0], dtype=torch.float64),
        lambdas=[0.5],
        var_floor=0.0005,
        eps=0.0,
        **kwargs,
    )
    cost = 16 * (0.1 + 0.5 * math.log(1.0005)) * 2
    assert torch.allclose(mu, torch.full((1, 1, 1, 16), 2.0, dtype=torch.float64))
    assert math.isclose(a_out.item(), 1 / (1 + math.exp(-0.5 * (2.0 - cost))), rel_tol=1e-12)


def test_lambda_schedule_golden_values():
    assert inverse_temperatures(3) == pytest.approx([0.0005, 0.000975, 0.00142625], rel=1e-12)
    assert inverse_temperatures(3, scale=0.25) == pytest.approx([0.000125, 0.00024375, 0.0003565625], rel=1e-12)
    assert inverse_temperatures(2, value=0.02) == pytest.approx(
        [0.001, 0.00195], rel=1e-12
    )  # value scales the official ramp
    assert inverse_temperatures(2, schedule="fixed", value=0.3, scale=0.25) == pytest.approx([0.075, 0.075])
    assert em(3, role="class").lambdas == pytest.approx([0.000125, 0.00024375, 0.0003565625])
    assert em(3, iterations=2).lambdas == pytest.approx([0.0005, 0.000975])
    assert em(3, lambda_schedule="fixed", lambda_value=0.02).lambdas == pytest.approx([0.02] * 3)
    assert em(
        3, lambda_schedule="fixed", lambda_value=0.02, role="class", class_lambda_scale=0.5
    ).lambdas == pytest.approx([0.01] * 3)


@pytest.mark.parametrize("impl", IMPLS)
def test_routing_runs_in_float32_under_autocast(impl):
    layer = class_layer(2, 3, impl=impl, moment_dtype="float32")
    pose, a = torch.randn(2, 3, 3, 2, 16).bfloat16(), torch.rand(2, 3, 3, 2).bfloat16()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        mu, a_out = layer(pose, a)
    assert mu.dtype == torch.float32 and a_out.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"iterations": 0}, "iterations"),
        ({"lambda_schedule": "linear"}, "lambda_schedule"),
        ({"var_floor": 0.0}, "var_floor"),
        ({"class_lambda_scale": -1.0}, "class_lambda_scale"),
        ({"normalisation": "global"}, "normalisation"),
        ({"moment_dtype": "float16"}, "moment_dtype"),
        ({"impl": "cuda"}, "impl"),
        ({"iteration": 2}, "iteration"),
    ],
)
def test_bad_config_raises_naming_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=f"model.routing.*{key}"):
        em(2, **kwargs)


def test_routing_module_parameters():
    assert sum(p.numel() for p in em(7).parameters()) == 14


# --- fused == reference; precision, gradients and layouts of the fused moments -----------------


def routing_inputs(case: str, *, conv: bool, seed: int = 0) -> dict:
    """Votes (B, P, K, T_in, T_out, 16), activations and routing kwargs; conv: 3x3/1 on a 5x5 grid."""
    torch.manual_seed(seed)
    if conv:
        layout, k, p = ChildLayout(conv_child_index(5, 5, kernel_size=3, stride=1), 25), 9, 9
    else:
        layout, k, p = ChildLayout(), 12, 1
    shape = (2, p, k, 3, 4, 16)
    V = {
        "randn": torch.randn(shape),
        "offset_1000": 1000 + 3 * torch.randn(shape),
        "huge_1e4": 1e4 * torch.randn(shape),
    }[case]
    return {
        "V": V,
        "a_in": torch.rand(shape[:4]),
        "beta_u": 0.5 * torch.randn(4),
        "beta_a": 0.5 * torch.randn(4),
        "lambdas": [0.01, 0.02, 0.05],
        "layout": layout,
    }


def as_double(inputs: dict) -> dict:
    return {key: x.double() if torch.is_tensor(x) and x.is_floating_point() else x for key, x in inputs.items()}


# the fused routing's vote-sized work runs in blocks of vote_passes.CHUNK_ELEMENTS elements: the default (one block
# for these sizes), one parent / one position per block, blocks that split the parents of one image unevenly, and
# votes formed from their factors in blocks that straddle two images (8 x 1600 elements: 7 of the 2 x 9 positions)
CHUNKS = [None, 1, 5000, 1600]


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("normalisation", ["covering", "type", "patch"])
@pytest.mark.parametrize("conv", [True, False])
def test_fused_equals_reference_values_and_gradients(conv, normalisation, chunk, monkeypatch):
    if chunk is not None:
        monkeypatch.setattr(kernels, "CHUNK_ELEMENTS", chunk)
    inputs = as_double(routing_inputs("randn", conv=conv))
    V, a_in = inputs.pop("V").requires_grad_(True), inputs.pop("a_in").requires_grad_(True)
    beta_u, beta_a = inputs.pop("beta_u").requires_grad_(True), inputs.pop("beta_a").requires_grad_(True)
    leaves = (V, a_in, beta_u, beta_a)
    weights = None
    results = []
    for route, extra in ((reference_em_routing, {}), (fused_em_routing, {"moment_dtype": torch.float64})):
        out = route(V, a_in, beta_u=beta_u, beta_a=beta_a, normalisation=normalisation, **inputs, **extra)
        if weights is None:
            weights = [torch.randn_like(x) for x in out]
        loss = sum((w * x).sum() for w, x in zip(weights, out))
        results.append((out, torch.autograd.grad(loss, leaves)))
    (ref, ref_grads), (fused, fused_grads) = results
    for x, y in zip(ref, fused):
        assert torch.allclose(x, y, atol=1e-10, rtol=1e-9)
    for x, y in zip(ref_grads, fused_grads):
        assert torch.allclose(x, y, atol=1e-9, rtol=1e-7)


def tight_cluster_inputs(seed: int) -> dict:
    """Large poses of which 30% agree to 1e-3 far from the plain mean of the rest: the cancellation case."""
    inputs = routing_inputs("randn", conv=True, seed=seed)
    V = 10 * inputs["V"]
    inliers = torch.rand(V.shape[:4]) < 0.3  # (B, P, K, T_in)
    centre = 10 * torch.randn(V.shape[0], V.shape[1], 1, 1, V.shape[4], 16)
    inputs["V"] = torch.where(inliers[..., None, None], centre + 1e-3 * torch.randn(V.shape), V)
    inputs["a_in"] = torch.where(inliers, 0.9, 0.1)
    return inputs


def float32_errors(got, ref) -> tuple[float, float, float]:
    """Largest error of poses (relative to the largest pose), activations and assignments (absolute)."""
    return (
        ((got.poses.double() - ref.poses).abs().max() / ref.poses.abs().max()).item(),
        (got.activations.double() - ref.activations).abs().max().item(),
        (got.assignments.double() - ref.assignments).abs().max().item(),
    )


@pytest.mark.parametrize("normalisation", ["covering", "type"])
@pytest.mark.parametrize("conv", [True, False])
@pytest.mark.parametrize("case", ["randn", "offset_1000", "huge_1e4"])
def test_float32_routing_matches_float64(case, conv, normalisation):
    # float64 equals the slow loop (tests above). float32 (the default) re-centres the votes on each M-step's
    # mean and keeps the per-parent statistics in float64: worst over 10 seeds 2.5e-6 (the plain-mean
    # centring of earlier versions: up to 6.5e-5 on R; a float32 run of the reference: up to 6.4e-4)
    for seed in range(3):
        inputs = routing_inputs(case, conv=conv, seed=seed)
        got = fused_em_routing(**inputs, normalisation=normalisation)
        ref = fused_em_routing(**as_double(inputs), normalisation=normalisation, moment_dtype=torch.float64)
        assert got.poses.dtype == got.activations.dtype == got.assignments.dtype == torch.float32
        assert max(float32_errors(got, ref)) < 1e-5, (seed, float32_errors(got, ref))


def test_float32_routing_exact_for_a_tight_cluster_far_from_the_mean():
    # the case that defeated plain-mean centring (R off by 6e-2): now better than a float32 run of the
    # straightforward reference, which forms (V - mu)^2 itself; what is left is float32's own rounding of the
    # outliers' squared distances (~1e4 sigma^2)
    for seed in range(3):
        torch.manual_seed(seed)
        inputs = tight_cluster_inputs(seed)
        ref = fused_em_routing(**as_double(inputs), moment_dtype=torch.float64)
        exact = fused_em_routing(**inputs, moment_dtype=torch.float64)  # float64 arithmetic on float32 inputs
        assert max(float32_errors(exact, ref)) < 1e-9
        got = float32_errors(fused_em_routing(**inputs), ref)
        plain = float32_errors(reference_em_routing(**inputs), ref)
        assert got[0] < 1e-4 and got[1] < 2e-5 and got[2] < 2e-4, got
        assert all(g <= max(q, 1e-5) for g, q in zip(got, plain)), (got, plain)  # never worse than plain float32


def test_float32_gradients_match_float64():
    inputs = routing_inputs("randn", conv=True)
    grads = []
    for dtype in (torch.float32, torch.float64):
        leaves = [inputs[key].to(dtype).requires_grad_(True) for key in ("V", "a_in", "beta_u", "beta_a")]
        rest = {key: value for key, value in inputs.items() if key not in ("V", "a_in", "beta_u", "beta_a")}
        out = fused_em_routing(*leaves[:2], beta_u=leaves[2], beta_a=leaves[3], moment_dtype=dtype, **rest)
        torch.manual_seed(1)
        loss = sum((torch.randn(x.shape, dtype=torch.float64) * x.double()).sum() for x in out)
        grads.append(torch.autograd.grad(loss, leaves))
    for g32, g64 in zip(*grads):
        assert ((g32.double() - g64).abs().max() / g64.abs().max()).item() < 1e-5


@pytest.mark.parametrize("route", [reference_em_routing, fused_em_routing], ids=IMPLS)
@pytest.mark.parametrize("conv", [True, False])
def test_em_routing_gradcheck_float64(route, conv):
    inputs = as_double(routing_inputs("randn", conv=conv))
    inputs["V"] = inputs["V"][:1, :, :, :2, :3]  # (1, P, K, 2, 3, 16)
    inputs["a_in"] = inputs["a_in"][:1, :, :, :2]
    inputs["beta_u"], inputs["beta_a"] = inputs["beta_u"][:3], inputs["beta_a"][:3]
    # votes in a strided layout, as the vote einsum hands them over
    V = inputs.pop("V").permute(4, 0, 1, 2, 3, 5).contiguous().permute(1, 2, 3, 4, 0, 5)
    tensors = [V, inputs.pop("a_in"), inputs.pop("beta_u"), inputs.pop("beta_a")]
    for x in tensors:
        x.requires_grad_(True)
    extra = {"moment_dtype": torch.float64} if route is fused_em_routing else {}

    def routed(V, a_in, beta_u, beta_a):
        return route(V, a_in, beta_u=beta_u, beta_a=beta_a, **inputs, **extra)

    assert torch.autograd.gradcheck(routed, tensors, fast_mode=True)


def test_gradients_repeatable_partial_and_linear():
    inputs = routing_inputs("randn", conv=True)
    V = inputs.pop("V").requires_grad_(True)
    a_in = inputs.pop("a_in").requires_grad_(True)
    mu, a_out, _ = fused_em_routing(V, a_in, **inputs)
    g_mu = torch.randn_like(mu)
    first = torch.autograd.grad((mu * g_mu).sum(), V, retain_graph=True)[0]
    again = torch.autograd.grad((mu * g_mu).sum(), V, retain_graph=True)[0]
    assert torch.equal(first, again)  # nothing left over from one backward to the next
    of_a = torch.autograd.grad(a_out.sum(), V, retain_graph=True)[0]
    both = torch.autograd.grad((mu * g_mu).sum() + a_out.sum(), V, retain_graph=True)[0]
    assert torch.allclose(both, first + of_a, rtol=1e-4, atol=1e-6)
    only_a = fused_em_routing(V.detach(), a_in, **inputs)  # votes without gradient
    (grad_a,) = torch.autograd.grad(only_a.activations.sum(), a_in)
    assert torch.isfinite(grad_a).all() and grad_a.abs().sum() > 0


def test_vote_layout_does_not_change_the_result():
    inputs = routing_inputs("randn", conv=True)
    V = inputs.pop("V")
    strided = V.permute(2, 3, 0, 1, 4, 5).contiguous().permute(2, 3, 0, 1, 4, 5)  # the vote einsum's layout
    assert not strided.is_contiguous()
    a, b = fused_em_routing(V, **inputs), fused_em_routing(strided, **inputs)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("conv", [True, False])
@pytest.mark.parametrize("offset", [False, True])
def test_votes_by_their_factors_equal_the_votes_tensor_in_values_and_gradients(conv, offset, chunk, monkeypatch):
    # fused EM forms the votes itself, block by block, from a layer's VoteFactors; the routing of the factors must
    # equal the routing of the votes they make, and the gradients reach the pose, the weight and the offset
    if chunk is not None:
        monkeypatch.setattr(kernels, "CHUNK_ELEMENTS", chunk)
    inputs = as_double(routing_inputs("randn", conv=conv))
    b, p, k, t_in, t_out, d = inputs.pop("V").shape
    torch.manual_seed(1)
    pose = torch.randn(b, p, k, t_in, d, dtype=torch.float64, requires_grad=True)
    weight = (0.5 * torch.randn(k, t_in, t_out, d, d, dtype=torch.float64)).requires_grad_(True)
    shift = torch.randn(k, d, dtype=torch.float64, requires_grad=True) if offset else None
    a_in = inputs.pop("a_in").requires_grad_(True)
    factors = VoteFactors(pose, weight, shift)
    leaves = [x for x in (pose, weight, shift, a_in) if x is not None]
    results = []
    for V in (factors.materialise(), factors):
        out = fused_em_routing(V, a_in, moment_dtype=torch.float64, **inputs)
        loss = sum((torch.cos(3 * x) * (i + 1)).sum() for i, x in enumerate(out))
        results.append((out, torch.autograd.grad(loss, leaves)))
    (ref, ref_grads), (got, got_grads) = results
    for x, y in zip(ref, got):
        assert torch.allclose(x, y, atol=1e-10, rtol=1e-9)
    for x, y in zip(ref_grads, got_grads):
        assert x.abs().max() > 0 and torch.allclose(x, y, atol=1e-9, rtol=1e-7)


def test_a_routing_without_vote_factors_receives_the_votes_tensor():
    # the seam forms the votes for every procedure that does not form them itself (here the reference EM routing)
    layer = em(4, impl="reference", lambda_schedule="fixed", lambda_value=0.05).double()
    assert not layer.takes_vote_factors and em(4).takes_vote_factors  # fused EM is the default
    seen = []
    layer.route = lambda votes, *args: seen.append(votes) or type(layer).route(layer, votes, *args)
    factors = VoteFactors(torch.randn(2, 1, 6, 3, 16), torch.randn(6, 3, 4, 16, 16), torch.randn(6, 16))
    out = layer(factors, torch.rand(2, 1, 6, 3, dtype=torch.float64))
    assert torch.is_tensor(seen[0]) and torch.equal(seen[0], factors.materialise())
    assert out.poses.shape == (2, 1, 4, 16)


@pytest.mark.parametrize("route", [reference_em_routing, fused_em_routing], ids=IMPLS)
def test_parents_without_data_get_zero_pose_and_the_bias_activation(route):
    # as the slow loop: mu = sum_i R V / (sum_i R + eps) = 0 and cost = 0 when no child is active
    inputs = routing_inputs("offset_1000", conv=True)
    inputs["a_in"] = torch.zeros_like(inputs["a_in"])
    poses, a_out, _ = route(**inputs, var_floor=0.01)
    assert torch.equal(poses, torch.zeros_like(poses))
    expected = torch.sigmoid(inputs["lambdas"][-1] * inputs["beta_a"]).expand_as(a_out)
    assert torch.allclose(a_out, expected)


def test_moment_dtype_and_normalisation_reach_the_routing():
    layer = conv_layer(2, 2, 3, 1, moment_dtype="float64", normalisation="type")
    assert layer.routing.moment_dtype == "float64" and layer.routing.normalisation == "type"


# --- the release's M-step switches: each changes what it claims, nothing else ------------------


def routed(impl: str, role: str = "hidden", conv: bool = True, **settings):
    """(poses, activations, assignments) of one EM routing on fixed float64 inputs, with ``settings``."""
    inputs = as_double(routing_inputs("randn", conv=conv, seed=11))
    layer = em(4, impl=impl, role=role, lambda_schedule="fixed", lambda_value=0.05, **settings).double()
    with torch.no_grad():
        layer.beta_u.copy_(inputs["beta_u"])
        layer.beta_a.copy_(inputs["beta_a"])
    return layer(inputs["V"], inputs["a_in"], inputs["layout"]), inputs


def same(a, b, atol=1e-10) -> bool:
    return all(torch.allclose(x, y, atol=atol, rtol=1e-9) for x, y in zip(a, b))


@pytest.mark.parametrize("impl", IMPLS)
def test_beta_scales_are_a_reparameterisation_of_the_biases(impl):
    (scaled, inputs) = routed(impl, beta_a_scale=40.0, beta_u_scale=3.0)
    layer = em(4, impl=impl, lambda_schedule="fixed", lambda_value=0.05).double()
    with torch.no_grad():
        layer.beta_u.copy_(3.0 * inputs["beta_u"])
        layer.beta_a.copy_(40.0 * inputs["beta_a"])
    assert same(scaled, layer(inputs["V"], inputs["a_in"], inputs["layout"]))
    assert not same(scaled, routed(impl)[0])


@pytest.mark.parametrize("impl", IMPLS)
def test_log_variance_doubles_the_log_term_of_the_cost(impl):
    # cost with log sigma^2 = 2 (beta_u / 2 + log sigma) m: the paper's form at lambda' = 2 lambda, betas halved
    (release, inputs) = routed(impl, log_variance=True)
    layer = em(4, impl=impl, lambda_schedule="fixed", lambda_value=0.1).double()
    with torch.no_grad():
        layer.beta_u.copy_(inputs["beta_u"] / 2)
        layer.beta_a.copy_(inputs["beta_a"] / 2)
    assert same(release, layer(inputs["V"], inputs["a_in"], inputs["layout"]))


@pytest.mark.parametrize("impl", IMPLS)
def test_mean_smoothing_shrinks_the_first_mean_towards_zero_and_changes_only_the_poses_with_one_iteration(impl):
    (smooth, _), (paper, _) = (
        routed(impl, mean_smoothing=0.1, iterations=1, conv=False),
        routed(impl, iterations=1, conv=False),
    )
    assert torch.allclose(smooth.poses, 0.9 * paper.poses, atol=1e-12)  # mu_1 = 0.9 mean + 0.1 * 0
    assert torch.equal(smooth.assignments, paper.assignments)  # the start: uniform either way
    assert not torch.allclose(smooth.activations, paper.activations)  # the variance is around the smoothed mean


@pytest.mark.parametrize("role, expected", [("hidden", (0.5, -0.5)), ("class", (2.0, -1.0))])
def test_beta_inits_per_layer_role(role, expected):
    layer = em(3, role=role, beta_u_init=0.5, beta_a_init=-0.5, class_beta_u_init=2.0, class_beta_a_init=-1.0)
    assert torch.equal(layer.beta_u, torch.full((3,), expected[0])) and torch.equal(
        layer.beta_a, torch.full((3,), expected[1])
    )
    assert torch.equal(em(3, role="class", beta_u_init=0.7).beta_u, torch.full((3,), 0.7))  # class_* null: the same


@pytest.mark.parametrize("normalisation", ["covering", "type"])
def test_fused_equals_reference_with_the_release_m_step(normalisation):
    inputs = as_double(routing_inputs("randn", conv=True, seed=2))
    V, a_in = inputs.pop("V").requires_grad_(True), inputs.pop("a_in").requires_grad_(True)
    variant = EMVariant(**RELEASE_M_STEP)
    outs, grads = [], []
    for route, extra in ((reference_em_routing, {}), (fused_em_routing, {"moment_dtype": torch.float64})):
        out = route(V, a_in, normalisation=normalisation, variant=variant, **inputs, **extra)
        outs.append(out)
        grads.append(torch.autograd.grad(out.poses.sin().sum() + out.activations.sum(), (V, a_in)))
    assert same(*outs)
    assert all(torch.allclose(x, y, atol=1e-9, rtol=1e-7) for x, y in zip(*grads))


@pytest.mark.parametrize(
    "route, extra", [(reference_em_routing, {}), (fused_em_routing, {"moment_dtype": torch.float64})], ids=IMPLS
)
def test_detach_assignments_keeps_the_forward_pass_and_changes_only_the_gradients(route, extra):
    inputs = as_double(routing_inputs("randn", conv=True, seed=4))
    V = inputs.pop("V").requires_grad_(True)
    results = {}
    for detach in (False, True):
        out = route(V, variant=EMVariant(detach_assignments=detach), **inputs, **extra)
        results[detach] = (out, torch.autograd.grad(out.poses.sin().sum() + out.activations.sum(), V)[0])
    assert same(results[False][0], results[True][0], atol=0)  # identical values
    assert not torch.allclose(results[False][1], results[True][1])  # gradients no longer pass through R
    ref = reference_em_routing(V, variant=EMVariant(detach_assignments=True), **inputs)
    assert torch.allclose(
        torch.autograd.grad(ref.poses.sin().sum() + ref.activations.sum(), V)[0], results[True][1], atol=1e-9
    )


@pytest.mark.parametrize("seed", range(12))
def test_activation_gradient_of_a_child_joining_a_parent_with_one_child_is_not_lost_to_rounding(seed):
    # every parent holds a single child (the others at a = 0): its variance is 0 up to rounding, which the
    # centred moments can land just below 0; a plain clamp there zeroes d cost / d a of the other children
    torch.manual_seed(seed)
    V = torch.randn(1, 1, 6, 1, 2, 16, dtype=torch.float64)
    a_in = torch.zeros(1, 1, 6, 1, dtype=torch.float64)
    a_in[..., 0, 0] = 1.0
    a_in.requires_grad_(True)
    kwargs = {"beta_u": torch.zeros(2, dtype=torch.float64), "beta_a": torch.zeros(2, dtype=torch.float64)}
    grads = []
    for route, extra in ((reference_em_routing, {}), (fused_em_routing, {"moment_dtype": torch.float64})):
        out = route(V, a_in, lambdas=[0.01], **kwargs, **extra)
        (grad,) = torch.autograd.grad(out.activations.sum(), a_in)
        grads.append(grad)
    assert grads[0][..., 1:, :].abs().min() > 1.0  # a child joining the parent changes its cost
    assert torch.allclose(grads[1], grads[0], rtol=1e-6, atol=1e-8)


def test_fused_routing_refuses_second_derivatives_and_the_reference_computes_them():
    inputs = as_double(routing_inputs("randn", conv=False))
    inputs["V"] = inputs["V"][:1, :, :4, :2, :2, :4].clone().requires_grad_(True)
    inputs["a_in"] = inputs["a_in"][:1, :, :4, :2]
    inputs["beta_u"], inputs["beta_a"] = inputs["beta_u"][:2], inputs["beta_a"][:2]
    out = fused_em_routing(**inputs, moment_dtype=torch.float64)
    with pytest.raises(RuntimeError, match="impl=reference"):
        torch.autograd.grad(out.activations.sum(), inputs["V"], create_graph=True)
    V = inputs.pop("V")

    def activations(V):
        return reference_em_routing(V, **inputs).activations

    assert torch.autograd.gradgradcheck(activations, (V,), fast_mode=True)


def test_fused_called_directly_under_autocast_routes_as_without():
    # the layers turn autocast off around every routing; a direct call must not run its bmm's in bf16
    inputs = routing_inputs("randn", conv=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused_em_routing(**inputs)
    want = fused_em_routing(**inputs)
    for x, y in zip(got, want):
        assert x.dtype == torch.float32 and torch.equal(x, y)
