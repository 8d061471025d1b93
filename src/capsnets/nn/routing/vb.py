"""Variational Bayes routing (Ribeiro, Leontidis & Kollias, AAAI 2020, "Capsule routing via variational Bayes").

The parents of a capsule layer are the components of a mixture of transforming Gaussians whose
parameters carry priors: a Dirichlet over the mixing coefficients ``pi`` (``alpha_0``) and a
Gaussian-Wishart over each parent's mean and (diagonal) precision ``(mu_j, Lambda_j)``
(``m_0``, ``kappa_0``, ``Psi_0``, ``nu_0``). Routing alternates the variational updates of the
posterior over the parameters (the "M-step") and of the assignments ``R_ij`` (the "E-step"),
in the paper's symbols (D = 16 pose elements h; diagonal covariance, so every matrix is its diagonal)::

    V     (B, P, K, T_in, T_out, D)   votes V_ij;  a_in (B, P, K, T_in) child activations a_i
    R     (B, P, K, T_in, T_out)      assignments, uniform at the start

    update q(pi, mu, Lambda):                                     (per parent j: (B, P, T_out[, D]))
        R_ij <- R_ij a_i;  R_j = sum_i R_ij
        alpha_j = alpha_0 + R_j;  kappa_j = kappa_0 + R_j;  nu_j = nu_0 + R_j
        mu_bar_j = sum_i R_ij V_ij / R_j;  S_j = sum_i R_ij (V_ij - mu_bar_j)^2
        m_j = (R_j mu_bar_j + kappa_0 m_0) / kappa_j
        Psi_j^-1 = Psi_0^-1 + S_j + kappa_0 R_j / kappa_j (mu_bar_j - m_0)^2
    update q(R):
        E[ln pi_j] = digamma(alpha_j) - digamma(sum_k alpha_k)           (k: the parent types of a position)
        E[ln |Lambda_j|] = sum_{h=1..D} digamma((nu_j + 1 - h) / 2) + D ln 2 + ln |Psi_j|
        E[(V_ij - mu_j)^T Lambda_j (V_ij - mu_j)] = D / kappa_j + nu_j sum_h (V_ij^h - m_j^h)^2 Psi_j^h
        ln rho_ij = E[ln pi_j] + E[ln |Lambda_j|] / 2 - D/2 ln 2 pi - E[(V - mu)^T Lambda (V - mu)] / 2
        R_ij = rho_ij / sum_k rho_ik                                     (over child i's parents, ``normalisation``)

After the last update of q(pi, mu, Lambda) (the q(R) update after it is skipped, as in EM routing),
the parent's pose is the posterior mean ``m_j`` and its activation, as the authors' release computes it,
a logistic of the weighted negative entropy of the posterior over ``(mu_j, Lambda_j)``::

        H_j = D/2 ln(2 pi e) - E[ln |Lambda_j|] / 2
        a_j = logistic(BN(beta_a - (exp(E[ln pi_j]) H_j + beta_u)))

with ``BN`` a batch normalisation without affine parameters per parent type (``batch_norm``; a routing trace
records every iteration's activation before it, so the iterations are comparable), and the
poses likewise batch-normalised per parent type before the next layer (``pose_batch_norm``). The
release's priors are the defaults: ``alpha_0 = 1``, ``m_0 = 0``, ``kappa_0 = 1``, ``Psi_0 = I``,
``nu_0 = D + 1``, 3 iterations, and its per-patch normalisation. Where capsnets departs from the
release: the q(R) update keeps ``E[ln pi_j]`` in the numerator of ``R_ij`` as the equations above (the
release divides ``p_j`` by ``sum_k pi_k p_k``, so its assignments need not sum to 1); the Dirichlet
is over the parent types of each position (as the release sums ``alpha`` over types); the batch norms'
running averages move with momentum ``bn_momentum = 0.5`` (the release: torch's 0.1, which lags the routed
logits' moving mean by many batch standard deviations, so evaluation after a short run saturated every
activation: synthetic shapes, 64 steps, 20% test accuracy vs 97%). As in the release, the layers feeding
the routing draw W with Xavier's rule (``transform_init = xavier``, std ``sqrt(2 / ((T_in + T_out) k^2 D))``),
not EM routing's 0.5, which puts the votes ~20x outside the Wishart prior's scale and keeps VB at chance;
and the release trains with Adam at LR 0.001 (``experiment=ribeiro2020_smallnorb`` and the
``em_vb_release_lr`` row of ``experiment=routing_comparison`` use it; the routing itself sets no optimiser).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from capsnets.errors import ConfigError
from capsnets.nn.routing.base import Routing, RoutingResult, RoutingTrace, Votes, register_routing, routing_key
from capsnets.nn.routing.kernels import KernelMode
from capsnets.nn.routing.layout import ChildLayout, Normalisation
from capsnets.schema import BoundedFloat, Fraction, PositiveFloat, PositiveInt, checked

BN_EPS = 1e-5  # torch's BatchNorm default, as the release's nn.BatchNorm2d/3d
POSE_SIZE = 16  # D, the pose elements of capsnets' matrix capsules (4x4)


def vb_posterior(
    R: torch.Tensor,
    a_in: torch.Tensor,
    V: torch.Tensor,
    *,
    alpha0: float,
    kappa0: float,
    nu0: float,
    psi0: float,
    m0: float,
    eps: float,
) -> dict[str, torch.Tensor]:
    """Update q(pi, mu, Lambda) from assignments R (B, P, K, T_in, T_out): the posterior's parameters per parent."""
    R = R * a_in[..., None]  # R_ij <- R_ij a_i
    R_j = R.sum(dim=(2, 3))  # (B, P, T_out)
    alpha, kappa, nu = alpha0 + R_j, kappa0 + R_j, nu0 + R_j  # (B, P, T_out)
    mu_bar = torch.einsum("bpkio,bpkiod->bpod", R, V) / (R_j[..., None] + eps)  # (B, P, T_out, D)
    S = torch.einsum("bpkio,bpkiod->bpod", R, (V - mu_bar[:, :, None, None]) ** 2)  # (B, P, T_out, D)
    m = (R_j[..., None] * mu_bar + kappa0 * m0) / kappa[..., None]  # (B, P, T_out, D)
    inv_psi = 1.0 / psi0 + S + (kappa0 * R_j / kappa)[..., None] * (mu_bar - m0) ** 2  # diag of Psi_j^-1
    return {"alpha": alpha, "kappa": kappa, "nu": nu, "m": m, "inv_psi": inv_psi}


def expected_logs(q: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """E[ln pi_j] and E[ln |Lambda_j|], each (B, P, T_out)."""
    alpha, nu, inv_psi = q["alpha"], q["nu"], q["inv_psi"]
    d = inv_psi.shape[-1]
    e_ln_pi = torch.digamma(alpha) - torch.digamma(alpha.sum(dim=-1, keepdim=True))
    h = torch.arange(d, dtype=nu.dtype, device=nu.device)  # h - 1 = 0 .. D-1
    e_ln_lambda = (
        torch.digamma(0.5 * (nu[..., None] - h)).sum(dim=-1) + d * math.log(2.0) - torch.log(inv_psi).sum(dim=-1)
    )
    return e_ln_pi, e_ln_lambda


def vb_assignments(
    V: torch.Tensor, q: dict[str, torch.Tensor], layout: ChildLayout, normalisation: str
) -> torch.Tensor:
    """Update q(R): ln rho_ij, normalised over each child's parents -> R (B, P, K, T_in, T_out)."""
    d = V.shape[-1]
    e_ln_pi, e_ln_lambda = expected_logs(q)  # (B, P, T_out)
    m, inv_psi = q["m"][:, :, None, None], q["inv_psi"][:, :, None, None]  # (B, P, 1, 1, T_out, D)
    mahalanobis = ((V - m) ** 2 / inv_psi).sum(dim=-1)  # sum_h (V - m)^2 Psi_j^h, (B, P, K, T_in, T_out)
    quadratic = d / q["kappa"][:, :, None, None] + q["nu"][:, :, None, None] * mahalanobis
    ln_rho = (e_ln_pi + 0.5 * e_ln_lambda)[:, :, None, None] - 0.5 * d * math.log(2 * math.pi) - 0.5 * quadratic
    return layout.softmax(ln_rho, over=normalisation)


def vb_activation_logits(q: dict[str, torch.Tensor], *, beta_u: torch.Tensor, beta_a: torch.Tensor) -> torch.Tensor:
    """``beta_a - (exp(E[ln pi_j]) H_j + beta_u)``, H_j the entropy of q(mu_j, Lambda_j): (B, P, T_out)."""
    d = q["m"].shape[-1]
    e_ln_pi, e_ln_lambda = expected_logs(q)
    entropy = 0.5 * d * math.log(2 * math.pi * math.e) - 0.5 * e_ln_lambda
    return beta_a - (torch.exp(e_ln_pi) * entropy + beta_u)


def batch_norm(bn: nn.BatchNorm1d, x: torch.Tensor) -> torch.Tensor:
    """``bn`` on x (N, C) or (N, C, L); with a single value per channel in training (one example at one position)
    the batch has no spread to normalise, so the running statistics are used, as in evaluation."""
    training = bn.training and x.numel() // x.shape[1] > 1
    if training:
        bn.num_batches_tracked.add_(1)
    momentum = bn.momentum if bn.momentum is not None else 0.1
    return F.batch_norm(x, bn.running_mean, bn.running_var, training=training, momentum=momentum, eps=bn.eps)


@register_routing("vb", kinds=("matrix",), impl="reference")
class VBRouting(Routing):
    """Variational Bayes routing for matrix capsules, a drop-in for EM routing (see the module docstring): the
    readable implementation (``impl: reference``); ``impl: fused`` (:mod:`~capsnets.nn.routing.vb_fused`, the default)
    computes the same with fewer passes over the votes.

    Args:
        iterations: updates of q(pi, mu, Lambda) (release: 3).
        alpha0: Dirichlet prior over the mixing coefficients (release: 1).
        kappa0: precision scaling of the Gaussian prior over the means (release: 1).
        nu0: Wishart degrees of freedom (> D - 1); null: D + 1 (release).
        psi0: the Wishart scale ``Psi_0 = psi0 I`` (release: I).
        m0: the prior mean, every pose element (release: 0).
        normalisation: over which parents a conv child's assignments are normalised (release: ``patch``).
        batch_norm, pose_batch_norm: batch-normalise the activation logits / poses per parent type, no affine
            parameters (release: both).
        beta_u_init, beta_a_init: initial learned biases (release: 0).
        transform_init: the initial transformation matrices ``W`` of the layer feeding this routing (unless the
            network sets its own ``init_std``): ``xavier`` (release) draws them with the std of the release's Xavier
            rule, ``sqrt(2 / ((T_in + T_out) k^2 D))`` for k x k patches (1 for the class layer, whose ``W`` is shared
            over positions), about 0.02-0.07 on em_caps_small, so that votes start well inside the Wishart prior's
            scale (``psi0``); ``layer`` leaves the layer's default (1/sqrt(4) = 0.5, EM routing's), where votes start
            ~20x wider than the prior and training does not start (mnist_sample: chance accuracy after 3,200 samples,
            gradient norm ~1e3 vs ~3).
        bn_momentum: the batch norms' running-average momentum (what evaluation normalises with; release: torch's
            0.1). capsnets' 0.5: the routed logits and poses vary little within a batch (std ~0.003 in em_caps_small's
            first layer) against how fast their mean moves while training, and an average over the last ~10 batches
            (0.1) lags by many batch standard deviations, so evaluation saturates every activation (synthetic shapes,
            64 steps: 20% test accuracy in evaluation, 100% with the batch's own statistics; 0.5: 97%, 1.0: 99%).
        kernels: how ``impl: fused`` runs its passes over the votes, as EM routing's setting
            (:mod:`~capsnets.nn.routing.kernels`: ``auto``, ``compiled``, ``eager``); ``impl: reference`` has none.
    """

    @checked(routing_key)
    def __init__(
        self,
        *,
        iterations: PositiveInt = 3,
        alpha0: PositiveFloat = 1.0,
        kappa0: PositiveFloat = 1.0,
        nu0: PositiveFloat | None = None,
        psi0: PositiveFloat = 1.0,
        m0: BoundedFloat = 0.0,
        normalisation: Normalisation = "patch",
        batch_norm: bool = True,
        pose_batch_norm: bool = True,
        beta_u_init: BoundedFloat = 0.0,
        beta_a_init: BoundedFloat = 0.0,
        transform_init: Literal["xavier", "layer"] = "xavier",
        bn_momentum: Fraction = 0.5,
        eps: PositiveFloat = 1e-8,
        kernels: KernelMode = "auto",
        **base: Any,
    ) -> None:
        super().__init__(iterations=iterations, **base)
        self.kernels = kernels
        self.alpha0, self.kappa0, self.psi0, self.m0 = float(alpha0), float(kappa0), float(psi0), float(m0)
        self.nu0 = nu0  # None: D + 1, fixed once the pose size is seen
        if nu0 is not None:
            self.prior_nu(POSE_SIZE)  # capsnets' matrix capsules have 4x4 poses: refuse a bad nu0 before training
        self.normalisation = normalisation
        self.batch_norm = batch_norm
        self.pose_batch_norm = pose_batch_norm
        self.eps = float(eps)
        self.transform_init = transform_init
        self.bn_momentum = float(bn_momentum)
        self.beta_u = nn.Parameter(torch.full((self.out_types,), float(beta_u_init)))
        self.beta_a = nn.Parameter(torch.full((self.out_types,), float(beta_a_init)))
        self.bn_a = (
            nn.BatchNorm1d(self.out_types, eps=BN_EPS, momentum=self.bn_momentum, affine=False)
            if self.batch_norm
            else None
        )
        self.bn_pose = (
            nn.BatchNorm1d(self.out_types, eps=BN_EPS, momentum=self.bn_momentum, affine=False)
            if self.pose_batch_norm
            else None
        )

    def prior_nu(self, d: int) -> float:
        nu0 = float(d + 1) if self.nu0 is None else float(self.nu0)
        if nu0 <= d - 1:
            raise ConfigError(
                f"{self.key}.nu0={self.nu0}: the Wishart prior needs nu0 > D - 1 = {d - 1} for {d}-element poses. "
                f"Fix: {self.key}.nu0=null (D + 1, the release's)."
            )
        return nu0

    def transform_init_std(self, *, in_types: int, kernel_size: int) -> float | None:
        """The release's Xavier std for W (``transform_init=xavier``), or None (the layer's default)."""
        if self.transform_init == "layer":
            return None
        return math.sqrt(2.0 / ((in_types + self.out_types) * kernel_size**2 * POSE_SIZE))

    def priors(self, d: int) -> dict[str, float]:
        """The prior's parameters for ``d``-element poses (``vb_posterior``'s keywords)."""
        return dict(alpha0=self.alpha0, kappa0=self.kappa0, nu0=self.prior_nu(d), psi0=self.psi0, m0=self.m0)

    def iterate(
        self, V: Votes, a_in: torch.Tensor, layout: ChildLayout, trace: RoutingTrace | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The updates of q(pi, mu, Lambda) and q(R): the posterior means m_j (B, P, T_out, D), the activation logits
        before the batch norm (B, P, T_out) and the last assignments R (B, P, K, T_in, T_out), in V's dtype."""
        priors = self.priors(V.shape[-1])
        # uniform start: R_ij = 1 / |parents of i| under this normalisation
        R = layout.softmax(V.new_zeros((1, *V.shape[1:5])), over=self.normalisation).expand(V.shape[:5])
        for t in range(self.iterations):
            q = vb_posterior(R, a_in, V, eps=self.eps, **priors)
            if t < self.iterations - 1:  # the q(R) update after the last one would not be used
                if trace is not None:
                    logits = vb_activation_logits(q, beta_u=self.beta_u.to(V.dtype), beta_a=self.beta_a.to(V.dtype))
                    trace.record(R, torch.sigmoid(logits))
                R = vb_assignments(V, q, layout, self.normalisation)
        logits = vb_activation_logits(q, beta_u=self.beta_u.to(V.dtype), beta_a=self.beta_a.to(V.dtype))
        return q["m"], logits, R

    def route(
        self, votes: Votes, a_in: torch.Tensor | None, layout: ChildLayout, trace: RoutingTrace | None
    ) -> RoutingResult:
        V = votes  # (B, P, K, T_in, T_out, D), at least float32 (the seam); VoteFactors for impl: fused
        if a_in is None:
            a_in = torch.ones(V.shape[:4], dtype=V.dtype, device=V.device)
        b, p, _, _, t_out, d = V.shape
        poses, logits, R = self.iterate(V, a_in, layout, trace)  # (B, P, T_out, D), (B, P, T_out), R
        if trace is not None:  # every iteration's activation before the batch norm, the last one included
            trace.record(R, torch.sigmoid(logits))
        if self.bn_a is not None:  # per parent type over examples and positions
            # as (B * P, T_out) rows, not a transposed (B, T_out, P) view: the same statistics, and torch.compile's
            # traced backward of batch norm on a transposed input expects other strides than the CPU kernel returns
            logits = batch_norm(self.bn_a, logits.reshape(b * p, t_out)).view(b, p, t_out)
        if self.bn_pose is not None:  # per parent type over examples, positions and pose elements
            flat = poses.permute(0, 2, 1, 3).reshape(b, t_out, p * d)  # (B, T_out, P*D)
            poses = batch_norm(self.bn_pose, flat).view(b, t_out, p, d).permute(0, 2, 1, 3)
        activations = torch.sigmoid(logits)
        return RoutingResult(poses, activations, R)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, alpha0={self.alpha0}, kappa0={self.kappa0}, nu0={self.nu0}, psi0={self.psi0}, "
            f"m0={self.m0}, normalisation={self.normalisation}, batch_norm={self.batch_norm}, "
            f"pose_batch_norm={self.pose_batch_norm}, transform_init={self.transform_init}, "
            f"bn_momentum={self.bn_momentum}"
        )
