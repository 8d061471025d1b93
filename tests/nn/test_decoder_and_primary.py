import torch

from capsnets.nn import PrimaryCapsules, ReconstructionDecoder, mask_capsules


def test_mask_by_label_keeps_only_that_capsule():
    v = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2) + 1
    masked = mask_capsules(v, torch.tensor([2, 0])).view(2, 3, 2)
    assert torch.equal(masked[0, 2], v[0, 2]) and masked[0, :2].abs().sum() == 0
    assert torch.equal(masked[1, 0], v[1, 0]) and masked[1, 1:].abs().sum() == 0


def test_mask_by_prediction_uses_longest_capsule():
    v = torch.zeros(2, 4, 3)
    v[0, 1] = torch.tensor([0.9, 0.0, 0.0])
    v[0, 3] = torch.tensor([0.5, 0.5, 0.0])  # length 0.707 < 0.9
    v[1, 3] = torch.tensor([0.0, 0.0, 0.2])
    masked = mask_capsules(v, None).view(2, 4, 3)
    assert torch.equal(masked[0, 1], v[0, 1]) and masked[0, 3].abs().sum() == 0
    assert torch.equal(masked[1, 3], v[1, 3])


def test_decoder_shape_range_and_params():
    dec = ReconstructionDecoder(num_classes=10, capsule_dim=16, out_shape=(1, 28, 28))
    # 160*512+512 + 512*1024+1024 + 1024*784+784 (paper's decoder)
    assert sum(p.numel() for p in dec.parameters()) == 1_411_344
    out = dec(torch.randn(3, 10, 16), torch.tensor([0, 5, 9]))
    assert out.shape == (3, 1, 28, 28) and (out >= 0).all() and (out <= 1).all()


def test_decoder_ignores_other_capsules_when_label_given():
    dec = ReconstructionDecoder(num_classes=3, capsule_dim=4, out_shape=(1, 5, 5), hidden=(8, 8))
    v = torch.randn(1, 3, 4)
    v2 = v.clone()
    v2[0, 0] += 5.0  # change a capsule that is masked away
    assert torch.allclose(dec(v, torch.tensor([2])), dec(v2, torch.tensor([2])))


def test_primary_capsules_mnist_shape():
    layer = PrimaryCapsules(256, num_types=32, capsule_dim=8, kernel_size=9, stride=2)
    assert layer.output_size(20) == 6
    u = layer(torch.randn(2, 256, 20, 20))
    assert u.shape == (2, 1152, 8)
    assert (u.norm(dim=-1) < 1).all()


def test_primary_capsules_group_channels_of_one_type_and_position():
    layer = PrimaryCapsules(1, num_types=2, capsule_dim=3, kernel_size=1, stride=1)
    with torch.no_grad():
        layer.conv.weight.copy_(torch.arange(6.0).view(6, 1, 1, 1) + 1)
        layer.conv.bias.zero_()
    x = torch.zeros(1, 1, 2, 2)
    x[0, 0, 1, 0] = 1.0  # one bright pixel at (row 1, col 0)
    u = layer(x)  # (1, 2 types * 4 positions, 3)
    # type 1 at position (1, 0) is capsule index 1*4 + 1*2 + 0 = 6, built from channels 3, 4, 5
    raw = torch.tensor([4.0, 5.0, 6.0])
    expected = raw.norm() ** 2 / (1 + raw.norm() ** 2) * raw / raw.norm()
    assert torch.allclose(u[0, 6], expected, atol=1e-6)
    assert u[0, 7].abs().sum() == 0
