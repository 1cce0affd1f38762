"""BN-ReLU as one elementwise pass, alone or feeding a (3x3) convolution, saving only the pre-BN input.

A pre-activation relu(bn(x)) in front of a 3x3 convolution cannot live inside a GEMM prologue the way
it does for a 1x1 (fastpreact.functional.bn_relu_conv1x1): cuDNN runs the 3x3. So:

    forward   a = relu(x * scale + shift)  (one Triton pass, kernels/bn_relu.py), y = conv(a, W), free a
    backward  recompute a from x; (da, dW) = conv backward(dy, a, W); free a;
              dz = da * [x * scale + shift > 0];  dbeta = sum dz;  dgamma = sum dz * xhat
              dx = scale * (dz - dbeta / M - xhat * dgamma / M)        (batch statistics)
              dx = scale * dz                                          (running statistics)

Saved for backward, through ctx.save_for_backward only: x, W, gamma, beta, mean, rstd; never a.
Batch statistics may come from the producer of x (the previous kernel's epilogue, `input_stats`); they
are constants here: the dx formula above already carries the whole gradient through mean and variance.

No host synchronisation and no data-dependent host logic: CUDA graphs can capture these Functions.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional as Fp
from ..models.blocks import BatchNormReLU2d

__all__ = ["FusedBatchNormReLU2d", "FusedStem", "bn_relu", "bn_relu_conv2d", "bn_relu_max_pool2d",
           "bn_statistics"]


def _kernels():
    from ..kernels import bn_relu as kernels  # imported on first use: triton stays out of `import`
    return kernels


def _rows(t):
    """The [M = N*H*W, C] row-major matrix of a channels-last [N, C, H, W] tensor (copies otherwise)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _from_rows(t2d, shape):
    n, c, h, w = shape
    return t2d.view(n, h, w, c).permute(0, 3, 1, 2)


def _autocast_off(device):
    """Autocast disabled: the Functions cast explicitly (meta tensors, for shape-only runs, have none)."""
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _scale_shift(gamma, beta, mean, rstd):
    scale = gamma.float() * rstd
    return scale, beta.float() - mean * scale


def _bn_relu_apply(x, gamma, beta, mean, rstd):
    """relu(x * scale + shift) in fp32 arithmetic, stored in x's dtype, channels-last."""
    if Fp.backend(x.device) == "triton":
        return _from_rows(_kernels().bn_relu_fwd(_rows(x), gamma, beta, mean, rstd), x.shape)
    scale, shift = _scale_shift(gamma, beta, mean, rstd)
    z = x.float() * scale[None, :, None, None] + shift[None, :, None, None]
    return F.relu(z).to(x.dtype).contiguous(memory_format=torch.channels_last)


def _bn_relu_backward(da, x, gamma, beta, mean, rstd, batch_stats):
    """(dx, dgamma, dbeta) of a = relu(bn(x)) given da (see the module docstring)."""
    if Fp.backend(x.device) == "triton":
        k = _kernels()
        x2d, da2d = _rows(x), _rows(da).contiguous()
        sums = k.bn_relu_bwd_reduce(da2d, x2d, gamma, beta, mean, rstd)
        dx = _from_rows(k.bn_relu_bwd_dx(da2d, x2d, gamma, beta, mean, rstd, sums, batch_stats), x.shape)
        return dx, sums[1] * rstd, sums[0]
    count = x.numel() // x.shape[1]
    scale, shift = _scale_shift(gamma, beta, mean, rstd)
    xc = x.float() - mean[None, :, None, None]
    z = x.float() * scale[None, :, None, None] + shift[None, :, None, None]
    dz = torch.where(z > 0, da.float(), 0.0)
    dbeta, dgamma = dz.sum((0, 2, 3)), (dz * xc).sum((0, 2, 3)) * rstd
    dx = scale[None, :, None, None] * dz
    if batch_stats:
        coef_b, coef_c = -scale * dbeta / count, -scale * rstd * dgamma / count
        dx = dx + coef_b[None, :, None, None] + xc * coef_c[None, :, None, None]
    return dx.to(x.dtype), dgamma, dbeta


class _BNReLU(torch.autograd.Function):
    """a = relu(bn(x)) with given statistics; saves x (not a) and recomputes the mask in backward."""

    @staticmethod
    def forward(ctx, x, gamma, beta, mean, rstd, batch_stats):
        ctx.save_for_backward(x, gamma, beta, mean, rstd)
        ctx.batch_stats = batch_stats
        return _bn_relu_apply(x, gamma, beta, mean, rstd)

    @staticmethod
    def backward(ctx, da):
        x, gamma, beta, mean, rstd = ctx.saved_tensors
        dx, dgamma, dbeta = _bn_relu_backward(da, x, gamma, beta, mean, rstd, ctx.batch_stats)
        return dx, dgamma.to(gamma.dtype), dbeta.to(beta.dtype), None, None, None


class _BNReLUConv2d(torch.autograd.Function):
    """y = conv2d(relu(bn(x)), W): the pre-activation is recomputed in backward, never saved."""

    @staticmethod
    def forward(ctx, x, weight, gamma, beta, mean, rstd, stride, padding, batch_stats):
        a = _bn_relu_apply(x, gamma, beta, mean, rstd)
        with _autocast_off(x.device):
            y = F.conv2d(a, weight.to(a.dtype), None, stride, padding)
        ctx.save_for_backward(x, weight, gamma, beta, mean, rstd)
        ctx.stride, ctx.padding, ctx.batch_stats = stride, padding, batch_stats
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, gamma, beta, mean, rstd = ctx.saved_tensors
        with _autocast_off(x.device):
            a = _bn_relu_apply(x, gamma, beta, mean, rstd)
            da, dw, _ = torch.ops.aten.convolution_backward(
                dy.to(a.dtype), a, weight.to(a.dtype), None, [ctx.stride] * 2, [ctx.padding] * 2,
                [1, 1], False, [0, 0], 1, [True, ctx.needs_input_grad[1], False])
            del a
            dx, dgamma, dbeta = _bn_relu_backward(da, x, gamma, beta, mean, rstd, ctx.batch_stats)
        return (dx, None if dw is None else dw.to(weight.dtype), dgamma.to(gamma.dtype),
                dbeta.to(beta.dtype), None, None, None, None, None)


class _BNReLUMaxPool2d(torch.autograd.Function):
    """max_pool2d(relu(bn(x))) (the ImageNet stem): saves only x; backward recomputes relu(bn(x)) and the
    pooling's argmax instead of keeping the pre-activation and the int64 indices."""

    @staticmethod
    def forward(ctx, x, gamma, beta, mean, rstd, kernel_size, stride, padding, batch_stats):
        y = F.max_pool2d(_bn_relu_apply(x, gamma, beta, mean, rstd), kernel_size, stride, padding)
        ctx.save_for_backward(x, gamma, beta, mean, rstd)
        ctx.pool, ctx.batch_stats = (kernel_size, stride, padding), batch_stats
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
        dx, dgamma, dbeta = _bn_relu_backward(da, x, gamma, beta, mean, rstd, ctx.batch_stats)
        return dx, dgamma.to(gamma.dtype), dbeta.to(beta.dtype), None, None, None, None, None, None


def bn_statistics(bn: nn.BatchNorm2d, x, input_stats=None, update=True):
    """(mean, biased var, uses_batch_stats) that `bn` normalises x with, as nn.BatchNorm2d would.

    Training (or no running statistics): the batch statistics, taken from `input_stats` when a producer
    emitted them, else from one fastpreact.functional.batch_stats pass; running statistics and
    num_batches_tracked are updated once (update=True) with nn.BatchNorm2d's exact momentum semantics.
    Eval: the running statistics.
    """
    if bn.training or bn.running_mean is None:
        if input_stats is not None:
            mean, var = (t.detach().float() for t in input_stats)
        else:
            mean, var = Fp.batch_stats(x)
        if bn.training and bn.track_running_stats and update:
            Fp.update_running_stats(bn.running_mean, bn.running_var, bn.num_batches_tracked, mean, var,
                                    x.numel() // x.shape[1], bn.momentum)
        return mean, var, True
    return bn.running_mean.float(), bn.running_var.float(), False


def _autocast(x):
    """x in the autocast dtype where autocast is on (as a conv would compute), else unchanged."""
    if x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type):
        return x.to(torch.get_autocast_dtype(x.device.type))
    return x


def bn_relu(x, bn: nn.BatchNorm2d, input_stats=None):
    """relu(bn(x)) in one elementwise pass that saves only x; updates bn's running statistics."""
    x = _autocast(x).contiguous(memory_format=torch.channels_last)
    mean, var, batch_stats = bn_statistics(bn, x, input_stats)
    return _BNReLU.apply(x, bn.weight, bn.bias, mean, torch.rsqrt(var + bn.eps), batch_stats)


def bn_relu_conv2d(x, bn: nn.BatchNorm2d, conv: nn.Conv2d, input_stats=None, stats=None):
    """conv(relu(bn(x))) saving only x (the conv's pre-BN input), for any square-kernel conv without
    bias, groups or dilation (the 3x3 convs of the ResNets).

    stats: (mean, var, uses_batch_stats) already taken by bn_statistics (a pre-activation shared with
    another consumer updates the running statistics once); else they are taken here.
    """
    if conv.bias is not None or conv.groups != 1 or conv.dilation != (1, 1) or conv.padding_mode != "zeros":
        raise ValueError(f"bn_relu_conv2d: conv must have no bias, groups or dilation, got {conv}")
    x = _autocast(x).contiguous(memory_format=torch.channels_last)
    mean, var, batch_stats = stats if stats is not None else bn_statistics(bn, x, input_stats)
    return _BNReLUConv2d.apply(x, conv.weight, bn.weight, bn.bias, mean, torch.rsqrt(var + bn.eps),
                               conv.stride[0], conv.padding[0], batch_stats)


def bn_relu_max_pool2d(x, bn: nn.BatchNorm2d, pool: nn.MaxPool2d, input_stats=None):
    """pool(relu(bn(x))) for a square max-pool without dilation or ceil mode, saving only x."""
    k, s, p = (v if isinstance(v, int) else v[0] for v in (pool.kernel_size, pool.stride, pool.padding))
    if pool.dilation not in (1, (1, 1)) or pool.ceil_mode or pool.return_indices:
        raise ValueError(f"bn_relu_max_pool2d: pool must have no dilation, ceil_mode or indices, got {pool}")
    x = _autocast(x).contiguous(memory_format=torch.channels_last)
    mean, var, batch_stats = bn_statistics(bn, x, input_stats)
    return _BNReLUMaxPool2d.apply(x, bn.weight, bn.bias, mean, torch.rsqrt(var + bn.eps), k, s, p,
                                  batch_stats)


class FusedStem(nn.Sequential):
    """The ImageNet stem (conv, BN-ReLU, max-pool) with BN-ReLU and the max-pool as one recomputed
    Function; same children, hence the same state_dict, as the stock nn.Sequential stem."""

    def forward(self, x):
        if not hasattr(self, "pool") or not getattr(self.norm, "apply_act", True):
            return super().forward(x)
        return bn_relu_max_pool2d(self.conv(x), self.norm, self.pool)


class FusedBatchNormReLU2d(BatchNormReLU2d):
    """BatchNormReLU2d on one elementwise Triton pass that saves only its input (same state_dict).

    forward(x, input_stats=None): input_stats are x's batch statistics from its producer, if any.
    With apply_act=False it is a plain BatchNorm2d (there is no ReLU mask to recompute).
    """

    def forward(self, x, input_stats=None):
        if not self.apply_act:
            return nn.BatchNorm2d.forward(self, x)
        return bn_relu(x, self, input_stats=input_stats)
