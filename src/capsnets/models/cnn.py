"""The CNN baselines the capsule papers compare against, trained with the same DataModules.

The networks are in :mod:`capsnets.nets.cnn`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from capsnets.models.base import CapsuleClassifier
from capsnets.nets.cnn import ARCHITECTURES, PRESETS, BaselineCNN
from capsnets.registry import register_model
from capsnets.utils.validation import require_choice


@register_model
class CNNModule(CapsuleClassifier):
    """LightningModule for the CNN baselines: cross-entropy on the logits; class score = softmax."""

    network = BaselineCNN  # the plain nn.Module built from model.net (its constructor types model.net.*)
    net_settings: ClassVar[dict[str, type]] = {"architecture": str}  # model.net keys the module itself reads

    def __init__(self, *, net: dict[str, Any], optimizer: dict[str, Any], scheduler: dict[str, Any]) -> None:
        super().__init__(num_classes=net["num_classes"], optimizer=optimizer, scheduler=scheduler)
        self.save_hyperparameters(logger=False)  # train.py logs the whole resolved config instead
        net = dict(net)
        arch = require_choice("model.net.architecture", net.pop("architecture"), ARCHITECTURES)
        self.net = BaselineCNN(**{**PRESETS[arch], **net})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def class_capsules(self, x: torch.Tensor) -> tuple[None, torch.Tensor]:
        return None, self.net(x).softmax(dim=-1)  # no capsules; class scores = softmax

    def shared_step(self, batch: Any, stage: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch
        logits = self.net(x)
        return torch.nn.functional.cross_entropy(logits, y), logits.softmax(dim=-1), {}
