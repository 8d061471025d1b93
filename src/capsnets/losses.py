"""Losses of the capsule papers.

* margin loss and reconstruction loss: Sabour et al. 2017, Eq. 4 and Sec. 4.1;
* spread loss: Hinton et al. 2018, Sec. 3.1 (added with the EM model).

Every loss returns the mean over the batch of a per-example sum, as in the papers.
"""

from __future__ import annotations

import torch


def margin_loss(
    lengths: torch.Tensor,
    target: torch.Tensor,
    *,
    m_plus: float = 0.9,
    m_minus: float = 0.1,
    down_weight: float = 0.5,
) -> torch.Tensor:
    """``L_k = T_k max(0, m+ - |v_k|)^2 + lambda (1 - T_k) max(0, |v_k| - m-)^2``.

    Args:
        lengths: capsule lengths ``|v_k|`` (or activations), shape (B, K).
        target: class indices, shape (B,).
        down_weight: lambda, the weight of the absent-class term (0.5 in the paper).
    Returns:
        scalar: sum over the K classes, mean over the batch.
    """
    t_k = torch.nn.functional.one_hot(target, num_classes=lengths.shape[-1]).to(lengths.dtype)  # (B, K)
    present = t_k * torch.relu(m_plus - lengths).pow(2)
    absent = down_weight * (1.0 - t_k) * torch.relu(lengths - m_minus).pow(2)
    return (present + absent).sum(dim=-1).mean()


def reconstruction_loss(reconstruction: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Sum of squared pixel errors per image, mean over the batch (unweighted)."""
    return (reconstruction - images).pow(2).flatten(1).sum(dim=-1).mean()


def spread_loss(activations: torch.Tensor, target: torch.Tensor, margin: float | torch.Tensor) -> torch.Tensor:
    """Spread loss (Hinton et al. 2018, Eq. 3): ``L = sum_{i != t} max(0, m - (a_t - a_i))^2``.

    Args:
        activations: class-capsule activations ``a`` of shape (B, K).
        target: class indices t, shape (B,).
        margin: m; grows from 0.2 to 0.9 during training (see ``SpreadMarginSchedule``).
    Returns:
        scalar: sum over the wrong classes, mean over the batch.
    """
    a_t = activations.gather(1, target[:, None])  # (B, 1)
    gap = torch.relu(margin - (a_t - activations)).pow(2)  # (B, K); the i = t term is m^2, removed below
    wrong = 1.0 - torch.nn.functional.one_hot(target, num_classes=activations.shape[-1]).to(activations.dtype)
    return (gap * wrong).sum(dim=-1).mean()
