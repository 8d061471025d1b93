"""Variational Bayes routing, fused (``impl: fused``): the updates of :mod:`capsnets.nn.routing.vb` with as few
passes over the votes as possible.

The same mathematics as the readable ``impl: reference`` (tests assert equal values and gradients), organised like
the fused EM routing (:mod:`capsnets.nn.routing.em_fused`), whose vote-sized passes it shares: VB's vote-sized work
is EM's. With ``U = V - c0`` (G, N, D), the votes copied once into the parents' layout and centred on each parent's
plain mean ``c0`` (formed straight into U from the layer's :class:`~capsnets.nn.routing.VoteFactors`), and
``w_i = R_ij a_i / (R_j + eps)``:

* **q(pi, mu, Lambda)** needs per parent ``R_j``, the weighted mean ``mu_bar_j = sum_i R_ij V_ij / R_j`` and
  ``S_j = sum_i R_ij (V_ij - mu_bar_j)^2``: EM's M-step sums (``E[U]`` and the squared distances ``Q = (U - c)^2``
  from the rounded mean ``c``, with the exact correction for the rounding; compiled kernels take both in one pass,
  in float64 about the last centre ``c_m``), so that a tight cluster of votes far from the plain mean loses nothing
  in float32;
* **q(R)** needs every vote's ``sum_h (V_ij^h - m_j^h)^2 Psi_j^h`` around the posterior mean ``m_j`` (the weighted mean
  pulled towards the prior's ``m_0``): with ``Q = (U - c_m)^2`` around ``c_m``, ``m_j - c0_j`` rounded to the votes'
  dtype, and ``delta = m_j - c0_j - c_m`` (rounding-sized),
  ``sum_h (U - c_m - delta)^2 Psi = sum_h Q Psi + sum_h U (-2 delta Psi) + sum_h (2 c_m + delta) delta Psi``, EM's
  E-step contraction (one pass over U, Q formed block by block) and a per-parent constant.

Everything per parent (the posterior's parameters, the expected logarithms, the assignments) is computed in float64
(as the fused EM routing keeps its statistics), the vote-sized tensors in the votes' dtype (float32 unless the model
runs in float64); results are returned in the votes' dtype. The activation, its batch norm and the poses' batch norm
are :class:`~capsnets.nn.routing.vb.VBRouting`'s.
"""

from __future__ import annotations

import math

import torch

from capsnets.nn.routing.base import RoutingTrace, VoteFactors, Votes, register_routing
from capsnets.nn.routing.em_fused import STATS, Moments, PoseSum, parent_weights, spread
from capsnets.nn.routing.kernels import KernelMode, vote_kernels
from capsnets.nn.routing.layout import ChildLayout, normalise_over_parents
from capsnets.nn.routing.vb import VBRouting, expected_logs, vb_activation_logits
from capsnets.nn.routing.vote_passes import FactorVotes, ParentVotes


def fused_vb_iterations(
    V: Votes,
    a_in: torch.Tensor,
    *,
    iterations: int,
    priors: dict[str, float],
    eps: float,
    layout: ChildLayout,
    normalisation: str,
    beta_u: torch.Tensor,
    beta_a: torch.Tensor,
    trace: RoutingTrace | None = None,
    kernels: KernelMode = "eager",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``iterations`` updates of q(pi, mu, Lambda), with an update of q(R) between each two (module docstring).

    V (B, P, K, T_in, T_out, D) in any strides, or its :class:`~capsnets.nn.routing.VoteFactors`; a_in (B, P, K, T_in);
    ``kernels`` how the passes over the votes run (:func:`~capsnets.nn.routing.kernels.vote_kernels`).
    Returns the posterior means m (B, P, T_out, D), the activation logits before the batch norm (B, P, T_out) and the
    last assignments R (B, P, K, T_in, T_out), all in float64 (:data:`~capsnets.nn.routing.em_fused.STATS`).
    """
    b, p, k, t_in, t_out, d = V.shape
    g = b * p * t_out  # parents
    alpha0, kappa0, nu0, psi0, m0 = (priors[key] for key in ("alpha0", "kappa0", "nu0", "psi0", "m0"))
    dtype = V.dtype  # the vote-sized tensors'
    # token pairs as the fused EM routing's: per update of q(pi, mu, Lambda) and per update of q(R) a plain and a
    # scaled one
    kernels = vote_kernels(kernels, a_in.device)  # how the passes over the votes run
    uses = (2 * iterations - 1, 2 * iterations - 1, dtype, True, kernels)
    if isinstance(V, VoteFactors):
        U, c0, *tokens = FactorVotes.apply(V.pose, V.weight, V.offset, *uses, V.kron)
    else:
        U, c0, *tokens = ParentVotes.apply(V, *uses)
    plain, scaled = tokens[: 2 * (2 * iterations - 1)], tokens[2 * (2 * iterations - 1) :]
    c0 = c0.to(STATS).view(b, p, t_out, d)
    a = a_in.to(STATS)[:, :, None]  # (B, P, 1, K, T_in), broadcast over T_out
    beta_u, beta_a = beta_u.to(STATS), beta_a.to(STATS)
    # uniform start, R_ij = 1 / |parents of i| under the normalisation, in the parents' layout (B, P, T_out, K, T_in)
    R = layout.softmax(a.new_zeros((1, p, k, t_in, t_out)), over=normalisation).expand(b, p, k, t_in, t_out)
    R = R.permute(0, 1, 4, 2, 3)
    c_m = U.new_zeros(g, d)  # the centre of the squared distances, in U's coordinates: first the plain mean
    for t in range(iterations):
        m_tokens = (*plain[4 * t : 4 * t + 2], *scaled[4 * t : 4 * t + 2])
        # q(pi, mu, Lambda): R_ij <- R_ij a_i, R_j = sum_i R_ij, and the weighted mean and squared distances
        # w (G, N) in the votes' dtype; R_j (B, P, T_out); mass = sum_i w_i (B, P, T_out, 1): 1, or 0 for a parent
        # without data (EM's M-step weights)
        w, R_j, mass = kernels.stats("parent_weights", parent_weights, R, a, eps, dtype)
        # EM's sums (where the kernels sum in one pass: about the last update's centre c_m)
        E_U, E_Q, c = (x.view(b, p, t_out, d) for x in Moments.apply(U, *m_tokens, w, c_m, kernels))
        mu_bar = mass * c0 + E_U  # sum_i R_ij V_ij / (R_j + eps), (B, P, T_out, D)
        # S_j = sum_i R_ij (V_ij - mu_bar_j)^2 = (R_j + eps) sum_i w_i (V_ij - mu_bar_j)^2
        S = (R_j[..., None] + eps) * spread(E_U, E_Q, c.to(STATS), mu_bar - c0, mass)
        alpha, kappa, nu = alpha0 + R_j, kappa0 + R_j, nu0 + R_j  # (B, P, T_out)
        m = (R_j[..., None] * mu_bar + kappa0 * m0) / kappa[..., None]  # (B, P, T_out, D)
        inv_psi = 1.0 / psi0 + S + (kappa0 * R_j / kappa)[..., None] * (mu_bar - m0) ** 2  # diag of Psi_j^-1
        q = {"alpha": alpha, "kappa": kappa, "nu": nu, "m": m, "inv_psi": inv_psi}
        if t == iterations - 1:  # the q(R) update after the last one would not be used
            break
        if trace is not None:
            logits = vb_activation_logits(q, beta_u=beta_u, beta_a=beta_a)
            trace.record(R.permute(0, 1, 3, 4, 2), torch.sigmoid(logits))  # R as (B, P, K, T_in, T_out)
        # q(R): sum_h (U - c_m - delta_m)^2 Psi_h around the posterior mean, Q formed around its rounding c_m (so
        # delta_m = m - c0 - c_m is rounding-sized and nothing cancels)
        e_tokens = (*plain[4 * t + 2 : 4 * t + 4], *scaled[4 * t + 2 : 4 * t + 4])
        psi = 1.0 / inv_psi  # (B, P, T_out, D)
        c_m = (m - c0).detach().to(dtype).view(g, d)
        c_ms = c_m.to(STATS).view(b, p, t_out, d)
        delta_m = m - c0 - c_ms  # m's gradient
        f1, f2 = (-2.0 * delta_m * psi).view(g, d), psi.view(g, d)
        quad_u = PoseSum.apply(U, c_m, *e_tokens, f1.to(dtype), f2.to(dtype), kernels).view(b, p, t_out, k, t_in)
        args = (quad_u, c_ms, delta_m, psi, alpha, kappa, nu, inv_psi, layout.child_index, layout.num_children)
        R = kernels.stats("vb_assignments", fused_assignments, *args, normalisation)
    logits = vb_activation_logits(q, beta_u=beta_u, beta_a=beta_a)
    return q["m"], logits, R.permute(0, 1, 3, 4, 2)


def fused_assignments(
    quad_u: torch.Tensor,
    c_m: torch.Tensor,
    delta_m: torch.Tensor,
    psi: torch.Tensor,
    alpha: torch.Tensor,
    kappa: torch.Tensor,
    nu: torch.Tensor,
    inv_psi: torch.Tensor,
    child_index: torch.Tensor | None,
    num_children: int | None,
    normalisation: str,
) -> torch.Tensor:
    """The update of q(R), R (B, P, T_out, K, T_in), from ``quad_u = sum_h (U - c_m)^2 Psi + U (-2 delta_m Psi)``
    (B, P, T_out, K, T_in) and the posterior's parameters (B, P, T_out, D) or (B, P, T_out), normalised over each
    child's parents in the layout ``child_index`` (module docstring)."""
    d = psi.shape[-1]
    per_parent = ((2 * c_m + delta_m) * delta_m * psi).sum(dim=-1)  # (B, P, T_out)
    e_ln_pi, e_ln_lambda = expected_logs({"alpha": alpha, "nu": nu, "inv_psi": inv_psi})  # (B, P, T_out)
    # ln rho = E[ln pi] + E[ln |Lambda|] / 2 - D/2 ln 2 pi - (D / kappa + nu (quad_u + per_parent)) / 2
    constant = e_ln_pi + 0.5 * e_ln_lambda - 0.5 * d * math.log(2 * math.pi) - 0.5 * (d / kappa + nu * per_parent)
    ln_rho = torch.addcmul(constant[..., None, None], nu[..., None, None], quad_u, value=-0.5)  # in STATS
    # normalised over each child's parents in the routing layout (a permuted view: no copy)
    R = normalise_over_parents(ln_rho.permute(0, 1, 3, 4, 2), child_index, num_children, normalisation)
    return R.permute(0, 1, 4, 2, 3)


@register_routing("vb", kinds=("matrix",), impl="fused", default=True)
class FusedVBRouting(VBRouting):
    """Variational Bayes routing, the fast implementation (``impl: fused``): the same settings and results as
    ``impl: reference``; forms the votes itself, straight into U, when a layer hands over their factors."""

    takes_vote_factors = True

    def iterate(
        self, V: Votes, a_in: torch.Tensor, layout: ChildLayout, trace: RoutingTrace | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = fused_vb_iterations(
            V,
            a_in,
            iterations=self.iterations,
            priors=self.priors(V.shape[-1]),
            eps=self.eps,
            layout=layout,
            normalisation=self.normalisation,
            beta_u=self.beta_u,
            beta_a=self.beta_a,
            trace=trace,
            kernels=self.kernels,
        )
        return tuple(x.to(V.dtype) for x in out)
