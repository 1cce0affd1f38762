"""Fused network pieces: residual units and BN-ReLU modules on the fused kernels.

The units subclass fastpreact.models' stock units (same submodules, same state_dict) and only change
forward; fastpreact.models.create_model(..., kernels="fused") builds the ResNets from them.
The functional forms (bn_relu, bn_relu_conv2d, bn_relu_max_pool2d) live in fastpreact.nn.bn_relu.
"""
from . import bn_relu  # noqa: F401  (the module; its function bn_relu is fastpreact.nn.bn_relu.bn_relu)
from .bn_relu import (FusedBatchNormReLU2d, FusedStem, bn_relu_conv2d, bn_relu_max_pool2d,  # noqa: F401
                      bn_statistics)
from .units import (FusedBasic, FusedBottleneck, FusedPreActBasic, FusedPreActBottleneck,  # noqa: F401
                    fused_components)

__all__ = ["FusedBatchNormReLU2d", "FusedStem", "bn_relu_conv2d", "bn_relu_max_pool2d", "bn_statistics",
           "FusedPreActBottleneck", "FusedPreActBasic", "FusedBottleneck", "FusedBasic", "fused_components"]
