"""Fusion: fuse(model) runs every BatchNorm2d -> ReLU -> 1x1 Conv2d chain of any nn.Module on the fused op.

    model = fastpreact.fuse(torchvision.models.resnet50())     # or timm.create_model("resnetv2_50")
    fastpreact.fused_chains(model)                             # Counter: what was fused, per pattern

  walk.py        the walk over a model's modules, bottom up, and what it leaves alone
  patterns.py    which modules may form a chain, and the calls that replace one
  sequential.py  chains inside nn.Sequential
  traced.py      chains found by torch.fx tracing: matching, rewriting, pickling

What is a chain: a BatchNorm2d whose output goes only to a ReLU whose output goes only to one or two
1x1 Conv2d (groups 1, no dilation, no padding, stride 1 or 2, with or without bias), or a BN+ReLU module
(timm's BatchNormAct2d, fastpreact's BatchNormReLU2d) whose output goes only to such convs. Two convs
on one pre-activation (a pre-activation unit's first conv and its projection shortcut) run on
bn_relu_conv1x1_dual: the BN statistics and running-stat update happen once.

How the chains are found, bottom-up over the module tree, each module once (walk):
  - nn.Sequential: windows [BN, ReLU, conv1x1] and [BN+ReLU module, conv1x1] of consecutive children,
    no tracing. The Sequential becomes a FusedSequential (an nn.Sequential subclass, same children;
    sequential).
  - any other module whose subtree holds a BN and a 1x1 conv not yet fused: its forward is traced with
    torch.fx and the chains are found in the graph by data flow (so torchvision's Bottleneck, which
    calls one ReLU module three times, is handled per call); the rewritten graph becomes the module's
    forward (traced). The module keeps its object, class (a subclass is swapped in), children,
    attributes and methods: the state_dict is untouched by construction.
  - a module whose forward cannot be traced (data-dependent control flow, ...) keeps its forward, with a
    warning naming it and the reason; its children are still fused where they can be.
The fused op is fastpreact.functional.bn_relu_conv1x1 (Triton on a GPU or under TRITON_INTERPRET=1, the
PyTorch fallback elsewhere); it reads the BN's training flag, buffers and momentum at every call, so
train/eval, running statistics (num_batches_tracked, momentum=None, track_running_stats=False) and
autocast behave as nn.BatchNorm2d -> ReLU -> Conv2d (patterns).

float64 activations (no kernel; the op keeps BN statistics in float32) run the original modules, so a
float64 model keeps float64 accuracy.

Limits: SyncBatchNorm, lazy modules, padded/grouped/dilated convs, and chains whose intermediate tensors
have another user are left alone. A chain that crosses into a module already rewritten is not seen.
Pickling a fused model re-traces the rewritten modules on load; TorchScript is not supported (fuse the
model, then torch.compile it if you like).
"""
from __future__ import annotations

import collections
import copy

from torch import nn

__all__ = ["fuse", "fused_chains"]

# `import fastpreact` imports this package for fastpreact.fuse, so it stays light: the rewriting
# machinery (walk, and the torch.fx code and fusable classes of fastpreact.models and fastpreact.nn
# under it) is imported on the first call.


def fuse(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Run every BatchNorm2d -> ReLU -> 1x1 Conv2d chain of `model` on fastpreact's fused op.

    Returns the fused model (a deep copy unless inplace=True). Parameters, buffers and state_dict keys
    are those of `model`; train/eval, running statistics and autocast behave as in `model`. Logs a
    count per pattern (logger "fastpreact.fusion"); warns about modules whose forward cannot be traced.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastpreact.fuse: expected an nn.Module, got {type(model).__name__}; pass the "
                        "model object (not its state_dict)")
    from .walk import ModuleWalk

    if not inplace:
        model = copy.deepcopy(model)
    walk = ModuleWalk()
    walk.visit(model, "")
    walk.report()
    return model


def fused_chains(model: nn.Module) -> collections.Counter:
    """Counter {pattern: number of chains} of what runs on the fused op in a fused `model`."""
    from .walk import chains_of

    counts = collections.Counter()
    for path, m in model.named_modules():
        for pattern, _, _ in chains_of(m, path):
            counts[pattern] += 1
    return counts
