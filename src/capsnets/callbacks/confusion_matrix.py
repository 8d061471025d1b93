"""Confusion matrix of the whole validation (test) set, from the class scores the evaluation steps return."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from lightning import LightningModule, Trainer
from torchmetrics.classification import MulticlassConfusionMatrix

from capsnets.callbacks.drawing import confusion_matrix_figure
from capsnets.callbacks.pictures import PictureCallback, Render


class ConfusionMatrixPictures(PictureCallback):
    """True vs predicted class over every validation (test) image, for every model whose evaluation
    step returns ``{"scores": (B, K)}`` (all capsnets models). Counted with torchmetrics'
    ``MulticlassConfusionMatrix`` on every rank and summed across ranks before rank 0 draws.

    After drawing, ``confusion[stage]`` holds the counts (K, K), row = true class, column = predicted.
    Takes the settings of :class:`~capsnets.callbacks.pictures.PictureCallback`.
    """

    key = "callbacks.confusion_matrix"

    def __init__(self, **settings: Any) -> None:
        super().__init__(**settings)
        self._metrics: dict[str, MulticlassConfusionMatrix] = {}
        self.confusion: dict[str, torch.Tensor] = {}

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._metrics.pop("val", None)

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._metrics.pop("test", None)

    def collect(self, stage: str, pl_module: LightningModule, outputs: Any, y: torch.Tensor) -> None:
        scores = outputs.get("scores") if isinstance(outputs, dict) else None
        if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
            return
        if stage not in self._metrics:
            self._metrics[stage] = MulticlassConfusionMatrix(num_classes=scores.shape[-1]).to(scores.device)
        self._metrics[stage].update(scores.argmax(dim=-1), y)

    def gather(self, stage: str, trainer: Trainer) -> None:
        metric = self._metrics.pop(stage, None)
        if metric is not None:
            self.confusion[stage] = metric.compute().cpu()  # every rank: compute() sums across processes
        else:
            self.confusion.pop(stage, None)

    def draw(
        self, stage: str, trainer: Trainer, pl_module: LightningModule, title: str
    ) -> tuple[dict[str, Render], dict[str, float]]:
        if stage not in self.confusion:
            self._skip("confusion_matrix", f"{type(pl_module).__name__}'s {stage} step returns no class scores")
            return {}, {}
        figure = partial(
            confusion_matrix_figure,
            self.confusion[stage],
            class_names=self.class_names_for(trainer),
            title=title,
            dpi=self.dpi,
        )
        return {"confusion_matrix": figure}, {}
