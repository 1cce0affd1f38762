"""Drop-in modules built on the fused ops.

BNReLUConv1x1 replaces BatchNorm2d -> ReLU -> Conv2d(1x1). It holds the original `.bn` and `.conv`
modules, so its state_dict is exactly theirs and a checkpoint moves freely between stock and fused.
"""
from __future__ import annotations

import torch
from torch import nn

from . import functional as Fp

__all__ = ["BNReLUConv1x1"]


class BNReLUConv1x1(nn.Module):
    """relu(bn(x)) -> conv1x1 on the fused kernels; train mode uses batch statistics like nn.BatchNorm2d."""

    def __init__(self, in_channels, out_channels, stride=1, bias=False, eps=1e-5, momentum=0.1):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels, eps=eps, momentum=momentum)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=bias)

    @classmethod
    def from_modules(cls, bn: nn.BatchNorm2d, conv: nn.Conv2d) -> "BNReLUConv1x1":
        """Wrap existing modules (their parameters and buffers are shared, not copied)."""
        if not isinstance(bn, nn.BatchNorm2d):
            raise TypeError(f"BNReLUConv1x1.from_modules: bn must be nn.BatchNorm2d, got {type(bn).__name__}")
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"BNReLUConv1x1.from_modules: conv must be nn.Conv2d, got {type(conv).__name__}")
        if (conv.kernel_size != (1, 1) or conv.groups != 1 or conv.dilation != (1, 1)
                or conv.padding not in ((0, 0), "valid") or conv.stride not in ((1, 1), (2, 2))):
            raise ValueError("BNReLUConv1x1.from_modules: conv must be a 1x1 Conv2d with groups=1, no "
                             f"padding or dilation and stride 1 or 2, got {conv}")
        if conv.in_channels != bn.num_features:
            raise ValueError(f"BNReLUConv1x1.from_modules: bn has {bn.num_features} channels but conv "
                             f"expects {conv.in_channels}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.bn, self.conv = bn, conv
        return self

    def forward(self, x, residual=None):
        bn = self.bn
        return Fp.bn_relu_conv1x1(
            x, self.conv.weight, bn.weight, bn.bias,
            bn.running_mean if (not self.training or bn.track_running_stats) else None,
            bn.running_var if (not self.training or bn.track_running_stats) else None,
            num_batches_tracked=bn.num_batches_tracked if self.training and bn.track_running_stats else None,
            training=self.training, momentum=bn.momentum, eps=bn.eps, stride=self.conv.stride[0],
            conv_bias=self.conv.bias, residual=residual)
