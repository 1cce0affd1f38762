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


import torch
import torch.nn.functional as F
from torch import nn

from .backends import autocast_off, compute_dtype, eager, kernels, poison, use_triton
from .types import BNStats

__all__ = ["eligible", "preact_bottleneck"]


class _Unit:
    """The non-tensor side of one unit's call."""
    __slots__ = ("norms", "strides", "padding", "dtype", "stats", "next_bn", "plans")

    def __init__(self, norms, strides, padding, dtype, stats, next_bn, plans):
        self.norms = norms      # (norm1, norm2, norm3): BatchNorm2d modules in training
        self.strides = strides  # (conv1, conv2, projection or 0)
        self.padding = padding  # conv2's
        self.dtype = dtype      # the compute dtype (autocast's, else x's)
        self.stats = stats      # x's BNStats, finished for norm1 by the previous unit, or None
        self.next_bn = next_bn  # the BatchNorm consuming the output, finished in conv3's launch, or None
        self.plans = plans      # the launchers' plans of this unit's shapes (_unit_plans)


# The launchers' plans (kernels' *_plan functions), kept per unit shape: the units of a net repeat a few
# shapes, and a warm launcher given its plan skips its key and argument checks. A unit's list holds the
# forward's plans by launch site (F_*), then a dict of the backward's by needs_input_grad.
F_STATS1, F_CONV1, F_PROJ, F_BN_RELU, F_STATS3, F_CONV3, BACKWARD = range(7)
B_CONV3, B_REDUCE2, B_DX2, B_CONV1, B_PROJ = range(5)
_UNIT_PLANS: list = []  # [the plan cache], made on first use (emptied with the tuning table)


def _unit_plans(key) -> list:
    if not _UNIT_PLANS:
        _UNIT_PLANS.append(kernels("tuning").plan_cache())
    cache = _UNIT_PLANS[0]
    plans = cache.get(key)
    if plans is None:
        plans = cache[key] = [None] * BACKWARD + [{}]
    return plans


def _site(plans, i, make):
    """plans[i], made by make() on the first call of this unit shape."""
    plan = plans[i]
    if plan is None:
        plan = plans[i] = make()
    return plan


def _pretend_key():
    """The card the kernels pretend to run on (kernels.cards.pretend), or None: it sets the plans' tiles."""
    pretend = kernels("cards")._PRETEND
    return pretend[-1] if pretend else None


def _momentum_none(bn):
    return bn is not None and bn.momentum is None


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
    strides = (_stride(c1), _stride(c2), _stride(ds) if ds is not None else 0)
    w1, wd, w2, w3 = _weight(c1), _weight(ds) if ds is not None else None, _weight(c2), _weight(c3)
    # Everything the launchers' plans depend on: shapes, dtypes, strides, the card and its TF32 switch,
    # which statistics are given or finished, and the BatchNorms' momentum-None flags.
    key = (x.shape, x.dtype, dtype, x.device, w1.shape, w1.dtype, None if wd is None else (wd.shape, wd.dtype),
           w2.shape, w2.dtype, w3.shape, w3.dtype, strides, c2.padding[0], stats is None, next_bn is None,
           tuple(_momentum_none(n) for n in (*norms, next_bn)), torch._C._get_cudnn_allow_tf32(), _pretend_key())
    plan = _Unit(norms, strides, c2.padding[0], dtype, stats, next_bn, _unit_plans(key))
    n1, n2, n3 = (n._parameters for n in norms)
    params = (w1, wd, w2, w3, n1["weight"], n1["bias"], n2["weight"], n2["bias"], n3["weight"], n3["bias"])
    y, mean, var, rstd = _PreActBottleneck.apply(x, plan, *params)
    return y, BNStats(mean, var, rstd)


def _finish(bn) -> dict:
    """The kernels' next_bn / batch_stats keywords that finish BatchNorm `bn` (its buffers read per call:
    model.to() and load_state_dict may replace them)."""
    b = bn._buffers
    return dict(eps=float(bn.eps), running_mean=b["running_mean"], running_var=b["running_var"],
                num_batches_tracked=b["num_batches_tracked"], momentum=bn.momentum)


_KERNELS: list = []  # the kernel modules (bn_relu_conv1x1, bn_relu, batch_stats), imported on first use


def _kernels():
    if not _KERNELS:
        _KERNELS.extend(kernels(name) for name in ("bn_relu_conv1x1", "bn_relu", "batch_stats"))
    return _KERNELS


def _w2d(w):
    """A 1x1 conv weight [Cout, K, 1, 1] as the kernels' [Cout, K] matrix (a view of a contiguous one)."""
    return w.reshape(w.shape[0], -1).contiguous()


class _PreActBottleneck(torch.autograd.Function):
    """Inputs: x, the plan, then conv1, projection (or None), conv2 and conv3 weights, then (gamma, beta)
    of norm1, norm2, norm3: each tensor that takes a gradient is an argument of its own, which is how
    autograd.Function hands out gradients (hence the long list). Outputs: y and the (mean, var, rstd) of
    y (rstd when finished for next_bn; no gradient).
    Saves x, h1, h2, the weights, the BatchNorm parameters and the three (mean, rstd).

    The launches are the kernels' own launchers, called with the arguments the per-op path gives them
    (conv1x1_ops.forward_impl / backward_impl, bn_relu's and batchnorm's implementations), so both paths
    compute the same bits; the launchers take the channels-last activations as they are (no row views)."""

    @staticmethod
    def forward(ctx, x, plan: _Unit, w1, wd, w2, w3, g1, b1, g2, b2, g3, b3):
        kc, kb, ks = _kernels()
        pz, dtype = poison(), plan.dtype
        ctx.set_materialize_grads(False)  # the statistics outputs take no gradient: no zeros made for them
        n1, n2, n3 = plan.norms
        s1, s2, sd = plan.strides
        P = plan.plans
        if plan.stats is not None:
            m1, r1 = plan.stats.mean, plan.stats.rstd
        else:
            f1 = _finish(n1)
            p = _site(P, F_STATS1, lambda: ks.batch_stats_plan(x, increment_nbt=True, **f1))
            m1, _, r1 = ks.batch_stats(x, pz, p, increment_nbt=True, **f1)
        fused_proj = wd is not None and sd == s1
        ca = w1.shape[0]
        w_cat = _w2d(torch.cat([w1, wd.to(w1.dtype)], dim=0) if fused_proj else w1)
        split, f2 = ca if fused_proj else 0, _finish(n2)
        p = _site(P, F_CONV1, lambda: kc.fwd_plan(x, w_cat, stride=s1, split=split, output_stats=True, next_bn=f2,
                                                  out_dtype=dtype))
        out, st2 = kc.bn_relu_conv1x1_fwd(x, w_cat, m1, r1, g1, b1, stride=s1, split=split, output_stats=True,
                                          next_bn=f2, out_dtype=dtype, poison=pz, plan=p)
        h1, proj = out if fused_proj else (out, None)
        if wd is not None and not fused_proj:
            wd2 = _w2d(wd)
            p = _site(P, F_PROJ, lambda: kc.fwd_plan(x, wd2, stride=sd, out_dtype=dtype))
            proj = kc.bn_relu_conv1x1_fwd(x, wd2, m1, r1, g1, b1, stride=sd, out_dtype=dtype, poison=pz, plan=p)[0]
        m2, r2 = (st2[0][:ca], st2[2]) if fused_proj else (st2[0], st2[2])
        a2 = kb.bn_relu_fwd(h1, g2, b2, m2, r2, pz, _site(P, F_BN_RELU, lambda: kb.bn_relu_plan(h1, "fwd")))
        w2c = w2.to(a2.dtype)  # cast once: backward reuses it (as a stock conv under autocast saves it)
        with autocast_off(x.device):
            h2 = F.conv2d(a2, w2c, None, s2, plan.padding)
        del a2
        h2 = h2.contiguous(memory_format=torch.channels_last)
        f3 = _finish(n3)
        p = _site(P, F_STATS3, lambda: ks.batch_stats_plan(h2, increment_nbt=True, **f3))
        m3, _, r3 = ks.batch_stats(h2, pz, p, increment_nbt=True, **f3)
        shortcut = x if wd is None else proj
        if shortcut.dtype != dtype:
            shortcut = shortcut.to(dtype).contiguous(memory_format=torch.channels_last)
        nb = plan.next_bn
        w3m, fn = _w2d(w3), (_finish(nb) if nb is not None else None)
        p = _site(P, F_CONV3, lambda: kc.fwd_plan(h2, w3m, residual=shortcut, output_stats=True, next_bn=fn,
                                                  out_dtype=dtype))
        y, out = kc.bn_relu_conv1x1_fwd(h2, w3m, m3, r3, g3, b3, residual=shortcut, output_stats=True, next_bn=fn,
                                        out_dtype=dtype, poison=pz, plan=p)
        ctx.save_for_backward(x, h1, h2, w_cat, wd, w2c, w3m, g1, b1, g2, b2, g3, b3, m1, r1, m2, r2, m3, r3)
        ctx.plan, ctx.fused_proj, ctx.w2_dtype, ctx.w_shapes = plan, fused_proj, w2.dtype, (w1.shape, w3.shape)
        stats_out = out if len(out) == 3 else (*out, None)
        ctx.mark_non_differentiable(*(t for t in stats_out if t is not None))
        return (y, *stats_out)

    @staticmethod
    def backward(ctx, dy, *_):
        if dy is None:  # y took no gradient (only its statistics were used downstream)
            return (None,) * 12
        (x, h1, h2, w_cat, wd, w2c, w3m, g1, b1, g2, b2, g3, b3,
         m1, r1, m2, r2, m3, r3) = ctx.saved_tensors
        kc = _kernels()[0]
        plan, pz = ctx.plan, poison()
        s1, s2, sd = plan.strides
        w1_shape, w3_shape = ctx.w_shapes
        need = ctx.needs_input_grad  # x, plan, w1, wd, w2, w3, g1, b1, g2, b2, g3, b3
        by_need = plan.plans[BACKWARD]
        P = by_need.get(need)
        if P is None:
            P = by_need[need] = [None] * 5
        dy = dy.to(plan.dtype).contiguous(memory_format=torch.channels_last)
        p = _site(P, B_CONV3, lambda: kc.bwd_plan(h2, dy, w3m, need_w=need[5]))
        dh2, dw3, db3, dg3 = kc.bn_relu_conv1x1_bwd(h2, dy, w3m, m3, r3, g3, b3, need_w=need[5], poison=pz, plan=p)
        dh1, dw2, dg2, db2 = _conv2_backward(dh2, h1, w2c, (g2, b2, m2, r2), plan, need[4], P)
        dw2 = None if dw2 is None else dw2.to(ctx.w2_dtype)
        dh1 = dh1.to(plan.dtype).contiguous(memory_format=torch.channels_last)
        split = w_cat.shape[0] - wd.shape[0] if ctx.fused_proj else 0
        # The identity shortcut's gradient is added in conv1's dx pass where it has x's dtype; an x of
        # another dtype (an fp32 input under autocast) gets it cast and added after, as autograd would.
        in_pass = wd is None and need[0] and x.dtype == dy.dtype
        dy2 = dy if ctx.fused_proj else None
        p = _site(P, B_CONV1, lambda: kc.bwd_plan(x, dh1, w_cat, stride=s1, dy2=dy2, need_x=need[0],
                                                  need_w=need[2] or need[3], accumulate=in_pass))
        dx, dw_cat, db1, dg1 = kc.bn_relu_conv1x1_bwd(
            x, dh1, w_cat, m1, r1, g1, b1, stride=s1, dy2=dy2, need_x=need[0], need_w=need[2] or need[3],
            add_grad=dy if in_pass else None, poison=pz, plan=p)
        if wd is None and need[0] and not in_pass:
            dx = dx + dy.to(x.dtype)
        dw1, dwd = dw_cat, None
        if ctx.fused_proj and dw_cat is not None:
            dw1, dwd = dw_cat[:split], dw_cat[split:].view(wd.shape).to(wd.dtype)
        elif wd is not None:  # a projection of its own stride: its own two passes, summed as autograd would
            wd2 = _w2d(wd)
            p = _site(P, B_PROJ, lambda: kc.bwd_plan(x, dy, wd2, stride=sd, need_x=need[0], need_w=need[3]))
            dxd, dwd, dbd, dgd = kc.bn_relu_conv1x1_bwd(x, dy, wd2, m1, r1, g1, b1, stride=sd, need_x=need[0],
                                                        need_w=need[3], poison=pz, plan=p)
            dwd = None if dwd is None else dwd.view(wd.shape)
            dx = dx + dxd if dx is not None else None
            db1, dg1 = db1 + dbd, dg1 + dgd
        return (dx, None, None if dw1 is None or not need[2] else dw1.view(w1_shape),
                dwd if need[3] else None, dw2, dw3.view(w3_shape) if need[5] else None, dg1, db1, dg2, db2, dg3, db3)


def _conv2_backward(dh2, h1, w2c, bn2, plan, need_w, P):
    """conv2(relu(bn2(h1))) backward: (dh1, dW2 or None, dgamma2, dbeta2); the pre-activation recomputed.
    P: the backward's plans of this unit shape."""
    g2, b2, m2, r2 = bn2
    s2, pad = plan.strides[1], plan.padding
    kb, pz = _kernels()[1], poison()
    with autocast_off(h1.device):
        a2 = kb.bn_relu_fwd(h1, g2, b2, m2, r2, pz, plan.plans[F_BN_RELU])
        da, dw, _ = _CONV_BACKWARD(dh2.to(a2.dtype), a2, w2c, None, [s2] * 2, [pad] * 2, [1, 1], False, [0, 0], 1,
                                   [True, need_w, False])
        del a2
        da = da.contiguous(memory_format=torch.channels_last)
        sums = kb.bn_relu_bwd_reduce(da, h1, g2, b2, m2, r2, pz, _site(P, B_REDUCE2,
                                                                       lambda: kb.bn_relu_plan(h1, "reduce", da)))
        dh1 = kb.bn_relu_bwd_dx(da, h1, g2, b2, m2, r2, sums, True, pz,
                                _site(P, B_DX2, lambda: kb.bn_relu_plan(h1, "dx_batch", da)))
    return dh1, dw, sums[2], sums[0]


_CONV_BACKWARD = torch.ops.aten.convolution_backward.default
