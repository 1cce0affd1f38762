"""Autograd Functions over the fused kernels, plus the pure-PyTorch fallback.

bn_relu_conv1x1 computes  y = relu(BN(x)) (*) W  [+ bias] [+ residual]  for a 1x1 convolution W, with
BatchNorm in training mode (batch statistics, running-statistics update with nn.BatchNorm2d's exact
semantics) or eval mode (running statistics). It saves only x, mean, rstd and W for backward (through
ctx.save_for_backward), never the BN or the ReLU output: backward recomputes relu(x*scale + shift).

Math (per channel c, M = N*H*W rows, z = x*scale + shift, a = relu(z), scale = gamma*rstd):
    forward   y = a[rows(stride)] @ W^T
    backward  dW = a^T @ dy;  da = dy @ W (scattered to the strided rows);  dz = da * [z > 0]
              dbeta = sum(dz);  dgamma = sum(dz * xhat),  xhat = (x - mean) * rstd
              train: dx = scale * (dz - dbeta/M - xhat * dgamma/M)
              eval:  dx = scale * dz
Batch statistics given through `input_stats` (from a producer's epilogue) are treated as constants of
the producer: the consumer's dx above already carries the whole gradient through the mean and variance.

Backends: "triton" (a GPU, or TRITON_INTERPRET=1 on a CPU) and "torch" (this file's math, so every model
works anywhere). `backend()` says which one runs.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

__all__ = ["bn_relu_conv1x1", "backend", "update_running_stats"]


def backend(device: torch.device | str | None = None) -> str:
    """'triton' where the kernels can run on `device` (CUDA, or the CPU interpreter), else 'torch'."""
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        return "triton"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "triton"
    return "torch"


@torch.no_grad()
def update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, count, momentum):
    """nn.BatchNorm2d's running-statistics update from batch mean and biased variance over `count` values.

    momentum=None is the cumulative moving average (1 / num_batches_tracked, counted after this batch).
    The running variance uses the unbiased estimate var * count / (count - 1).
    """
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if running_mean is None:
        return
    if momentum is None:
        m = 1.0 / float(num_batches_tracked.item()) if num_batches_tracked is not None else 0.0
    else:
        m = momentum
    unbiased = var * (count / max(count - 1, 1))
    running_mean.lerp_(mean.to(running_mean.dtype), m)
    running_var.lerp_(unbiased.to(running_var.dtype), m)


def _batch_stats_torch(x):
    """Per-channel mean and biased variance of NCHW x in fp32 (two-pass: numerically safe)."""
    xf = x.float()
    mean = xf.mean(dim=(0, 2, 3))
    var = (xf - mean[None, :, None, None]).square().mean(dim=(0, 2, 3))
    return mean, var


class _BNReLUConv1x1Torch(torch.autograd.Function):
    """The fallback: the fused op's contract (what is saved, what is returned) in plain PyTorch."""

    @staticmethod
    def forward(ctx, x, weight, gamma, beta, mean, rstd, stride, conv_bias, residual, training):
        scale = (gamma * rstd).to(x.dtype)
        shift = (beta - mean * gamma * rstd).to(x.dtype)
        a = F.relu(x * scale[None, :, None, None] + shift[None, :, None, None])
        y = F.conv2d(a, weight.to(x.dtype), None if conv_bias is None else conv_bias.to(x.dtype), stride=stride)
        if residual is not None:
            y = y + residual
        ctx.save_for_backward(x, weight, gamma, beta, mean, rstd)
        ctx.stride, ctx.training = stride, training
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
        dW = torch.nn.grad.conv2d_weight(a, weight.shape, dy, stride=s).to(weight.dtype)
        da_s = torch.nn.grad.conv2d_input(a[:, :, ::s, ::s].shape, weight.to(dy.dtype), dy).float()
        da = torch.zeros_like(xhat)
        da[:, :, ::s, ::s] = da_s
        dz = da * (z > 0)
        dbeta = dz.sum(dim=(0, 2, 3))
        dgamma = (dz * xhat).sum(dim=(0, 2, 3))
        if ctx.training:
            m = x.numel() // x.shape[1]
            dx = scale[None, :, None, None] * (dz - dbeta[None, :, None, None] / m
                                               - xhat * (dgamma / m)[None, :, None, None])
        else:
            dx = scale[None, :, None, None] * dz
        dbias = dy.float().sum(dim=(0, 2, 3)) if ctx.has_bias else None
        dres = dy if ctx.has_residual else None
        return (dx.to(x.dtype), dW, dgamma.to(gamma.dtype), dbeta.to(beta.dtype), None, None, None,
                dbias, dres, None)


def bn_relu_conv1x1(x, conv_weight, bn_weight, bn_bias, running_mean=None, running_var=None, *,
                    num_batches_tracked=None, training=True, momentum=0.1, eps=1e-5, stride=1,
                    conv_bias=None, residual=None, input_stats=None, output_stats=False):
    """relu(BatchNorm2d(x)) followed by a 1x1 Conv2d (stride 1 or 2), optionally + residual.

    x: [N, C, H, W], channels-last preferred (NCHW-contiguous is converted once).
    conv_weight: [Cout, C, 1, 1]; bn_weight, bn_bias: [C] (fp32 parameters).
    running_mean, running_var, num_batches_tracked: updated in place in training mode, as nn.BatchNorm2d.
    input_stats: optional (mean, biased var) fp32 [C] of x from a producer; skips the statistics pass.
    output_stats: also return (mean, biased var) fp32 [Cout] of y as stored (the next BN's statistics).
    Returns y (channels-last), or (y, (mean, var)) when output_stats.
    """
    if stride not in (1, 2):
        raise ValueError(f"bn_relu_conv1x1: stride must be 1 or 2, got {stride}")
    if x.dim() != 4:
        raise ValueError(f"bn_relu_conv1x1: x must be [N, C, H, W], got shape {tuple(x.shape)}")
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x = x.to(dtype)
        residual = None if residual is None else residual.to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    use_batch = training or running_mean is None
    if use_batch:
        if input_stats is not None:
            mean, var = (t.detach().float() for t in input_stats)
        else:
            mean, var = _batch_stats_torch(x)
        if training:
            eff_momentum = momentum
            update_running_stats(running_mean, running_var, num_batches_tracked, mean, var,
                                 x.numel() // x.shape[1], eff_momentum)
    else:
        mean, var = running_mean.float(), running_var.float()
    rstd = torch.rsqrt(var + eps)
    y = _BNReLUConv1x1Torch.apply(x, conv_weight, bn_weight, bn_bias, mean, rstd, stride, conv_bias,
                                  residual, use_batch)
    if output_stats:
        return y, tuple(t.detach() for t in _batch_stats_torch(y))
    return y
