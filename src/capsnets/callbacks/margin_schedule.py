"""The spread-loss margin schedule (Hinton et al. 2018, Sec. 3.1), defined in samples seen.

The paper grows the margin ``m`` "linearly from 0.2 to 0.9 during training"; the authors'
release uses ``m = 0.2 + 0.79 * sigmoid(min(10, step / 50000 - 4))`` at batch size 64. Both
are offered here as functions of the number of training samples seen (all devices), so the
curve does not depend on batch size or device count. ``samples_seen`` lives on the model
and is saved in every checkpoint, so a resumed run continues the curve exactly.
"""

from __future__ import annotations

import math
from typing import Any

from lightning import Callback, LightningModule, Trainer

from capsnets.errors import ConfigError
from capsnets.utils.validation import require_choice, require_positive, require_range

SCHEDULES = ("linear", "sigmoid", "constant")


def linear_margin(samples: float, *, start: float, end: float, ramp_samples: float) -> float:
    """``start -> end`` linearly over ``ramp_samples`` samples, then constant at ``end``."""
    return start + (end - start) * min(samples / ramp_samples, 1.0)


def sigmoid_margin(
    samples: float, *, start: float = 0.2, amplitude: float = 0.79, samples_per_unit: float = 50_000 * 64,
    offset: float = 4.0, cap: float = 10.0,
) -> float:
    """Authors' release: ``0.2 + 0.79 sigmoid(min(10, step/50000 - 4))`` with step = samples / 64."""
    z = min(cap, samples / samples_per_unit - offset)
    return start + amplitude / (1.0 + math.exp(-z))


class SpreadMarginSchedule(Callback):
    """Sets ``pl_module.spread_margin`` before every training batch and logs ``train/margin``.

    Args:
        schedule: ``linear`` (paper), ``sigmoid`` (authors' code) or ``constant`` (= ``end``).
        start, end: margin at the first sample and at the end of the linear ramp.
        ramp_samples: samples over which the linear ramp runs; ``None`` = the whole training
            run as planned at fit start (max_epochs/max_steps), remembered across resumes.
        sigmoid_samples_per_unit: samples per unit of the sigmoid's argument (50,000 steps
            of batch 64 in the authors' code).
    """

    def __init__(
        self,
        *,
        schedule: str = "linear",
        start: float = 0.2,
        end: float = 0.9,
        ramp_samples: float | None = None,
        sigmoid_amplitude: float = 0.79,
        sigmoid_samples_per_unit: float = 50_000 * 64,
        sigmoid_offset: float = 4.0,
        sigmoid_cap: float = 10.0,
    ) -> None:
        super().__init__()
        self.schedule = require_choice("model.loss.margin_schedule.schedule", schedule, SCHEDULES)
        self.start = require_range("model.loss.margin_schedule.start", start, 0.0, 1.0)
        self.end = require_range("model.loss.margin_schedule.end", end, 0.0, 1.0)
        self.ramp_samples = None if ramp_samples is None else require_positive("model.loss.margin_schedule.ramp_samples", ramp_samples)
        self.sigmoid_amplitude = sigmoid_amplitude
        self.sigmoid_samples_per_unit = require_positive("model.loss.margin_schedule.sigmoid_samples_per_unit", sigmoid_samples_per_unit)
        self.sigmoid_offset = sigmoid_offset
        self.sigmoid_cap = sigmoid_cap

    def margin(self, samples: float) -> float:
        """The margin after ``samples`` training samples."""
        if self.schedule == "constant":
            return self.end
        if self.schedule == "sigmoid":
            return sigmoid_margin(
                samples, start=self.start, amplitude=self.sigmoid_amplitude, samples_per_unit=self.sigmoid_samples_per_unit,
                offset=self.sigmoid_offset, cap=self.sigmoid_cap,
            )
        return linear_margin(samples, start=self.start, end=self.end, ramp_samples=self.ramp_samples or 1.0)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.schedule == "linear" and self.ramp_samples is None:
            # the planned length of the whole run, in samples (kept in the state_dict for resumes)
            planned = float(max(trainer.estimated_stepping_batches, 1) * pl_module.effective_batch_size())
            if not math.isfinite(planned):
                raise ConfigError(
                    "model.loss.margin_schedule.ramp_samples=null ramps the margin over the planned run, but this run "
                    "has no end (trainer.max_epochs=-1 and no max_steps). Fix: set model.loss.margin_schedule.ramp_samples "
                    "to a number of samples, or bound the run."
                )
            self.ramp_samples = planned

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        m = self.margin(pl_module.samples_seen)
        pl_module.spread_margin = m
        pl_module.log("train/margin", m, on_step=True, on_epoch=False, batch_size=1)

    def state_dict(self) -> dict[str, Any]:
        return {"ramp_samples": self.ramp_samples}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("ramp_samples") is not None:
            self.ramp_samples = float(state_dict["ramp_samples"])
