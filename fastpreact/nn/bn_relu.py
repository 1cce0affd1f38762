"""BatchNorm2d + ReLU as one module: the stock BatchNormReLU2d and its fused drop-in, and the ImageNet
stem whose BN-ReLU and max-pool run as one recomputed pass.

All are BatchNorm2d subclasses or an nn.Sequential with the stock children, so their state_dict is
exactly the stock one and checkpoints move freely between them and plain BatchNorm2d.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .. import functional as Fp

__all__ = ["BatchNormReLU2d", "FusedBatchNormReLU2d", "FusedStem"]


class BatchNormReLU2d(nn.BatchNorm2d):
    """BatchNorm2d followed by ReLU (or by nothing when apply_act=False), as one module.

    A BatchNorm2d subclass (like timm's BatchNormAct2d), so its state_dict is exactly BatchNorm2d's and
    checkpoints move between this, plain BatchNorm2d and FusedBatchNormReLU2d.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, apply_act=True, **kw):
        super().__init__(num_features, eps=eps, momentum=momentum, **kw)
        self.apply_act = apply_act

    def forward(self, x):
        x = super().forward(x)
        # In place: BatchNorm's backward needs its input, not its output, so the ReLU may overwrite it.
        return F.relu(x, inplace=True) if self.apply_act else x

    def extra_repr(self):
        return super().extra_repr() + f", apply_act={self.apply_act}"


class FusedBatchNormReLU2d(BatchNormReLU2d):
    """BatchNormReLU2d on one elementwise Triton pass that saves only its input (same state_dict).

    forward(x, input_stats=None): input_stats are x's batch statistics from its producer, if any.
    With apply_act=False it is a plain BatchNorm2d (there is no ReLU mask to recompute).
    """

    def forward(self, x, input_stats=None):
        if not self.apply_act:
            return nn.BatchNorm2d.forward(self, x)
        return Fp.bn_relu(x, self, input_stats=input_stats)


class FusedStem(nn.Sequential):
    """The ImageNet stem (conv, BN-ReLU, max-pool) with BN-ReLU and the max-pool as one recomputed
    Function; same children, hence the same state_dict, as the stock nn.Sequential stem."""

    def forward(self, x):
        if not hasattr(self, "pool") or not getattr(self.norm, "apply_act", True):
            return super().forward(x)
        return Fp.bn_relu_max_pool2d(self.conv(x), self.norm, self.pool)
