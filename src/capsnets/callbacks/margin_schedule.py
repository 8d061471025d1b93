"""The spread-loss margin schedule (Hinton et al. 2018, Sec. 3.1) as a Lightning callback.

The schedule itself (:class:`capsnets.losses.MarginSchedule`, in samples seen) lives beside the
spread loss; this callback sets ``pl_module.spread_margin`` from it before every training batch.
``samples_seen`` lives on the model and is saved in every checkpoint, and the planned ramp length
is this callback's state, so a resumed run continues the curve exactly. EM models supply the
callback themselves (``configure_callbacks``), so ``python train.py model=em_caps`` needs no flag.
"""

from __future__ import annotations

from typing import Any

from lightning import Callback, LightningModule, Trainer

from capsnets.losses import MarginSchedule


class SpreadMarginSchedule(Callback):
    """Sets ``pl_module.spread_margin`` before every training batch and logs ``train/margin``.

    Takes the settings of :class:`~capsnets.losses.MarginSchedule` (``model.loss.margin_schedule``).
    """

    def __init__(self, **settings: Any) -> None:
        super().__init__()
        self.schedule = MarginSchedule(**settings)

    @property
    def ramp_samples(self) -> float | None:
        return self.schedule.ramp_samples

    @ramp_samples.setter
    def ramp_samples(self, value: float | None) -> None:
        self.schedule.ramp_samples = value

    def margin(self, samples: float) -> float:
        return self.schedule.margin(samples)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # the planned length of the whole run, in samples (kept in the state_dict for resumes)
        self.schedule.plan(float(max(trainer.estimated_stepping_batches, 1) * pl_module.effective_batch_size()))

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        m = self.margin(pl_module.samples_seen)
        pl_module.spread_margin = m
        pl_module.log("train/margin", m, on_step=True, on_epoch=False, batch_size=1)

    def state_dict(self) -> dict[str, Any]:
        return {"ramp_samples": self.ramp_samples}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("ramp_samples") is not None:
            self.ramp_samples = float(state_dict["ramp_samples"])
