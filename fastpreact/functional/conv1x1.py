"""BatchNorm2d -> ReLU -> 1x1 Conv2d as one op: its Triton implementation as PyTorch operators
(torch.ops.fastpreact.bn_relu_conv1x1, bn_relu_conv1x1_dual, bn_relu_conv1x1_backward: fake
implementations, registered autograd), the PyTorch fallback's autograd Function, its argument checks,
and what makes a Conv2d a 1x1 the op computes exactly.

bn_relu_conv1x1 computes  y = relu(BN(x)) (*) W  [+ bias] [+ residual]  for a 1x1 convolution W, with
BatchNorm in training mode (batch statistics, running-statistics update with nn.BatchNorm2d's exact
semantics) or eval mode (running statistics). It saves only x, mean, rstd and W (and the BN affine
parameters gamma, beta) for backward, through ctx.save_for_backward, never the BN or the ReLU output:
backward recomputes relu((x - mean)*scale + beta).

Math (per channel c, M = N*H*W rows, z = (x - mean)*scale + beta, a = relu(z), scale = gamma*rstd):
    forward   y = a[rows(stride)] @ W^T
    backward  dW = a^T @ dy;  da = dy @ W (scattered to the strided rows);  dz = da * [z > 0]
              dbeta = sum(dz);  dgamma = sum(dz * xhat),  xhat = (x - mean) * rstd
              train: dx = scale * (dz - dbeta/M - xhat * dgamma/M)
              eval:  dx = scale * dz
Batch statistics given through `input_stats` (from a producer's epilogue) are treated as constants of
the producer: the consumer's dx above already carries the whole gradient through the mean and variance.

Backends: backends.use_triton decides per call (the kernels, or this module's PyTorch math, so every
model works anywhere). Nothing here synchronises with the host (no .item(), no branch on tensor
values), so a training step that calls these ops can be captured in a CUDA graph.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backends import autocast_dtype, kernels, poison, use_triton
from .batchnorm import batch_norm_stats, batch_stats_torch, check_vec
from .library import custom_op, no_tensor

__all__ = ["bn_relu_conv1x1", "bn_relu_conv1x1_dual", "conv1x1_unfusable"]

OP = "bn_relu_conv1x1"


# ---------------------------------------------------------------------------------------------------
# The Triton implementation (forward and backward launches), and the operators around it
# ---------------------------------------------------------------------------------------------------
def conv1x1_forward_impl(x, weight, gamma, beta, mean, rstd, conv_bias, residual, stride, output_stats, n_split):
    """The forward launches: ([y] or [y_a, y_b], (mean, var) of the output as stored, or None)."""
    kc = kernels("bn_relu_conv1x1")
    cout = weight.shape[0]
    w2d = weight.reshape(cout, -1).to(x.dtype).contiguous()
    out, stats = kc.bn_relu_conv1x1_fwd(
        x, w2d, mean, rstd, gamma, beta, stride=stride,
        bias=None if conv_bias is None else conv_bias.detach().float().contiguous(),
        residual=residual, n_split=n_split, out_stats=output_stats, poison=poison())
    return (list(out) if n_split else [out]), stats


def conv1x1_backward_impl(dy, dy2, x, weight, gamma, beta, mean, rstd, stride, use_batch_stats, need_x, need_w,
                          need_bn):
    """The backward launches: (dx, dW, dbeta, dgamma), None where not needed; dbeta, dgamma fp32.
    dy (and dy2, the second output's gradient of a split op) channels-last in x's dtype."""
    kc = kernels("bn_relu_conv1x1")
    poisoned = poison()
    cout = weight.shape[0]
    dx = dw = dgamma = dbeta = None
    if need_w:
        dw = kc.bn_relu_conv1x1_bwd_dw(x, dy, mean, rstd, gamma, beta, stride=stride, dy2=dy2, poison=poisoned)
        dw = dw.view(weight.shape).to(weight.dtype)
    if need_x or need_bn:
        w2d = weight.reshape(cout, -1).to(x.dtype).contiguous()
        dz, dbeta, dgamma = kc.bn_relu_conv1x1_bwd_dz(dy, w2d, x, mean, rstd, gamma, beta, stride=stride,
                                                      dy2=dy2, poison=poisoned)
        if need_x:
            dx = kc.bn_relu_conv1x1_bwd_dx(x, dz, mean, rstd, gamma, dbeta, dgamma, stride=stride,
                                           batch_stats=use_batch_stats, poison=poisoned)
    return dx, dw, dbeta, dgamma


def _out_like(x, cout, stride):
    n, _, h, w = _out_shape(x, cout, stride)
    return x.new_empty((n, cout, h, w)).contiguous(memory_format=torch.channels_last)


def _stats_or_none(stats, like):
    return (no_tensor(like), no_tensor(like)) if stats is None else stats


@custom_op("bn_relu_conv1x1")
def _conv1x1_op(x: Tensor, weight: Tensor, gamma: Tensor, beta: Tensor, mean: Tensor, rstd: Tensor,
                conv_bias: Optional[Tensor], residual: Optional[Tensor], stride: int, use_batch_stats: bool,
                output_stats: bool) -> Tuple[Tensor, Tensor, Tensor]:
    outs, stats = conv1x1_forward_impl(x, weight, gamma, beta, mean, rstd, conv_bias, residual, stride,
                                       output_stats, 0)
    return (outs[0], *_stats_or_none(stats, mean))


@_conv1x1_op.register_fake
def _(x, weight, gamma, beta, mean, rstd, conv_bias, residual, stride, use_batch_stats, output_stats):
    k = weight.shape[0] if output_stats else 0
    return _out_like(x, weight.shape[0], stride), mean.new_empty((k,)), mean.new_empty((k,))


@custom_op("bn_relu_conv1x1_dual")
def _dual_op(x: Tensor, weight: Tensor, gamma: Tensor, beta: Tensor, mean: Tensor, rstd: Tensor, stride: int,
             use_batch_stats: bool, output_stats: bool, n_split: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    outs, stats = conv1x1_forward_impl(x, weight, gamma, beta, mean, rstd, None, None, stride, output_stats,
                                       n_split)
    return (*outs, *_stats_or_none(stats, mean))


@_dual_op.register_fake
def _(x, weight, gamma, beta, mean, rstd, stride, use_batch_stats, output_stats, n_split):
    k = weight.shape[0] if output_stats else 0
    return (_out_like(x, n_split, stride), _out_like(x, weight.shape[0] - n_split, stride), mean.new_empty((k,)),
            mean.new_empty((k,)))


@custom_op("bn_relu_conv1x1_backward")
def _backward_op(dy: Tensor, dy2: Optional[Tensor], x: Tensor, weight: Tensor, gamma: Tensor, beta: Tensor,
                 mean: Tensor, rstd: Tensor, stride: int, use_batch_stats: bool, need_x: bool, need_w: bool,
                 need_bn: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx, dW, [dbeta; dgamma] as one fp32 [2, C] tensor); an empty tensor for what is not needed."""
    dx, dw, dbeta, dgamma = conv1x1_backward_impl(dy, dy2, x, weight, gamma, beta, mean, rstd, stride,
                                                  use_batch_stats, need_x, need_w, need_bn)
    return (no_tensor(x) if dx is None else dx, no_tensor(x) if dw is None else dw,
            _two_rows(dbeta, dgamma) if need_bn else no_tensor(x))


def _two_rows(a, b):
    """[a; b] as one [2, C] tensor: a view where the kernels wrote them as rows of one buffer (an operator
    may not return two aliasing tensors), else a copy."""
    c = a.shape[0]
    if (torch._C._is_alias_of(a, b) and a.stride() == b.stride() == (1,)
            and b.storage_offset() - a.storage_offset() == c):
        return a.as_strided((2, c), (c, 1), a.storage_offset())
    return torch.stack((a, b))


@_backward_op.register_fake
def _(dy, dy2, x, weight, gamma, beta, mean, rstd, stride, use_batch_stats, need_x, need_w, need_bn):
    dx = torch.empty_like(x, memory_format=torch.channels_last) if need_x else no_tensor(x)
    dw = weight.new_empty(weight.shape).contiguous() if need_w else no_tensor(x)
    return dx, dw, (x.new_empty((2, x.shape[1]), dtype=torch.float32) if need_bn else no_tensor(x))


def _save(ctx, inputs, output, stride, use_batch_stats):
    x, weight, gamma, beta, mean, rstd = inputs[:6]
    ctx.save_for_backward(x, weight, gamma, beta, mean, rstd)
    ctx.stride, ctx.use_batch_stats = stride, use_batch_stats
    ctx.mark_non_differentiable(*output[-2:])  # the output statistics
    ctx.set_materialize_grads(False)  # no zero fills for them


def _backward(ctx, dy, dy2):
    """(dx, dW, dgamma, dbeta) through the backward operator, None where no gradient is needed."""
    x, weight, gamma, beta, mean, rstd = ctx.saved_tensors
    need_x, need_w, need_g, need_b = ctx.needs_input_grad[:4]
    dx, dw, sums = torch.ops.fastpreact.bn_relu_conv1x1_backward(
        dy, dy2, x, weight, gamma, beta, mean, rstd, ctx.stride, ctx.use_batch_stats, need_x, need_w,
        need_g or need_b)
    dbeta, dgamma = sums.unbind(0) if need_g or need_b else (None, None)
    return (dx if need_x else None, dw if need_w else None, dgamma.to(gamma.dtype) if need_g else None,
            dbeta.to(beta.dtype) if need_b else None)


def _as_cl(g, x, cout, stride):
    """An output's gradient as the backward operator takes it (zeros where the output was not used)."""
    if g is None:
        return _out_like(x, cout, stride).zero_()
    return g.to(x.dtype).contiguous(memory_format=torch.channels_last)


def _conv1x1_setup(ctx, inputs, output):
    _save(ctx, inputs, output, inputs[8], inputs[9])
    conv_bias, residual = inputs[6], inputs[7]
    ctx.has_bias, ctx.has_residual = conv_bias is not None, residual is not None
    ctx.bias_dtype = None if conv_bias is None else conv_bias.dtype


def _conv1x1_backward(ctx, dy, _mean, _var):
    x, weight = ctx.saved_tensors[:2]
    dy = _as_cl(dy, x, weight.shape[0], ctx.stride)
    dbias = None
    if ctx.has_bias and ctx.needs_input_grad[6]:
        dbias = dy.float().sum(dim=(0, 2, 3)).to(ctx.bias_dtype)
    dres = dy if ctx.has_residual and ctx.needs_input_grad[7] else None
    return (*_backward(ctx, dy, None), None, None, dbias, dres, None, None, None)


def _dual_setup(ctx, inputs, output):
    _save(ctx, inputs, output, inputs[6], inputs[7])
    ctx.n_split = inputs[9]


def _dual_backward(ctx, dy_a, dy_b, _mean, _var):
    x, weight = ctx.saved_tensors[:2]
    n_a, n_b = ctx.n_split, weight.shape[0] - ctx.n_split
    dy_a, dy_b = _as_cl(dy_a, x, n_a, ctx.stride), _as_cl(dy_b, x, n_b, ctx.stride)
    return (*_backward(ctx, dy_a, dy_b), None, None, None, None, None, None)


_conv1x1_op.register_autograd(_conv1x1_backward, setup_context=_conv1x1_setup)
_dual_op.register_autograd(_dual_backward, setup_context=_dual_setup)


# ---------------------------------------------------------------------------------------------------
# The torch fallback Function (same contract, reference math)
# ---------------------------------------------------------------------------------------------------
class _BNReLUConv1x1Torch(torch.autograd.Function):
    """The fallback: the fused op's contract (what is saved, what is returned) in plain PyTorch."""

    @staticmethod
    def forward(ctx, x, weight, gamma, beta, mean, rstd, stride, conv_bias, residual, use_batch_stats):
        # Centred first, like the kernels: exact when |mean| >> std.
        xhat = (x.float() - mean[None, :, None, None]) * rstd[None, :, None, None]
        a = F.relu(xhat * gamma[None, :, None, None] + beta[None, :, None, None]).to(x.dtype)
        y = F.conv2d(a, weight.to(x.dtype), None if conv_bias is None else conv_bias.to(x.dtype), stride=stride)
        if residual is not None:
            y = y + residual
        ctx.save_for_backward(x, weight, gamma, beta, mean, rstd)
        ctx.stride, ctx.use_batch_stats = stride, use_batch_stats
        ctx.has_bias, ctx.has_residual = conv_bias is not None, residual is not None
        return y.contiguous(memory_format=torch.channels_last)

    @staticmethod
    def backward(ctx, dy):
        x, weight, gamma, beta, mean, rstd = ctx.saved_tensors
        s = ctx.stride
        scale = gamma * rstd
        xhat = (x.float() - mean[None, :, None, None]) * rstd[None, :, None, None]
        z = xhat * gamma[None, :, None, None] + beta[None, :, None, None]
        a = F.relu(z).to(x.dtype)
        dy = dy.to(x.dtype)
        dW = torch.nn.grad.conv2d_weight(a, weight.shape, dy, stride=s).to(weight.dtype)
        da_s = torch.nn.grad.conv2d_input(a[:, :, ::s, ::s].shape, weight.to(dy.dtype), dy).float()
        da = torch.zeros_like(xhat)
        da[:, :, ::s, ::s] = da_s
        dz = da * (z > 0)
        dbeta = dz.sum(dim=(0, 2, 3))
        dgamma = (dz * xhat).sum(dim=(0, 2, 3))
        if ctx.use_batch_stats:
            m = x.numel() // x.shape[1]
            dx = scale[None, :, None, None] * (dz - dbeta[None, :, None, None] / m
                                               - xhat * (dgamma / m)[None, :, None, None])
        else:
            dx = scale[None, :, None, None] * dz
        dbias = dy.float().sum(dim=(0, 2, 3)) if ctx.has_bias else None
        dres = dy if ctx.has_residual else None
        return (dx.to(x.dtype), dW, dgamma.to(gamma.dtype), dbeta.to(beta.dtype), None, None, None,
                dbias, dres, None)


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
    if w.dim() != 4 or tuple(w.shape[2:]) != (1, 1):
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
    """Check x, apply autocast, make it channels-last contiguous. Returns x in the compute dtype."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"bn_relu_conv1x1: x must be a tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"bn_relu_conv1x1: x must be [N, C, H, W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"bn_relu_conv1x1: x must be floating point (float32, float16, bfloat16), got {x.dtype}")
    x = autocast_dtype(x)
    # Any other layout (NCHW, slices, expanded views) is copied once into channels-last: the kernels
    # read x as a dense [M, C] matrix, so a strided view must never reach them.
    return x.contiguous(memory_format=torch.channels_last)


def _prepare_residual(residual, x, expected_shape):
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
    if residual.dtype != x.dtype:
        if torch.is_autocast_enabled(x.device.type) and residual.is_floating_point():
            residual = residual.to(x.dtype)
        else:
            raise TypeError(f"bn_relu_conv1x1: residual is {residual.dtype} but the op computes in {x.dtype}; "
                            "cast it (or run under torch.autocast)")
    return residual.contiguous(memory_format=torch.channels_last)


def _bn_vectors(x, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, training, momentum,
                eps, input_stats):
    """(gamma, beta, mean, rstd, use_batch_stats) fp32, updating the running statistics in training."""
    c = x.shape[1]
    for name, t in (("bn_weight", bn_weight), ("bn_bias", bn_bias)):
        check_vec(OP, name, t, c, x.device)
    # affine=False BatchNorm: gamma = 1, beta = 0 (constants, no gradient).
    gamma = bn_weight if bn_weight is not None else torch.ones(c, device=x.device)
    beta = bn_bias if bn_bias is not None else torch.zeros(c, device=x.device)
    mean, _, rstd, use_batch_stats = batch_norm_stats(
        x, running_mean, running_var, num_batches_tracked, training=training, momentum=momentum, eps=eps,
        input_stats=input_stats, op=OP)
    return gamma.float().contiguous(), beta.float().contiguous(), mean, rstd, use_batch_stats


def _out_shape(x, cout, stride):
    n, _, h, w = x.shape
    return (n, cout, (h - 1) // stride + 1, (w - 1) // stride + 1)


def bn_relu_conv1x1(x, conv_weight, bn_weight, bn_bias, running_mean=None, running_var=None, *,
                    num_batches_tracked=None, training=True, momentum=0.1, eps=1e-5, stride=1,
                    conv_bias=None, residual=None, input_stats=None, output_stats=False):
    """relu(BatchNorm2d(x)) followed by a 1x1 Conv2d (stride 1 or 2), optionally + residual.

    x: [N, C, H, W], channels-last preferred (any other layout is converted once).
    conv_weight: [Cout, C, 1, 1]; bn_weight, bn_bias: [C] (fp32 parameters; None = affine=False).
    running_mean, running_var, num_batches_tracked: updated in place in training mode, as nn.BatchNorm2d.
    input_stats: optional (mean, biased var) fp32 [C] of x from a producer; skips the statistics pass.
    output_stats: also return (mean, biased var) fp32 [Cout] of y as stored (the next BN's statistics).
    Under torch.autocast, x (and residual) are cast to the autocast dtype and y is in it.
    Returns y (channels-last), or (y, (mean, var)) when output_stats.
    """
    stride = _stride_int(stride)
    x = _prepare_x(x)
    _check_weight("conv_weight", conv_weight, x.shape[1], x.device)
    cout = conv_weight.shape[0]
    check_vec(OP, "conv_bias", conv_bias, cout, x.device)
    residual = _prepare_residual(residual, x, _out_shape(x, cout, stride))
    gamma, beta, mean, rstd, use_batch_stats = _bn_vectors(
        x, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, training, momentum, eps,
        input_stats)
    if use_triton(x):
        y, y_mean, y_var = torch.ops.fastpreact.bn_relu_conv1x1(
            x, conv_weight, gamma, beta, mean, rstd, conv_bias, residual, stride, use_batch_stats,
            bool(output_stats))
        return (y, (y_mean, y_var)) if output_stats else y
    y = _BNReLUConv1x1Torch.apply(x, conv_weight, gamma, beta, mean, rstd, stride, conv_bias, residual,
                                  use_batch_stats)
    if output_stats:
        return y, tuple(t.detach() for t in batch_stats_torch(y))
    return y


def bn_relu_conv1x1_dual(x, w_a, w_b, bn_weight, bn_bias, running_mean=None, running_var=None, *,
                         num_batches_tracked=None, training=True, momentum=0.1, eps=1e-5, stride_a=1,
                         stride_b=1, input_stats=None, output_stats_a=False):
    """One pre-activation relu(BN(x)) feeding two 1x1 convs: (y_a, y_b) = (a (*) w_a, a (*) w_b).

    E.g. a pre-activation unit's first conv (w_a) and its projection shortcut (w_b). BN statistics are
    computed and the running statistics updated ONCE. With stride_a == stride_b the two convs run as one
    GEMM over the concatenated weights (two contiguous channels-last outputs); otherwise two launches.
    Returns (y_a, y_b), or ((y_a, (mean_a, var_a)), y_b) when output_stats_a.
    """
    stride_a = _stride_int(stride_a, "stride_a")
    stride_b = _stride_int(stride_b, "stride_b")
    x = _prepare_x(x)
    _check_weight("w_a", w_a, x.shape[1], x.device)
    _check_weight("w_b", w_b, x.shape[1], x.device)
    gamma, beta, mean, rstd, use_batch_stats = _bn_vectors(
        x, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, training, momentum, eps,
        input_stats)
    ca = w_a.shape[0]
    stats_a = None
    if use_triton(x) and stride_a == stride_b:
        w_cat = torch.cat([w_a, w_b.to(w_a.dtype)], dim=0)
        y_a, y_b, y_mean, y_var = torch.ops.fastpreact.bn_relu_conv1x1_dual(
            x, w_cat, gamma, beta, mean, rstd, stride_a, use_batch_stats, bool(output_stats_a), ca)
        if output_stats_a:
            stats_a = (y_mean[:ca], y_var[:ca])
    elif use_triton(x):
        y_a, y_mean, y_var = torch.ops.fastpreact.bn_relu_conv1x1(
            x, w_a, gamma, beta, mean, rstd, None, None, stride_a, use_batch_stats, bool(output_stats_a))
        if output_stats_a:
            stats_a = (y_mean, y_var)
        y_b = torch.ops.fastpreact.bn_relu_conv1x1(x, w_b, gamma, beta, mean, rstd, None, None, stride_b,
                                                   use_batch_stats, False)[0]
    else:
        y_a = _BNReLUConv1x1Torch.apply(x, w_a, gamma, beta, mean, rstd, stride_a, None, None, use_batch_stats)
        y_b = _BNReLUConv1x1Torch.apply(x, w_b, gamma, beta, mean, rstd, stride_b, None, None, use_batch_stats)
        if output_stats_a:
            stats_a = tuple(t.detach() for t in batch_stats_torch(y_a))
    return ((y_a, stats_a), y_b) if output_stats_a else (y_a, y_b)


def conv1x1_unfusable(conv) -> str | None:
    """None when `conv` is a Conv2d that bn_relu_conv1x1 computes exactly (1x1, groups 1, no dilation,
    no padding ("same" is none for a 1x1), stride 1 or 2, nn.Conv2d's own forward, a floating,
    initialised weight); otherwise the reason it is not, as one phrase."""
    if not isinstance(conv, nn.Conv2d) or type(conv).forward is not nn.Conv2d.forward:
        return f"not an nn.Conv2d with its stock forward (got {type(conv).__name__})"
    if isinstance(conv.weight, nn.parameter.UninitializedParameter):
        return "a lazy Conv2d whose weight is not initialised yet (before its first call)"
    if conv.kernel_size != (1, 1) or conv.groups != 1 or conv.dilation != (1, 1):
        return (f"not a 1x1 Conv2d with groups=1 and no dilation (kernel_size={conv.kernel_size}, "
                f"groups={conv.groups}, dilation={conv.dilation})")
    if conv.padding not in ((0, 0), "valid", "same"):
        return f"a 1x1 Conv2d with padding {conv.padding} (the fused op takes no padding)"
    if conv.stride not in ((1, 1), (2, 2)):
        return f"a 1x1 Conv2d with stride {conv.stride} (the fused op takes stride 1 or 2)"
    if not conv.weight.dtype.is_floating_point:
        return f"a Conv2d with a {conv.weight.dtype} weight (not floating point)"
    return None
