"""BatchNorm2d -> ReLU -> 1x1 Conv2d as one op: its entry points, the PyTorch fallback's autograd
Function, its argument checks, and what makes a Conv2d a 1x1 the op computes exactly. The Triton side
(implementations, operators, the autograd Function) is conv1x1_ops.

bn_relu_conv1x1 computes  y = relu(BN(x)) (*) W  [+ bias] [+ residual]  for a 1x1 convolution W, with
BatchNorm in training mode (batch stats, finished with nn.BatchNorm2d's exact semantics) or eval mode
(running statistics). It saves only x, mean, rstd and W (and the BN affine parameters gamma, beta) for
backward, through ctx.save_for_backward, never the BN or the ReLU output: backward recomputes
relu((x - mean)*scale + beta).

Math (per channel c, M = N*H*W rows, z = (x - mean)*scale + beta, a = relu(z), scale = gamma*rstd):
    forward   y = a[rows(stride)] @ W^T
    backward  dW = a^T @ dy;  da = dy @ W (scattered to the strided rows);  dz = da * [z > 0]
              dbeta = sum(dz);  dgamma = sum(dz * xhat),  xhat = (x - mean) * rstd
              train: dx = scale * (dz - dbeta/M - xhat * dgamma/M)
              eval:  dx = scale * dz
Stats given through `input_stats` (from a producer's epilogue) are constants of the producer: the
consumer's dx above already carries the whole gradient through the mean and variance.

Backends: backends.use_triton decides per call (the kernels, or this module's PyTorch math, so every
model works anywhere). Nothing here synchronises with the host (no .item(), no branch on tensor
values), so a training step that calls these ops can be captured in a CUDA graph.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .backends import compute_dtype, use_triton
from .batchnorm import _bn_stats, _torch_batch_stats, bn_args, bn_stats, check_vec
from .conv1x1_ops import Conv1x1Call, ShortcutGrad, _BNReLUConv1x1Triton, out_shape
from .types import BNFinish, BNStats

__all__ = ["bn_relu_conv1x1", "bn_relu_conv1x1_dual", "conv1x1_fusable", "Fusable", "ShortcutGrad"]

OP = "bn_relu_conv1x1"


# ---------------------------------------------------------------------------------------------------
# The torch fallback Function (same contract, reference math)
# ---------------------------------------------------------------------------------------------------
class _BNReLUConv1x1Torch(torch.autograd.Function):
    """The fallback: the fused op's contract (what is saved, what is returned) in plain PyTorch, one conv
    (call.split is 0)."""

    @staticmethod
    def forward(ctx, x, weight, gamma, beta, conv_bias, residual, stats: BNStats, call: Conv1x1Call):
        mean, rstd = stats.mean, stats.rstd
        dtype = call.dtype or x.dtype
        # Centred first, like the kernels: exact when |mean| >> std.
        xhat = (x.float() - mean[None, :, None, None]) * rstd[None, :, None, None]
        a = F.relu(xhat * gamma[None, :, None, None] + beta[None, :, None, None]).to(dtype)
        y = F.conv2d(a, weight.to(dtype), None if conv_bias is None else conv_bias.to(dtype), stride=call.stride)
        if residual is not None:
            y = y + residual
        ctx.save_for_backward(x, weight, gamma, beta, mean, rstd)
        ctx.call, ctx.has_bias, ctx.has_residual = call, conv_bias is not None, residual is not None
        return y.contiguous(memory_format=torch.channels_last)

    @staticmethod
    def backward(ctx, dy):
        x, weight, gamma, beta, mean, rstd = ctx.saved_tensors
        s = ctx.call.stride
        scale = gamma * rstd
        xhat = (x.float() - mean[None, :, None, None]) * rstd[None, :, None, None]
        z = xhat * gamma[None, :, None, None] + beta[None, :, None, None]
        a = F.relu(z).to(ctx.call.dtype or x.dtype)
        dy = dy.to(a.dtype)
        dW = torch.nn.grad.conv2d_weight(a, weight.shape, dy, stride=s).to(weight.dtype)
        da_s = torch.nn.grad.conv2d_input(a[:, :, ::s, ::s].shape, weight.to(dy.dtype), dy).float()
        da = torch.zeros_like(xhat)
        da[:, :, ::s, ::s] = da_s
        dz = da * (z > 0)
        dbeta = dz.sum(dim=(0, 2, 3))
        dgamma = (dz * xhat).sum(dim=(0, 2, 3))
        if ctx.call.batch:
            m = x.numel() // x.shape[1]
            dx = scale[None, :, None, None] * (dz - dbeta[None, :, None, None] / m
                                               - xhat * (dgamma / m)[None, :, None, None])
        else:
            dx = scale[None, :, None, None] * dz
        dbias = dy.float().sum(dim=(0, 2, 3)) if ctx.has_bias else None
        dres = dy if ctx.has_residual else None
        return dx.to(x.dtype), dW, dgamma.to(gamma.dtype), dbeta.to(beta.dtype), dbias, dres, None, None


# ---------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------
def _stride_int(stride, what="stride"):
    if isinstance(stride, (tuple, list)):
        if len(stride) != 2 or stride[0] != stride[1]:
            raise ValueError(f"bn_relu_conv1x1: {what} must be 1 or 2 (equal in H and W), got {stride}")
        stride = stride[0]
    if isinstance(stride, bool) or not isinstance(stride, int) or stride not in (1, 2):
        raise ValueError(f"bn_relu_conv1x1: {what} must be 1 or 2, got {stride!r}")
    return stride


def _check_weight(name, w, c, device):
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"bn_relu_conv1x1: {name} must be a tensor, got {type(w).__name__}")
    if w.dim() != 4 or w.shape[2] != 1 or w.shape[3] != 1:
        raise ValueError(f"bn_relu_conv1x1: {name} must be a 1x1 conv weight [Cout, C, 1, 1], got shape "
                         f"{tuple(w.shape)}")
    if w.shape[1] != c:
        raise ValueError(f"bn_relu_conv1x1: {name} expects {w.shape[1]} input channels but x has {c}")
    if w.device != device:
        raise ValueError(f"bn_relu_conv1x1: {name} is on {w.device} but x is on {device}; move them to one "
                         "device")
    if not w.is_floating_point():
        raise TypeError(f"bn_relu_conv1x1: {name} must be floating point, got {w.dtype}")


def _prepare_x(x):
    """Check x and make it channels-last contiguous; returns (x in its own dtype, the compute dtype).

    Under torch.autocast the compute dtype is the autocast dtype, as a conv computes, and x keeps its own:
    stock autocast runs BatchNorm on the input as it comes and rounds only the conv's input relu(bn(x)),
    so the statistics, z and the ReLU masks come from x as stored (rounding x first would flip masks)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"bn_relu_conv1x1: x must be a tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"bn_relu_conv1x1: x must be [N, C, H, W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"bn_relu_conv1x1: x must be floating point (float32, float16, bfloat16), got {x.dtype}")
    dtype = compute_dtype(x)
    # Any other layout (NCHW, slices, expanded views) is copied once into channels-last: the kernels
    # read x as a dense [M, C] matrix, so a strided view must never reach them.
    return x.contiguous(memory_format=torch.channels_last), dtype


def _prepare_residual(residual, x, expected_shape, dtype):
    if residual is None:
        return None
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"bn_relu_conv1x1: residual must be a tensor or None, got {type(residual).__name__}")
    if tuple(residual.shape) != expected_shape:
        raise ValueError(f"bn_relu_conv1x1: residual must have the output's shape {expected_shape}, got "
                         f"{tuple(residual.shape)}")
    if residual.device != x.device:
        raise ValueError(f"bn_relu_conv1x1: residual is on {residual.device} but x is on {x.device}; move them "
                         "to one device")
    if residual.dtype != dtype:
        if torch.is_autocast_enabled(x.device.type) and residual.is_floating_point():
            residual = residual.to(dtype)
        else:
            raise TypeError(f"bn_relu_conv1x1: residual is {residual.dtype} but the op computes in {dtype}; "
                            "cast it (or run under torch.autocast)")
    return residual.contiguous(memory_format=torch.channels_last)


class _BN(NamedTuple):
    """The input BatchNorm of a call, resolved: (gamma, beta) fp32 and the stats it normalises with."""
    gamma: torch.Tensor
    beta: torch.Tensor
    stats: BNStats


def _input_bn(x, bn: dict, input_stats) -> _BN:
    """gamma, beta fp32 and the BNStats of the input BatchNorm; finishes it in training."""
    c = x.shape[1]
    for name in ("bn_weight", "bn_bias"):
        check_vec(OP, name, bn[name], c, x.device)
    # affine=False BatchNorm: gamma = 1, beta = 0 (constants, no gradient).
    gamma = bn["bn_weight"] if bn["bn_weight"] is not None else torch.ones(c, device=x.device)
    beta = bn["bn_bias"] if bn["bn_bias"] is not None else torch.zeros(c, device=x.device)
    finish = BNFinish(bn["running_mean"], bn["running_var"], bn["num_batches_tracked"], bn["momentum"], bn["eps"])
    stats = _bn_stats(x, finish, training=bn["training"], input_stats=input_stats, op=OP)
    return _BN(gamma.float().contiguous(), beta.float().contiguous(), stats)


def _next_bn(bn, y_shape, channels, output_stats, name="next_bn"):
    """The BNFinish of `bn`, the BatchNorm consuming y in training, for the kernel to finish it; None: no
    BatchNorm, or one that normalises y with its running statistics (then bn_stats takes them)."""
    if bn is None:
        return None
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.num_features != channels:
        raise ValueError(f"bn_relu_conv1x1: {name} must be the BatchNorm2d({channels}) that consumes the "
                         f"output, got {bn!r}")
    if not output_stats:
        raise ValueError(f"bn_relu_conv1x1: {name} needs output_stats=True (the stats it finishes)")
    if not bn_args(bn)["training"]:
        return None
    if y_shape[0] * y_shape[2] * y_shape[3] <= 1:
        raise ValueError(f"{type(bn).__name__}: training needs more than 1 value per channel (x has shape "
                         f"{tuple(y_shape)}); use a larger batch or eval mode")
    return BNFinish.of(bn)


def _output_stats(next_bn, y, stats: BNStats | None) -> BNStats:
    """The stats handed to the next op: finished by the kernel (next_bn in training), else next_bn's own
    stats of y (eval: its running ones), else the output's batch stats."""
    if stats is not None and stats.finished:
        return stats
    if next_bn is not None:
        return bn_stats(next_bn, y, input_stats=stats)
    return stats


def _bn_keywords(bn_weight, bn_bias, running_mean, running_var, kw):
    return dict(bn_weight=bn_weight, bn_bias=bn_bias, running_mean=running_mean, running_var=running_var,
                num_batches_tracked=kw["num_batches_tracked"], training=kw["training"], momentum=kw["momentum"],
                eps=kw["eps"])


# ---------------------------------------------------------------------------------------------------
# The entry points
# ---------------------------------------------------------------------------------------------------
def bn_relu_conv1x1(x, conv_weight, bn_weight, bn_bias, running_mean=None, running_var=None, *,
                    num_batches_tracked=None, training=True, momentum=0.1, eps=1e-5, stride=1,
                    conv_bias=None, residual=None, input_stats=None, output_stats=False, shortcut_grad=None,
                    next_bn=None):
    """relu(BatchNorm2d(x)) followed by a 1x1 Conv2d (stride 1 or 2), optionally + residual.

    x: [N, C, H, W], channels-last preferred (any other layout is converted once).
    conv_weight: [Cout, C, 1, 1]; bn_weight, bn_bias: [C] (fp32 parameters; None = affine=False).
    running_mean, running_var, num_batches_tracked: updated in place in training mode, as nn.BatchNorm2d.
    input_stats: x's BNStats (or a (mean, biased var) pair) from its producer; skips the statistics pass.
    output_stats: also return the BNStats of y as stored (the next BatchNorm's).
    shortcut_grad: a ShortcutGrad shared with the unit's other fused 1x1 call (see ShortcutGrad), so that
    x's identity-shortcut gradient is added in the dx pass.
    next_bn (with output_stats): the BatchNorm2d that consumes y; in training it is finished from y's
    stats in the same launch (rstd, running statistics, num_batches_tracked), and the BNStats returned
    are those it normalises with, which its op then takes as input_stats (nothing is done twice).
    Under torch.autocast, the GEMM operands relu(bn(x)) and W (and the residual) are in the autocast
    dtype and so is y; x is normalised as it comes.
    Returns y (channels-last), or (y, BNStats) with output_stats.
    """
    stride = _stride_int(stride)
    x, dtype = _prepare_x(x)
    _check_weight("conv_weight", conv_weight, x.shape[1], x.device)
    cout = conv_weight.shape[0]
    check_vec(OP, "conv_bias", conv_bias, cout, x.device)
    y_shape = out_shape(x, cout, stride)
    residual = _prepare_residual(residual, x, y_shape, dtype)
    if shortcut_grad is not None and not isinstance(shortcut_grad, ShortcutGrad):
        raise TypeError(f"bn_relu_conv1x1: shortcut_grad must be a ShortcutGrad or None, got "
                        f"{type(shortcut_grad).__name__}")
    finish = _next_bn(next_bn, y_shape, cout, output_stats)
    kw = dict(num_batches_tracked=num_batches_tracked, training=training, momentum=momentum, eps=eps)
    bn = _input_bn(x, _bn_keywords(bn_weight, bn_bias, running_mean, running_var, kw), input_stats)
    if use_triton(x):
        if torch.compiler.is_compiling():
            shortcut_grad = None  # a graph returns the residual's gradient (see ShortcutGrad)
        call = Conv1x1Call(stride, 0, bn.stats.batch, bool(output_stats), finish, shortcut_grad, dtype)
        outs = _BNReLUConv1x1Triton.apply(x, conv_weight, bn.gamma, bn.beta, conv_bias, residual, bn.stats, call)
        y = outs[0]
        stats = BNStats(outs[2], outs[3], outs[4] if finish is not None else None) if output_stats else None
    else:
        call = Conv1x1Call(stride, 0, bn.stats.batch, dtype=dtype)
        y = _BNReLUConv1x1Torch.apply(x, conv_weight, bn.gamma, bn.beta, conv_bias, residual, bn.stats, call)
        stats = BNStats(*(t.detach() for t in _torch_batch_stats(y))) if output_stats else None
    if not output_stats:
        return y
    return y, _output_stats(next_bn, y, stats)


def bn_relu_conv1x1_dual(x, w_a, w_b, bn_weight, bn_bias, running_mean=None, running_var=None, *,
                         num_batches_tracked=None, training=True, momentum=0.1, eps=1e-5, stride_a=1,
                         stride_b=1, input_stats=None, output_stats_a=False, next_bn_a=None):
    """One pre-activation relu(BN(x)) feeding two 1x1 convs: (y_a, y_b) = (a (*) w_a, a (*) w_b).

    E.g. a pre-activation unit's first conv (w_a) and its projection shortcut (w_b). The BatchNorm's
    stats are taken and it is finished ONCE. With stride_a == stride_b the two convs run as one GEMM over
    the concatenated weights (two contiguous channels-last outputs); otherwise two launches. Returns
    (y_a, y_b), or ((y_a, BNStats of y_a), y_b) with output_stats_a; next_bn_a: the BatchNorm2d
    consuming y_a, finished in the same launch as in bn_relu_conv1x1's next_bn.
    """
    stride_a = _stride_int(stride_a, "stride_a")
    stride_b = _stride_int(stride_b, "stride_b")
    x, dtype = _prepare_x(x)
    _check_weight("w_a", w_a, x.shape[1], x.device)
    _check_weight("w_b", w_b, x.shape[1], x.device)
    ca = w_a.shape[0]
    finish = _next_bn(next_bn_a, out_shape(x, ca, stride_a), ca, output_stats_a, "next_bn_a")
    kw = dict(num_batches_tracked=num_batches_tracked, training=training, momentum=momentum, eps=eps)
    bn = _input_bn(x, _bn_keywords(bn_weight, bn_bias, running_mean, running_var, kw), input_stats)
    stats_a = None
    if use_triton(x) and stride_a == stride_b:
        w_cat = torch.cat([w_a, w_b.to(w_a.dtype)], dim=0)
        call = Conv1x1Call(stride_a, ca, bn.stats.batch, bool(output_stats_a), finish, dtype=dtype)
        outs = _BNReLUConv1x1Triton.apply(x, w_cat, bn.gamma, bn.beta, None, None, bn.stats, call)
        y_a, y_b = outs[0], outs[1]
        if output_stats_a:
            stats_a = BNStats(outs[2][:ca], outs[3][:ca], outs[4] if finish is not None else None)
    elif use_triton(x):
        call_a = Conv1x1Call(stride_a, 0, bn.stats.batch, bool(output_stats_a), finish, dtype=dtype)
        outs = _BNReLUConv1x1Triton.apply(x, w_a, bn.gamma, bn.beta, None, None, bn.stats, call_a)
        y_a = outs[0]
        if output_stats_a:
            stats_a = BNStats(outs[2], outs[3], outs[4] if finish is not None else None)
        y_b = _BNReLUConv1x1Triton.apply(x, w_b, bn.gamma, bn.beta, None, None, bn.stats,
                                         Conv1x1Call(stride_b, 0, bn.stats.batch, dtype=dtype))[0]
    else:
        y_a = _BNReLUConv1x1Torch.apply(x, w_a, bn.gamma, bn.beta, None, None, bn.stats,
                                        Conv1x1Call(stride_a, 0, bn.stats.batch, dtype=dtype))
        y_b = _BNReLUConv1x1Torch.apply(x, w_b, bn.gamma, bn.beta, None, None, bn.stats,
                                        Conv1x1Call(stride_b, 0, bn.stats.batch, dtype=dtype))
        if output_stats_a:
            stats_a = BNStats(*(t.detach() for t in _torch_batch_stats(y_a)))
    if not output_stats_a:
        return y_a, y_b
    return (y_a, _output_stats(next_bn_a, y_a, stats_a)), y_b


# ---------------------------------------------------------------------------------------------------
# Which Conv2d the op computes exactly
# ---------------------------------------------------------------------------------------------------
class Fusable(NamedTuple):
    """conv1x1_fusable's answer: true when the op computes the conv exactly, else the reason why not."""
    ok: bool
    reason: str = ""

    def __bool__(self):
        return self.ok


def conv1x1_fusable(conv) -> Fusable:
    """Whether `conv` is a Conv2d that bn_relu_conv1x1 computes exactly (1x1, groups 1, no dilation, no
    padding ("same" is none for a 1x1), stride 1 or 2, nn.Conv2d's own forward, a floating, initialised
    weight); false with the reason, as one phrase, otherwise."""
    if not isinstance(conv, nn.Conv2d) or type(conv).forward is not nn.Conv2d.forward:
        return Fusable(False, f"not an nn.Conv2d with its stock forward (got {type(conv).__name__})")
    if isinstance(conv.weight, nn.parameter.UninitializedParameter):
        return Fusable(False, "a lazy Conv2d whose weight is not initialised yet (before its first call)")
    if conv.kernel_size != (1, 1) or conv.groups != 1 or conv.dilation != (1, 1):
        return Fusable(False, f"not a 1x1 Conv2d with groups=1 and no dilation (kernel_size={conv.kernel_size}, "
                              f"groups={conv.groups}, dilation={conv.dilation})")
    if conv.padding not in ((0, 0), "valid", "same"):
        return Fusable(False, f"a 1x1 Conv2d with padding {conv.padding} (the fused op takes no padding)")
    if conv.stride not in ((1, 1), (2, 2)):
        return Fusable(False, f"a 1x1 Conv2d with stride {conv.stride} (the fused op takes stride 1 or 2)")
    if not conv.weight.dtype.is_floating_point:
        return Fusable(False, f"a Conv2d with a {conv.weight.dtype} weight (not floating point)")
    return Fusable(True)
