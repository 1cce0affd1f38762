"""Residual units and the layer factories they are built from.

He et al., "Identity Mappings in Deep Residual Networks" (ECCV 2016, arXiv 1603.05027):

    original unit (post-activation):   conv-BN-ReLU-conv-BN, add, ReLU
    pre-act unit (basic, two 3x3):     BN-ReLU-conv-BN-ReLU-conv, add
    pre-act bottleneck:                BN-ReLU-conv1x1, BN-ReLU-conv3x3, BN-ReLU-conv1x1, add

As in timm's resnetv2, a unit receives its building blocks as factories (`conv_layer`, `norm_layer`), so
the fused implementation (fused_units.py) swaps the kernels without a second model definition. Every
unit's forward is written as the chain of its pieces

    pre-activation (norm1) -> conv1 [+ projection `downsample` on the SAME pre-activation]
    -> norm2 -> conv2 [-> norm3 -> conv3] -> + shortcut

and the fused units of fused_units.py subclass these classes, keep the same submodules (hence the same
state_dict keys) and only run a different forward.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..nn import BatchNormReLU2d

__all__ = [
    "BatchNormReLU2d", "conv2d", "PreActBasic", "PreActBottleneck", "Basic", "Bottleneck",
]


def conv2d(in_channels, out_channels, kernel_size, stride=1):
    """The paper's convolution: no bias (a BatchNorm follows or precedes it), 'same' padding."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2,
                     bias=False)


class PreActBasic(nn.Module):
    """Full pre-activation basic unit: BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3, add.

    Where the shape changes, the shortcut is a 1x1 projection of the pre-activated input: one BN-ReLU
    (norm1) is shared by the residual branch and the projection.
    """

    expansion = 1

    def __init__(self, in_chs, out_chs, stride=1, *, own_preact=True, conv_layer=conv2d,
                 norm_layer=BatchNormReLU2d, stride_on_first=True):
        super().__init__()
        del stride_on_first  # a basic unit has only 3x3 convs: the stride is on the first
        self.norm1 = norm_layer(in_chs) if own_preact else None
        self.conv1 = conv_layer(in_chs, out_chs, 3, stride)
        self.norm2 = norm_layer(out_chs)
        self.conv2 = conv_layer(out_chs, out_chs, 3, 1)
        self.downsample = (conv_layer(in_chs, out_chs, 1, stride)
                           if stride != 1 or in_chs != out_chs else None)

    def last_layer(self):
        """The layer that zero_init_last_bn zeroes: the last conv (zeroing BN2's gamma would also zero
        ReLU's gradient, so the branch could never grow back)."""
        return self.conv2

    def forward(self, x):
        x_preact = self.norm1(x) if self.norm1 is not None else x
        shortcut = self.downsample(x_preact) if self.downsample is not None else x
        out = self.conv1(x_preact)
        out = self.conv2(self.norm2(out))
        return out + shortcut


class PreActBottleneck(nn.Module):
    """Full pre-activation bottleneck: BN-ReLU-conv1x1, BN-ReLU-conv3x3, BN-ReLU-conv1x1, add.

    mid = out_chs // 4. The stride sits on the first 1x1 (stride_on_first=True, the CIFAR nets of the
    authors' resnet-pre-act.lua) or on the 3x3 (fb.resnet.torch's ImageNet preresnet.lua). Where the
    shape changes, the shortcut is a 1x1 projection of the shared pre-activation (norm1).
    """

    expansion = 4

    def __init__(self, in_chs, out_chs, stride=1, *, own_preact=True, conv_layer=conv2d,
                 norm_layer=BatchNormReLU2d, stride_on_first=False):
        super().__init__()
        mid = out_chs // self.expansion
        s1, s2 = (stride, 1) if stride_on_first else (1, stride)
        self.norm1 = norm_layer(in_chs) if own_preact else None
        self.conv1 = conv_layer(in_chs, mid, 1, s1)
        self.norm2 = norm_layer(mid)
        self.conv2 = conv_layer(mid, mid, 3, s2)
        self.norm3 = norm_layer(mid)
        self.conv3 = conv_layer(mid, out_chs, 1, 1)
        self.downsample = (conv_layer(in_chs, out_chs, 1, stride)
                           if stride != 1 or in_chs != out_chs else None)

    def last_layer(self):
        """The layer that zero_init_last_bn zeroes: conv3 (see PreActBasic.last_layer)."""
        return self.conv3

    def forward(self, x):
        x_preact = self.norm1(x) if self.norm1 is not None else x
        shortcut = self.downsample(x_preact) if self.downsample is not None else x
        out = self.conv1(x_preact)
        out = self.conv2(self.norm2(out))
        out = self.conv3(self.norm3(out))
        return out + shortcut


class _Projection(nn.Sequential):
    """The original unit's projection shortcut (type B): 1x1 conv (stride) then BN."""

    def __init__(self, in_chs, out_chs, stride, conv_layer, norm_layer):
        super().__init__()
        self.conv = conv_layer(in_chs, out_chs, 1, stride)
        self.norm = norm_layer(out_chs, apply_act=False)


class Basic(nn.Module):
    """Original (post-activation) basic unit: conv3x3(stride)-BN-ReLU-conv3x3-BN, add, ReLU."""

    expansion = 1

    def __init__(self, in_chs, out_chs, stride=1, *, own_preact=True, conv_layer=conv2d,
                 norm_layer=BatchNormReLU2d, stride_on_first=True):
        super().__init__()
        del own_preact, stride_on_first
        self.conv1 = conv_layer(in_chs, out_chs, 3, stride)
        self.norm1 = norm_layer(out_chs)
        self.conv2 = conv_layer(out_chs, out_chs, 3, 1)
        self.norm2 = norm_layer(out_chs, apply_act=False)
        self.downsample = (_Projection(in_chs, out_chs, stride, conv_layer, norm_layer)
                           if stride != 1 or in_chs != out_chs else None)

    def last_layer(self):
        """The layer that zero_init_last_bn zeroes: the branch's last BN (no ReLU follows it)."""
        return self.norm2

    def forward(self, x):
        shortcut = self.downsample(x) if self.downsample is not None else x
        out = self.norm1(self.conv1(x))
        out = self.norm2(self.conv2(out))
        return F.relu(out + shortcut)


class Bottleneck(nn.Module):
    """Original (post-activation) bottleneck: conv1x1-BN-ReLU, conv3x3-BN-ReLU, conv1x1-BN, add, ReLU.

    The same layers (hence parameters) as torchvision's Bottleneck; the stride placement follows the
    family as for PreActBottleneck.
    """

    expansion = 4

    def __init__(self, in_chs, out_chs, stride=1, *, own_preact=True, conv_layer=conv2d,
                 norm_layer=BatchNormReLU2d, stride_on_first=False):
        super().__init__()
        del own_preact
        mid = out_chs // self.expansion
        s1, s2 = (stride, 1) if stride_on_first else (1, stride)
        self.conv1 = conv_layer(in_chs, mid, 1, s1)
        self.norm1 = norm_layer(mid)
        self.conv2 = conv_layer(mid, mid, 3, s2)
        self.norm2 = norm_layer(mid)
        self.conv3 = conv_layer(mid, out_chs, 1, 1)
        self.norm3 = norm_layer(out_chs, apply_act=False)
        self.downsample = (_Projection(in_chs, out_chs, stride, conv_layer, norm_layer)
                           if stride != 1 or in_chs != out_chs else None)

    def last_layer(self):
        """The layer that zero_init_last_bn zeroes: the branch's last BN (no ReLU follows it)."""
        return self.norm3

    def forward(self, x):
        shortcut = self.downsample(x) if self.downsample is not None else x
        out = self.norm1(self.conv1(x))
        out = self.norm2(self.conv2(out))
        out = self.norm3(self.conv3(out))
        return F.relu(out + shortcut)


def count_main_path_layers(unit: nn.Module) -> int:
    """Convolutions on a unit's residual branch (projection shortcuts excluded): its share of the depth."""
    return sum(1 for name, m in unit.named_children() if isinstance(m, nn.Conv2d) and name != "downsample")

