"""Capsules with inverted dot-product attention routing (Tsai et al., ICLR 2020): loss and training."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from capsnets.models.base import CapsuleClassifier, Optimizer, SchedulerSettings
from capsnets.nets import IDACapsNet
from capsnets.registry import register_model
from capsnets.schema import checked


@register_model
class IDACapsModule(CapsuleClassifier):
    """LightningModule for :class:`~capsnets.nets.IDACapsNet`: cross-entropy on the class logits (the release's loss).

    The class scores shown to metrics and pictures are the softmax probabilities; ``routing``
    (``model.routing``) is any pose-capsule routing.
    """

    network = IDACapsNet

    capsule_kind = "pose"
    class_layer = "classes"

    @checked("model")
    def __init__(
        self,
        *,
        net: dict[str, Any],
        optimizer: Optimizer,
        scheduler: SchedulerSettings,
        routing: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(num_classes=net["num_classes"], optimizer=optimizer, scheduler=scheduler)
        self.save_hyperparameters(logger=False)
        self.net = self.network(**net, routing=routing)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[1]

    def class_capsules(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        poses, logits = self.net(x)
        return poses, logits.softmax(dim=-1)

    def shared_step(self, batch: Any, stage: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch
        _, logits = self.net(x)  # (B, K)
        return F.cross_entropy(logits, y), logits.softmax(dim=-1), {}
