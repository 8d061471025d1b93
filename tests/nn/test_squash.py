import math

import pytest
import torch

from capsnets.nn import squash


def test_golden_value_3_4():
    # |s| = 5: scale 25/26, direction (0.6, 0.8)
    v = squash(torch.tensor([[3.0, 4.0]]))
    assert torch.allclose(v, torch.tensor([[25 / 26 * 0.6, 25 / 26 * 0.8]]), atol=1e-6)


@pytest.mark.parametrize("scale", [1e-3, 0.5, 1.0, 10.0, 1e4])
def test_length_below_one_and_direction_kept(scale):
    s = torch.randn(64, 10, 16, dtype=torch.float64) * scale
    v = squash(s)
    norm_s, norm_v = s.norm(dim=-1), v.norm(dim=-1)
    assert (norm_v < 1).all()
    # eps = 1e-8 sits inside the square root: |v| = |s|^2/(1+|s|^2) * |s|/sqrt(|s|^2 + eps)
    expected = norm_s**2 / (1 + norm_s**2) * norm_s / torch.sqrt(norm_s**2 + 1e-8)
    assert torch.allclose(norm_v, expected, rtol=1e-6, atol=1e-12)
    cos = torch.nn.functional.cosine_similarity(s, v, dim=-1)
    assert torch.allclose(cos, torch.ones_like(cos))


def test_squash_over_requested_dim():
    s = torch.randn(4, 8, 5)
    assert torch.allclose(squash(s, dim=1), squash(s.transpose(1, 2), dim=-1).transpose(1, 2), atol=1e-6)


def test_zero_input_gives_zero_and_finite_gradient():
    # without an epsilon inside the norm, d|s|/ds = 0/0 at s = 0 and the gradient is NaN
    s = torch.zeros(3, 8, requires_grad=True)
    v = squash(s)
    assert torch.equal(v, torch.zeros_like(v))
    (v.sum() + v.norm(dim=-1).sum()).backward()
    assert torch.isfinite(s.grad).all()


def test_naive_squash_would_nan_at_zero():
    # guards the test above: the epsilon-free formula really is NaN at zero
    s = torch.zeros(2, 4, requires_grad=True)
    norm = s.norm(dim=-1, keepdim=True)
    v = norm**2 / (1 + norm**2) * s / norm
    assert torch.isnan(v).all()
    assert not math.isnan(float(squash(s.detach()).sum()))
