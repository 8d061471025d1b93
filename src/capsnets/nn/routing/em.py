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
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from capsnets.nn.routing.base import Routing, RoutingResult, RoutingTrace, register_routing
from capsnets.nn.routing.layout import NORMALISATIONS, ChildLayout
from capsnets.utils.validation import require_choice, require_positive

LAMBDA_SCHEDULES = ("official", "fixed")
MOMENT_DTYPES = {"float32": torch.float32, "float64": torch.float64}
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
        moment_dtype: ``float32`` or ``float64`` arithmetic of the routing (outputs keep the votes' dtype).
    """

    def __init__(
        self,
        *,
        iterations: int = 3,
        lambda_schedule: str = "official",
        lambda_value: float = 0.01,
        class_lambda_scale: float = 0.25,
        var_floor: float = 0.0005,
        eps: float = 1e-8,
        normalisation: str = "covering",
        moment_dtype: str = "float64",
        **base,
    ) -> None:
        super().__init__(iterations=iterations, **base)
        key = self.key
        self.lambda_schedule = require_choice(f"{key}.lambda_schedule", lambda_schedule, LAMBDA_SCHEDULES)
        self.lambda_value = require_positive(f"{key}.lambda_value", lambda_value)
        self.class_lambda_scale = require_positive(f"{key}.class_lambda_scale", class_lambda_scale)
        self.var_floor = require_positive(f"{key}.var_floor", var_floor)
        self.eps = require_positive(f"{key}.eps", eps)
        self.normalisation = require_choice(f"{key}.normalisation", normalisation, NORMALISATIONS)
        self.moment_dtype = require_choice(f"{key}.moment_dtype", moment_dtype, tuple(MOMENT_DTYPES))
        self.beta_u = nn.Parameter(torch.zeros(self.out_types))
        self.beta_a = nn.Parameter(torch.zeros(self.out_types))

    @property
    def lambdas(self) -> list[float]:
        scale = self.class_lambda_scale if self.role == "class" else 1.0
        return inverse_temperatures(
            self.iterations, schedule=self.lambda_schedule, value=self.lambda_value, scale=scale
        )

    def dtype_for(self, votes: torch.Tensor) -> torch.dtype:
        """The routing arithmetic's dtype: at least ``moment_dtype`` and the votes' own."""
        return torch.promote_types(votes.dtype, MOMENT_DTYPES[self.moment_dtype])

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, out_types={self.out_types}, lambda_schedule={self.lambda_schedule}, "
            f"lambda_value={self.lambda_value}, var_floor={self.var_floor}, normalisation={self.normalisation}, "
            f"moment_dtype={self.moment_dtype}"
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """M-STEP for every parent j: returns mu, sigma_sq (B, P, T_out, D) and the logits of a_j (B, P, T_out)."""
    # line 2: R_ij <- R_ij * a_i
    R = R * a_in[..., None]  # (B, P, K, T_in, T_out)
    sum_R = R.sum(dim=(2, 3))  # sum_i R_ij, (B, P, T_out); eps keeps parents without data finite
    # line 3: mu_j^h <- sum_i R_ij V_ij^h / sum_i R_ij
    mu = torch.einsum("bpkio,bpkiod->bpod", R, V) / (sum_R[..., None] + eps)  # (B, P, T_out, D)
    # line 4: (sigma_j^h)^2 <- sum_i R_ij (V_ij^h - mu_j^h)^2 / sum_i R_ij   (+ the variance floor)
    sq_dev = (V - mu[:, :, None, None]) ** 2  # (B, P, K, T_in, T_out, D)
    sigma_sq = torch.einsum("bpkio,bpkiod->bpod", R, sq_dev) / (sum_R[..., None] + eps) + var_floor
    # line 5: cost^h <- (beta_u + log sigma_j^h) sum_i R_ij
    cost = (beta_u[:, None] + 0.5 * torch.log(sigma_sq)) * sum_R[..., None]  # (B, P, T_out, D)
    # line 6: a_j <- logistic(lambda (beta_a - sum_h cost^h)); returned as its logit
    logits = lambda_ * (beta_a - cost.sum(dim=-1))  # (B, P, T_out)
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
    trace: RoutingTrace | None = None,
) -> RoutingResult:
    """Procedure 1 with ``len(lambdas)`` iterations; returns parents mu (B, P, T_out, D), a_out and the final R."""
    layout = layout if layout is not None else ChildLayout()
    # line 2: R_ij <- 1/|Omega_{L+1}|, uniform over the parents each child votes for
    R = layout.initial(V.shape[:5], like=V, over=normalisation)  # (B, P, K, T_in, T_out)
    for t, lambda_ in enumerate(lambdas):  # line 3
        # line 4: M-step for every parent
        mu, sigma_sq, logits = m_step(
            R, a_in, V, beta_u=beta_u, beta_a=beta_a, lambda_=lambda_, var_floor=var_floor, eps=eps
        )
        if trace is not None:
            trace.record(R, torch.sigmoid(logits))
        if t < len(lambdas) - 1:
            # line 5: E-step for every child
            R = e_step(V, mu, sigma_sq, logits, layout, normalisation)
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
            trace=trace,
        )
        return RoutingResult(*(x.to(votes.dtype) for x in result))
