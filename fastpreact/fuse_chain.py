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

from . import BNReLUConv1x1, BNReLUConv1x1Dual
from . import functional as Fp
from .models import BatchNormReLU2d
from .nn import (FusedBasic, FusedBatchNormReLU2d, FusedBottleneck, FusedPreActBasic, FusedPreActBottleneck,
                 FusedStem)

__all__ = ["RUNS_FUSED_OP", "bn_kind", "conv1x1_ok", "runs_fused_op", "pattern_name", "timm_attr",
           "bn_relu_conv1x1_call", "bn_relu_conv1x1_dual_call"]

# fastpreact's own modules that already run the fused ops: fuse() leaves them, and their insides, alone.
RUNS_FUSED_OP = (BNReLUConv1x1, BNReLUConv1x1Dual, FusedBatchNormReLU2d, FusedStem, FusedPreActBottleneck,
                 FusedPreActBasic, FusedBottleneck, FusedBasic)


# ----------------------------------------------------------------------------------------------------
# The BatchNorm arguments of the fused op, and the 1x1 convs it computes exactly
# ----------------------------------------------------------------------------------------------------
def conv1x1_ok(m) -> bool:
    """A Conv2d the fused op computes exactly: 1x1, groups 1, no dilation, no padding (padding 0,
    "valid", or "same", which is 0 on a 1x1 kernel), stride 1 or 2."""
    if type(m) is not nn.Conv2d or isinstance(m.weight, nn.parameter.UninitializedParameter):
        return False
    return (m.kernel_size == (1, 1) and m.groups == 1 and m.dilation == (1, 1)
            and m.padding in ((0, 0), "valid", "same") and m.stride in ((1, 1), (2, 2))
            and m.weight.dtype.is_floating_point)


def _bn_state(bn, x):
    """The BN's parameters and the buffers nn.BatchNorm2d.forward would pass to F.batch_norm."""
    use_buffers = (not bn.training) or bn.track_running_stats
    weight, bias = bn.weight, bn.bias
    if weight is None:  # affine=False: gamma 1, beta 0 (constants, no gradient)
        weight = torch.ones(bn.num_features, device=x.device, dtype=torch.float32)
        bias = torch.zeros(bn.num_features, device=x.device, dtype=torch.float32)
    return weight, bias, dict(
        running_mean=bn.running_mean if use_buffers else None,
        running_var=bn.running_var if use_buffers else None,
        num_batches_tracked=bn.num_batches_tracked if bn.training and bn.track_running_stats else None,
        training=bn.training, momentum=bn.momentum, eps=bn.eps)


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
    weight, bias, state = _bn_state(bn, x)
    return Fp.bn_relu_conv1x1(x, conv.weight, weight, bias, **state, stride=conv.stride[0],
                              conv_bias=conv.bias)


def bn_relu_conv1x1_dual_call(x, bn, conv_a, conv_b):
    """(conv_a(a), conv_b(a)) with a = relu(bn(x)): one BN (statistics and running update once)."""
    if x.dtype == torch.float64:
        a = _pre_activation(x, bn)
        return conv_a(a), conv_b(a)
    if conv_a.bias is not None or conv_b.bias is not None:  # the dual op takes no conv bias
        return _dual_with_conv_bias(x, bn, conv_a, conv_b)
    weight, bias, state = _bn_state(bn, x)
    return Fp.bn_relu_conv1x1_dual(x, conv_a.weight, conv_b.weight, weight, bias, state["running_mean"],
                                   state["running_var"], num_batches_tracked=state["num_batches_tracked"],
                                   training=state["training"], momentum=state["momentum"], eps=state["eps"],
                                   stride_a=conv_a.stride[0], stride_b=conv_b.stride[0])


def _dual_with_conv_bias(x, bn, conv_a, conv_b):
    """The dual call as two single calls: statistics once, running update once.

    Each call's backward is the full BN backward of its own dz, and BN's backward is linear in dz, so
    the two dx sum to the exact gradient.
    """
    weight, bias, state = _bn_state(bn, x)
    if not (state["training"] or state["running_mean"] is None):  # eval on running statistics
        return bn_relu_conv1x1_call(x, bn, conv_a), bn_relu_conv1x1_call(x, bn, conv_b)
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))  # statistics of x as the op will see it
    mean, var = Fp.batch_stats(x)
    if state["training"]:
        Fp.update_running_stats(state["running_mean"], state["running_var"], state["num_batches_tracked"],
                                mean, var, x.numel() // x.shape[1], state["momentum"])
    common = dict(running_mean=None, running_var=None, num_batches_tracked=None,
                  training=state["training"], momentum=state["momentum"], eps=state["eps"],
                  input_stats=(mean, var))
    return tuple(Fp.bn_relu_conv1x1(x, conv.weight, weight, bias, **common, stride=conv.stride[0],
                                    conv_bias=conv.bias) for conv in (conv_a, conv_b))
