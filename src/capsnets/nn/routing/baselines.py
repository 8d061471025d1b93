"""No-routing baselines (Paik, Kwon & Kim 2019, "Capsule networks need an improved routing algorithm").

Every comparison of routing procedures should include "does routing help at all": the same
network, with the iterative procedure replaced by assignments that look at nothing.

* ``uniform``: every child split equally over the parents it votes for (no iterations):
  ``c_ij = 1 / |parents of i|``, the starting point of dynamic and EM routing (with
  ``normalisation: type`` a convolutional child gives each parent type one unit, split equally over
  its covering positions, as the E-step normalises it);
* ``random``: each child's assignments a softmax of random logits ``b_ij ~ N(0, logit_std^2)``
  over its parents. By default one fixed draw per (patch, slot, type, parent) (``seed``), the same
  for every example and step (each layer its own draw), i.e. a fixed random routing; ``redraw: true``
  draws fresh logits for every example at every training step (evaluation keeps the fixed draw, so it
  is repeatable).

From the assignments ``c`` (B, P, K, T_in, T_out) the parents are formed exactly as the routing
they stand in for forms them:

* vector capsules (dynamic routing's lines 5-6): ``s_j = sum_i c_ij u_hat_{j|i}``, ``v_j = squash(s_j)``;
* pose capsules (inverted dot-product attention routing's pose update, its learned LayerNorm gain and bias
  included, over ``pose_dim`` elements): ``p_j = LayerNorm(sum_i c_ij v_ij)``, each child's ``c`` normalised
  over the parent types of its patch, as that routing's release does; ``uniform`` is then exactly
  ``inverted_dot_product`` with one iteration;
* matrix capsules (one M-step of EM routing, Procedure 1): ``R_ij <- c_ij a_i``, ``mu_j``, ``sigma_j^2``,
  ``cost^h`` and ``a_j = logistic(lambda (beta_a - sum_h cost^h))``, with the M-step settings of
  ``model/routing=em`` (:class:`~capsnets.nn.routing.em.EMRoutingBase`). The defaults are those of
  capsnets' EM routing for em_caps (``em_capsnets.yaml``: ``normalisation: type``,
  ``class_lambda_scale: 1``), and ``lambda`` is that of the last of ``iterations`` EM iterations
  (default 2, as em_capsnets), so the baseline differs from the model's routing in the assignments only.

Shapes (see :mod:`capsnets.nn.routing.base`): votes (B, P, K, T_in, T_out, D), a_in (B, P, K, T_in).
"""

from __future__ import annotations

import functools
import zlib
from typing import Any, ClassVar

import torch
from torch import nn

from capsnets.errors import ConfigError
from capsnets.nn.routing.base import RoutingResult, RoutingTrace, register_routing, routing_key
from capsnets.nn.routing.em import EMRoutingBase, m_step
from capsnets.nn.routing.inverted import parent_share
from capsnets.nn.routing.layout import ChildLayout
from capsnets.nn.squash import squash
from capsnets.schema import NonNegativeInt, PositiveFloat, PositiveInt, checked

# what a baseline on matrix capsules takes when the config does not say: capsnets' EM routing (em_capsnets.yaml)
MATRIX_DEFAULTS: dict[str, Any] = {"iterations": 2, "normalisation": "type", "class_lambda_scale": 1.0}
LAYER_KEYS = ("kind", "out_types", "role", "in_slots", "key")


class AssignmentBaseline(EMRoutingBase):
    """Fixed assignments (:meth:`assignments`) and the parents the stood-in routing would form from them.

    Matrix capsules take every setting of EM routing's M-step (``model/routing=em``); vector capsules
    only this class's own (``vector_settings``), and a matrix-only setting on a vector layer is refused.
    """

    vector_settings: ClassVar[frozenset[str]] = frozenset()

    @checked(routing_key)
    def __init__(self, *, pose_dim: PositiveInt | None = None, **settings: Any) -> None:
        kind, key = settings.get("kind"), settings.get("key", "model.routing")
        if pose_dim is not None and kind != "pose":
            raise ConfigError(f"{key}.pose_dim is a setting of routings on pose capsules only; remove it.")
        chosen = set(settings) - set(LAYER_KEYS)
        if kind in ("vector", "pose"):
            matrix_only = sorted(chosen - self.vector_settings - {"iterations"})
            if matrix_only:
                raise ConfigError(
                    f"{key}: {', '.join(matrix_only)} is a setting of the matrix-capsule M-step; routing "
                    f"{self.name!r} on {kind} capsules takes only {', '.join(sorted(self.vector_settings)) or 'none'}."
                )
            settings = {"iterations": 1, **settings}
        else:
            settings = {**MATRIX_DEFAULTS, **settings}
        super().__init__(**settings)
        if self.kind != "matrix":  # no M-step: no learned betas (unused parameters would stall DDP)
            del self.beta_u, self.beta_a
            # the normalisation of the routing stood in for: dynamic routing's, inverted dot-product routing's
            self.normalisation = {"vector": "covering", "pose": "patch"}[self.kind]
        if self.kind == "pose":  # inverted dot-product routing's LayerNorm, learned gain and bias
            self.norm = nn.LayerNorm(16 if pose_dim is None else pose_dim)

    def assignments(self, shape: torch.Size, like: torch.Tensor, layout: ChildLayout) -> torch.Tensor:
        """(B, P, K, T_in, T_out) assignments, each child's summing to 1 over its parents (``type``: per type)."""
        raise NotImplementedError

    @property
    def over(self) -> str:
        """The normalisation of a child's assignments: dynamic routing's (covering), inverted dot-product
        routing's (patch) or the M-step's setting."""
        return self.normalisation

    def route(
        self, votes: torch.Tensor, a_in: torch.Tensor | None, layout: ChildLayout, trace: RoutingTrace | None
    ) -> RoutingResult:
        if self.kind == "vector":
            c = self.assignments(votes.shape[:5], votes, layout)  # (B, P, K, T_in, T_out)
            v = squash(torch.einsum("bpkio,bpkiod->bpod", c, votes))  # (B, P, T_out, D)
            if trace is not None:
                trace.record(c, v.norm(dim=-1))
            return RoutingResult(v, v.norm(dim=-1), c)
        if self.kind == "pose":
            c = self.assignments(votes.shape[:5], votes, layout)  # (B, P, K, T_in, T_out)
            s = torch.einsum("bpkio,bpkiod->bpod", c, votes)  # (B, P, T_out, D)
            poses, share = self.norm(s), parent_share(c)
            if trace is not None:
                trace.record(c, share)
            return RoutingResult(poses, share, c)
        dtype = self.dtype_for(votes)
        V = votes.to(dtype)
        a_in = a_in.to(dtype) if a_in is not None else V.new_ones(V.shape[:4])
        R = self.assignments(V.shape[:5], V, layout)  # (B, P, K, T_in, T_out)
        mu, _, logits = m_step(
            R,
            a_in,
            V,
            beta_u=self.beta_u.to(dtype),
            beta_a=self.beta_a.to(dtype),
            lambda_=self.lambdas[-1],
            var_floor=self.var_floor,
            eps=self.eps,
            variant=self.variant,
        )  # mu (B, P, T_out, D), logits (B, P, T_out)
        a_out = torch.sigmoid(logits)
        if trace is not None:
            trace.record(R, a_out)
        return RoutingResult(mu.to(votes.dtype), a_out.to(votes.dtype), R.to(votes.dtype))

    def extra_repr(self) -> str:
        if self.kind != "matrix":
            return f"name={self.name}, kind={self.kind}, role={self.role}"
        return super().extra_repr()


@torch.compiler.disable  # a torch.Generator cannot be made inside a compiled graph: the draw runs eagerly (a break)
@functools.lru_cache(maxsize=64)
def fixed_logits(seed: int, slots: tuple[int, ...], role: str) -> torch.Tensor:
    """(1, P, K, T_in, T_out) standard normal logits, drawn on the CPU from ``seed`` mixed with the layer's slot shape
    and role, so layers of different shapes get independent draws. Drawn once per argument (cached: callers must not
    change it in place)."""
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{slots}:{role}".encode()))
    return torch.randn((1, *slots), generator=generator, dtype=torch.float64)


@register_routing("uniform", kinds=("vector", "matrix", "pose"))
class UniformRouting(AssignmentBaseline):
    """Uniform assignments, no iterations: ``c_ij = 1 / |parents of child i|``."""

    def assignments(self, shape: torch.Size, like: torch.Tensor, layout: ChildLayout) -> torch.Tensor:
        # the normalisation of equal logits: 1 / (#covering patches x T_out) (covering), 1 / #covering
        # patches to each parent type (type), 1 / T_out (patch, or no shared children)
        return layout.softmax(like.new_zeros((1, *shape[1:])), over=self.over).expand(shape)


@register_routing("random", kinds=("vector", "matrix", "pose"))
class RandomRouting(AssignmentBaseline):
    """Random assignments: a softmax over each child's parents of logits drawn from N(0, ``logit_std``^2).

    Args:
        logit_std: spread of the logits (0.5: mild preferences; 5: nearly one parent per child).
        seed: seed of the fixed draw (one per patch, slot, type and parent, shared by all examples; mixed with the
            layer's shape and role, so the layers of a network draw independently).
        redraw: draw fresh logits for every example at every training step (evaluation: the fixed draw).
    """

    vector_settings = frozenset({"logit_std", "seed", "redraw"})
    compiles_whole = False  # the fixed draw (fixed_logits) runs outside a compiled graph

    @checked(routing_key)
    def __init__(
        self, *, logit_std: PositiveFloat = 1.0, seed: NonNegativeInt = 0, redraw: bool = False, **settings: Any
    ) -> None:
        super().__init__(**settings)
        self.logit_std = float(logit_std)
        self.seed = seed
        self.redraw = redraw

    def assignments(self, shape: torch.Size, like: torch.Tensor, layout: ChildLayout) -> torch.Tensor:
        if self.redraw and self.training:
            logits = torch.randn(shape, device=like.device, dtype=like.dtype)  # (B, P, K, T_in, T_out)
        else:  # the same draw at every call, whatever the device
            logits = fixed_logits(self.seed, tuple(shape[1:]), self.role).to(device=like.device, dtype=like.dtype)
        return layout.softmax(self.logit_std * logits, over=self.over).expand(shape)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, logit_std={self.logit_std}, seed={self.seed}, redraw={self.redraw}"
