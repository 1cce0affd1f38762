"""Drop-in modules on the fused ops, each with the state_dict of the stock modules it replaces.

  conv1x1   BNReLUConv1x1, BNReLUConv1x1Dual: BatchNorm2d -> ReLU -> one or two 1x1 Conv2d
  bn_relu   BatchNormReLU2d (stock), FusedBatchNormReLU2d, FusedStem (the ImageNet stem)

The functional forms live in fastpreact.functional; the residual units and nets in fastpreact.models.
"""
from .bn_relu import BatchNormReLU2d, FusedBatchNormReLU2d, FusedStem  # noqa: F401
from .conv1x1 import BNReLUConv1x1, BNReLUConv1x1Dual  # noqa: F401

__all__ = ["BNReLUConv1x1", "BNReLUConv1x1Dual", "BatchNormReLU2d", "FusedBatchNormReLU2d", "FusedStem"]
