"""The fused ops and every autograd Function over the kernels, with their PyTorch fallback.

    from fastpreact import functional as Fp
    y = Fp.bn_relu_conv1x1(x, w, gamma, beta, running_mean, running_var, num_batches_tracked=nbt)

Modules:
  backends    backend() and the one "use Triton?" rule every op follows (device, dtype, size)
  batchnorm   batch_stats, update_running_stats, bn_args (the fused ops' arguments for an
              nn.BatchNorm2d) and batch_norm_stats / bn_statistics (the one statistics path)
  conv1x1     bn_relu_conv1x1, bn_relu_conv1x1_dual (kernels/bn_relu_conv1x1.py) and
              conv1x1_unfusable (which Conv2d they compute exactly, and why not)
  conv1x1_ops their Triton side: the forward and backward launches as PyTorch operators, the autograd
              Function around them and ShortcutGrad (the identity shortcut's gradient in the dx pass)
  bn_relu     bn_relu, bn_relu_conv2d, bn_relu_max_pool2d: the elementwise BN-ReLU pass
              (kernels/bn_relu.py) alone or feeding a 3x3 conv or the stem's max-pool
  library     the torch.library registration helper: the Triton implementations are PyTorch operators
              (torch.ops.fastpreact.*, with fake implementations and autograd), so dynamo and
              torch.compile trace every op without a graph break

Nothing here imports triton before a kernel first runs, and nothing synchronises with the host.
"""
from .backends import backend, use_triton  # noqa: F401
from .batchnorm import (batch_norm_stats, batch_stats, bn_args, bn_statistics,  # noqa: F401
                        update_running_stats)
from .bn_relu import bn_relu, bn_relu_conv2d, bn_relu_max_pool2d  # noqa: F401
from .conv1x1 import (ShortcutGrad, _BNReLUConv1x1Torch, _BNReLUConv1x1Triton, bn_relu_conv1x1,  # noqa: F401
                      bn_relu_conv1x1_dual, conv1x1_unfusable)

__all__ = ["bn_relu_conv1x1", "bn_relu_conv1x1_dual", "batch_stats", "backend", "update_running_stats",
           "use_triton", "bn_args", "batch_norm_stats", "bn_statistics", "conv1x1_unfusable", "bn_relu",
           "bn_relu_conv2d", "bn_relu_max_pool2d", "ShortcutGrad"]
