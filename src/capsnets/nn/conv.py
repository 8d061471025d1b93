"""A 2-D convolution whose weight gradient can be computed as a forward convolution (faster on CPUs).

For ``y = conv2d(x, W)`` with stride ``s``, padding ``p`` and dilation ``d`` (groups 1) the weight gradient is

    dL/dW[o, i, u, v] = sum_b sum_{m, n} dL/dy[b, o, m, n] * x_pad[b, i, s m + d u, s n + d v],

which is itself a convolution: of the padded input with its batch and channel axes swapped,
``x_pad^T`` (C_in, B, H, W), by the output gradient as the kernel, ``dy^T`` (C_out, B, H_out, W_out),
with stride ``d`` and dilation ``s``; its output (C_in, C_out, k, k) is ``dW`` transposed. The sum
over the batch and the output positions is then the reduction of one forward convolution, a shape
that CPU convolution libraries (oneDNN) run at their fastest, where their backward-weights kernel
is slow for large kernels with small outputs: CapsNet's primary capsules (256 -> 256 channels,
9x9, stride 2, 20x20 -> 6x6) take 0.19 s for the weight gradient of a batch of 128 in bfloat16
this way, 0.60 s through the backward kernel (float32: 0.39 vs 0.70 s; AMD EPYC, 2 threads, one
process, interleaved; ``scripts/bench.py`` measures the whole step). The input gradient and the
forward pass are torch's own. Values equal the native gradient up to the order of summation.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AUTOCAST_DTYPES", "Conv2d", "WeightGrad", "conv2d_weight_grad"]

WeightGrad = Literal["auto", "native", "conv"]  # auto: conv on a CPU, native elsewhere (cuDNN)


def conv2d_weight_grad(
    x: torch.Tensor,
    grad_out: torch.Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> torch.Tensor:
    """``dL/dW`` (C_out, C_in, kh, kw) of ``conv2d(x, W)`` from ``x`` (B, C_in, H, W) and ``grad_out``
    (B, C_out, H_out, W_out), as one forward convolution (module docstring)."""
    (kh, kw), (oh, ow) = kernel_size, grad_out.shape[2:]
    xp = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))  # (B, C_in, H + 2p, W + 2p)
    rows = (oh - 1) * stride[0] + (kh - 1) * dilation[0] + 1  # the input rows the convolution reads
    cols = (ow - 1) * stride[1] + (kw - 1) * dilation[1] + 1
    xp = xp[:, :, :rows, :cols]
    grad_t = F.conv2d(
        xp.transpose(0, 1), grad_out.transpose(0, 1), stride=dilation, dilation=stride
    )  # (C_in, C_out, kh, kw)
    return grad_t.transpose(0, 1)  # (C_out, C_in, kh, kw)


class _ConvWeightGradAsConv(torch.autograd.Function):
    """conv2d forward; backward: the input gradient by torch's kernel, the weight gradient by
    :func:`conv2d_weight_grad`. Runs in the dtype of its inputs (:class:`Conv2d` casts them for autocast first,
    where autograd records the casts, so second-order gradients flow through them)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.settings = (stride, padding, dilation, bias is not None)
        return F.conv2d(x, weight, bias, stride, padding, dilation)  # (B, C_out, H_out, W_out)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        stride, padding, dilation, has_bias = ctx.settings
        grad_out = grad_out.to(x.dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv2d_input(x.shape, weight, grad_out, stride, padding, dilation)
        if ctx.needs_input_grad[1]:
            grad_w = conv2d_weight_grad(x, grad_out, weight.shape[2:], stride, padding, dilation)
        if has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(dim=(0, 2, 3))  # (C_out,)
        return grad_x, grad_w, grad_b, None, None, None


AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what autocast lowers (never float64)


class Conv2d(nn.Conv2d):
    """``torch.nn.Conv2d`` (same parameters, state-dict keys and forward values) whose weight gradient is
    computed as a forward convolution when ``weight_grad`` says so: ``conv``, or ``auto`` on a CPU;
    ``native`` always uses torch's backward kernel. The forward pass and the input gradient are torch's. Under
    autocast the input, weight and bias are cast as ``F.conv2d`` would be (float64 stays float64). ``conv``
    needs groups 1, zero padding and numeric (or ``valid``) padding; ``auto`` falls back to torch's kernel
    otherwise."""

    def __init__(self, *args: Any, weight_grad: WeightGrad = "auto", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if weight_grad not in ("auto", "native", "conv"):
            raise ValueError(f"Conv2d: weight_grad must be auto, native or conv, got {weight_grad!r}")
        self.weight_grad = weight_grad
        if weight_grad == "conv" and not self.supports_conv_weight_grad():
            raise ValueError(
                f"Conv2d: weight_grad='conv' needs groups=1, padding_mode='zeros' and numeric padding, got "
                f"groups={self.groups}, padding_mode={self.padding_mode!r}, padding={self.padding!r}. "
                f"Fix: weight_grad='auto' (torch's kernel for such a convolution) or 'native'."
            )

    def supports_conv_weight_grad(self) -> bool:
        return self.groups == 1 and self.padding_mode == "zeros" and self.padding != "same"

    def uses_conv_weight_grad(self, x: torch.Tensor) -> bool:
        """Whether this call computes the weight gradient as a forward convolution."""
        if not self.supports_conv_weight_grad():
            return False
        return self.weight_grad == "conv" or (self.weight_grad == "auto" and x.device.type == "cpu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.uses_conv_weight_grad(x):
            return super().forward(x)
        weight, bias = self.weight, self.bias
        device = x.device.type
        if torch.is_autocast_enabled(device) and x.dtype in AUTOCAST_DTYPES and weight.dtype in AUTOCAST_DTYPES:
            # the casts F.conv2d gets from autocast, here outside the Function: recorded by autograd
            dtype = torch.get_autocast_dtype(device)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(device, enabled=False):
            return self._conv_forward_as(x, weight, bias)

    def _conv_forward_as(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The weight-gradient-as-convolution path on the given (already cast) tensors."""
        padding = (0, 0) if self.padding == "valid" else self.padding
        return _ConvWeightGradAsConv.apply(x, weight, bias, self.stride, padding, self.dilation)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight_grad={self.weight_grad}"
