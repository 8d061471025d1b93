"""Matrix capsules with EM routing (Hinton, Sabour & Frosst, ICLR 2018): losses and training."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal, Required

import torch
from lightning import Callback

from capsnets.losses import MarginLossSettings, MarginSchedule, margin_loss, spread_loss
from capsnets.models.base import CapsuleClassifier, Optimizer, SchedulerSettings
from capsnets.nets import EMCapsNet
from capsnets.registry import register_model
from capsnets.schema import SettingsOf, checked


class EMLossSettings(MarginLossSettings, total=False):
    """``model.loss`` of matrix capsules: which loss, the spread loss's margin schedule, the margin loss's settings."""

    name: Required[Literal["spread", "margin", "cross_entropy"]]
    margin_schedule: Annotated[Mapping[str, Any], SettingsOf(MarginSchedule)]


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

    @checked("model")
    def __init__(
        self,
        *,
        net: dict[str, Any],
        loss: EMLossSettings,
        optimizer: Optimizer,
        scheduler: SchedulerSettings,
        routing: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(num_classes=net["num_classes"], optimizer=optimizer, scheduler=scheduler)
        self.save_hyperparameters(logger=False)  # train.py logs the whole resolved config instead
        self.loss_name = loss["name"]
        self.loss_cfg = dict(loss)
        self.margin_schedule_cfg = dict(loss.get("margin_schedule") or {})
        # checked now, before any data is read; the callback built from it sets spread_margin per batch
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
