"""Lightning callbacks: the spread-loss margin schedule, learning curves, and pictures (confusion
matrices, reconstructions and capsule perturbations, routing statistics and class activations)."""

from capsnets.callbacks.confusion_matrix import ConfusionMatrixPictures
from capsnets.callbacks.learning_curve import LearningCurve
from capsnets.callbacks.margin_schedule import SpreadMarginSchedule
from capsnets.callbacks.nonfinite import NonFiniteError, NonFiniteGuard
from capsnets.callbacks.pictures import PictureCallback
from capsnets.callbacks.reconstructions import ReconstructionPictures, perturbed_capsules, perturbed_reconstructions
from capsnets.callbacks.routing_pictures import RoutingPictures
from capsnets.callbacks.routing_stats import LayerRoutingStats, routing_statistics
from capsnets.callbacks.throughput import Throughput

__all__ = [
    "ConfusionMatrixPictures",
    "LayerRoutingStats",
    "LearningCurve",
    "NonFiniteError",
    "NonFiniteGuard",
    "PictureCallback",
    "ReconstructionPictures",
    "RoutingPictures",
    "SpreadMarginSchedule",
    "Throughput",
    "perturbed_capsules",
    "perturbed_reconstructions",
    "routing_statistics",
]
