"""The paper's ResNets (pre-activation and original, CIFAR and ImageNet families) behind one registry.

    from fastpreact.models import create_model
    model = create_model("resnet164", num_classes=10)                  # stock PyTorch modules
    model = create_model("resnet200", 1000, kernels="fused")           # the Triton path, same state_dict

  blocks        the stock residual units (pre-activation and original) and their layer factories
  fused_units   the same units with a forward on the fused ops (same submodules, same state_dict)
  resnet        ResNet, the registry and create_model
"""
from ..nn import BatchNormReLU2d  # noqa: F401  (the units' default norm_layer, a drop-in module of nn)
from .blocks import Basic, Bottleneck, PreActBasic, PreActBottleneck, conv2d  # noqa: F401
from .fused_units import (FusedBasic, FusedBottleneck, FusedPreActBasic, FusedPreActBottleneck,  # noqa: F401
                          fused_components)
from .resnet import IMAGENET_LAYERS, ResNet, create_model, list_archs  # noqa: F401

__all__ = ["create_model", "list_archs", "ResNet", "PreActBottleneck", "PreActBasic", "Bottleneck",
           "Basic", "BatchNormReLU2d", "conv2d", "IMAGENET_LAYERS", "FusedPreActBottleneck",
           "FusedPreActBasic", "FusedBottleneck", "FusedBasic", "fused_components"]
