"""LightningModules, one per capsule variant, sharing :class:`CapsuleClassifier`."""

from capsnets.models.base import CapsuleClassifier
from capsnets.models.cnn import BaselineCNN, CNNModule
from capsnets.models.dr_caps import CapsNet, DRCapsModule
from capsnets.models.em_caps import EMCapsModule, EMCapsNet

__all__ = ["BaselineCNN", "CNNModule", "CapsNet", "CapsuleClassifier", "DRCapsModule", "EMCapsModule", "EMCapsNet"]
