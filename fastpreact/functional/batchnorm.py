"""BatchNorm's half of every fused op: which arguments an nn.BatchNorm2d stands for, its stats, and its
finish (running statistics, num_batches_tracked) with nn.BatchNorm2d's exact semantics.

One path for stats: `_bn_stats` gives the BNStats an op normalises with, from the producer's
`input_stats`, one statistics launch, or the running statistics, and finishes the BatchNorm in training
(momentum, unbiased running variance, num_batches_tracked, momentum=None as the cumulative average) on
the device: no host synchronisation, so a training step can be captured in a CUDA graph. `bn_stats(bn,
x)` is the same for a BatchNorm module. Stats are constants for autograd: each op's backward carries the
whole gradient through the mean and variance.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .backends import eager, kernels, poison, rows, use_triton
from .library import custom_op
from .types import BNFinish, BNStats, as_stats

__all__ = ["batch_stats", "update_running_stats", "bn_args", "bn_stats", "check_vec"]


@torch.no_grad()
def update_running_stats(finish: BNFinish, mean, var, count):
    """nn.BatchNorm2d's finish in torch ops, from batch mean and biased variance over `count` values.

    momentum=None is the cumulative moving average (1 / num_batches_tracked, counted after this batch),
    computed on the device so that no host synchronisation happens. The running variance uses the
    unbiased estimate var * count / (count - 1).
    """
    running_mean, running_var, nbt, momentum, _ = finish
    if nbt is not None:
        nbt.add_(1)
    if running_mean is None:
        return
    if momentum is None:
        if nbt is None:
            return  # what F.batch_norm does with momentum 0.0
        factor = torch.reciprocal(nbt.to(running_mean.dtype))
    else:
        factor = float(momentum)
    unbiased = var * (count / max(count - 1, 1))
    running_mean.lerp_(mean.to(running_mean.dtype), factor)
    running_var.lerp_(unbiased.to(running_var.dtype), factor)


@torch.no_grad()
def _torch_batch_stats(x):
    """Per-channel mean and biased variance of NCHW x in fp32: two passes over values shifted by each
    channel's first value, as the kernel shifts each tile (so mean 1e3, std 1 costs no precision)."""
    xf = x.float()
    d = xf - xf[:1, :, :1, :1]
    d_mean = d.mean(dim=(0, 2, 3))
    var = (d - d_mean[None, :, None, None]).square().mean(dim=(0, 2, 3))
    return xf[0, :, 0, 0] + d_mean, var


@torch.no_grad()
def batch_stats(x: torch.Tensor) -> BNStats:
    """BNStats(mean, biased variance) fp32 [C] of x [N, C, H, W] over N, H, W (not finished); no gradient.

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
        return BNStats(*_torch_batch_stats(x))
    x = x.contiguous(memory_format=torch.channels_last)
    return BNStats(*(batch_stats_impl(x) if eager(x) else torch.ops.fastpreact.batch_stats(x)))


# ---------------------------------------------------------------------------------------------------
# The Triton implementations and their operators
# ---------------------------------------------------------------------------------------------------
def _per_channel(x, n):
    return tuple(x.new_empty((x.shape[1],), dtype=torch.float32) for _ in range(n))


def batch_stats_impl(x):
    """The statistics launch of batch_stats: (mean, biased var) of channels-last x."""
    return kernels("batch_stats").batch_stats(rows(x), poison=poison())


def bn_stats_impl(x, running_mean, running_var, num_batches_tracked, momentum, eps, update):
    """One launch: (mean, biased var, rstd) of channels-last x; with update, the BatchNorm's finish."""
    run = {}
    if update:
        run = dict(running_mean=running_mean, running_var=running_var, num_batches_tracked=num_batches_tracked,
                   momentum=momentum, increment_nbt=True)
    return kernels("batch_stats").batch_stats(rows(x), poison(), eps=eps, **run)


def bn_finish_impl(mean, var, running_mean, running_var, num_batches_tracked, momentum, eps, count, update):
    """One launch: rstd from given (mean, biased var) of `count` values; with update, the finish."""
    run = {}
    if update:
        run = dict(running_mean=running_mean, running_var=running_var, num_batches_tracked=num_batches_tracked,
                   momentum=momentum, increment_nbt=True)
    return kernels("batch_stats").bn_finish(mean, var, eps, count, poison(), **run)


_RUNNING = ("running_mean", "running_var", "num_batches_tracked")


@custom_op("batch_stats")
def _batch_stats_op(x: Tensor) -> Tuple[Tensor, Tensor]:
    return batch_stats_impl(x)


# The finishing variants declare the buffers they update; the plain ones mutate nothing (an operator that
# declares mutations but updates nothing trips inductor's re-inplacing of single-output operators).
@custom_op("bn_stats")
def _bn_stats_op(x: Tensor, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """(mean, biased var, rstd) of channels-last x."""
    return bn_stats_impl(x, None, None, None, None, eps, False)


@custom_op("bn_stats_update", mutates_args=_RUNNING)
def _bn_stats_update_op(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                        num_batches_tracked: Optional[Tensor], momentum: Optional[float],
                        eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """(mean, biased var, rstd) of channels-last x, finishing the BatchNorm (running statistics, counter)."""
    return bn_stats_impl(x, running_mean, running_var, num_batches_tracked, momentum, eps, True)


@custom_op("bn_finish")
def _bn_finish_op(mean: Tensor, var: Tensor, eps: float, count: int) -> Tensor:
    """rstd from (mean, biased var)."""
    return bn_finish_impl(mean, var, None, None, None, None, eps, count, False)


@custom_op("bn_finish_update", mutates_args=_RUNNING)
def _bn_finish_update_op(mean: Tensor, var: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                         num_batches_tracked: Optional[Tensor], momentum: Optional[float], eps: float,
                         count: int) -> Tensor:
    """rstd from (mean, biased var) of `count` values, finishing the BatchNorm (running statistics, counter)."""
    return bn_finish_impl(mean, var, running_mean, running_var, num_batches_tracked, momentum, eps, count, True)


_batch_stats_op.register_fake(lambda x: _per_channel(x, 2))
for _op in (_bn_stats_op, _bn_stats_update_op):
    _op.register_fake(lambda x, *args: _per_channel(x, 3))
for _op in (_bn_finish_op, _bn_finish_update_op):
    _op.register_fake(lambda mean, *args: torch.empty_like(mean))


# ---------------------------------------------------------------------------------------------------
# The arguments of a BatchNorm module, and the one stats path
# ---------------------------------------------------------------------------------------------------
def bn_args(bn: nn.BatchNorm2d, training: bool | None = None, shared_stats: BNStats | None = None) -> dict:
    """The BatchNorm keyword arguments of the fused ops (bn_weight, bn_bias, running_mean, running_var,
    num_batches_tracked, training, momentum, eps) that make them normalise exactly as `bn` does, in
    `training` mode (default: bn.training), running buffers passed as nn.BatchNorm2d.forward passes them.

    shared_stats: the BNStats a first consumer of the same pre-activation already took (and finished):
    batch stats are then handed over as input_stats and no running statistics are given, so nothing is
    updated twice.
    """
    training = bn.training if training is None else bool(training)
    # The parameter and buffer dicts directly: nn.Module.__getattr__ costs a microsecond a lookup, and
    # every fused call asks for seven of them.
    params, buffers = bn._parameters, bn._buffers
    args = dict(bn_weight=params.get("weight"), bn_bias=params.get("bias"), momentum=bn.momentum, eps=bn.eps)
    if shared_stats is not None:
        if shared_stats.batch:
            return dict(args, running_mean=None, running_var=None, num_batches_tracked=None, training=True,
                        input_stats=BNStats(shared_stats.mean, shared_stats.var))
        return dict(args, running_mean=buffers.get("running_mean"), running_var=buffers.get("running_var"),
                    num_batches_tracked=None, training=False)
    running = not training or bn.track_running_stats
    return dict(args, running_mean=buffers.get("running_mean") if running else None,
                running_var=buffers.get("running_var") if running else None,
                num_batches_tracked=buffers.get("num_batches_tracked") if training and bn.track_running_stats
                else None, training=training)


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


def _check_stats_args(op, x, finish: BNFinish, training, input_stats):
    c = x.shape[1]
    running_mean, running_var = finish.running_mean, finish.running_var
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
        for name, t in zip(("input_stats mean", "input_stats var", "input_stats rstd"), input_stats[:3]):
            check_vec(op, name, t, c, x.device)


def _bn_stats(x, finish: BNFinish, *, training=True, input_stats=None, op="bn_stats") -> BNStats:
    """The BNStats a BatchNorm normalises channels-last x [N, C, H, W] with; in training it is finished
    once (running statistics, num_batches_tracked).

    Batch stats (training, or no running statistics) come from input_stats (a producer's epilogue) when
    given, else from one statistics launch; eval uses the running statistics. On the Triton backend the
    stats, rstd, the running update and num_batches_tracked's increment take one launch, on the device.
    Finished input_stats (a producer finished this BatchNorm: next_bn) are returned as they are.
    """
    input_stats = as_stats(input_stats, op, x.shape[1])
    _check_stats_args(op, x, finish, training, input_stats)
    running_mean, running_var, nbt, momentum, eps = finish
    batch = training or running_mean is None
    if input_stats is not None and input_stats.finished and batch:
        return input_stats
    count = x.numel() // x.shape[1]
    if batch and input_stats is not None:
        mean, var = (t.detach().float().contiguous() for t in input_stats[:2])
    elif not batch:
        mean, var = running_mean.detach().float().contiguous(), running_var.detach().float().contiguous()
    if not use_triton(x):
        if batch and input_stats is None:
            mean, var = _torch_batch_stats(x)
        if training:
            update_running_stats(finish, mean, var, count)
        return BNStats(mean, var, torch.rsqrt(var + eps), batch)
    # In training the one launch also updates the running statistics (when given) and increments
    # num_batches_tracked (when given): F.batch_norm's rules, on the device.
    update = training and (running_mean is not None or nbt is not None)
    run = (running_mean, running_var, nbt, momentum, eps)
    ops = torch.ops.fastpreact
    if batch and input_stats is None:
        x = x.detach()
        if eager(x):
            out = bn_stats_impl(x, *run, update)
        else:
            out = ops.bn_stats_update(x, *run) if update else ops.bn_stats(x, eps)
        return BNStats(*out, batch)
    if eager(x):
        rstd = bn_finish_impl(mean, var, *run, count, update)
    else:
        rstd = ops.bn_finish_update(mean, var, *run, count) if update else ops.bn_finish(mean, var, eps, count)
    return BNStats(mean, var, rstd, batch)


def bn_stats(bn: nn.BatchNorm2d, x, input_stats=None) -> BNStats:
    """The BNStats `bn` normalises x with (channels-last, in the compute dtype), in bn's mode; in
    training bn is finished once (running statistics, num_batches_tracked)."""
    args = bn_args(bn)
    finish = BNFinish(args["running_mean"], args["running_var"], args["num_batches_tracked"], bn.momentum,
                      float(bn.eps))
    return _bn_stats(x, finish, training=args["training"], input_stats=input_stats, op=type(bn).__name__)
