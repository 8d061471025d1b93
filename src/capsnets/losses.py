"""Losses of the capsule papers.

* margin loss and reconstruction loss: Sabour et al. 2017, Eq. 4 and Sec. 4.1;
* spread loss: Hinton et al. 2018, Sec. 3.1, and its margin schedule (:class:`MarginSchedule`;
  :class:`capsnets.callbacks.SpreadMarginSchedule` applies it during training).

Every loss returns the mean over the batch of a per-example sum, as in the papers.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal, TypedDict

import torch

from capsnets.errors import ConfigError
from capsnets.schema import Fraction, NonNegativeFloat, PositiveFloat, Range, checked

MarginScheduleKind = Literal["linear", "sigmoid", "constant"]
KEY = "model.loss.margin_schedule"
SigmoidShift = Annotated[float, Range(-1e9, 1e9)]  # the release's offset and cap, in units of its argument


class MarginLossSettings(TypedDict, total=False):
    """The margin loss's settings in ``model.loss`` (Sabour et al. 2017, Eq. 4)."""

    m_plus: Fraction  # the present class's length is pushed above m_plus ...
    m_minus: Fraction  # ... the absent classes' below m_minus (m_plus > m_minus: config_checks)
    down_weight: NonNegativeFloat  # lambda, the weight of the absent classes' term


def margin_loss(
    lengths: torch.Tensor,
    target: torch.Tensor,
    *,
    m_plus: float = 0.9,
    m_minus: float = 0.1,
    down_weight: float = 0.5,
) -> torch.Tensor:
    """``L_k = T_k max(0, m+ - |v_k|)^2 + lambda (1 - T_k) max(0, |v_k| - m-)^2``.

    Args:
        lengths: capsule lengths ``|v_k|`` (or activations), shape (B, K).
        target: class indices, shape (B,).
        down_weight: lambda, the weight of the absent-class term (0.5 in the paper).
    Returns:
        scalar: sum over the K classes, mean over the batch.
    """
    t_k = torch.nn.functional.one_hot(target, num_classes=lengths.shape[-1]).to(lengths.dtype)  # (B, K)
    present = t_k * torch.relu(m_plus - lengths).pow(2)
    absent = down_weight * (1.0 - t_k) * torch.relu(lengths - m_minus).pow(2)
    return (present + absent).sum(dim=-1).mean()


def reconstruction_loss(reconstruction: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Sum of squared pixel errors per image, mean over the batch (unweighted)."""
    return (reconstruction - images).pow(2).flatten(1).sum(dim=-1).mean()


def spread_loss(activations: torch.Tensor, target: torch.Tensor, margin: float | torch.Tensor) -> torch.Tensor:
    """Spread loss (Hinton et al. 2018, Eq. 3): ``L = sum_{i != t} max(0, m - (a_t - a_i))^2``.

    Args:
        activations: class-capsule activations ``a`` of shape (B, K).
        target: class indices t, shape (B,).
        margin: m; grows from 0.2 to 0.9 during training (see ``SpreadMarginSchedule``).
    Returns:
        scalar: sum over the wrong classes, mean over the batch.
    """
    a_t = activations.gather(1, target[:, None])  # (B, 1)
    gap = torch.relu(margin - (a_t - activations)).pow(2)  # (B, K); the i = t term is m^2, removed below
    wrong = 1.0 - torch.nn.functional.one_hot(target, num_classes=activations.shape[-1]).to(activations.dtype)
    return (gap * wrong).sum(dim=-1).mean()


# --- the spread-loss margin schedule, in samples seen -----------------------------------------
# The paper grows m "linearly from 0.2 to 0.9 during training"; the authors' release uses
# m = 0.2 + 0.79 sigmoid(min(10, step / 50000 - 4)) at batch size 64. Both are functions of the
# training samples seen (all devices), so batch size and device count do not change the curve.


def linear_margin(samples: float, *, start: float, end: float, ramp_samples: float) -> float:
    """``start -> end`` linearly over ``ramp_samples`` samples, then constant at ``end``."""
    return start + (end - start) * min(samples / ramp_samples, 1.0)


def sigmoid_margin(
    samples: float,
    *,
    start: float = 0.2,
    amplitude: float = 0.79,
    samples_per_unit: float = 50_000 * 64,
    offset: float = 4.0,
    cap: float = 10.0,
) -> float:
    """Authors' release: ``0.2 + 0.79 sigmoid(min(10, step/50000 - 4))`` with step = samples / 64."""
    z = min(cap, samples / samples_per_unit - offset)
    return start + amplitude / (1.0 + math.exp(-z))


class MarginSchedule:
    """The margin m of the spread loss as a function of training samples seen (settings checked as it is built).

    Args:
        schedule: ``linear`` (paper), ``sigmoid`` (authors' code) or ``constant`` (= ``end``).
        start, end: margin at the first sample and at the end of the linear ramp.
        ramp_samples: samples over which the linear ramp runs; ``None`` = the whole training run
            as planned at fit start (set by the callback through :meth:`plan`).
        sigmoid_*: the release's sigmoid (amplitude, samples per unit of its argument = 50,000
            steps of batch 64, offset, cap).
    """

    @checked(KEY)
    def __init__(
        self,
        *,
        schedule: MarginScheduleKind = "linear",
        start: Fraction = 0.2,
        end: Fraction = 0.9,
        ramp_samples: PositiveFloat | None = None,
        sigmoid_amplitude: Fraction = 0.79,
        sigmoid_samples_per_unit: PositiveFloat = 50_000 * 64,
        sigmoid_offset: SigmoidShift = 4.0,
        sigmoid_cap: SigmoidShift = 10.0,
    ) -> None:
        self.schedule = schedule
        self.start, self.end = float(start), float(end)
        self.ramp_samples = None if ramp_samples is None else float(ramp_samples)
        self.sigmoid_amplitude = float(sigmoid_amplitude)
        self.sigmoid_samples_per_unit = float(sigmoid_samples_per_unit)
        self.sigmoid_offset, self.sigmoid_cap = float(sigmoid_offset), float(sigmoid_cap)

    def margin(self, samples: float) -> float:
        """The margin after ``samples`` training samples."""
        if self.schedule == "constant":
            return self.end
        if self.schedule == "sigmoid":
            return sigmoid_margin(
                samples,
                start=self.start,
                amplitude=self.sigmoid_amplitude,
                samples_per_unit=self.sigmoid_samples_per_unit,
                offset=self.sigmoid_offset,
                cap=self.sigmoid_cap,
            )
        return linear_margin(samples, start=self.start, end=self.end, ramp_samples=self.ramp_samples or 1.0)

    def plan(self, planned_samples: float) -> None:
        """A linear ramp without ``ramp_samples`` runs over the planned run (``planned_samples``)."""
        if self.schedule != "linear" or self.ramp_samples is not None:
            return
        if not math.isfinite(planned_samples):
            raise ConfigError(
                f"{KEY}.ramp_samples=null ramps the margin over the planned run, but this run has no end "
                f"(trainer.max_epochs=-1 and no max_steps). Fix: set {KEY}.ramp_samples to a number of samples, "
                "or bound the run."
            )
        self.ramp_samples = float(planned_samples)
