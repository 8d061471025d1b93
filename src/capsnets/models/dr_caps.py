"""Vector-capsule classifiers: CapsNet (Sabour, Frosst & Hinton, NeurIPS 2017) and Efficient-CapsNet (Mazzia et al.
2021): margin and reconstruction losses, training."""

from __future__ import annotations

from typing import Any

import torch

from capsnets.losses import MarginLossSettings, margin_loss, reconstruction_loss
from capsnets.models.base import CapsuleClassifier, Optimizer, SchedulerSettings
from capsnets.nets import CapsNet, EfficientCapsNet
from capsnets.registry import register_model
from capsnets.schema import NonNegativeFloat, checked


class CapsNetLossSettings(MarginLossSettings, total=False):
    """``model.loss`` of CapsNet: the margin loss plus ``recon_weight`` x the reconstruction loss."""

    recon_weight: NonNegativeFloat


@register_model
class DRCapsModule(CapsuleClassifier):
    """LightningModule for CapsNet: margin loss + ``recon_weight`` x reconstruction loss.

    The decoder is masked by the true label in training and by the prediction in
    validation/test, as in the paper. ``routing`` (``model.routing``) is any vector-capsule
    routing for DigitCaps.
    """

    network = CapsNet  # the plain nn.Module built from model.net (its constructor types model.net.*)

    capsule_kind = "vector"
    class_layer = "digit"

    @checked("model")
    def __init__(
        self,
        *,
        net: dict[str, Any],
        loss: CapsNetLossSettings,
        optimizer: Optimizer,
        scheduler: SchedulerSettings,
        routing: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(num_classes=net["num_classes"], optimizer=optimizer, scheduler=scheduler)
        self.save_hyperparameters(logger=False)  # train.py logs the whole resolved config instead
        self.loss_cfg = dict(loss)
        self.net = self.network(**net, routing=routing)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def class_capsules(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.net(x)  # (B, K, D)
        return v, v.norm(dim=-1)  # class score = length

    @property
    def decoder(self) -> torch.nn.Module | None:
        return self.net.decoder

    def compiled_modules(self) -> dict[str, torch.nn.Module]:
        # the step calls the decoder on its own (after the class capsules), outside net's forward
        modules = super().compiled_modules()
        if self.net.decoder is not None:
            modules["net.decoder"] = self.net.decoder
        return modules

    def shared_step(self, batch: Any, stage: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch
        v, lengths = self.class_capsules(x)  # (B, K, D), (B, K)
        cfg = self.loss_cfg
        l_margin = margin_loss(lengths, y, m_plus=cfg["m_plus"], m_minus=cfg["m_minus"], down_weight=cfg["down_weight"])
        parts = {"margin_loss": l_margin.detach()}
        loss = l_margin
        if self.net.decoder is not None:
            recon = self.net.decoder(v, y if stage == "train" else None)
            l_recon = reconstruction_loss(recon, x)
            parts["recon_loss"] = l_recon.detach()
            loss = loss + cfg["recon_weight"] * l_recon
        return loss, lengths, parts


@register_model
class EfficientCapsModule(DRCapsModule):
    """LightningModule for Efficient-CapsNet (Mazzia, Salvetti & Chiaberge 2021): the same losses as CapsNet.

    Margin loss (m+ 0.9, m- 0.1, lambda 0.5) plus the reconstruction loss, which the authors weight
    0.392 on the mean squared error over 784 pixels, i.e. 0.0005 on the sum of squares (``recon_weight``).
    ``routing``: any vector-capsule routing (default: self-attention routing).
    """

    network = EfficientCapsNet
