"""EM routing (Hinton, Sabour & Frosst 2018, "Matrix capsules with EM routing", Procedure 1), as written.

This is the reference a researcher reads: every line of Procedure 1 appears below with its
number, on tensors in the routing layout (see :mod:`capsnets.nn.routing.base`)::

    V     (B, P, K, T_in, T_out, D)  vote V_ij of child i for parent j, D = 16 pose elements h
    a_in  (B, P, K, T_in)            child activations a_i
    R     (B, P, K, T_in, T_out)     assignment of child i to parent j

    procedure EM ROUTING(a, V)
    2:  R_ij <- 1/|Omega_{L+1}|                  (uniform over the parents child i votes for)
    3:  for t iterations:
    4:      M-STEP(a, R, V, j) for every parent j
    5:      E-STEP(mu, sigma, a, V, i) for every child i
    6:  return a, M
    procedure M-STEP(a, R, V, j)
    2:  R_ij <- R_ij * a_i
    3:  mu_j^h <- sum_i R_ij V_ij^h / sum_i R_ij
    4:  (sigma_j^h)^2 <- sum_i R_ij (V_ij^h - mu_j^h)^2 / sum_i R_ij
    5:  cost^h <- (beta_u + log sigma_j^h) sum_i R_ij
    6:  a_j <- logistic(lambda (beta_a - sum_h cost^h))
    procedure E-STEP(mu, sigma, a, V, i)
    2:  p_j <- prod_h N(V_ij^h; mu_j^h, (sigma_j^h)^2)
    3:  R_ij <- a_j p_j / sum_k a_k p_k

The E-step after the last M-step is skipped (its R would not be used). Densities are computed in
the log domain and every variance gets ``var_floor`` (0.0005 in the authors' code), which keeps
single-child parents finite. ``em_fused.py`` computes the same with fewer passes over the votes.

The settings of both implementations live in :class:`EMRoutingBase`; see ``conf/model/routing/em.yaml``.

**Variants** (:class:`EMVariant`; the paper's form is the default, each departure is a setting).
The authors' release (google-research ``capsule_em``) writes lines 3, 5 and 6 differently:

* cost with ``log sigma^2`` instead of ``log sigma`` (``log_variance``),
* ``beta_u`` multiplied by ``ln(2 pi) + 1`` and ``beta_a`` by 5000 (``beta_u_scale``, ``beta_a_scale``):
  a reparameterisation that lets the learned biases move as fast as the cost they offset
  (with Adam a parameter moves ~lr per step whatever its gradient's scale),
* each parent's mean smoothed across iterations, ``mu <- 0.9 mu_new + 0.1 mu_previous`` from
  ``mu = 0`` (``mean_smoothing: 0.1``); the variance is taken around the smoothed mean.

In the paper's notation line 5 becomes ``cost^h <- (beta_u_scale beta_u + c log sigma_j^h) sum_i R_ij``
(``c = 2`` with ``log_variance``) and line 6 ``a_j <- logistic(lambda (beta_a_scale beta_a - sum_h cost^h))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from capsnets.nn.routing.base import Routing, RoutingResult, RoutingTrace, Votes, register_routing, routing_key
from capsnets.nn.routing.kernels import KernelMode
from capsnets.nn.routing.layout import ChildLayout, Normalisation
from capsnets.schema import BoundedFloat, PositiveFloat, PositiveInt, Range, checked

LambdaSchedule = Literal["official", "fixed"]
MomentDtype = Literal["float32", "float64"]
MOMENT_DTYPES = {"float32": torch.float32, "float64": torch.float64}
MeanSmoothing = Annotated[float, Range(0, 0.99)]  # 1 would freeze the means at 0
LAMBDA_DECAY = 0.95  # official schedule: lambda_t = lambda_value * (1 - 0.95 ** (t + 1))


def inverse_temperatures(
    iterations: int, *, schedule: str = "official", value: float = 0.01, scale: float = 1.0
) -> list[float]:
    """lambda_t for routing iterations t = 0 .. iterations-1.

    ``official``: ``scale * value * (1 - 0.95 ** (t + 1))`` (the authors' code, value 0.01, and
    ``scale = 1/4`` at the class layer); ``fixed``: ``scale * value`` every iteration.
    """
    if schedule == "official":
        return [scale * value * (1 - LAMBDA_DECAY ** (t + 1)) for t in range(iterations)]
    return [scale * value] * iterations


@dataclass(frozen=True)
class EMVariant:
    """How lines 3, 5 and 6 of the M-step are written (the defaults are the paper's; see the module docstring)."""

    log_variance: bool = False  # cost with log sigma^2 (release) instead of log sigma (paper)
    beta_u_scale: float = 1.0  # release: ln(2 pi) + 1
    beta_a_scale: float = 1.0  # release: 5000
    mean_smoothing: float = 0.0  # weight of the previous iteration's mean (release: 0.1; the first starts from 0)
    detach_assignments: bool = False  # back-propagate through the E-step's R (paper/release) or treat R as a constant


PAPER = EMVariant()  # Procedure 1 as the paper writes it


def activation_logits(
    sigma_sq: torch.Tensor,
    sum_R: torch.Tensor,
    *,
    beta_u: torch.Tensor,
    beta_a: torch.Tensor,
    lambda_: float,
    variant: EMVariant,
) -> torch.Tensor:
    """Lines 5 and 6 of the M-step: the logits of a_j (B, P, T_out) from sigma_sq (B, P, T_out, D) and sum_i R_ij."""
    # line 5: cost^h <- (beta_u + log sigma_j^h) sum_i R_ij          (log sigma = 0.5 log sigma^2)
    log_sigma = torch.log(sigma_sq) * (1.0 if variant.log_variance else 0.5)
    cost = (variant.beta_u_scale * beta_u[:, None] + log_sigma) * sum_R[..., None]  # (B, P, T_out, D)
    # line 6: a_j <- logistic(lambda (beta_a - sum_h cost^h)); returned as its logit
    return lambda_ * (variant.beta_a_scale * beta_a - cost.sum(dim=-1))  # (B, P, T_out)


def smoothed_mean(mu: torch.Tensor, mu_previous: torch.Tensor | None, variant: EMVariant) -> torch.Tensor:
    """Line 3's mean, optionally smoothed with the previous iteration's (the release; the first with mu = 0)."""
    s = variant.mean_smoothing
    if s == 0.0:
        return mu
    return (1.0 - s) * mu + s * (mu_previous if mu_previous is not None else torch.zeros_like(mu))


class EMRoutingBase(Routing):
    """Settings shared by both EM implementations, and the learned ``beta_u``, ``beta_a`` (one per parent type).

    Args:
        iterations: t in Procedure 1 (paper's ablation: 1/2/3/5 -> 9.7/2.2/1.8/3.9% smallNORB error).
        lambda_schedule, lambda_value: inverse temperature, see :func:`inverse_temperatures`.
        class_lambda_scale: multiplies lambda at the class layer (the authors' code: 1/4).
        var_floor: added to every parent variance.
        eps: guards ``sum_i R_ij`` of parents that receive no data.
        normalisation: how the E-step normalises a child over its parents in a convolutional
            layer: ``covering`` (paper), ``type`` (authors' release) or ``patch`` (see ``layout.py``).
        moment_dtype: ``float32`` or ``float64``, the dtype of the vote-sized tensors (outputs keep the votes'
            dtype). ``impl: fused`` keeps its per-parent statistics in float64 and re-centres the votes on each
            M-step's mean, so float32 matches float64 to ~1e-6 (tests); ``impl: reference`` computes plainly.
        kernels: how ``impl: fused`` runs its passes over the votes (:mod:`~capsnets.nn.routing.kernels`): ``auto``
            (compiled by torch.compile where it works: a CPU with a C++ compiler, a CUDA GPU; else eager),
            ``compiled`` (an error where compiling fails) or ``eager`` (batched products, never compiles); the
            same values either way. ``impl: reference`` is plain autograd and has no such passes.
        log_variance, beta_u_scale, beta_a_scale, mean_smoothing: the release's way of writing the
            M-step (:class:`EMVariant`; defaults: the paper's).
        detach_assignments: treat each E-step's assignments as constants in back-propagation (the
            forward pass is unchanged; the paper says nothing about gradients, the release lets them
            flow: false).
        beta_u_init, beta_a_init: initial ``beta_u``, ``beta_a`` (paper: not given; release: 0.5 and
            -0.5 in this sign convention for conv layers); ``class_beta_u_init``, ``class_beta_a_init``
            at the class layer (null = the same; release: 2.0 and -1.0).
    """

    @checked(routing_key)
    def __init__(
        self,
        *,
        iterations: PositiveInt = 3,
        lambda_schedule: LambdaSchedule = "official",
        lambda_value: PositiveFloat = 0.01,
        class_lambda_scale: PositiveFloat = 0.25,
        var_floor: PositiveFloat = 0.0005,
        eps: PositiveFloat = 1e-8,
        normalisation: Normalisation = "covering",
        moment_dtype: MomentDtype = "float32",
        kernels: KernelMode = "auto",
        log_variance: bool = False,
        beta_u_scale: PositiveFloat = 1.0,
        beta_a_scale: PositiveFloat = 1.0,
        mean_smoothing: MeanSmoothing = 0.0,
        detach_assignments: bool = False,
        beta_u_init: BoundedFloat = 0.0,
        beta_a_init: BoundedFloat = 0.0,
        class_beta_u_init: BoundedFloat | None = None,
        class_beta_a_init: BoundedFloat | None = None,
        **base: Any,
    ) -> None:
        super().__init__(iterations=iterations, **base)
        self.lambda_schedule = lambda_schedule
        self.lambda_value = float(lambda_value)
        self.class_lambda_scale = float(class_lambda_scale)
        self.var_floor = float(var_floor)
        self.eps = float(eps)
        self.normalisation = normalisation
        self.moment_dtype = moment_dtype
        self.kernels = kernels
        self.variant = EMVariant(
            log_variance=log_variance,
            beta_u_scale=float(beta_u_scale),
            beta_a_scale=float(beta_a_scale),
            mean_smoothing=float(mean_smoothing),
            detach_assignments=detach_assignments,
        )
        if self.role == "class":  # the class layer's own initial betas, where given
            beta_u_init = class_beta_u_init if class_beta_u_init is not None else beta_u_init
            beta_a_init = class_beta_a_init if class_beta_a_init is not None else beta_a_init
        self.beta_u = nn.Parameter(torch.full((self.out_types,), float(beta_u_init)))
        self.beta_a = nn.Parameter(torch.full((self.out_types,), float(beta_a_init)))

    @property
    def lambdas(self) -> list[float]:
        scale = self.class_lambda_scale if self.role == "class" else 1.0
        return inverse_temperatures(
            self.iterations, schedule=self.lambda_schedule, value=self.lambda_value, scale=scale
        )

    def dtype_for(self, votes: Votes) -> torch.dtype:
        """The routing arithmetic's dtype: at least ``moment_dtype`` and the votes' own."""
        return torch.promote_types(votes.dtype, MOMENT_DTYPES[self.moment_dtype])

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, out_types={self.out_types}, lambda_schedule={self.lambda_schedule}, "
            f"lambda_value={self.lambda_value}, var_floor={self.var_floor}, normalisation={self.normalisation}, "
            f"moment_dtype={self.moment_dtype}, variant={self.variant}"
        )


def m_step(
    R: torch.Tensor,
    a_in: torch.Tensor,
    V: torch.Tensor,
    *,
    beta_u: torch.Tensor,
    beta_a: torch.Tensor,
    lambda_: float,
    var_floor: float,
    eps: float,
    variant: EMVariant = PAPER,
    mu_previous: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """M-STEP for every parent j: returns mu, sigma_sq (B, P, T_out, D) and the logits of a_j (B, P, T_out)."""
    # line 2: R_ij <- R_ij * a_i
    R = R * a_in[..., None]  # (B, P, K, T_in, T_out)
    sum_R = R.sum(dim=(2, 3))  # sum_i R_ij, (B, P, T_out); eps keeps parents without data finite
    # line 3: mu_j^h <- sum_i R_ij V_ij^h / sum_i R_ij   (smoothed across iterations in the release's variant)
    mu = torch.einsum("bpkio,bpkiod->bpod", R, V) / (sum_R[..., None] + eps)  # (B, P, T_out, D)
    mu = smoothed_mean(mu, mu_previous, variant)
    # line 4: (sigma_j^h)^2 <- sum_i R_ij (V_ij^h - mu_j^h)^2 / sum_i R_ij   (+ the variance floor)
    sq_dev = (V - mu[:, :, None, None]) ** 2  # (B, P, K, T_in, T_out, D)
    sigma_sq = torch.einsum("bpkio,bpkiod->bpod", R, sq_dev) / (sum_R[..., None] + eps) + var_floor
    # lines 5 and 6: cost^h and a_j
    logits = activation_logits(sigma_sq, sum_R, beta_u=beta_u, beta_a=beta_a, lambda_=lambda_, variant=variant)
    return mu, sigma_sq, logits


def e_step(
    V: torch.Tensor,
    mu: torch.Tensor,
    sigma_sq: torch.Tensor,
    logits: torch.Tensor,
    layout: ChildLayout,
    normalisation: str,
) -> torch.Tensor:
    """E-STEP for every child i: the new assignments R (B, P, K, T_in, T_out)."""
    mu, sigma_sq = mu[:, :, None, None], sigma_sq[:, :, None, None]  # (B, P, 1, 1, T_out, D)
    # line 2: log p_j = sum_h log N(V_ij^h; mu_j^h, (sigma_j^h)^2), in the log domain
    log_p = -0.5 * ((V - mu) ** 2 / sigma_sq + torch.log(2 * math.pi * sigma_sq)).sum(dim=-1)  # (B, P, K, T_in, T_out)
    # line 3: R_ij <- a_j p_j / sum_k a_k p_k, the sum over every parent k child i votes for;
    # log a_j = logsigmoid(logit) stays finite where a_j underflows to 0
    log_a = F.logsigmoid(logits)[:, :, None, None]  # (B, P, 1, 1, T_out)
    return layout.softmax(log_a + log_p, over=normalisation)


def em_routing(
    V: torch.Tensor,
    a_in: torch.Tensor,
    *,
    beta_u: torch.Tensor,
    beta_a: torch.Tensor,
    lambdas: list[float],
    var_floor: float = 0.0005,
    eps: float = 1e-8,
    layout: ChildLayout | None = None,
    normalisation: str = "covering",
    variant: EMVariant = PAPER,
    trace: RoutingTrace | None = None,
) -> RoutingResult:
    """Procedure 1 with ``len(lambdas)`` iterations; returns parents mu (B, P, T_out, D), a_out and the final R."""
    layout = layout if layout is not None else ChildLayout()
    # line 2: R_ij <- 1/|Omega_{L+1}|, uniform over the parents each child votes for
    R = layout.initial(V.shape[:5], like=V, over=normalisation)  # (B, P, K, T_in, T_out)
    mu = None
    for t, lambda_ in enumerate(lambdas):  # line 3
        # line 4: M-step for every parent
        mu, sigma_sq, logits = m_step(
            R,
            a_in,
            V,
            beta_u=beta_u,
            beta_a=beta_a,
            lambda_=lambda_,
            var_floor=var_floor,
            eps=eps,
            variant=variant,
            mu_previous=mu,
        )
        if trace is not None:
            trace.record(R, torch.sigmoid(logits))
        if t < len(lambdas) - 1:
            # line 5: E-step for every child
            R = e_step(V, mu, sigma_sq, logits, layout, normalisation)
            if variant.detach_assignments:  # the same forward pass; gradients reach V only through the M-steps
                R = R.detach()
    # line 6: return a, M
    return RoutingResult(mu, torch.sigmoid(logits), R)


@register_routing("em", kinds=("matrix",), impl="reference")
class EMRouting(EMRoutingBase):
    """EM routing, the readable implementation of Procedure 1 (``impl: reference``)."""

    def route(
        self, votes: torch.Tensor, a_in: torch.Tensor | None, layout: ChildLayout, trace: RoutingTrace | None
    ) -> RoutingResult:
        dtype = self.dtype_for(votes)
        a_in = a_in if a_in is not None else votes.new_ones(votes.shape[:4])
        result = em_routing(
            votes.to(dtype),
            a_in.to(dtype),
            beta_u=self.beta_u.to(dtype),
            beta_a=self.beta_a.to(dtype),
            lambdas=self.lambdas,
            var_floor=self.var_floor,
            eps=self.eps,
            layout=layout,
            normalisation=self.normalisation,
            variant=self.variant,
            trace=trace,
        )
        return RoutingResult(*(x.to(votes.dtype) for x in result))
