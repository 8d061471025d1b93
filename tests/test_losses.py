import pytest
import torch

from capsnets.losses import margin_loss, reconstruction_loss


def test_margin_loss_golden():
    # ex 1: target 0, |v| = (0.95, 0.3, 0.05): present 0, absent 0.5 * 0.2^2 = 0.02
    # ex 2: target 1, |v| = (0.5, 0.2, 0.8): present 0.7^2 = 0.49, absent 0.5*(0.4^2 + 0.7^2) = 0.325
    lengths = torch.tensor([[0.95, 0.3, 0.05], [0.5, 0.2, 0.8]])
    loss = margin_loss(lengths, torch.tensor([0, 1]))
    assert loss.item() == pytest.approx((0.02 + 0.815) / 2, abs=1e-6)


def test_margin_loss_params_used():
    lengths = torch.tensor([[0.5, 0.5]])
    assert margin_loss(lengths, torch.tensor([0]), m_plus=0.6, m_minus=0.4, down_weight=1.0).item() == pytest.approx(
        0.02
    )
    assert margin_loss(lengths, torch.tensor([0]), m_plus=0.5, m_minus=0.5).item() == 0.0


def test_margin_loss_zero_when_perfect():
    assert margin_loss(torch.tensor([[0.95, 0.05, 0.0]]), torch.tensor([0])).item() == 0.0


def test_reconstruction_loss_sum_per_image_mean_over_batch():
    images = torch.zeros(2, 1, 2, 2)
    recon = torch.zeros(2, 1, 2, 2)
    recon[0] = 0.5  # 4 pixels * 0.25 = 1.0
    recon[1, 0, 0, 0] = 1.0  # 1.0
    assert reconstruction_loss(recon, images).item() == pytest.approx(1.0)


def test_spread_loss_golden():
    from capsnets.losses import spread_loss

    # ex 1: t=0, m=0.5: (0.5-0.3)^2 + 0 = 0.04; ex 2 at m=0.5: (0.5+0.4)^2 + (0.5+0.1)^2 = 0.81+0.36
    a = torch.tensor([[0.8, 0.5, 0.1], [0.2, 0.6, 0.3]])
    assert spread_loss(a, torch.tensor([0, 0]), 0.5).item() == pytest.approx((0.04 + 1.17) / 2)
    # ex 2 at m=0.2: 0.6^2 + 0.3^2 = 0.45
    assert spread_loss(a[1:], torch.tensor([0]), 0.2).item() == pytest.approx(0.45)


def test_spread_loss_ignores_target_term_and_is_zero_when_separated():
    from capsnets.losses import spread_loss

    assert spread_loss(torch.tensor([[0.95, 0.0, 0.05]]), torch.tensor([0]), 0.9).item() == 0.0
    # the i = t term would add m^2 = 0.81 if it were not excluded
    assert spread_loss(torch.tensor([[0.5, 0.5]]), torch.tensor([1]), 0.9).item() == pytest.approx(0.81)
