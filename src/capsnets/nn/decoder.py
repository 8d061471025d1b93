"""Reconstruction decoder (Sabour et al. 2017, Sec. 4.1, Fig. 2)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def mask_capsules(v: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Zero all class capsules but one and flatten.

    The kept capsule is the true class when ``labels`` is given (training) and the longest
    capsule otherwise (evaluation). (B, K, D) -> (B, K*D).
    """
    if labels is None:
        labels = v.norm(dim=-1).argmax(dim=-1)  # predicted class, (B,)
    mask = torch.nn.functional.one_hot(labels, num_classes=v.shape[1]).to(v.dtype)  # (B, K)
    return (v * mask.unsqueeze(-1)).flatten(1)  # (B, K*D)


class ReconstructionDecoder(nn.Module):
    """FC 512 ReLU -> FC 1024 ReLU -> FC (C*H*W) sigmoid, from the masked class capsules."""

    def __init__(
        self, *, num_classes: int, capsule_dim: int, out_shape: Sequence[int], hidden: Sequence[int] = (512, 1024)
    ) -> None:
        super().__init__()
        self.out_shape = tuple(out_shape)
        sizes = [num_classes * capsule_dim, *hidden]
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU(inplace=True)]
        n_pixels = 1
        for size in self.out_shape:
            n_pixels *= size
        layers += [nn.Linear(sizes[-1], n_pixels), nn.Sigmoid()]
        self.mlp = nn.Sequential(*layers)

    def forward(self, v: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K, D) class capsules -> (B, C, H, W) reconstruction in [0, 1]."""
        return self.mlp(mask_capsules(v, labels)).view(v.shape[0], *self.out_shape)
