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
