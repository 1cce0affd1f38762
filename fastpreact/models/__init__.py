"""The paper's ResNets (pre-activation and original, CIFAR and ImageNet families) behind one registry.

    from fastpreact.models import create_model
    model = create_model("resnet164", num_classes=10)                  # stock PyTorch modules
    model = create_model("resnet200", 1000, kernels="fused")           # the Triton path, same state_dict
"""
from .blocks import (Basic, BatchNormReLU2d, Bottleneck, PreActBasic, PreActBottleneck,  # noqa: F401
                     conv2d)
from .resnet import IMAGENET_LAYERS, ResNet, create_model, list_archs  # noqa: F401

__all__ = ["create_model", "list_archs", "ResNet", "PreActBottleneck", "PreActBasic", "Bottleneck",
           "Basic", "BatchNormReLU2d", "conv2d", "IMAGENET_LAYERS"]
