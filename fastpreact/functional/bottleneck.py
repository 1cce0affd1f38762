"""A pre-activation bottleneck in training as ONE autograd node: the same kernels, in the same order,
with the same arguments as the unit's three fused ops (conv1x1 ops and bn_relu_conv2d), without their
per-op Python (argument checks, three autograd Functions, the ShortcutGrad hand-over).

The host pays per launch for the Python around it; a CIFAR net's eager step is hundreds of small launches,
so per-op bookkeeping decides whether the fused step feeds the GPU faster than stock (see
fastpreact/cost/host.py). Here a unit's forward is 3 or 4 launches and one cuDNN 3x3 conv, its backward 6
or 7 launches and the conv's backward, under one node:

    forward   [stats1: one launch, unless the previous unit finished norm1]
              h1 (| shortcut) = conv1 (| projection) of relu(bn1(x)), one GEMM when the strides match,
                                its epilogue finishing norm2 (stats2)
              h2 = conv2(relu(bn2(h1)))              one BN-ReLU launch + cuDNN (the pre-activation freed)
              stats3: one launch over h2 finishing norm3
              y  = conv3(relu(bn3(h2))) + shortcut    its epilogue finishing next_bn (stats out)
    backward  conv3: two passes -> dh2 (dy also the shortcut's gradient)
              conv2: BN-ReLU recomputed, cuDNN's backward, the BN-ReLU backward (reduce, dx) -> dh1
              conv1 (| projection): two passes -> dx, with the identity shortcut's dy added in its dx pass

Only the eager Triton path in training takes it (eligible()); everything else (eval, torch.compile, fake
tensors, the torch backend, BatchNorms without affine parameters or running statistics) runs the per-op
path, which tests/test_fused_models.py checks bit for bit against this one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .backends import autocast_off, compute_dtype, eager, use_triton
from .batchnorm import bn_stats_impl
from .bn_relu import bn_relu_backward_impl, bn_relu_forward_impl
from .conv1x1_ops import Conv1x1Call, backward_impl, forward_impl
from .types import BNFinish, BNStats

__all__ = ["eligible", "preact_bottleneck"]


@dataclass(frozen=True)
class _Unit:
    """The non-tensor side of one unit's call."""
    norms: tuple               # (norm1, norm2, norm3): BatchNorm2d modules in training
    strides: tuple             # (conv1, conv2, projection or 0)
    padding: int               # conv2's
    dtype: torch.dtype         # the compute dtype (autocast's, else x's)
    stats: Optional[BNStats]   # x's stats, finished for norm1 by the previous unit, or None
    next_bn: Optional[nn.Module]  # the BatchNorm consuming the output, finished in conv3's launch


def _plain_bn(bn) -> bool:
    return (isinstance(bn, nn.BatchNorm2d) and bn.training and bn.affine and bn.track_running_stats
            and bn._parameters["weight"].dtype == torch.float32)


# The unit's submodules and parameters are read from the modules' dicts: nn.Module.__getattr__ costs a
# microsecond a lookup, and a unit asks for some thirty per call.
def _weight(module):
    return module._parameters["weight"]


def _stride(conv):
    return conv.stride[0]


def eligible(x, unit, stats=None, next_bn=None) -> bool:
    """Whether `unit` (a pre-activation bottleneck with norm1..3, conv1..3 and an optional 1x1 projection
    `downsample`) can run as one node on x with these stats and next_bn: eager Triton, training, plain
    BatchNorms, x's stats absent or finished, a next_bn in training or none."""
    mods = unit._modules
    if not (use_triton(x) and eager(x) and mods.get("norm1") is not None):
        return False
    if (stats is not None and not stats.finished) or (next_bn is not None and not next_bn.training):
        return False
    if not (_plain_bn(mods["norm1"]) and _plain_bn(mods["norm2"]) and _plain_bn(mods["norm3"])):
        return False
    c2, ds = mods["conv2"], mods.get("downsample")
    return (c2.groups == 1 and c2.dilation == (1, 1) and c2._parameters.get("bias") is None
            and c2.padding_mode == "zeros" and c2.stride[0] == c2.stride[1] and c2.padding[0] == c2.padding[1]
            and mods["conv1"]._parameters.get("bias") is None and mods["conv3"]._parameters.get("bias") is None
            and (ds is None or ds._parameters.get("bias") is None))


def preact_bottleneck(x, unit, stats=None, next_bn=None):
    """(y, the BNStats of y: finished for next_bn, or not finished without one) of a pre-activation
    bottleneck in training, as one autograd node (see the module docstring)."""
    dtype = compute_dtype(x)
    x = x.contiguous(memory_format=torch.channels_last)
    mods = unit._modules
    ds, c1, c2, c3 = mods.get("downsample"), mods["conv1"], mods["conv2"], mods["conv3"]
    norms = (mods["norm1"], mods["norm2"], mods["norm3"])
    plan = _Unit(norms, (_stride(c1), _stride(c2), _stride(ds) if ds is not None else 0), c2.padding[0], dtype,
                 stats, next_bn)
    n1, n2, n3 = (n._parameters for n in norms)
    params = (_weight(c1), _weight(ds) if ds is not None else None, _weight(c2), _weight(c3),
              n1["weight"], n1["bias"], n2["weight"], n2["bias"], n3["weight"], n3["bias"])
    y, mean, var, rstd = _PreActBottleneck.apply(x, plan, *params)
    return y, BNStats(mean, var, rstd)


def _finish(bn) -> BNFinish:
    b = bn._buffers
    return BNFinish(b["running_mean"], b["running_var"], b["num_batches_tracked"], bn.momentum, float(bn.eps))


class _PreActBottleneck(torch.autograd.Function):
    """Inputs: x, the plan, then conv1, projection (or None), conv2 and conv3 weights, then (gamma, beta)
    of norm1, norm2, norm3: each tensor that takes a gradient is an argument of its own, which is how
    autograd.Function hands out gradients (hence the long list). Outputs: y and the (mean, var, rstd) of
    y (rstd when finished for next_bn; no gradient).
    Saves x, h1, h2, the weights, the BatchNorm parameters and the three (mean, rstd)."""

    @staticmethod
    def forward(ctx, x, plan: _Unit, w1, wd, w2, w3, g1, b1, g2, b2, g3, b3):
        n1, n2, n3 = plan.norms
        s1, s2, sd = plan.strides
        s_in = plan.stats or bn_stats_impl(x.detach(), *_finish(n1)[:4], float(n1.eps), True)
        st1 = BNStats(s_in[0], s_in[1], s_in[2])
        fused_proj = wd is not None and sd == s1
        w_cat = torch.cat([w1, wd.to(w1.dtype)], dim=0) if fused_proj else w1
        ca = w1.shape[0]
        call1 = Conv1x1Call(s1, ca if fused_proj else 0, True, True, _finish(n2), dtype=plan.dtype)
        h1, proj, st2 = forward_impl(x, w_cat, g1, b1, st1, call1)
        if wd is not None and not fused_proj:
            proj = forward_impl(x, wd, g1, b1, st1, Conv1x1Call(sd, dtype=plan.dtype))[0]
        st2 = BNStats(st2.mean[:ca], st2.var[:ca], st2.rstd)
        a2 = bn_relu_forward_impl(h1, g2, b2, st2.mean, st2.rstd)
        w2c = w2.to(a2.dtype)  # cast once: backward reuses it (as a stock conv under autocast saves it)
        with autocast_off(x.device):
            h2 = F.conv2d(a2, w2c, None, s2, plan.padding)
        del a2
        h2 = h2.contiguous(memory_format=torch.channels_last)
        st3 = bn_stats_impl(h2, *_finish(n3)[:4], float(n3.eps), True)
        st3 = BNStats(st3[0], st3[1], st3[2])
        shortcut = x if wd is None else proj
        if shortcut.dtype != plan.dtype:
            shortcut = shortcut.to(plan.dtype).contiguous(memory_format=torch.channels_last)
        nb = plan.next_bn
        call3 = Conv1x1Call(1, 0, True, True, _finish(nb) if nb is not None else None, dtype=plan.dtype)
        y, _, out = forward_impl(h2, w3, g3, b3, st3, call3, residual=shortcut)
        ctx.save_for_backward(x, h1, h2, w_cat, wd, w2c, w3, g1, b1, g2, b2, g3, b3, st1.mean, st1.rstd,
                              st2.mean, st2.rstd, st3.mean, st3.rstd)
        ctx.plan, ctx.fused_proj, ctx.w2_dtype = plan, fused_proj, w2.dtype
        stats_out = tuple(out[:3])
        ctx.mark_non_differentiable(*(t for t in stats_out if t is not None))
        return (y, *stats_out)

    @staticmethod
    def backward(ctx, dy, *_):
        (x, h1, h2, w_cat, wd, w2c, w3, g1, b1, g2, b2, g3, b3,
         m1, r1, m2, r2, m3, r3) = ctx.saved_tensors
        plan = ctx.plan
        s1, s2, sd = plan.strides
        need = ctx.needs_input_grad  # x, plan, w1, wd, w2, w3, g1, b1, g2, b2, g3, b3
        dy = dy.to(plan.dtype).contiguous(memory_format=torch.channels_last)
        dh2, dw3, db3, dg3 = backward_impl((dy, None), (h2, w3, g3, b3, m3, r3), Conv1x1Call(1, dtype=plan.dtype),
                                           (True, need[5], True))
        dh1, dw2, dg2, db2 = _conv2_backward(dh2, h1, w2c, (g2, b2, m2, r2), plan, need[4])
        dw2 = None if dw2 is None else dw2.to(ctx.w2_dtype)
        dh1 = dh1.to(plan.dtype).contiguous(memory_format=torch.channels_last)
        c1 = Conv1x1Call(s1, w_cat.shape[0] - wd.shape[0] if ctx.fused_proj else 0, dtype=plan.dtype)
        grads = (dh1, dy if ctx.fused_proj else None)
        # The identity shortcut's gradient is added in conv1's dx pass where it has x's dtype; an x of
        # another dtype (an fp32 input under autocast) gets it cast and added after, as autograd would.
        in_pass = wd is None and need[0] and x.dtype == dy.dtype
        dx, dw_cat, db1, dg1 = backward_impl(grads, (x, w_cat, g1, b1, m1, r1), c1, (need[0], need[2] or need[3], True),
                                             dy if in_pass else None)
        if wd is None and need[0] and not in_pass:
            dx = dx + dy.to(x.dtype)
        dw1, dwd = dw_cat, None
        if ctx.fused_proj and dw_cat is not None:
            dw1, dwd = dw_cat[:c1.split], dw_cat[c1.split:].to(wd.dtype)
        elif wd is not None:  # a projection of its own stride: its own two passes, summed as autograd would
            dxd, dwd, dbd, dgd = backward_impl((dy, None), (x, wd, g1, b1, m1, r1), Conv1x1Call(sd, dtype=plan.dtype),
                                               (need[0], need[3], True))
            dx = dx + dxd if dx is not None else None
            db1, dg1 = db1 + dbd, dg1 + dgd
        return (dx, None, dw1 if need[2] else None, dwd if need[3] else None, dw2, dw3 if need[5] else None,
                dg1, db1, dg2, db2, dg3, db3)


def _conv2_backward(dh2, h1, w2c, bn2, plan, need_w):
    """conv2(relu(bn2(h1))) backward: (dh1, dW2 or None, dgamma2, dbeta2); the pre-activation recomputed."""
    g2, b2, m2, r2 = bn2
    s2, pad = plan.strides[1], plan.padding
    with autocast_off(h1.device):
        a2 = bn_relu_forward_impl(h1, g2, b2, m2, r2)
        da, dw, _ = torch.ops.aten.convolution_backward(dh2.to(a2.dtype), a2, w2c, None, [s2] * 2, [pad] * 2, [1, 1],
                                                        False, [0, 0], 1, [True, need_w, False])
        del a2
        dh1, sums = bn_relu_backward_impl(da, h1, g2, b2, m2, r2, True)
    return dh1, dw, sums[2], sums[0]
