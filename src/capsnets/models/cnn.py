"""The CNN baselines the capsule papers compare against, trained with the same DataModules.

The networks are in :mod:`capsnets.nets.cnn`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from capsnets.models.base import CapsuleClassifier, Optimizer, SchedulerSettings
from capsnets.nets.cnn import PRESETS, Architecture, BaselineCNN
from capsnets.registry import register_model
from capsnets.schema import check_value, checked


@register_model
class CNNModule(CapsuleClassifier):
    """LightningModule for the CNN baselines: cross-entropy on the logits; class score = softmax."""

    network = BaselineCNN  # the plain nn.Module built from model.net (its constructor types model.net.*)
    net_settings: ClassVar[dict[str, Any]] = {"architecture": Architecture}  # model.net keys the module reads

    @checked("model")
    def __init__(self, *, net: dict[str, Any], optimizer: Optimizer, scheduler: SchedulerSettings) -> None:
        super().__init__(num_classes=net["num_classes"], optimizer=optimizer, scheduler=scheduler)
        self.save_hyperparameters(logger=False)  # train.py logs the whole resolved config instead
        net = dict(net)
        arch = net.pop("architecture")
        check_value("model.net.architecture", arch, self.net_settings["architecture"])
        self.net = BaselineCNN(**{**PRESETS[arch], **net})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def class_capsules(self, x: torch.Tensor) -> tuple[None, torch.Tensor]:
        return None, self.net(x).softmax(dim=-1)  # no capsules; class scores = softmax

    def shared_step(self, batch: Any, stage: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch
        logits = self.net(x)
        return torch.nn.functional.cross_entropy(logits, y), logits.softmax(dim=-1), {}
