"""LightningModules, one per capsule variant, sharing :class:`CapsuleClassifier`."""

from capsnets.models.base import CapsuleClassifier
from capsnets.models.dr_caps import CapsNet, DRCapsModule

__all__ = ["CapsNet", "CapsuleClassifier", "DRCapsModule"]
