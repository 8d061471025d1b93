"""Matrix capsules with EM routing (Hinton, Sabour & Frosst, ICLR 2018): losses and training."""

from __future__ import annotations

from typing import Any

import torch
from lightning import Callback

from capsnets.losses import MarginSchedule, margin_loss, spread_loss
from capsnets.models.base import CapsuleClassifier
from capsnets.nets import EMCapsNet
from capsnets.registry import register_model
from capsnets.utils.validation import require_choice, require_range

LOSSES = ("spread", "margin", "cross_entropy")


@register_model
class EMCapsModule(CapsuleClassifier):
    """LightningModule for matrix capsules; class score = class-capsule activation.

    Loss by ``model.loss.name``: ``spread`` (paper; the margin follows
    :class:`~capsnets.losses.MarginSchedule`, whose callback this module supplies itself through
    ``configure_callbacks``), ``margin`` (Sabour et al.'s margin loss on the activations) or
    ``cross_entropy`` (on the activations' logits ``log(a / (1 - a))``), as in the paper's loss
    ablation. ``routing`` (``model.routing``) is any matrix-capsule routing.
    """

    network = EMCapsNet  # the plain nn.Module built from model.net (its constructor types model.net.*)

    capsule_kind = "matrix"
    class_layer = "classes"

    def __init__(
        self,
        *,
        net: dict[str, Any],
        loss: dict[str, Any],
        optimizer: dict[str, Any],
        scheduler: dict[str, Any],
        routing: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(num_classes=net["num_classes"], optimizer=optimizer, scheduler=scheduler)
        self.save_hyperparameters(logger=False)  # train.py logs the whole resolved config instead
        self.loss_name = require_choice("model.loss.name", loss.get("name"), LOSSES)
        self.loss_cfg = dict(loss)
        if self.loss_name == "margin":
            for key in ("m_plus", "m_minus"):
                require_range(f"model.loss.{key}", loss[key], 0.0, 1.0)
            require_range("model.loss.down_weight", loss["down_weight"], 0.0, float("inf"))
        self.margin_schedule_cfg = dict(loss.get("margin_schedule") or {})
        # validated now, before any data is read; the callback built from it sets spread_margin per batch
        schedule = MarginSchedule(**self.margin_schedule_cfg) if self.loss_name == "spread" else None
        self.spread_margin = schedule.margin(0) if schedule is not None else 0.0
        self.net = EMCapsNet(**net, routing=routing)

    def configure_callbacks(self) -> list[Callback]:
        if self.loss_name != "spread":
            return []
        from capsnets.callbacks.margin_schedule import SpreadMarginSchedule  # only when training: keeps imports light

        return [SpreadMarginSchedule(**self.margin_schedule_cfg)]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(x)

    def class_capsules(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(x)  # class poses (B, K, 16), activations (B, K)

    def shared_step(self, batch: Any, stage: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch
        _, a = self.net(x)  # (B, K) class activations
        a = a.float()
        if self.loss_name == "spread":
            loss = spread_loss(a, y, self.spread_margin)
        elif self.loss_name == "margin":
            cfg = self.loss_cfg
            loss = margin_loss(a, y, m_plus=cfg["m_plus"], m_minus=cfg["m_minus"], down_weight=cfg["down_weight"])
        else:
            logits = torch.logit(a, eps=1e-6)
            loss = torch.nn.functional.cross_entropy(logits, y)
        return loss, a, {}
