"""Squash non-linearity (Sabour et al. 2017, Eq. 1).

``v = |s|^2 / (1 + |s|^2) * s / |s|``: short vectors shrink to almost zero length, long
ones to just under length one, and the direction is kept. The norm is computed as
``sqrt(sum s^2 + eps)`` (epsilon *inside* the square root): the official code has no
epsilon, and ``d|s|/ds`` is then 0/0 at ``s = 0``, which is where public ports get NaN
gradients. With the epsilon, ``squash(0) = 0`` with a finite gradient.
"""

from __future__ import annotations

from typing import Literal

import torch


def squash(s: torch.Tensor, dim: int = -1, eps: float = 1e-8) -> torch.Tensor:
    """Squash ``s`` along ``dim`` so that its length lies in [0, 1)."""
    sq_norm = s.pow(2).sum(dim=dim, keepdim=True)  # |s|^2
    norm = torch.sqrt(sq_norm + eps)  # |s|, safe at s = 0
    return (sq_norm / (1.0 + sq_norm)) * (s / norm)


def efficient_squash(s: torch.Tensor, dim: int = -1, eps: float = 1e-8) -> torch.Tensor:
    """Efficient-CapsNet's squash (Mazzia, Salvetti & Chiaberge 2021, Eq. 7): ``v = (1 - 1/e^{|s|}) s / |s|``.

    Steeper near zero than Sabour's (slope 1 instead of ``|s|``), so small capsules are not
    silenced; the length still lies in [0, 1). ``|s| = sqrt(sum s^2 + eps)``, finite gradient at 0.
    """
    norm = torch.sqrt(s.pow(2).sum(dim=dim, keepdim=True) + eps)  # |s|
    return -torch.expm1(-norm) * (s / norm)  # (1 - e^{-|s|}) without cancellation for small |s|


SQUASHES = {"sabour": squash, "efficient": efficient_squash}
Squash = Literal["sabour", "efficient"]  # a setting naming one of SQUASHES
