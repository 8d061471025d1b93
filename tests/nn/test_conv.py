"""capsnets.nn.Conv2d: the weight gradient as a forward convolution equals torch's, in values and under autocast."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from capsnets.nn import Conv2d, PrimaryCapsules, conv2d_weight_grad

CASES = [  # (in, out, kernel, stride, padding, dilation, input side): CapsNet's PrimaryCaps shape first, scaled down
    (6, 5, 9, 2, 0, 1, 20),
    (3, 4, 3, 1, 1, 1, 9),
    (4, 2, 5, 2, 2, 1, 11),
    (2, 3, 3, 3, 0, 2, 13),
    (3, 3, (3, 5), (2, 1), (1, 2), (1, 2), 12),
]


def pair(conv_cls, *args, seed=0, **kwargs):
    torch.manual_seed(seed)
    return conv_cls(*args, **kwargs).double()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_gradients_equal_torchs_kernel(case, bias):
    cin, cout, k, s, p, d, side = case
    native = pair(nn.Conv2d, cin, cout, k, stride=s, padding=p, dilation=d, bias=bias)
    ours = pair(Conv2d, cin, cout, k, stride=s, padding=p, dilation=d, bias=bias, weight_grad="conv")
    assert ours.state_dict().keys() == native.state_dict().keys()
    ours.load_state_dict(native.state_dict())
    x = torch.randn(3, cin, side, side, dtype=torch.float64, requires_grad=True)
    grad_out = None
    results = []
    for conv in (native, ours):
        xx = x.detach().clone().requires_grad_(True)
        y = conv(xx)
        grad_out = torch.randn_like(y, generator=torch.Generator().manual_seed(1)) if grad_out is None else grad_out
        y.backward(grad_out)
        results.append((y.detach(), xx.grad, conv.weight.grad, conv.bias.grad if bias else None))
    (y0, gx0, gw0, gb0), (y1, gx1, gw1, gb1) = results
    assert torch.equal(y0, y1)
    torch.testing.assert_close(gx1, gx0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw1, gw0, rtol=1e-10, atol=1e-12)
    if bias:
        torch.testing.assert_close(gb1, gb0, rtol=1e-12, atol=1e-12)


def test_weight_grad_formula_alone_matches_autograd():
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    y = torch.nn.functional.conv2d(x, w, stride=2, padding=1)
    g = torch.randn_like(y)
    (want,) = torch.autograd.grad(y, w, g)
    got = conv2d_weight_grad(x, g, (3, 3), (2, 2), (1, 1), (1, 1))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_bf16_autocast_computes_in_bf16_and_stays_close():
    torch.manual_seed(0)
    native = nn.Conv2d(8, 8, 9, stride=2)
    ours = Conv2d(8, 8, 9, stride=2, weight_grad="conv")
    ours.load_state_dict(native.state_dict())
    x = torch.randn(4, 8, 20, 20)
    outs = []
    for conv in (native, ours):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(x)
        assert y.dtype == torch.bfloat16
        y.float().square().sum().backward()
        assert conv.weight.grad.dtype == torch.float32  # the parameter's own dtype
        outs.append((y.float(), conv.weight.grad.clone(), conv.bias.grad.clone()))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=0, atol=0)  # the same bf16 forward
    for got, want in zip(outs[1][1:], outs[0][1:]):
        assert float((got - want).abs().max() / want.abs().max()) < 2e-2  # bf16 products, other summation order


def test_which_path_runs():
    x = torch.randn(1, 2, 5, 5)
    assert Conv2d(2, 2, 3).uses_conv_weight_grad(x)  # auto on a CPU
    y = Conv2d(2, 2, 3, weight_grad="conv")(x.requires_grad_(True))
    assert "ConvWeightGradAsConv" in type(y.grad_fn).__name__
    assert "Convolution" in type(Conv2d(2, 2, 3, weight_grad="native")(x).grad_fn).__name__
    assert not Conv2d(2, 2, 3, weight_grad="native").uses_conv_weight_grad(x)
    assert not Conv2d(2, 2, 3, groups=2).uses_conv_weight_grad(x)  # auto, grouped: torch's kernel
    assert not Conv2d(2, 2, 3, padding="same").uses_conv_weight_grad(x)
    assert Conv2d(2, 2, 3, padding="valid", weight_grad="conv")(x).shape == (1, 2, 3, 3)
    with pytest.raises(ValueError, match="weight_grad must be auto, native or conv"):
        Conv2d(2, 2, 3, weight_grad="fast")
    with pytest.raises(ValueError, match="weight_grad='conv' needs groups=1"):
        Conv2d(2, 2, 3, groups=2, weight_grad="conv")


def test_primary_capsules_take_the_setting():
    caps = PrimaryCapsules(4, num_types=2, capsule_dim=4, kernel_size=3, stride=2, weight_grad="native")
    assert caps.conv.weight_grad == "native" and isinstance(caps.conv, nn.Conv2d)


def test_second_order_gradients():
    # a gradient penalty differentiates the backward pass: gradgradcheck in float64, and under bf16 autocast the
    # same second-order weight gradient as torch's kernel (the autocast casts are recorded outside the Function)
    torch.manual_seed(0)
    conv = Conv2d(2, 3, 3, stride=2, padding=1, weight_grad="conv").double()
    x = torch.randn(2, 2, 7, 7, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradgradcheck(lambda x, w, b: conv._conv_forward_as(x, w, b), (x, conv.weight, conv.bias))

    native = nn.Conv2d(4, 4, 5, stride=2)
    ours = Conv2d(4, 4, 5, stride=2, weight_grad="conv")
    ours.load_state_dict(native.state_dict())
    xb = torch.randn(3, 4, 12, 12)
    grads = []
    for conv in (native, ours):
        xx = xb.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(xx)
        (gx,) = torch.autograd.grad(y.float().square().sum(), xx, create_graph=True)
        gx.square().sum().backward()
        grads.append(conv.weight.grad.clone())
    assert float((grads[1] - grads[0]).abs().max() / grads[0].abs().max()) < 3e-2


def test_float64_is_not_lowered_by_autocast():
    conv = Conv2d(2, 2, 3, weight_grad="conv").double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(torch.randn(1, 2, 5, 5, dtype=torch.float64))
    assert y.dtype == torch.float64  # as torch's own conv2d under autocast
