"""Learning curves: accuracy on a held-out split against the number of training samples seen.

Every ``every_samples`` training samples (all devices; and once before the first step) the
model scores the whole ``split`` (``test`` by default: the curve is what a paper's "accuracy
after N samples" means; ``val`` for model selection) with the network in eval mode, exactly as
``trainer.test`` would score it (the DataModule's evaluation form of each batch, multi-crop
averaging included). The points are logged as ``curve/<split>/acc`` (step = global step,
with ``curve/samples``), kept in the checkpoint (a resumed run continues its curve) and written
by ``train.py`` into ``metrics.json`` (``curve``), from which ``capsnets-summarize`` draws the
curves of a sweep (mean +/- std over seeds per configuration).

Cost: one pass over the split per point, on global rank 0 (the other ranks wait at their next
collective). mnist_sample's 2,000 test digits take seconds for dr_caps and em_caps_small; for a
large split on a CPU (Fashion-MNIST's 10,000 test images: ~1 min per point for em_caps_small)
``max_samples`` scores the first N samples of the split in its fixed order, the same ones at every
point (2,000 samples: standard error about 1 point of accuracy at 80%). The run's final
``test/acc`` still scores the whole split; the curve's last point then differs from it by the
subset's sampling error.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import move_data_to_device

from capsnets.errors import ConfigError
from capsnets.schema import PositiveInt, checked

KEY = "callbacks.learning_curve"


class LearningCurve(Callback):
    """Scores ``split`` every ``every_samples`` training samples; ``curve`` holds ``{samples, acc}`` points.

    Args:
        every_samples: training samples between two points (counted as the model's ``samples_seen``).
        split: ``test`` or ``val``.
        at_start: also score before the first training step (the curve's origin, chance level).
        max_samples: score only the first ``max_samples`` samples of the split (null: all of it).
    """

    @checked(KEY)
    def __init__(
        self,
        *,
        every_samples: PositiveInt = 1000,
        split: Literal["test", "val"] = "test",
        at_start: bool = True,
        max_samples: PositiveInt | None = None,
    ) -> None:
        super().__init__()
        self.every_samples = every_samples
        self.split = split
        self.at_start = at_start
        self.max_samples = max_samples
        self.curve: list[dict[str, float]] = []
        self._next = 0  # samples_seen of the next point

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not callable(getattr(pl_module, "scores", None)) or not callable(
            getattr(trainer.datamodule, "eval_batch", None)
        ):
            raise ConfigError(
                f"{KEY} needs a capsnets model (scores()) and DataModule (eval_batch()); got "
                f"{type(pl_module).__name__} / {type(trainer.datamodule).__name__}. Fix: drop callbacks.learning_curve."
            )
        seen = int(getattr(pl_module, "samples_seen", 0))
        if not self.curve:
            self._next = 0 if self.at_start else self.every_samples
        if seen == 0 and self._next == 0:
            self._point(trainer, pl_module)
        while self._next <= seen:
            self._next += self.every_samples

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if pl_module.samples_seen >= self._next:
            self._point(trainer, pl_module)
            while self._next <= pl_module.samples_seen:
                self._next += self.every_samples

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.curve or self.curve[-1]["samples"] != pl_module.samples_seen:
            self._point(trainer, pl_module)  # the end of training is always a point

    def _point(self, trainer: Trainer, pl_module: LightningModule) -> None:
        samples = int(pl_module.samples_seen)
        if trainer.is_global_zero:
            acc = self.accuracy(trainer, pl_module)
            self.curve.append({"samples": samples, "acc": acc})
            for logger in trainer.loggers:
                logger.log_metrics({f"curve/{self.split}/acc": acc, "curve/samples": samples}, step=trainer.global_step)

    @torch.no_grad()
    def accuracy(self, trainer: Trainer, pl_module: LightningModule) -> float:
        """Accuracy of ``pl_module`` on ``split`` (its first ``max_samples``), scored as ``trainer.test`` scores it."""
        dm = trainer.datamodule
        if self.split == "test":
            if dm.data_test is None or getattr(dm, "eval_split", "test") != "test":
                dm.setup("test")
            loader = dm.test_dataloader()
        else:
            loader = dm.val_dataloader()
        was_training = pl_module.training
        pl_module.eval()
        correct = total = 0
        try:
            for batch in loader:
                x, y = dm.eval_batch(move_data_to_device(batch, pl_module.device))
                if self.max_samples is not None:
                    x, y = x[: self.max_samples - total], y[: self.max_samples - total]
                correct += int((pl_module.scores(x).argmax(dim=-1) == y).sum())
                total += int(y.numel())
                if self.max_samples is not None and total >= self.max_samples:
                    break
        finally:
            pl_module.train(was_training)
        return correct / max(total, 1)

    def state_dict(self) -> dict[str, Any]:
        return {"curve": list(self.curve), "next": self._next}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        loaded = [dict(point) for point in state_dict.get("curve", [])]
        if len(self.curve) > len(loaded) and self.curve[: len(loaded)] == loaded:
            # trainer.test(ckpt_path=best) restores callbacks from an earlier checkpoint of this same run:
            # the curve recorded since then is kept (a resumed run starts empty and takes the stored curve)
            return
        self.curve = loaded
        self._next = int(state_dict.get("next", self._next))
