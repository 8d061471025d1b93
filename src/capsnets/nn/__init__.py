"""Plain ``torch.nn`` building blocks for capsule networks, one concept per file.

The routing procedures are in :mod:`capsnets.nn.routing`."""

from capsnets.nn.class_caps import ClassCapsules, coordinate_offsets
from capsnets.nn.conv import Conv2d, conv2d_weight_grad
from capsnets.nn.conv_caps import ConvCapsules, conv_child_index
from capsnets.nn.decoder import ReconstructionDecoder, mask_capsules
from capsnets.nn.matrix_caps import PrimaryMatrixCapsules, capsule_votes
from capsnets.nn.primary_caps import PrimaryCapsules
from capsnets.nn.routing import ChildLayout, Routing, RoutingResult, RoutingTrace, build_routing
from capsnets.nn.routing_caps import RoutingCapsules
from capsnets.nn.squash import efficient_squash, squash

__all__ = [
    "ChildLayout",
    "ClassCapsules",
    "Conv2d",
    "ConvCapsules",
    "PrimaryCapsules",
    "PrimaryMatrixCapsules",
    "ReconstructionDecoder",
    "Routing",
    "RoutingCapsules",
    "RoutingResult",
    "RoutingTrace",
    "build_routing",
    "capsule_votes",
    "conv2d_weight_grad",
    "conv_child_index",
    "coordinate_offsets",
    "efficient_squash",
    "mask_capsules",
    "squash",
]
