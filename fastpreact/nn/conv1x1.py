"""Drop-in modules for BatchNorm2d -> ReLU -> 1x1 Conv2d on the fused op (functional.bn_relu_conv1x1).

BNReLUConv1x1 replaces BatchNorm2d -> ReLU -> Conv2d(1x1). It holds the original `.bn` and `.conv`
modules, so its state_dict is exactly theirs and a checkpoint moves freely between stock and fused.
BNReLUConv1x1Dual is one BatchNorm2d -> ReLU feeding two 1x1 convs (a pre-activation unit's first conv
and its projection shortcut): `.bn`, `.conv_a`, `.conv_b`.
"""
from __future__ import annotations

from torch import nn

from .. import functional as Fp

__all__ = ["BNReLUConv1x1", "BNReLUConv1x1Dual"]


def _check_conv1x1(where, name, conv, bn):
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"{where}: {name} must be nn.Conv2d, got {type(conv).__name__}")
    verdict = Fp.conv1x1_fusable(conv)
    if not verdict:
        raise ValueError(f"{where}: {name} must be a 1x1 Conv2d with groups=1, no padding or dilation and "
                         f"stride 1 or 2; it is {verdict.reason}: {conv}")
    if conv.in_channels != bn.num_features:
        raise ValueError(f"{where}: bn has {bn.num_features} channels but {name} expects {conv.in_channels}")


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
        _check_conv1x1("BNReLUConv1x1.from_modules", "conv", conv, bn)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.bn, self.conv = bn, conv
        return self

    def forward(self, x, residual=None):
        return Fp.bn_relu_conv1x1(x, self.conv.weight, **Fp.bn_args(self.bn, self.training),
                                  stride=self.conv.stride[0], conv_bias=self.conv.bias, residual=residual)


class BNReLUConv1x1Dual(nn.Module):
    """relu(bn(x)) feeding two bias-free 1x1 convs: forward(x) -> (conv_a(a), conv_b(a)).

    One GEMM over the concatenated weights when the strides match, two launches otherwise; the BN
    statistics are computed and its running statistics updated once. State dict: bn.*, conv_a.weight,
    conv_b.weight.
    """

    def __init__(self, in_channels, out_a, out_b, stride_a=1, stride_b=1, eps=1e-5, momentum=0.1):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels, eps=eps, momentum=momentum)
        self.conv_a = nn.Conv2d(in_channels, out_a, 1, stride=stride_a, bias=False)
        self.conv_b = nn.Conv2d(in_channels, out_b, 1, stride=stride_b, bias=False)

    @classmethod
    def from_modules(cls, bn: nn.BatchNorm2d, conv_a: nn.Conv2d, conv_b: nn.Conv2d) -> "BNReLUConv1x1Dual":
        """Wrap existing modules (their parameters and buffers are shared, not copied)."""
        if not isinstance(bn, nn.BatchNorm2d):
            raise TypeError(f"BNReLUConv1x1Dual.from_modules: bn must be nn.BatchNorm2d, got {type(bn).__name__}")
        for name, conv in (("conv_a", conv_a), ("conv_b", conv_b)):
            _check_conv1x1("BNReLUConv1x1Dual.from_modules", name, conv, bn)
            if conv.bias is not None:
                raise ValueError(f"BNReLUConv1x1Dual.from_modules: {name} has a bias; the dual op takes bias-free "
                                 "convs (use BNReLUConv1x1 for each instead)")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.bn, self.conv_a, self.conv_b = bn, conv_a, conv_b
        return self

    def forward(self, x):
        return Fp.bn_relu_conv1x1_dual(x, self.conv_a.weight, self.conv_b.weight,
                                       **Fp.bn_args(self.bn, self.training), stride_a=self.conv_a.stride[0],
                                       stride_b=self.conv_b.stride[0])
