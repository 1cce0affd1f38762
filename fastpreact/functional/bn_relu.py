"""BN-ReLU as one elementwise pass, alone or feeding a (3x3) convolution or the stem's max-pool, saving
only the pre-BN input.

A pre-activation relu(bn(x)) in front of a 3x3 convolution cannot live inside a GEMM prologue the way
it does for a 1x1 (bn_relu_conv1x1): cuDNN runs the 3x3. So (per channel, M rows, scale = gamma * rstd):

    forward   a = relu(z),  z = (x - mean) * scale + beta   (one pass, kernels/bn_relu.py), y = conv(a, W),
              free a
    backward  recompute a from x; (da, dW) = conv backward(dy, a, W); free a;
              dz = da * [z > 0];  dbeta = sum dz;  dgamma = sum dz * xhat,  xhat = (x - mean) * rstd
              dx = scale * (dz - dbeta / M - xhat * dgamma / M)        (batch statistics)
              dx = scale * dz                                          (running statistics)

z is centred on the mean before scaling (as in the 1x1 op), so it stays exact when |mean| >> std.
Saved for backward, through ctx.save_for_backward only: x, W, gamma, beta, mean, rstd; never a.
Batch statistics may come from the producer of x (the previous kernel's epilogue, `input_stats`); they
are constants here: the dx formula above already carries the whole gradient through mean and variance.

No host synchronisation and no data-dependent host logic: CUDA graphs can capture these Functions.
The Triton passes are PyTorch operators (torch.ops.fastpreact.bn_relu, bn_relu_backward); the autograd
Functions around them are plain PyTorch that dynamo traces (no graph break).
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backends import autocast_dtype, autocast_off, eager, from_rows, kernels, poison, rows, use_triton
from .batchnorm import bn_stats
from .library import custom_op
from .types import BNStats

__all__ = ["bn_relu", "bn_relu_conv2d", "bn_relu_max_pool2d"]


def bn_relu_forward_impl(x, gamma, beta, mean, rstd):
    """The forward launch: relu(bn(x)) of channels-last x, channels-last."""
    return from_rows(kernels("bn_relu").bn_relu_fwd(rows(x), gamma, beta, mean, rstd, poison=poison()), x.shape)


def bn_relu_backward_impl(da, x, gamma, beta, mean, rstd, batch):
    """The backward launches: dx of a = relu(bn(x)) given da, and the reduction's fp32 [3, C] sums
    (dbeta, sum dz * (x - mean), dgamma), finished in its launch."""
    k = kernels("bn_relu")
    x2d, da2d = rows(x), rows(da).contiguous()
    sums = k.bn_relu_bwd_reduce(da2d, x2d, gamma, beta, mean, rstd, poison=poison())
    dx = k.bn_relu_bwd_dx(da2d, x2d, gamma, beta, mean, rstd, sums, batch, poison=poison())
    return from_rows(dx, x.shape), sums


@custom_op("bn_relu")
def _bn_relu_op(x: Tensor, gamma: Tensor, beta: Tensor, mean: Tensor, rstd: Tensor) -> Tensor:
    return bn_relu_forward_impl(x, gamma, beta, mean, rstd)


_bn_relu_op.register_fake(lambda x, *args: torch.empty_like(x, memory_format=torch.channels_last))


@custom_op("bn_relu_backward")
def _bn_relu_backward_op(da: Tensor, x: Tensor, gamma: Tensor, beta: Tensor, mean: Tensor, rstd: Tensor,
                         batch: bool) -> Tuple[Tensor, Tensor]:
    """(dx, [dbeta; sum dz * (x - mean); dgamma] fp32 [3, C]): one tensor for the sums, which the
    reduction writes as rows of one buffer (an operator may not return aliasing tensors)."""
    return bn_relu_backward_impl(da, x, gamma, beta, mean, rstd, batch)


@_bn_relu_backward_op.register_fake
def _(da, x, gamma, beta, mean, rstd, batch):
    return (torch.empty_like(x, memory_format=torch.channels_last),
            x.new_empty((3, x.shape[1]), dtype=torch.float32))


def _bn_relu_apply(x, gamma, beta, mean, rstd):
    """relu((x - mean) * scale + beta) in fp32 arithmetic, stored in x's dtype, channels-last."""
    if use_triton(x):
        if eager(x):
            return bn_relu_forward_impl(x, gamma, beta, mean, rstd)
        return torch.ops.fastpreact.bn_relu(x, gamma, beta, mean, rstd)
    scale = gamma.float() * rstd
    z = (x.float() - mean[None, :, None, None]) * scale[None, :, None, None] + beta.float()[None, :, None, None]
    return F.relu(z).to(x.dtype).contiguous(memory_format=torch.channels_last)


def _bn_relu_backward(da, x, gamma, beta, mean, rstd, batch):
    """(dx, dgamma, dbeta) of a = relu(bn(x)) given da (see the module docstring)."""
    if use_triton(x):
        if eager(x):
            dx, sums = bn_relu_backward_impl(da, x, gamma, beta, mean, rstd, batch)
        else:
            dx, sums = torch.ops.fastpreact.bn_relu_backward(da, x, gamma, beta, mean, rstd, batch)
        return dx, sums[2], sums[0]  # dgamma, dbeta: finished by the reduction
    count = x.numel() // x.shape[1]
    scale = gamma.float() * rstd
    xc = x.float() - mean[None, :, None, None]
    z = xc * scale[None, :, None, None] + beta.float()[None, :, None, None]
    dz = torch.where(z > 0, da.float(), 0.0)
    dbeta, dgamma = dz.sum((0, 2, 3)), (dz * xc).sum((0, 2, 3)) * rstd
    dx = scale[None, :, None, None] * dz
    if batch:
        coef_b, coef_c = -scale * dbeta / count, -scale * rstd * dgamma / count
        dx = dx + coef_b[None, :, None, None] + xc * coef_c[None, :, None, None]
    return dx.to(x.dtype), dgamma, dbeta


class _BNReLU(torch.autograd.Function):
    """a = relu(bn(x)) with given statistics; saves x (not a) and recomputes the mask in backward."""

    @staticmethod
    def forward(ctx, x, gamma, beta, mean, rstd, batch):
        ctx.save_for_backward(x, gamma, beta, mean, rstd)
        ctx.batch = batch
        return _bn_relu_apply(x, gamma, beta, mean, rstd)

    @staticmethod
    def backward(ctx, da):
        x, gamma, beta, mean, rstd = ctx.saved_tensors
        dx, dgamma, dbeta = _bn_relu_backward(da, x, gamma, beta, mean, rstd, ctx.batch)
        return dx, dgamma.to(gamma.dtype), dbeta.to(beta.dtype), None, None, None


class _BNReLUConv2d(torch.autograd.Function):
    """y = conv2d(relu(bn(x)), W): the pre-activation is recomputed in backward, never saved."""

    @staticmethod
    def forward(ctx, x, weight, gamma, beta, stats: BNStats, stride_padding):
        mean, rstd = stats.mean, stats.rstd
        stride, padding = stride_padding
        a = _bn_relu_apply(x, gamma, beta, mean, rstd)
        w = weight.to(a.dtype)  # cast once: backward reuses it (as a stock conv under autocast saves it)
        with autocast_off(x.device):
            y = F.conv2d(a, w, None, stride, padding)
        ctx.save_for_backward(x, w, gamma, beta, mean, rstd)
        ctx.stride, ctx.padding, ctx.batch = stride, padding, stats.batch
        ctx.weight_dtype = weight.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, gamma, beta, mean, rstd = ctx.saved_tensors
        with autocast_off(x.device):
            a = _bn_relu_apply(x, gamma, beta, mean, rstd)
            da, dw, _ = torch.ops.aten.convolution_backward(
                dy.to(a.dtype), a, w, None, [ctx.stride] * 2, [ctx.padding] * 2,
                [1, 1], False, [0, 0], 1, [True, ctx.needs_input_grad[1], False])
            del a
            dx, dgamma, dbeta = _bn_relu_backward(da, x, gamma, beta, mean, rstd, ctx.batch)
        return (dx, None if dw is None else dw.to(ctx.weight_dtype), dgamma.to(gamma.dtype),
                dbeta.to(beta.dtype), None, None)


class _BNReLUMaxPool2d(torch.autograd.Function):
    """max_pool2d(relu(bn(x))) (the ImageNet stem): saves only x; backward recomputes relu(bn(x)) and the
    pooling's argmax instead of keeping the pre-activation and the int64 indices."""

    @staticmethod
    def forward(ctx, x, gamma, beta, stats: BNStats, pool):
        mean, rstd = stats.mean, stats.rstd
        y = F.max_pool2d(_bn_relu_apply(x, gamma, beta, mean, rstd), *pool)
        ctx.save_for_backward(x, gamma, beta, mean, rstd)
        ctx.pool, ctx.batch = pool, stats.batch
        return y

    @staticmethod
    def backward(ctx, dy):
        x, gamma, beta, mean, rstd = ctx.saved_tensors
        k, s, p = ctx.pool
        a = _bn_relu_apply(x, gamma, beta, mean, rstd)
        _, indices = torch.ops.aten.max_pool2d_with_indices(a, [k, k], [s, s], [p, p])
        da = torch.ops.aten.max_pool2d_with_indices_backward(dy.to(a.dtype), a, [k, k], [s, s], [p, p],
                                                             [1, 1], False, indices)
        del a, indices
        dx, dgamma, dbeta = _bn_relu_backward(da, x, gamma, beta, mean, rstd, ctx.batch)
        return dx, dgamma.to(gamma.dtype), dbeta.to(beta.dtype), None, None


def _affine(bn, x):
    """(gamma, beta) of bn; affine=False: constants 1 and 0 (no gradient)."""
    if bn.weight is None:
        c = x.shape[1]
        return torch.ones(c, device=x.device), torch.zeros(c, device=x.device)
    return bn.weight, bn.bias


def _prepare(x):
    return autocast_dtype(x).contiguous(memory_format=torch.channels_last)


def bn_relu(x, bn: nn.BatchNorm2d, input_stats=None):
    """relu(bn(x)) in one elementwise pass that saves only x; finishes bn in training."""
    x = _prepare(x)
    s = bn_stats(bn, x, input_stats)
    return _BNReLU.apply(x, *_affine(bn, x), s.mean, s.rstd, s.batch)


def bn_relu_conv2d(x, bn: nn.BatchNorm2d, conv: nn.Conv2d, input_stats=None, stats: BNStats | None = None):
    """conv(relu(bn(x))) saving only x (the conv's pre-BN input), for any square-kernel conv without
    bias, groups or dilation (the 3x3 convs of the ResNets).

    stats: the BNStats bn_stats already took (a pre-activation shared with another consumer finishes
    its BatchNorm once); else they are taken here.
    """
    if conv.bias is not None or conv.groups != 1 or conv.dilation != (1, 1) or conv.padding_mode != "zeros":
        raise ValueError(f"bn_relu_conv2d: conv must have no bias, groups or dilation, got {conv}")
    x = _prepare(x)
    s = stats if stats is not None else bn_stats(bn, x, input_stats)
    return _BNReLUConv2d.apply(x, conv.weight, *_affine(bn, x), s, (conv.stride[0], conv.padding[0]))


def bn_relu_max_pool2d(x, bn: nn.BatchNorm2d, pool: nn.MaxPool2d, input_stats=None):
    """pool(relu(bn(x))) for a square max-pool without dilation or ceil mode, saving only x."""
    k, s, p = (v if isinstance(v, int) else v[0] for v in (pool.kernel_size, pool.stride, pool.padding))
    if pool.dilation not in (1, (1, 1)) or pool.ceil_mode or pool.return_indices:
        raise ValueError(f"bn_relu_max_pool2d: pool must have no dilation, ceil_mode or indices, got {pool}")
    x = _prepare(x)
    st = bn_stats(bn, x, input_stats)
    return _BNReLUMaxPool2d.apply(x, *_affine(bn, x), st, (k, s, p))
