"""Autograd Functions over the fused kernels, plus the pure-PyTorch fallback.

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

Backends: "triton" (a GPU, or TRITON_INTERPRET=1 on a CPU) and "torch" (this file's math, so every model
works anywhere). `backend()` says which one runs. float64 inputs and empty batches always take the torch
path (the kernels are fp32/fp16/bf16 only). Nothing here synchronises with the host (no .item(), no
branch on tensor values), so a training step that calls these ops can be captured in a CUDA graph.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

__all__ = ["bn_relu_conv1x1", "bn_relu_conv1x1_dual", "batch_stats", "backend", "update_running_stats"]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def backend(device: torch.device | str | None = None) -> str:
    """'triton' where the kernels can run on `device` (CUDA, or the CPU interpreter), else 'torch'.
    device=None asks about the default device: CUDA when this machine has one."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(device).type == "cuda":
        return "triton"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "triton"
    return "torch"


def _poison() -> bool:
    # Tests set FASTPREACT_POISON=1: every kernel output starts as NaN, so an unwritten element fails.
    return os.environ.get("FASTPREACT_POISON") == "1"


def _kernels():
    # Imported on first use: `import fastpreact` must work where triton is absent (the torch backend).
    from .kernels import batch_stats as ks
    from .kernels import bn_relu_conv1x1 as kc
    return ks, kc


def _use_triton(x: torch.Tensor) -> bool:
    return backend(x.device) == "triton" and x.dtype in _KERNEL_DTYPES and x.numel() > 0


@torch.no_grad()
def update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, count, momentum):
    """nn.BatchNorm2d's running-statistics update from batch mean and biased variance over `count` values.

    momentum=None is the cumulative moving average (1 / num_batches_tracked, counted after this batch),
    computed on the device so that no host synchronisation happens. The running variance uses the
    unbiased estimate var * count / (count - 1).
    """
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if running_mean is None:
        return
    if momentum is None:
        if num_batches_tracked is None:
            return  # what F.batch_norm does with momentum 0.0
        factor = torch.reciprocal(num_batches_tracked.to(running_mean.dtype))
    else:
        factor = float(momentum)
    unbiased = var * (count / max(count - 1, 1))
    running_mean.lerp_(mean.to(running_mean.dtype), factor)
    running_var.lerp_(unbiased.to(running_var.dtype), factor)


@torch.no_grad()
def _batch_stats_torch(x):
    """Per-channel mean and biased variance of NCHW x in fp32 (two-pass: numerically safe). Constants
    for autograd: the op's backward carries the whole gradient through them."""
    xf = x.float()
    mean = xf.mean(dim=(0, 2, 3))
    var = (xf - mean[None, :, None, None]).square().mean(dim=(0, 2, 3))
    return mean, var


@torch.no_grad()
def batch_stats(x: torch.Tensor):
    """(mean, biased variance) fp32 [C] of x [N, C, H, W] over N, H, W; no gradient.

    Triton (two-stage shifted Chan merge, accurate for large means) when backend() is "triton", else a
    torch two-pass.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"batch_stats: x must be a 4-D tensor [N, C, H, W], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"batch_stats: x must be a floating-point tensor, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"batch_stats: x of shape {tuple(x.shape)} is empty; statistics need at least one "
                         "value per channel")
    if not _use_triton(x):
        return _batch_stats_torch(x)
    x = x.contiguous(memory_format=torch.channels_last)
    ks, _ = _kernels()
    return ks.batch_stats_rows(x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]), poison=_poison())


# ---------------------------------------------------------------------------------------------------
# The Triton autograd Function
# ---------------------------------------------------------------------------------------------------
class _BNReLUConv1x1Triton(torch.autograd.Function):
    """relu((x - mean)*gamma*rstd + beta) (*) W on the fused kernels. Outputs: y (or y_a, y_b when
    n_split > 0), then (mean, var) of the output as stored when out_stats. Saves x, W, gamma, beta,
    mean, rstd (nothing else, nothing as a ctx attribute)."""

    @staticmethod
    def forward(ctx, x, weight, gamma, beta, mean, rstd, conv_bias, residual, stride, batch_stats_used,
                out_stats, n_split):
        _, kc = _kernels()
        cout = weight.shape[0]
        w2d = weight.reshape(cout, -1).to(x.dtype).contiguous()
        out, stats = kc.bn_relu_conv1x1_fwd(
            x, w2d, mean, rstd, gamma, beta, stride=stride,
            bias=None if conv_bias is None else conv_bias.detach().float().contiguous(),
            residual=residual, n_split=n_split, out_stats=out_stats, poison=_poison())
        ctx.save_for_backward(x, weight, gamma, beta, mean, rstd)
        ctx.stride, ctx.batch_stats_used, ctx.n_split = stride, batch_stats_used, n_split
        ctx.has_bias, ctx.has_residual = conv_bias is not None, residual is not None
        ctx.bias_dtype = None if conv_bias is None else conv_bias.dtype
        outs = list(out) if n_split else [out]
        if out_stats:
            ctx.mark_non_differentiable(*stats)
            outs += list(stats)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        x, weight, gamma, beta, mean, rstd = ctx.saved_tensors
        _, kc = _kernels()
        s, n_split = ctx.stride, ctx.n_split
        poison = _poison()

        def as_cl(g):
            return g.to(x.dtype).contiguous(memory_format=torch.channels_last)

        dy = as_cl(grads[0])
        dy2 = as_cl(grads[1]) if n_split else None
        cout = weight.shape[0]
        need_x, need_w, need_g, need_b = ctx.needs_input_grad[:4]
        dx = dw = dgamma = dbeta = None
        if need_w:
            dw = kc.bn_relu_conv1x1_bwd_dw(x, dy, mean, rstd, gamma, beta, stride=s, dy2=dy2, poison=poison)
            dw = dw.view(weight.shape).to(weight.dtype)
        if need_x or need_g or need_b:
            w2d = weight.reshape(cout, -1).to(x.dtype).contiguous()
            dz, dbeta_f, dgamma_f = kc.bn_relu_conv1x1_bwd_dz(dy, w2d, x, mean, rstd, gamma, beta, stride=s,
                                                              dy2=dy2, poison=poison)
            if need_x:
                dx = kc.bn_relu_conv1x1_bwd_dx(x, dz, mean, rstd, gamma, dbeta_f, dgamma_f, stride=s,
                                               batch_stats=ctx.batch_stats_used, poison=poison)
            dgamma = dgamma_f.to(gamma.dtype) if need_g else None
            dbeta = dbeta_f.to(beta.dtype) if need_b else None
        dbias = None
        if ctx.has_bias and ctx.needs_input_grad[6]:
            dbias = dy.float().sum(dim=(0, 2, 3)).to(ctx.bias_dtype)
        dres = dy if ctx.has_residual and ctx.needs_input_grad[7] else None
        return dx, dw, dgamma, dbeta, None, None, dbias, dres, None, None, None, None


# ---------------------------------------------------------------------------------------------------
# The torch fallback Function (same contract, reference math)
# ---------------------------------------------------------------------------------------------------
class _BNReLUConv1x1Torch(torch.autograd.Function):
    """The fallback: the fused op's contract (what is saved, what is returned) in plain PyTorch."""

    @staticmethod
    def forward(ctx, x, weight, gamma, beta, mean, rstd, stride, conv_bias, residual, training):
        # Centred first, like the kernels: exact when |mean| >> std.
        xhat = (x.float() - mean[None, :, None, None]) * rstd[None, :, None, None]
        a = F.relu(xhat * gamma[None, :, None, None] + beta[None, :, None, None]).to(x.dtype)
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
        dy = dy.to(x.dtype)
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


# ---------------------------------------------------------------------------------------------------
# Argument checking shared by both backends
# ---------------------------------------------------------------------------------------------------
def _stride_int(stride, what="stride"):
    if isinstance(stride, (tuple, list)):
        if len(stride) != 2 or stride[0] != stride[1]:
            raise ValueError(f"bn_relu_conv1x1: {what} must be 1 or 2 (equal in H and W), got {stride}")
        stride = stride[0]
    if isinstance(stride, bool) or not isinstance(stride, int) or stride not in (1, 2):
        raise ValueError(f"bn_relu_conv1x1: {what} must be 1 or 2, got {stride!r}")
    return stride


def _check_vec(name, t, c, device):
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"bn_relu_conv1x1: {name} must be a tensor or None, got {type(t).__name__}")
    if t.shape != (c,):
        raise ValueError(f"bn_relu_conv1x1: {name} must have shape [{c}] (one value per channel), got "
                         f"{tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"bn_relu_conv1x1: {name} is on {t.device} but x is on {device}; move them to one "
                         "device")
    if not t.is_floating_point():
        raise TypeError(f"bn_relu_conv1x1: {name} must be floating point, got {t.dtype}")


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
    if torch.is_autocast_enabled(x.device.type) and x.dtype in _KERNEL_DTYPES:
        x = x.to(torch.get_autocast_dtype(x.device.type))
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


def _bn_statistics(x, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, training,
                   momentum, eps, input_stats):
    """(gamma, beta, mean, rstd, batch_stats_used) fp32, updating the running statistics in training."""
    c = x.shape[1]
    for name, t in (("bn_weight", bn_weight), ("bn_bias", bn_bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        _check_vec(name, t, c, x.device)
    if (running_mean is None) != (running_var is None):
        raise ValueError("bn_relu_conv1x1: give both running_mean and running_var, or neither")
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and c > 1 and t.stride(0) != 1:
            raise ValueError(f"bn_relu_conv1x1: {name} is updated in place and must be contiguous; pass the "
                             "BatchNorm buffer itself (or a .contiguous() copy)")
    # affine=False BatchNorm: gamma = 1, beta = 0 (constants, no gradient).
    gamma = bn_weight if bn_weight is not None else torch.ones(c, device=x.device)
    beta = bn_bias if bn_bias is not None else torch.zeros(c, device=x.device)
    gamma, beta = gamma.float().contiguous(), beta.float().contiguous()
    use_batch = training or running_mean is None
    count = x.numel() // c
    if use_batch:
        if training and count <= 1:
            raise ValueError(f"bn_relu_conv1x1: training needs more than 1 value per channel (x has shape "
                             f"{tuple(x.shape)}); use a larger batch or eval mode")
        if input_stats is not None:
            if (not isinstance(input_stats, (tuple, list)) or len(input_stats) != 2):
                raise TypeError("bn_relu_conv1x1: input_stats must be a (mean, biased_var) pair of [C] tensors")
            for name, t in zip(("input_stats mean", "input_stats var"), input_stats):
                _check_vec(name, t, c, x.device)
    if not _use_triton(x):
        if use_batch:
            if input_stats is not None:
                mean, var = (t.detach().float() for t in input_stats)
            else:
                mean, var = _batch_stats_torch(x)
            if training:
                update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, count, momentum)
        else:
            mean, var = running_mean.detach().float(), running_var.detach().float()
        return gamma, beta, mean, torch.rsqrt(var + eps), use_batch

    # Triton: statistics, rstd and the running-statistics update in two launches (one with input_stats
    # or in eval), all on the device.
    ks, _ = _kernels()
    poison = _poison()
    run = {}
    if training:
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        run = dict(running_mean=running_mean, running_var=running_var,
                   num_batches_tracked=num_batches_tracked, momentum=momentum)
    if use_batch and input_stats is None:
        mean, _, rstd = ks.batch_stats_rows(x.permute(0, 2, 3, 1).reshape(-1, c), poison, eps=eps, **run)
    else:
        if use_batch:
            mean, var = (t.detach().float().contiguous() for t in input_stats)
        else:
            mean, var = running_mean.detach().float().contiguous(), running_var.detach().float().contiguous()
        rstd = ks.bn_finalize(mean, var, eps, count, poison, **run)
    return gamma, beta, mean, rstd, use_batch


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
    _check_vec("conv_bias", conv_bias, cout, x.device)
    residual = _prepare_residual(residual, x, _out_shape(x, cout, stride))
    gamma, beta, mean, rstd, use_batch = _bn_statistics(
        x, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, training, momentum, eps,
        input_stats)
    if _use_triton(x):
        outs = _BNReLUConv1x1Triton.apply(x, conv_weight, gamma, beta, mean, rstd, conv_bias, residual,
                                          stride, use_batch, bool(output_stats), 0)
        return (outs[0], (outs[1], outs[2])) if output_stats else outs[0]
    y = _BNReLUConv1x1Torch.apply(x, conv_weight, gamma, beta, mean, rstd, stride, conv_bias, residual,
                                  use_batch)
    if output_stats:
        return y, tuple(t.detach() for t in _batch_stats_torch(y))
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
    gamma, beta, mean, rstd, use_batch = _bn_statistics(
        x, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, training, momentum, eps,
        input_stats)
    ca = w_a.shape[0]
    stats_a = None
    if _use_triton(x) and stride_a == stride_b:
        w_cat = torch.cat([w_a, w_b.to(w_a.dtype)], dim=0)
        outs = _BNReLUConv1x1Triton.apply(x, w_cat, gamma, beta, mean, rstd, None, None, stride_a, use_batch,
                                          bool(output_stats_a), ca)
        y_a, y_b = outs[0], outs[1]
        if output_stats_a:
            stats_a = (outs[2][:ca], outs[3][:ca])
    elif _use_triton(x):
        outs = _BNReLUConv1x1Triton.apply(x, w_a, gamma, beta, mean, rstd, None, None, stride_a, use_batch,
                                          bool(output_stats_a), 0)
        y_a = outs[0]
        if output_stats_a:
            stats_a = (outs[1], outs[2])
        y_b = _BNReLUConv1x1Triton.apply(x, w_b, gamma, beta, mean, rstd, None, None, stride_b, use_batch,
                                         False, 0)[0]
    else:
        y_a = _BNReLUConv1x1Torch.apply(x, w_a, gamma, beta, mean, rstd, stride_a, None, None, use_batch)
        y_b = _BNReLUConv1x1Torch.apply(x, w_b, gamma, beta, mean, rstd, stride_b, None, None, use_batch)
        if output_stats_a:
            stats_a = tuple(t.detach() for t in _batch_stats_torch(y_a))
    return ((y_a, stats_a), y_b) if output_stats_a else (y_a, y_b)
