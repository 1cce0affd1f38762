"""What fastpreact.fuse may fuse, and the calls that run a fused chain.

A chain is a BatchNorm2d whose output goes only to a ReLU whose output goes only to one or two 1x1
Conv2d, or a BN+ReLU module whose output goes only to such convs. This module says which modules may
form one (bn_kind, conv1x1_ok), which modules already run the fused op and are never looked into
(runs_fused_op), and holds the two calls that replace a chain in a Sequential or a rewritten graph
(bn_relu_conv1x1_call, bn_relu_conv1x1_dual_call). It knows nothing of how chains are found.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from ..nn import BNReLUConv1x1, BNReLUConv1x1Dual
from .. import functional as Fp
from ..models import FusedBasic, FusedBottleneck, FusedPreActBasic, FusedPreActBottleneck
from ..nn import BatchNormReLU2d, FusedBatchNormReLU2d, FusedStem

__all__ = ["RUNS_FUSED_OP", "bn_kind", "conv1x1_ok", "runs_fused_op", "pattern_name", "timm_attr",
           "bn_relu_conv1x1_call", "bn_relu_conv1x1_dual_call"]

# fastpreact's own modules that already run the fused ops: fuse() leaves them, and their insides, alone.
RUNS_FUSED_OP = (BNReLUConv1x1, BNReLUConv1x1Dual, FusedBatchNormReLU2d, FusedStem, FusedPreActBottleneck,
                 FusedPreActBasic, FusedBottleneck, FusedBasic)


# ----------------------------------------------------------------------------------------------------
# The 1x1 convs the fused op computes exactly
# ----------------------------------------------------------------------------------------------------
def conv1x1_ok(m) -> bool:
    """A Conv2d the fused op computes exactly (the op's own rule: fastpreact.functional.conv1x1_fusable)."""
    return bool(Fp.conv1x1_fusable(m))


# ----------------------------------------------------------------------------------------------------
# Which modules may form a chain
# ----------------------------------------------------------------------------------------------------
def timm_attr(module: str, name: str):
    """`name` from timm's `module` when that is already imported, else None.

    timm is optional and never imported here: a model can hold timm's classes, or its forward call
    timm's functions, only once timm has been imported.
    """
    found = sys.modules.get(module)
    return getattr(found, name, None) if found is not None else None


def _is_bn_relu_module(m) -> bool:
    """A BN+ReLU module whose forward is exactly BatchNorm then ReLU."""
    if type(m) is BatchNormReLU2d:
        return bool(m.apply_act)
    # timm's BatchNormAct2d runs batch_norm -> drop -> act: exact with no drop and a plain ReLU.
    batch_norm_act = timm_attr("timm.layers", "BatchNormAct2d")
    return (batch_norm_act is not None and type(m) is batch_norm_act
            and type(getattr(m, "drop", None)) is nn.Identity and type(getattr(m, "act", None)) is nn.ReLU)


def bn_kind(m) -> str | None:
    """'bn' for a plain BatchNorm2d, 'bnact' for a BN+ReLU module, None for anything else."""
    if not isinstance(m, nn.BatchNorm2d) or isinstance(m, (nn.SyncBatchNorm, LazyModuleMixin)):
        return None
    if type(m).forward is nn.BatchNorm2d.forward:
        return "bn"
    return "bnact" if _is_bn_relu_module(m) else None


def runs_fused_op(m) -> bool:
    """One of fastpreact's own modules that run the fused ops already."""
    return isinstance(m, RUNS_FUSED_OP)


def pattern_name(bn, n_convs: int) -> str:
    """How fused_chains() names a chain: 'BatchNorm2d -> ReLU -> Conv1x1' and the like."""
    head = "BatchNorm2d -> ReLU" if bn_kind(bn) == "bn" else type(bn).__name__ + "(ReLU)"
    if n_convs == 2:
        return f"{head} -> 2x Conv1x1 (shared pre-activation)"
    return f"{head} -> Conv1x1"


# ----------------------------------------------------------------------------------------------------
# The calls that replace a chain (module-level functions: the rewritten fx code calls them by name)
# ----------------------------------------------------------------------------------------------------
def _pre_activation(x, bn):
    """relu(bn(x)) with the modules themselves (float64: the fused op computes BN in float32)."""
    return bn(x) if bn_kind(bn) == "bnact" else F.relu(bn(x))


def bn_relu_conv1x1_call(x, bn, conv):
    """conv(relu(bn(x))) on the fused op, with the modules' own parameters and buffers."""
    if x.dtype == torch.float64:
        return conv(_pre_activation(x, bn))
    return Fp.bn_relu_conv1x1(x, conv.weight, **Fp.bn_args(bn), stride=conv.stride[0], conv_bias=conv.bias)


def bn_relu_conv1x1_dual_call(x, bn, conv_a, conv_b):
    """(conv_a(a), conv_b(a)) with a = relu(bn(x)): one BN (statistics and running update once)."""
    if x.dtype == torch.float64:
        a = _pre_activation(x, bn)
        return conv_a(a), conv_b(a)
    if conv_a.bias is not None or conv_b.bias is not None:  # the dual op takes no conv bias
        return _dual_with_conv_bias(x, bn, conv_a, conv_b)
    return Fp.bn_relu_conv1x1_dual(x, conv_a.weight, conv_b.weight, **Fp.bn_args(bn),
                                   stride_a=conv_a.stride[0], stride_b=conv_b.stride[0])


def _dual_with_conv_bias(x, bn, conv_a, conv_b):
    """The dual call as two single calls: statistics once, running update once.

    Each call's backward is the full BN backward of its own dz, and BN's backward is linear in dz, so
    the two dx sum to the exact gradient.
    """
    # The op normalises x as it comes (autocast rounds only the GEMM operands), so the stats are x's own.
    stats = Fp.bn_stats(bn, x.contiguous(memory_format=torch.channels_last))  # finishes the BatchNorm once
    shared = Fp.bn_args(bn, shared_stats=stats)
    return tuple(Fp.bn_relu_conv1x1(x, conv.weight, **shared, stride=conv.stride[0], conv_bias=conv.bias)
                 for conv in (conv_a, conv_b))
