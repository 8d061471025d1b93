"""Variational Bayes routing (Ribeiro et al. 2020) against a loop reference, and its priors as settings."""

from __future__ import annotations

import math

import pytest
import torch

from capsnets.errors import ConfigError
from capsnets.nn.conv_caps import conv_child_index
from capsnets.nn.routing import ChildLayout, FusedVBRouting, VBRouting, VoteFactors, build_routing, kernels
from capsnets.nn.routing.base import DEFAULT_IMPLS

CONV = ChildLayout(conv_child_index(4, 4, kernel_size=3, stride=1), 16)


def loop_reference(V, a_in, layout, *, iterations, alpha0, kappa0, nu0, psi0, m0, normalisation, beta_u, beta_a, bn):
    """The update equations of the module docstring, one parent and one child at a time (float64 scalars)."""
    b_size, p_size, k_size, t_in, t_out, d = V.shape
    slots = [(p, k, i) for p in range(p_size) for k in range(k_size) for i in range(t_in)]

    def child(p, k, i):
        return (int(layout.child_index[p * k_size + k]) if layout.shared else (p, k), i)

    def members(p, k, i, j):  # the parents over which child (p, k, i)'s assignment to (p, j) is normalised
        if normalisation == "patch" or not layout.shared:
            return [(p, k, i, jj) for jj in range(t_out)]
        same = [(q, m, i2) for q, m, i2 in slots if child(q, m, i2) == child(p, k, i)]
        return [(q, m, i2, jj) for q, m, i2 in same for jj in range(t_out) if normalisation == "covering" or jj == j]

    def normalise(log_rho):
        R = {}
        for p, k, i in slots:
            for j in range(t_out):
                z = torch.stack([log_rho[x] for x in members(p, k, i, j)])
                R[(p, k, i, j)] = torch.exp(log_rho[(p, k, i, j)]) / torch.exp(z).sum()
        return R

    poses = torch.zeros(b_size, p_size, t_out, d, dtype=V.dtype)
    logits = torch.zeros(b_size, p_size, t_out, dtype=V.dtype)
    R_out = torch.zeros(V.shape[:5], dtype=V.dtype)
    for b in range(b_size):
        R = normalise({(p, k, i, j): torch.zeros((), dtype=V.dtype) for p, k, i in slots for j in range(t_out)})
        for t in range(iterations):
            q = {}
            for p in range(p_size):
                for j in range(t_out):
                    w = {s: R[(*s, j)] * a_in[b, s[0], s[1], s[2]] for s in slots if s[0] == p}
                    Rj = sum(w.values())
                    mu_bar = sum(w[s] * V[b, s[0], s[1], s[2], j] for s in w) / (Rj + 1e-8)
                    S = sum(w[s] * (V[b, s[0], s[1], s[2], j] - mu_bar) ** 2 for s in w)
                    kappa, nu, alpha = kappa0 + Rj, nu0 + Rj, alpha0 + Rj
                    m = (Rj * mu_bar + kappa0 * m0) / kappa
                    inv_psi = 1 / psi0 + S + kappa0 * Rj / kappa * (mu_bar - m0) ** 2
                    e_ln_lambda = (
                        sum(torch.digamma((nu + 1 - h) / 2) for h in range(1, d + 1))
                        + d * math.log(2)
                        - torch.log(inv_psi).sum()
                    )
                    q[(p, j)] = dict(alpha=alpha, kappa=kappa, nu=nu, m=m, inv_psi=inv_psi, e_ln_lambda=e_ln_lambda)
                alphas = torch.stack([q[(p, j)]["alpha"] for j in range(t_out)])
                for j in range(t_out):
                    q[(p, j)]["e_ln_pi"] = torch.digamma(q[(p, j)]["alpha"]) - torch.digamma(alphas.sum())
            if t < iterations - 1:
                log_rho = {}
                for p, k, i in slots:
                    for j in range(t_out):
                        qj, v = q[(p, j)], V[b, p, k, i, j]
                        quad = d / qj["kappa"] + qj["nu"] * ((v - qj["m"]) ** 2 / qj["inv_psi"]).sum()
                        log_rho[(p, k, i, j)] = (
                            qj["e_ln_pi"] + 0.5 * qj["e_ln_lambda"] - 0.5 * d * math.log(2 * math.pi) - 0.5 * quad
                        )
                R = normalise(log_rho)
        for p in range(p_size):
            for j in range(t_out):
                qj = q[(p, j)]
                entropy = 0.5 * d * math.log(2 * math.pi * math.e) - 0.5 * qj["e_ln_lambda"]
                logits[b, p, j] = beta_a[j] - (torch.exp(qj["e_ln_pi"]) * entropy + beta_u[j])
                poses[b, p, j] = qj["m"]
        for (p, k, i, j), r in R.items():
            R_out[b, p, k, i, j] = r
    if bn:  # batch norm per parent type, no affine: over examples and positions (poses: and pose elements)
        mean, var = logits.mean(dim=(0, 1)), logits.var(dim=(0, 1), unbiased=False)
        logits = (logits - mean) / torch.sqrt(var + 1e-5)
        mean, var = poses.mean(dim=(0, 1, 3)), poses.var(dim=(0, 1, 3), unbiased=False)
        poses = (poses - mean[:, None]) / torch.sqrt(var[:, None] + 1e-5)
    return poses, torch.sigmoid(logits), R_out


SETTINGS = {
    "release": dict(normalisation="patch"),
    "covering_priors": dict(normalisation="covering", alpha0=2.0, kappa0=0.5, nu0=20.0, psi0=3.0, m0=0.2),
    "type_no_bn": dict(normalisation="type", batch_norm=False, pose_batch_norm=False, iterations=2),
}


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("case", list(SETTINGS))
def test_vectorised_equals_the_loop_reference_in_values_and_gradients(case, impl):
    settings = {"iterations": 3, **SETTINGS[case]}
    routing = build_routing({"name": "vb", "impl": impl, **settings}, kind="matrix", out_types=3).double()
    assert routing.impl == impl
    with torch.no_grad():
        routing.beta_u.copy_(torch.tensor([0.2, -0.1, 0.4]))
        routing.beta_a.copy_(torch.tensor([-0.3, 0.5, 0.1]))
    g = torch.Generator().manual_seed(5)
    V = torch.randn(2, 4, 9, 2, 3, 16, generator=g, dtype=torch.float64, requires_grad=True)
    a_in = torch.rand(2, 4, 9, 2, generator=g, dtype=torch.float64, requires_grad=True)
    got = routing(V, a_in, CONV)
    ref_settings = {**dict(iterations=3, alpha0=1.0, kappa0=1.0, nu0=17.0, psi0=1.0, m0=0.0), **SETTINGS[case]}
    bn = [ref_settings.pop("batch_norm", True), ref_settings.pop("pose_batch_norm", True)]
    assert bn[0] == bn[1]  # the reference normalises both or neither
    bn = bn[0]
    want = loop_reference(V, a_in, CONV, beta_u=routing.beta_u, beta_a=routing.beta_a, bn=bn, **ref_settings)
    for x, y in zip(got, want):
        assert torch.allclose(x, y, atol=1e-10)
    w = torch.randn(got.poses.shape, generator=g, dtype=torch.float64)
    params = (V, a_in, routing.beta_u, routing.beta_a)
    gx = torch.autograd.grad((got.poses * w).sum() + got.activations.sum(), params)
    gy = torch.autograd.grad((want[0] * w).sum() + want[1].sum(), params)
    for x, y in zip(gx, gy):
        assert torch.allclose(x, y, atol=1e-9)


def test_priors_keep_a_parent_with_one_child_from_collapsing():
    """EM's variance of a one-child parent is 0 (only the floor keeps it finite); VB's posterior keeps Psi_0^-1."""
    cfg = {"name": "vb", "batch_norm": False, "pose_batch_norm": False, "iterations": 1}
    routing = build_routing(cfg, kind="matrix", out_types=2)
    V = torch.randn(3, 1, 1, 1, 2, 16)
    poses, activations, _ = routing(V, torch.ones(3, 1, 1, 1))
    assert torch.isfinite(poses).all() and ((activations > 1e-6) & (activations < 1 - 1e-6)).all()
    # the posterior mean shrinks the single vote towards m0 = 0: R_j / (kappa0 + R_j) = 0.5 / 1.5 (R = 1/2)
    assert torch.allclose(poses, V[:, :, 0, 0] / 3, atol=1e-6)


def test_bad_priors_are_refused_before_training():
    with pytest.raises(ConfigError, match=r"nu0=10.*nu0 > D - 1 = 15.*Fix: model.routing.nu0=null"):
        build_routing({"name": "vb", "nu0": 10}, kind="matrix", out_types=3)
    for key in ("alpha0", "kappa0", "psi0"):
        with pytest.raises(ConfigError, match=f"model.routing.{key}"):
            build_routing({"name": "vb", key: 0.0}, kind="matrix", out_types=3)
    with pytest.raises(ConfigError, match="does not support vector capsules"):
        build_routing({"name": "vb"}, kind="vector", out_types=3)


def test_batch_of_one_at_one_position_trains_with_the_running_statistics():
    routing = build_routing({"name": "vb"}, kind="matrix", out_types=3, role="class")
    routing.train()
    poses, activations, _ = routing(torch.randn(1, 1, 6, 2, 3, 16), torch.rand(1, 1, 6, 2))
    assert torch.isfinite(poses).all() and torch.isfinite(activations).all()


def release_first_pass(V, a_in, beta_u, beta_a):
    """The authors' release (vb_routing.py, update_qparam and forward) for one iteration, transcribed with its
    simplifications for m0 = 0, kappa0 = 1, Psi0 = I, nu0 = D + 1, alpha0 = 1; R starts at 1 / C per slot."""
    d = V.shape[-1]
    R = torch.full(V.shape[:5], 1.0 / V.shape[4], dtype=V.dtype) * a_in[..., None]
    R_j = R.sum(dim=(2, 3))
    alpha, kappa, nu = 1.0 + R_j, 1.0 + R_j, d + 1.0 + R_j
    mu = (R[..., None] * V).sum(dim=(2, 3)) / R_j[..., None]
    m = R_j[..., None] * mu / kappa[..., None]
    sigma = (R[..., None] * (V - mu[:, :, None, None]) ** 2).sum(dim=(2, 3))
    inv_psi = 1.0 + sigma + (R_j / kappa)[..., None] * mu**2
    lndet_psi = -torch.log(inv_psi).sum(-1)
    e_ln_lambda = torch.digamma(0.5 * (nu[..., None] - torch.arange(d, dtype=V.dtype))).sum(-1) + d * math.log(2)
    e_ln_lambda = e_ln_lambda + lndet_psi
    e_ln_pi = torch.digamma(alpha) - torch.digamma(alpha.sum(-1, keepdim=True))
    H = 0.5 * d * math.log(2 * math.pi * math.e) - 0.5 * e_ln_lambda
    a = beta_a - (torch.exp(e_ln_pi) * H + beta_u)
    a = (a - a.mean(dim=(0, 1))) / torch.sqrt(a.var(dim=(0, 1), unbiased=False) + 1e-5)  # BN_a (no affine)
    pm, pv = m.mean(dim=(0, 1, 3)), m.var(dim=(0, 1, 3), unbiased=False)
    m_bn = (m - pm[:, None]) / torch.sqrt(pv[:, None] + 1e-5)  # BN_v over batch, positions and pose elements
    q = dict(m=m, inv_psi=inv_psi, kappa=kappa, nu=nu, e_ln_pi=e_ln_pi, e_ln_lambda=e_ln_lambda)
    return m_bn, torch.sigmoid(a), q


def test_matches_the_authors_release_and_departs_only_in_the_pi_factor_of_R():
    g = torch.Generator().manual_seed(11)
    V = torch.randn(3, 4, 9, 2, 3, 16, generator=g, dtype=torch.float64)
    a_in = torch.rand(3, 4, 9, 2, generator=g, dtype=torch.float64)
    beta_u, beta_a = torch.tensor([0.1, -0.2, 0.3]), torch.tensor([0.4, 0.0, -0.1])
    one = build_routing({"name": "vb", "iterations": 1}, kind="matrix", out_types=3).double()
    with torch.no_grad():
        one.beta_u.copy_(beta_u)
        one.beta_a.copy_(beta_a)
    poses, activations, _ = one(V, a_in, CONV)
    release_poses, release_activations, q = release_first_pass(V, a_in, beta_u.double(), beta_a.double())
    assert torch.allclose(poses, release_poses, atol=1e-10)
    assert torch.allclose(activations, release_activations, atol=1e-10)
    # the q(R) update: the release's R_ij = p_j / sum_k pi_k p_k; the paper's (capsnets') = pi_j p_j / sum_k pi_k p_k
    two = build_routing({"name": "vb", "iterations": 2}, kind="matrix", out_types=3).double()
    two.load_state_dict(one.state_dict())
    R = two(V, a_in, CONV).assignments
    deviation = ((V - q["m"][:, :, None, None]) ** 2 / q["inv_psi"][:, :, None, None]).sum(-1)
    quad = 16 / q["kappa"][:, :, None, None] + q["nu"][:, :, None, None] * deviation
    ln_p = 0.5 * q["e_ln_lambda"][:, :, None, None] - 8 * math.log(2 * math.pi) - 0.5 * quad
    ln_pi = q["e_ln_pi"][:, :, None, None]
    release_R = torch.exp(ln_p - torch.logsumexp(ln_pi + ln_p, dim=-1, keepdim=True))
    assert torch.allclose(R, torch.exp(ln_pi) * release_R, atol=1e-10)
    assert torch.allclose(R.sum(-1), torch.ones_like(R[..., 0]))  # sums to 1; the release's need not
    assert not torch.allclose(release_R.sum(-1), torch.ones_like(R[..., 0]), atol=1e-3)


def test_evaluation_uses_the_running_statistics_of_training():
    routing = build_routing({"name": "vb", "iterations": 1}, kind="matrix", out_types=3).double()
    V = torch.randn(4, 4, 9, 2, 3, 16, dtype=torch.float64)
    a_in = torch.rand(4, 4, 9, 2, dtype=torch.float64)
    routing.train()
    routing(V, a_in, CONV)
    assert not torch.allclose(routing.bn_a.running_mean, torch.zeros(3, dtype=torch.float64))  # updated in training
    routing.eval()
    _, activations, _ = routing(V, a_in, CONV)
    plain = {"name": "vb", "iterations": 1, "batch_norm": False, "pose_batch_norm": False}
    logits = torch.logit(build_routing(plain, kind="matrix", out_types=3).double()(V, a_in, CONV).activations)
    mean, var = routing.bn_a.running_mean, routing.bn_a.running_var
    assert torch.allclose(activations, torch.sigmoid((logits - mean) / torch.sqrt(var + 1e-5)), atol=1e-8)


def test_transform_init_gives_the_layers_the_releases_xavier_scale_unless_the_network_sets_its_own():
    from capsnets.nn import ClassCapsules, ConvCapsules

    def conv(routing_cfg, init_std=None):
        routing = build_routing(routing_cfg, kind="matrix", out_types=16)
        return ConvCapsules(in_types=8, out_types=16, kernel_size=3, stride=2, routing=routing, init_std=init_std)

    def classes(routing_cfg):
        routing = build_routing(routing_cfg, kind="matrix", out_types=10, role="class")
        return ClassCapsules(in_types=16, num_classes=10, routing=routing)

    torch.manual_seed(0)
    # release: sqrt(2 / ((T_in + T_out) k^2 16)) = 0.0241 for ConvCaps1 of em_caps_small (8 -> 16, 3x3), 0.0693 for
    # its class layer (16 -> 10, W shared over positions: k = 1); 18,432 and 2,560 draws
    assert conv({"name": "vb"}).weight.std().item() == pytest.approx(math.sqrt(2 / (24 * 9 * 16)), rel=0.03)
    assert classes({"name": "vb"}).weight.std().item() == pytest.approx(math.sqrt(2 / (26 * 16)), rel=0.05)
    # layer: the network's default 1/sqrt(4), as under EM routing (whose own hook leaves the layer alone)
    assert conv({"name": "vb", "transform_init": "layer"}).weight.std().item() == pytest.approx(0.5, rel=0.03)
    assert conv({"name": "em"}).weight.std().item() == pytest.approx(0.5, rel=0.03)
    assert classes({"name": "em"}).weight.std().item() == pytest.approx(0.5, rel=0.05)
    # an explicit init_std (model.net.caps_init_std) wins over the routing's
    assert conv({"name": "vb"}, init_std=0.2).weight.std().item() == pytest.approx(0.2, rel=0.03)
    with pytest.raises(ConfigError, match="transform_init"):
        build_routing({"name": "vb", "transform_init": "xavir"}, kind="matrix", out_types=4)


@pytest.mark.parametrize("momentum", [0.5, 0.1])  # capsnets' default, the release's (torch's)
def test_bn_momentum_sets_how_far_one_training_batch_moves_the_running_statistics(momentum):
    routing = build_routing({"name": "vb", "iterations": 1, "bn_momentum": momentum}, kind="matrix", out_types=3)
    routing = routing.double().train()
    plain = build_routing(
        {"name": "vb", "iterations": 1, "batch_norm": False, "pose_batch_norm": False}, kind="matrix", out_types=3
    ).double()
    V = torch.randn(4, 4, 9, 2, 3, 16, dtype=torch.float64) * 0.05
    a_in = torch.rand(4, 4, 9, 2, dtype=torch.float64)
    routing(V, a_in, CONV)
    logits = torch.logit(plain(V, a_in, CONV).activations)  # (B, P, T_out), the logits before the batch norm
    batch_mean, batch_var = logits.mean(dim=(0, 1)), logits.var(dim=(0, 1), unbiased=True)
    assert torch.allclose(routing.bn_a.running_mean, momentum * batch_mean, atol=1e-10)
    assert torch.allclose(routing.bn_a.running_var, (1 - momentum) + momentum * batch_var, atol=1e-10)
    assert int(routing.bn_a.num_batches_tracked) == 1


def test_the_fused_implementation_is_the_default_and_forms_the_votes_itself():
    assert DEFAULT_IMPLS["vb"] == "fused"
    routing = build_routing({"name": "vb"}, kind="matrix", out_types=3)
    assert type(routing) is FusedVBRouting and routing.takes_vote_factors
    reference = build_routing({"name": "vb", "impl": "reference"}, kind="matrix", out_types=3)
    assert type(reference) is VBRouting and not reference.takes_vote_factors


# the fused implementation's vote-sized work runs in blocks: the default (one block here), one parent or position
# per block, and blocks that split an image's positions
@pytest.mark.parametrize("chunk", [None, 1, 1600])
@pytest.mark.parametrize("normalisation", ["patch", "covering", "type"])
@pytest.mark.parametrize("factors", [False, True])
def test_fused_equals_the_reference_in_values_gradients_and_every_iteration(factors, normalisation, chunk, monkeypatch):
    if chunk is not None:
        monkeypatch.setattr(kernels, "CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(3)
    pose = torch.randn(2, 4, 9, 2, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weight = (0.3 * torch.randn(9, 2, 3, 16, 16, generator=g, dtype=torch.float64)).requires_grad_(True)
    shift = torch.randn(9, 16, generator=g, dtype=torch.float64, requires_grad=True)
    a_in = torch.rand(2, 4, 9, 2, generator=g, dtype=torch.float64, requires_grad=True)
    settings = {"name": "vb", "normalisation": normalisation, "m0": 0.1, "kappa0": 0.7}
    results = []
    for impl in ("reference", "fused"):
        routing = build_routing({**settings, "impl": impl}, kind="matrix", out_types=3).double()
        with torch.no_grad():
            routing.beta_u.copy_(torch.tensor([0.2, -0.1, 0.4]))
            routing.beta_a.copy_(torch.tensor([-0.3, 0.5, 0.1]))
        routing.record_trace = True
        votes = VoteFactors(pose, weight, shift)  # the reference receives them materialised (the seam)
        out = routing(votes if factors else votes.materialise(), a_in, CONV)
        leaves = (pose, weight, shift, a_in, routing.beta_u, routing.beta_a)
        loss = sum((torch.cos(3 * x) * (i + 1)).sum() for i, x in enumerate(out))
        results.append((out, torch.autograd.grad(loss, leaves), routing.trace))
    (ref, ref_grads, ref_trace), (got, got_grads, got_trace) = results
    for x, y in zip(ref, got):
        assert x.dtype == y.dtype == torch.float64 and torch.allclose(x, y, atol=1e-10, rtol=1e-9)
    for x, y in zip(ref_grads, got_grads):
        assert x.abs().max() > 0 and torch.allclose(x, y, atol=1e-9, rtol=1e-7)
    assert len(got_trace.assignments) == len(ref_trace.assignments) == 3  # the uniform start and two updates
    for x, y in zip(ref_trace.assignments + ref_trace.activations, got_trace.assignments + got_trace.activations):
        assert torch.allclose(x, y, atol=1e-10)


def vb_inputs(case: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(2, 4, 9, 2, 3, 16, generator=g, dtype=torch.float64)
    a_in = torch.rand(2, 4, 9, 2, generator=g, dtype=torch.float64)
    if case == "xavier":  # the scale the release's W gives the votes
        V = 0.05 * V
    if case == "offset_1000":  # every vote far from 0: float32 keeps ~4 digits of (V - mu)
        V = V + 1000
    return V, a_in


@pytest.mark.parametrize("normalisation", ["patch", "type"])
@pytest.mark.parametrize("case", ["randn", "xavier", "offset_1000"])
def test_fused_in_float32_matches_float64(case, normalisation):
    # the fused implementation forms the votes' squared distances around the (rounded) weighted and posterior means,
    # and keeps everything per parent in float64; what is left is float32's resolution of ln rho (~nu x 10 ~ 1e2 here,
    # so ~1e-5 absolute). Measured worst over 3 seeds: randn 1.5e-5 on R (a float32 run of the reference: 6.5e-6),
    # xavier-scale 1e-7 (2.7e-6), offset by 1000 7.8e-6 (1.2e-4)
    settings = {"name": "vb", "normalisation": normalisation, "batch_norm": False, "pose_batch_norm": False}
    for seed in range(3):
        V, a_in = vb_inputs(case, seed)
        truth = build_routing({**settings, "impl": "reference"}, kind="matrix", out_types=3).double()(V, a_in, CONV)
        errors = {}
        for impl in ("fused", "reference"):
            out = build_routing({**settings, "impl": impl}, kind="matrix", out_types=3)(V.float(), a_in.float(), CONV)
            assert out.poses.dtype == out.activations.dtype == out.assignments.dtype == torch.float32
            errors[impl] = [
                ((out.poses.double() - truth.poses).abs().max() / truth.poses.abs().max()).item(),
                (out.activations.double() - truth.activations).abs().max().item(),
                (out.assignments.double() - truth.assignments).abs().max().item(),
            ]
        assert max(errors["fused"]) < 5e-5, errors
        if case == "offset_1000":  # the reference forms V - mu of votes far from 0 in float32 and loses digits
            assert errors["fused"][2] < errors["reference"][2] / 4, errors
