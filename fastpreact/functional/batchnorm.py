"""BatchNorm's half of every fused op: which arguments an nn.BatchNorm2d stands for, the batch
statistics, and the running-statistics update, with nn.BatchNorm2d's exact semantics.

One path for statistics: `batch_norm_stats` gives (mean, biased var, rstd, use_batch_stats) for every
op, from the producer's `input_stats`, one statistics pass, or the running statistics, and updates the
running statistics (momentum, unbiased running variance, num_batches_tracked, momentum=None as the
cumulative average) on the device: no host synchronisation, so a training step can be captured in a
CUDA graph. Statistics are constants for autograd: each op's backward carries the whole gradient
through the mean and variance.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .backends import kernels, poison, rows, use_triton
from .library import custom_op

__all__ = ["batch_stats", "update_running_stats", "bn_args", "bn_statistics", "batch_norm_stats"]


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
def batch_stats_torch(x):
    """Per-channel mean and biased variance of NCHW x in fp32: two passes over values shifted by each
    channel's first value, as the kernel shifts each tile (so mean 1e3, std 1 costs no precision)."""
    xf = x.float()
    d = xf - xf[:1, :, :1, :1]
    d_mean = d.mean(dim=(0, 2, 3))
    var = (d - d_mean[None, :, None, None]).square().mean(dim=(0, 2, 3))
    return xf[0, :, 0, 0] + d_mean, var


@torch.no_grad()
def batch_stats(x: torch.Tensor):
    """(mean, biased variance) fp32 [C] of x [N, C, H, W] over N, H, W; no gradient.

    Triton (two-stage shifted Chan merge, accurate for large means) where use_triton(x), else a torch
    two-pass.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"batch_stats: x must be a 4-D tensor [N, C, H, W], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"batch_stats: x must be a floating-point tensor, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"batch_stats: x of shape {tuple(x.shape)} is empty; statistics need at least one "
                         "value per channel")
    if not use_triton(x):
        return batch_stats_torch(x)
    return torch.ops.fastpreact.batch_stats(x.contiguous(memory_format=torch.channels_last))


def _per_channel(x, n):
    return tuple(x.new_empty((x.shape[1],), dtype=torch.float32) for _ in range(n))


def batch_stats_impl(x):
    """The statistics launches of batch_stats: (mean, biased var) of channels-last x."""
    return kernels("batch_stats").batch_stats_rows(rows(x), poison=poison())


@custom_op("batch_stats")
def _batch_stats_op(x: Tensor) -> Tuple[Tensor, Tensor]:
    return batch_stats_impl(x)


_batch_stats_op.register_fake(lambda x: _per_channel(x, 2))


def batch_norm_stats_impl(x, mean, var, eps, count, running_mean, running_var, num_batches_tracked, momentum,
                          update):
    """The statistics launch of batch_norm_stats: (mean, var, rstd); batch statistics of x when mean is
    None; with update, the running-statistics update and num_batches_tracked's increment in the same
    launch."""
    ks = kernels("batch_stats")
    run = {}
    if update:
        run = dict(running_mean=running_mean, running_var=running_var, num_batches_tracked=num_batches_tracked,
                   momentum=momentum, increment_nbt=True)
    if mean is None:
        return ks.batch_stats_rows(rows(x), poison(), eps=eps, **run)
    return mean, var, ks.bn_finalize(mean, var, eps, count, poison(), **run)


_RUNNING = ("running_mean", "running_var", "num_batches_tracked")


@custom_op("batch_norm_stats")
def _batch_norm_stats_op(x: Tensor, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """(mean, biased var, rstd) of channels-last x."""
    return batch_norm_stats_impl(x, None, None, eps, None, None, None, None, None, False)


@custom_op("batch_norm_stats_update", mutates_args=_RUNNING)
def _batch_norm_stats_update_op(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                                num_batches_tracked: Optional[Tensor], momentum: Optional[float],
                                eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """(mean, biased var, rstd) of channels-last x, updating the running statistics and the counter."""
    return batch_norm_stats_impl(x, None, None, eps, None, running_mean, running_var, num_batches_tracked,
                                 momentum, True)


@custom_op("bn_finalize")
def _bn_finalize_op(mean: Tensor, var: Tensor, eps: float, count: int) -> Tensor:
    """rstd from given (mean, biased var)."""
    return batch_norm_stats_impl(None, mean, var, eps, count, None, None, None, None, False)[2]


@custom_op("bn_finalize_update", mutates_args=_RUNNING)
def _bn_finalize_update_op(mean: Tensor, var: Tensor, running_mean: Optional[Tensor],
                           running_var: Optional[Tensor], num_batches_tracked: Optional[Tensor],
                           momentum: Optional[float], eps: float, count: int) -> Tensor:
    """rstd from given (mean, biased var) of `count` values, updating the running statistics and the
    counter."""
    return batch_norm_stats_impl(None, mean, var, eps, count, running_mean, running_var, num_batches_tracked,
                                 momentum, True)[2]


for _op in (_batch_norm_stats_op, _batch_norm_stats_update_op):
    _op.register_fake(lambda x, *args: _per_channel(x, 3))
for _op in (_bn_finalize_op, _bn_finalize_update_op):
    _op.register_fake(lambda mean, *args: torch.empty_like(mean))


def bn_args(bn: nn.BatchNorm2d, training: bool | None = None, shared_stats=None) -> dict:
    """The BatchNorm keyword arguments of the fused ops (bn_weight, bn_bias, running_mean, running_var,
    num_batches_tracked, training, momentum, eps) that make them normalise exactly as `bn` does, in
    `training` mode (default: bn.training), running buffers passed as nn.BatchNorm2d.forward passes them.

    shared_stats: (mean, var, rstd, use_batch_stats) from bn_statistics, for a second consumer of a
    pre-activation whose statistics the first consumer already took (and whose running statistics it
    already updated): batch statistics are then handed over as input_stats and no running statistics
    are given, so nothing is updated twice.
    """
    training = bn.training if training is None else bool(training)
    args = dict(bn_weight=bn.weight, bn_bias=bn.bias, momentum=bn.momentum, eps=bn.eps)
    if shared_stats is not None:
        mean, var, _, batch = shared_stats
        if batch:
            return dict(args, running_mean=None, running_var=None, num_batches_tracked=None, training=True,
                        input_stats=(mean, var))
        return dict(args, running_mean=bn.running_mean, running_var=bn.running_var, num_batches_tracked=None,
                    training=False)
    buffers = not training or bn.track_running_stats
    return dict(args, running_mean=bn.running_mean if buffers else None,
                running_var=bn.running_var if buffers else None,
                num_batches_tracked=bn.num_batches_tracked if training and bn.track_running_stats else None,
                training=training)


def check_vec(op, name, t, c, device):
    """A per-channel vector argument: None, or a floating [c] tensor on x's device."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor or None, got {type(t).__name__}")
    if t.shape != (c,):
        raise ValueError(f"{op}: {name} must have shape [{c}] (one value per channel), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but x is on {device}; move them to one device")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be floating point, got {t.dtype}")


def _check_stats_args(op, x, running_mean, running_var, training, input_stats):
    c = x.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        check_vec(op, name, t, c, x.device)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: give both running_mean and running_var, or neither")
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and c > 1 and t.stride(0) != 1:
            raise ValueError(f"{op}: {name} is updated in place and must be contiguous; pass the "
                             "BatchNorm buffer itself (or a .contiguous() copy)")
    if not (training or running_mean is None):
        return
    if training and x.numel() // c <= 1:
        raise ValueError(f"{op}: training needs more than 1 value per channel (x has shape "
                         f"{tuple(x.shape)}); use a larger batch or eval mode")
    if input_stats is not None:
        if not isinstance(input_stats, (tuple, list)) or len(input_stats) not in (2, 4):
            raise TypeError(f"{op}: input_stats must be a (mean, biased_var) pair of [C] tensors, or the "
                            "(mean, var, rstd, use_batch_stats) a producer's output_bn finished")
        for name, t in zip(("input_stats mean", "input_stats var", "input_stats rstd"), input_stats[:3]):
            check_vec(op, name, t, c, x.device)


def batch_norm_stats(x, running_mean=None, running_var=None, num_batches_tracked=None, *, training=True,
                     momentum=0.1, eps=1e-5, input_stats=None, op="batch_norm_stats"):
    """(mean, biased var, rstd, use_batch_stats), fp32 [C], that BatchNorm normalises channels-last x
    [N, C, H, W] with; in training the running statistics and num_batches_tracked are updated once.

    Batch statistics (training, or no running statistics) come from input_stats (a producer's
    epilogue) when given, else from one statistics pass; eval uses the running statistics. On the
    Triton backend the statistics, rstd, the running update and num_batches_tracked's increment take
    one launch, all on the device. input_stats of four entries (mean, var, rstd, use_batch_stats) were
    finished for this BatchNorm by the producer (its output_bn, running statistics updated): they are
    returned as they are.
    """
    _check_stats_args(op, x, running_mean, running_var, training, input_stats)
    if input_stats is not None and len(input_stats) == 4 and (training or running_mean is None):
        return tuple(input_stats)
    use_batch_stats = training or running_mean is None
    count = x.numel() // x.shape[1]
    if use_batch_stats and input_stats is not None:
        mean, var = (t.detach().float().contiguous() for t in input_stats)
    elif not use_batch_stats:
        mean, var = running_mean.detach().float().contiguous(), running_var.detach().float().contiguous()
    if not use_triton(x):
        if use_batch_stats and input_stats is None:
            mean, var = batch_stats_torch(x)
        if training:
            update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, count, momentum)
        return mean, var, torch.rsqrt(var + eps), use_batch_stats
    ops = torch.ops.fastpreact
    # In training the one launch also updates the running statistics (when given) and increments
    # num_batches_tracked (when given): F.batch_norm's rules, on the device.
    update = training and (running_mean is not None or num_batches_tracked is not None)
    run = (running_mean, running_var, num_batches_tracked, momentum)
    if use_batch_stats and input_stats is None:
        x = x.detach()
        return (*(ops.batch_norm_stats_update(x, *run, eps) if update else ops.batch_norm_stats(x, eps)),
                use_batch_stats)
    rstd = ops.bn_finalize_update(mean, var, *run, eps, count) if update else ops.bn_finalize(mean, var, eps, count)
    return mean, var, rstd, use_batch_stats


def bn_statistics(bn: nn.BatchNorm2d, x, input_stats=None):
    """batch_norm_stats with `bn`'s buffers, momentum, eps and mode: (mean, var, rstd, use_batch_stats),
    updating bn's running statistics once in training. x: channels-last, in the compute dtype."""
    args = bn_args(bn)
    del args["bn_weight"], args["bn_bias"]
    return batch_norm_stats(x, **args, input_stats=input_stats, op=type(bn).__name__)
