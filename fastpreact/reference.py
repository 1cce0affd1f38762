"""The pure-PyTorch oracle: what every fused op must compute, written with stock modules' functional forms.

Tests compare kernels against these functions (usually in float64), and benchmarks time them as
"stock". Nothing here is fast or memory-lean on purpose: it is the definition.
"""
from __future__ import annotations

import torch.nn.functional as F


def bn_relu_conv1x1(x, conv_weight, bn_weight, bn_bias, running_mean=None, running_var=None, *,
                    training=True, momentum=0.1, eps=1e-5, stride=1, conv_bias=None, residual=None):
    """BatchNorm2d -> ReLU -> Conv2d(1x1, stride) [+ residual], exactly as the stock modules compute it.

    Updates running_mean/running_var in place in training mode, like nn.BatchNorm2d (momentum=None is
    handled by the caller through the momentum it passes, as nn.BatchNorm2d does).
    """
    a = F.batch_norm(x, running_mean, running_var, bn_weight, bn_bias,
                     training or running_mean is None, 0.0 if momentum is None else momentum, eps)
    y = F.conv2d(F.relu(a), conv_weight, conv_bias, stride=stride)
    return y if residual is None else y + residual


def batch_stats(x):
    """Per-channel mean and biased variance of an NCHW tensor, in float64 (the statistics oracle)."""
    x64 = x.double()
    return x64.mean(dim=(0, 2, 3)), x64.var(dim=(0, 2, 3), unbiased=False)


def bn_relu(x, bn_weight, bn_bias, running_mean=None, running_var=None, *, training=True, momentum=0.1,
            eps=1e-5):
    """BatchNorm2d -> ReLU, exactly as the stock modules compute it (running statistics updated in place
    in training mode, like nn.BatchNorm2d): the pre-activation in front of a 3x3 conv."""
    return F.relu(F.batch_norm(x, running_mean, running_var, bn_weight, bn_bias,
                               training or running_mean is None, 0.0 if momentum is None else momentum, eps))
