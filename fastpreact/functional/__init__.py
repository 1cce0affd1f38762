"""The fused ops and every autograd Function over the kernels, with their PyTorch fallback.

    from fastpreact import functional as Fp
    y = Fp.bn_relu_conv1x1(x, w, gamma, beta, running_mean, running_var, num_batches_tracked=nbt)

Glossary: one word per concept, from the fused units down to the kernel arguments.
  pre-activation  a = relu(bn(x)). Never stored: every kernel recomputes it from x.
  stats           what a BatchNorm normalises with: BNStats(mean, var, rstd, batch), fp32 [C]; batch
                  stats in training, the running statistics in eval (batch=False).
  finish          make batch stats usable and do the BatchNorm's bookkeeping: rstd = 1/sqrt(var + eps),
                  running statistics updated (momentum, unbiased variance, momentum=None as the
                  cumulative average), num_batches_tracked counted. BNFinish(running_mean, running_var,
                  num_batches_tracked, momentum, eps) is what it needs.
  input_stats     the stats of an op's input, handed over by the op that produced it (no statistics pass).
  output_stats    the stats of an op's output as stored, computed in its epilogue.
  next_bn         the BatchNorm that consumes an op's output; the op finishes it in its own launch.
  split           the output channels of the first of two 1x1 convs that share a pre-activation (the
                  dual op: one GEMM over the concatenated weights).
  shortcut grad   an identity shortcut's gradient, added in the unit's first dx pass (ShortcutGrad).
  impl            the Python function an operator runs: its kernel launches. Eager calls run it directly.

Modules:
  types       BNStats, BNFinish
  backends    backend(), the one "use Triton?" rule (device, dtype, size), eager()
  batchnorm   batch_stats, bn_stats (the one stats path), bn_args (an nn.BatchNorm2d as the ops'
              arguments), update_running_stats (the finish in torch ops)
  conv1x1     bn_relu_conv1x1, bn_relu_conv1x1_dual (kernels/bn_relu_conv1x1/) and conv1x1_fusable
  conv1x1_ops their Triton side: implementations, operators, the autograd Function, ShortcutGrad
  bn_relu     bn_relu, bn_relu_conv2d, bn_relu_max_pool2d: the elementwise BN-ReLU pass
              (kernels/bn_relu.py) alone or feeding a 3x3 conv or the stem's max-pool
  bottleneck  preact_bottleneck: a pre-activation bottleneck in training as one autograd node (the same
              launches as its three ops, without their per-op Python)
  library     the torch.library registration helper (torch.ops.fastpreact.*, fake implementations),
              so that dynamo and torch.compile trace every op without a graph break, and AOTAutograd
              decomposes each into its Triton launches (trace_kernels_on_cpu: also for CPU tensors)

Nothing here imports triton before a kernel first runs, and nothing synchronises with the host.
"""
from .backends import backend, use_triton  # noqa: F401
from .batchnorm import batch_stats, bn_args, bn_stats, update_running_stats  # noqa: F401
from .bn_relu import bn_relu, bn_relu_conv2d, bn_relu_max_pool2d  # noqa: F401
from .bottleneck import eligible as bottleneck_eligible, preact_bottleneck  # noqa: F401
from .library import trace_kernels_on_cpu  # noqa: F401
from .conv1x1 import Fusable, ShortcutGrad, bn_relu_conv1x1, bn_relu_conv1x1_dual, conv1x1_fusable  # noqa: F401
from .types import BNFinish, BNStats  # noqa: F401

__all__ = ["bn_relu_conv1x1", "bn_relu_conv1x1_dual", "batch_stats", "bn_stats", "bn_args", "backend", "use_triton",
           "update_running_stats", "conv1x1_fusable", "Fusable", "bn_relu", "bn_relu_conv2d", "bn_relu_max_pool2d",
           "ShortcutGrad", "BNStats", "BNFinish", "preact_bottleneck", "bottleneck_eligible"]
