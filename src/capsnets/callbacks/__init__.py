"""Lightning callbacks: the spread-loss margin schedule, and pictures (reconstructions, capsule
perturbations, confusion matrices, routing statistics, EM class activations)."""

from capsnets.callbacks.margin_schedule import SpreadMarginSchedule, linear_margin, sigmoid_margin
from capsnets.callbacks.pictures import KINDS as PICTURE_KINDS
from capsnets.callbacks.pictures import PicturesCallback, confusion_counts, perturbed_capsules, perturbed_reconstructions
from capsnets.callbacks.routing_stats import LayerRoutingStats, record_routing, routing_statistics

__all__ = [
    "PICTURE_KINDS",
    "LayerRoutingStats",
    "PicturesCallback",
    "SpreadMarginSchedule",
    "confusion_counts",
    "linear_margin",
    "perturbed_capsules",
    "perturbed_reconstructions",
    "record_routing",
    "routing_statistics",
    "sigmoid_margin",
]
