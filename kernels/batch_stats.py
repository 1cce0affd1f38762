"""Per-channel batch statistics of a channels-last activation, viewed as a row-major matrix [M, C], and
BatchNorm's per-channel finish (rstd, running-statistics update) fused into the same launch.

Design limits: fp32 accumulation whatever the input dtype (fp32, fp16, bf16); int64 row offsets. The
result is the mean and the BIASED variance (what BatchNorm normalises with); the running variance gets
the unbiased one. One launch per call: every program writes its tile's partials, and the last program
of each channel block to finish (found with an atomic ticket) merges that block's partials in a fixed
order (deterministic) and finishes BatchNorm there (rstd, running statistics, num_batches_tracked). None
of it synchronises with the host: momentum=None (cumulative average) reads num_batches_tracked on the
device. The tickets live in one zeroed int32 buffer per device and stream (kernels/tickets.py); the
program that takes the last ticket sets it back to 0, so no call needs a fill and CUDA graphs can
capture it.

Numerics: a single-pass sum of squares loses everything when the mean is large against the spread
(mean 1e3, std 1 in fp32 leaves ~2 significant bits of the variance), and even a plain sum of 64 values
of 1e3 loses a few ulps of the mean. So every tile of rows produces (count, mean, M2 about the tile's
own mean) from values shifted by the tile's first row, and tiles are merged, in coordinates shifted by
the first tile's mean, with Chan et al.'s formula
    n = na + nb,  d = mean_b - mean_a,  mean = mean_a + d * nb / n,  M2 = M2a + M2b + d^2 * na * nb / n
so no quantity ever carries the squared mean, and the mean is rounded once at the end. The GEMM
epilogue of bn_relu_conv1x1 emits the same per-tile partials for the statistics of its output and
merges them with the same `_merge_chunks`, in its own last program.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .cards import card_of
from .configs import tiles
from .tickets import tickets
from .tuning import Plan, cdiv, fp32_buffer, fp32_empty, launch, launch_planned, plan_cache


@triton.jit
def _tile_mean_m2(v, mask, count):
    """Per-column (mean, M2 about the mean) of the valid rows of a tile v [rows, cols] (fp32, count valid
    rows, the first row always valid). The tile is shifted by its first row before summing, so a large
    common offset (mean 1e3, std 1) costs no precision: sum(v - v0) is a sum of O(std) terms."""
    first = tl.arange(0, v.shape[0]) == 0
    v0 = tl.sum(tl.where(first[:, None], v, 0.0), axis=0)
    d = tl.where(mask, v - v0[None, :], 0.0)
    d_mean = tl.sum(d, axis=0) / count
    dev = tl.where(mask, d - d_mean[None, :], 0.0)
    return v0 + d_mean, tl.sum(dev * dev, axis=0)


@triton.jit
def _take_last_ticket(ticket_ptr, expected):
    """True in the one program that takes the last of `expected` tickets at ticket_ptr (an int32 counter
    at 0), which it sets back to 0. The barrier puts every thread's earlier stores before the ticket,
    which the atomic publishes (release); the last program's later loads come after every ticket
    (acquire)."""
    tl.debug_barrier()
    ticket = tl.atomic_add(ticket_ptr, 1)
    last = ticket == expected - 1
    if last:
        tl.atomic_xchg(ticket_ptr, 0)
    return last


@triton.jit
def _count_batch(ticket_ptr, expected, nbt_ptr, INCREMENT_NBT: tl.constexpr):
    """num_batches_tracked += 1, by the last of `expected` finishing programs (every one of them has read
    the counter before taking its ticket)."""
    if INCREMENT_NBT:
        if _take_last_ticket(ticket_ptr, expected):
            tl.store(nbt_ptr, tl.load(nbt_ptr) + 1)


# Stage 1, per tile of rows [pid_m*BLOCK_M, +BLOCK_M) and channels [pid_c*BLOCK_C, +BLOCK_C):
#   n_t = number of valid rows;  mean_t[c] = x0[c] + sum_r (x[r, c] - x0[c]) / n_t  (x0: the tile's first
#   row);  M2_t[c] = sum_r (x[r, c] - mean_t[c])^2  (two passes over the tile held in registers, so
#   neither the mean nor M2 ever sums squares or values of the size of the mean).
@triton.jit
def _stats_tile(x_ptr, part_mean_ptr, part_m2_ptr, pid_m, cols, col_ok, M, C, stride_xm,
                BLOCK_M: tl.constexpr):
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = (rows < M)[:, None] & col_ok[None, :]
    ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :]
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    count = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
    mean, m2 = _tile_mean_m2(x, mask, count)
    out = pid_m * C + cols
    tl.store(part_mean_ptr + out, mean, mask=col_ok)
    tl.store(part_m2_ptr + out, m2, mask=col_ok)


# BatchNorm's per-channel finish, shared by every kernel that ends in batch statistics:
#   rstd = 1 / sqrt(var + eps)
#   training (UPDATE_RUNNING): running <- running + f * (batch - running)   (nn.BatchNorm2d's momentum
#   update, f = momentum, or f = 1 / num_batches_tracked for momentum=None, read on the device so the
#   host never synchronises; with INCREMENT_NBT the counter is read before this call's increment, so
#   f = 1 / (num_batches_tracked + 1)), with the UNBIASED variance var * n / (n - 1) for running_var.
@triton.jit
def _bn_finish(mean, var, cols, col_ok, rstd_ptr, running_mean_ptr, running_var_ptr, nbt_ptr,
               eps, momentum, unbias, WRITE_RSTD: tl.constexpr, UPDATE_RUNNING: tl.constexpr,
               MOMENTUM_FROM_NBT: tl.constexpr, INCREMENT_NBT: tl.constexpr):
    if WRITE_RSTD:
        tl.store(rstd_ptr + cols, 1.0 / tl.sqrt_rn(var + eps), mask=col_ok)
    if UPDATE_RUNNING:
        if MOMENTUM_FROM_NBT:
            factor = 1.0 / (tl.load(nbt_ptr) + INCREMENT_NBT).to(tl.float32)
        else:
            factor = momentum
        rm = tl.load(running_mean_ptr + cols, mask=col_ok, other=0.0)
        rv = tl.load(running_var_ptr + cols, mask=col_ok, other=0.0)
        new_rm = rm.to(tl.float32) + factor * (mean - rm.to(tl.float32))
        new_rv = rv.to(tl.float32) + factor * (var * unbias - rv.to(tl.float32))
        tl.store(running_mean_ptr + cols, new_rm.to(rm.dtype), mask=col_ok)
        tl.store(running_var_ptr + cols, new_rv.to(rv.dtype), mask=col_ok)


# Stage 2: merge the per-tile partials of one block of channels. Tile p holds
#   n_p = min(rows_per_block, M - p*rows_per_block) rows (known from its index, not stored).
# Everything runs in coordinates shifted by the first tile's mean s (so no sum or running value carries
# the size of the mean, and the result is rounded once, at the end). A chunk of BLOCK_P tiles is first
# combined directly,
#   n_k = sum n_p,  d_k = sum n_p (mean_p - s) / n_k,  M2_k = sum (M2_p + n_p (mean_p - s - d_k)^2),
# then folded into the running (n, d, M2) with Chan's formula; mean = s + d. Output: mean and biased
# var = M2 / M. The loop order is fixed, so the result is deterministic. The partials are read through
# L2 (.cg): in a kernel whose last program merges, other programs wrote them.
@triton.jit
def _merge_chunks(part_mean_ptr, part_m2_ptr, cols, col_ok, num_blocks, M, C, rows_per_block,
                  BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    run_n = tl.zeros([BLOCK_C], dtype=tl.float32)
    run_d = tl.zeros([BLOCK_C], dtype=tl.float32)
    run_m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    shift = tl.load(part_mean_ptr + cols, mask=col_ok, other=0.0, cache_modifier=".cg")
    for p0 in range(0, num_blocks, BLOCK_P):
        blocks = p0 + tl.arange(0, BLOCK_P)
        blk_ok = blocks < num_blocks
        mask = blk_ok[:, None] & col_ok[None, :]
        offs = blocks.to(tl.int64)[:, None] * C + cols[None, :]
        p_mean = tl.load(part_mean_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
        p_m2 = tl.load(part_m2_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
        p_n = tl.minimum(M - blocks * rows_per_block, rows_per_block)
        p_n = tl.where(blk_ok, p_n, 0).to(tl.float32)
        k_n = tl.sum(p_n, axis=0)  # scalar: rows in this chunk
        s_p = tl.where(mask, p_mean - shift[None, :], 0.0)
        k_d = tl.sum(p_n[:, None] * s_p, axis=0) / k_n
        d_p = tl.where(mask, s_p - k_d[None, :], 0.0)
        k_m2 = tl.sum(p_m2 + p_n[:, None] * d_p * d_p, axis=0)
        new_n = run_n + k_n
        delta = k_d - run_d
        run_d = run_d + delta * (k_n / new_n)
        run_m2 = run_m2 + k_m2 + delta * delta * (run_n * k_n / new_n)
        run_n = new_n
    return shift + run_d, run_m2 / run_n


# Both stages in one launch: program (m, c) writes tile m's partials of channel block c; the last
# program of channel block c to finish (ticket c) merges the block's partials and finishes BatchNorm;
# the last of those (ticket num_c_blocks) increments num_batches_tracked.
@triton.jit
def _batch_stats_kernel(
    x_ptr,            # [M, C] row-major view of the channels-last activation (any float dtype)
    part_ptr,         # [2, num_m_blocks, C] fp32 scratch: per-tile mean, then per-tile M2
    mean_ptr, var_ptr, rstd_ptr,  # [C] fp32 out (rstd when WRITE_RSTD)
    running_mean_ptr, running_var_ptr, nbt_ptr,  # [C], [C], [] updated in place (see _bn_finish)
    ticket_ptr,       # [num_c_blocks + 1] int32 tickets, all 0
    M, C, stride_xm,
    eps, momentum, unbias,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, WRITE_RSTD: tl.constexpr,
    UPDATE_RUNNING: tl.constexpr, MOMENTUM_FROM_NBT: tl.constexpr, INCREMENT_NBT: tl.constexpr,
):
    pid_c = tl.program_id(1)
    part_mean_ptr = part_ptr
    part_m2_ptr = part_ptr + tl.num_programs(0) * C
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    _stats_tile(x_ptr, part_mean_ptr, part_m2_ptr, tl.program_id(0), cols, col_ok, M, C, stride_xm, BLOCK_M)
    num_m = tl.num_programs(0)
    if _take_last_ticket(ticket_ptr + pid_c, num_m):
        mean, var = _merge_chunks(part_mean_ptr, part_m2_ptr, cols, col_ok, num_m, M, C, BLOCK_M,
                                  BLOCK_P, BLOCK_C)
        tl.store(mean_ptr + cols, mean, mask=col_ok)
        tl.store(var_ptr + cols, var, mask=col_ok)
        _bn_finish(mean, var, cols, col_ok, rstd_ptr, running_mean_ptr, running_var_ptr, nbt_ptr, eps,
                   momentum, unbias, WRITE_RSTD, UPDATE_RUNNING, MOMENTUM_FROM_NBT, INCREMENT_NBT)
        _count_batch(ticket_ptr + tl.num_programs(1), tl.num_programs(1), nbt_ptr, INCREMENT_NBT)


# BatchNorm's finish from statistics already known (a producer's epilogue statistics, or the running
# statistics in eval mode): rstd, and in training the running-statistics update (see _bn_finish).
@triton.jit
def _bn_finalize_kernel(
    mean_ptr,         # [C] fp32 batch (or running) mean
    var_ptr,          # [C] fp32 biased batch (or running) variance
    rstd_ptr,         # [C] fp32 out
    running_mean_ptr,  # [C] updated in place (when UPDATE_RUNNING)
    running_var_ptr,  # [C] updated in place (when UPDATE_RUNNING)
    nbt_ptr,          # [] int64 num_batches_tracked (incremented here with INCREMENT_NBT)
    ticket_ptr,       # [1] int32 ticket, 0 (used with INCREMENT_NBT)
    C, eps, momentum, unbias,
    BLOCK_C: tl.constexpr, UPDATE_RUNNING: tl.constexpr, MOMENTUM_FROM_NBT: tl.constexpr,
    INCREMENT_NBT: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mean = tl.load(mean_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    var = tl.load(var_ptr + cols, mask=col_ok, other=1.0).to(tl.float32)
    _bn_finish(mean, var, cols, col_ok, rstd_ptr, running_mean_ptr, running_var_ptr, nbt_ptr, eps,
               momentum, unbias, True, UPDATE_RUNNING, MOMENTUM_FROM_NBT, INCREMENT_NBT)
    _count_batch(ticket_ptr, tl.num_programs(0), nbt_ptr, INCREMENT_NBT)


# ----------------------------------------------------------------------------------------- launchers
def running_flags(running_mean, num_batches_tracked, momentum, increment_nbt):
    """(UPDATE_RUNNING, MOMENTUM_FROM_NBT, INCREMENT_NBT) of a BatchNorm's finish: no update without running
    statistics, or with momentum None and no counter (what F.batch_norm does with momentum 0); momentum
    None takes it from the counter; the counter is incremented when asked and present."""
    update = running_mean is not None and (momentum is not None or num_batches_tracked is not None)
    return update, update and momentum is None, bool(increment_nbt) and num_batches_tracked is not None


def _running_args(running_mean, running_var, num_batches_tracked, momentum, increment_nbt, dummy):
    """Kernel arguments of the running-statistics update and of the counter's increment (running_flags)."""
    update, from_nbt, inc = running_flags(running_mean, num_batches_tracked, momentum, increment_nbt)
    return dict(
        ptrs=(running_mean if update else dummy, running_var if update else dummy,
              num_batches_tracked if (from_nbt or inc) else dummy),
        momentum=0.0 if momentum is None else float(momentum),
        flags=dict(UPDATE_RUNNING=update, MOMENTUM_FROM_NBT=from_nbt, INCREMENT_NBT=inc))


def bn_finish(mean, var, eps, count, poison=False, *, running_mean=None, running_var=None,
                num_batches_tracked=None, momentum=0.1, increment_nbt=False):
    """rstd = 1/sqrt(var + eps) fp32 [C], with the running-statistics update when running_mean is given
    (count = values per channel behind mean/var; num_batches_tracked already incremented, or incremented
    in the same launch with increment_nbt=True)."""
    C = mean.shape[0]
    dev = mean.device
    rstd = fp32_empty((C,), dev, poison)
    run = _running_args(running_mean, running_var, num_batches_tracked, momentum, increment_nbt, rstd)
    block_c = tiles("batch_stats", card_of(dev))["MERGE_BLOCK_C"]
    launch(_bn_finalize_kernel, (cdiv(C, block_c),),
           (mean, var, rstd, *run["ptrs"], tickets(dev, 1), C, float(eps), run["momentum"], count / max(count - 1, 1)),
           dev, BLOCK_C=block_c, **run["flags"], num_warps=4)
    return rstd


def batch_stats(x2d, poison=False, plan=None, **bn):
    """(mean, biased var) fp32 [C] over the rows of x2d [M, C] (unit stride along C, any row stride), in
    one launch.

    bn: eps (then (mean, var, rstd = 1/sqrt(var + eps)) is returned) and running_mean, running_var,
    num_batches_tracked, momentum: nn.BatchNorm2d's running-statistics update, done in the same launch
    (num_batches_tracked already incremented, or incremented in the same launch with increment_nbt=True).
    x2d may also be a channels-last contiguous [N, C, H, W] tensor: its rows, without the view.
    plan: batch_stats_plan(x2d, **bn) (kept by a caller that repeats the shape and flags), or None."""
    if plan is None:
        plan = batch_stats_plan(x2d, **bn)
    M, C, stride_m, write_rstd, update, from_nbt, inc, _ = plan.key
    part_shape, n_tickets, unbias = plan.sizes
    dev = x2d.device
    part = fp32_empty(part_shape, dev, poison)  # one allocation: the kernel finds the M2 half
    mean, var = fp32_buffer(part, poison, C), fp32_buffer(part, poison, C)
    rstd = fp32_buffer(part, poison, C) if write_rstd else mean
    ptrs = (bn["running_mean"] if update else mean, bn["running_var"] if update else mean,
            bn["num_batches_tracked"] if (from_nbt or inc) else mean)
    momentum = bn.get("momentum", 0.1)
    launch_planned(_batch_stats_kernel, plan,
                   (x2d, part, mean, var, rstd, *ptrs, tickets(dev, n_tickets), M, C, stride_m,
                    float(bn["eps"]) if write_rstd else 0.0, 0.0 if momentum is None else float(momentum), unbias),
                   dev)
    return (mean, var, rstd) if write_rstd else (mean, var)


def batch_stats_plan(x2d, **bn) -> Plan:
    """The launch plan of batch_stats on x2d with these BatchNorm keywords (see batch_stats), the
    arguments checked."""
    if x2d.dim() == 4:
        M, C, stride_m = x2d.numel() // max(x2d.shape[1], 1), x2d.shape[1], x2d.shape[1]
        if not x2d.is_contiguous(memory_format=torch.channels_last):
            raise ValueError("batch_stats: a 4-d x2d must be channels-last contiguous")
    else:
        (M, C), stride_m = x2d.shape, x2d.stride(0)
        if x2d.stride(1) != 1 and C > 1:
            raise ValueError("batch_stats: x2d must have unit stride along channels; make the activation "
                             "channels-last contiguous first")
    if M == 0:
        raise ValueError("batch_stats: no rows (empty batch); statistics need at least one value")
    update, from_nbt, inc = running_flags(bn.get("running_mean"), bn.get("num_batches_tracked"),
                                          bn.get("momentum", 0.1), bn.get("increment_nbt", False))
    key = (M, C, stride_m, bn.get("eps") is not None, update, from_nbt, inc, card_of(x2d.device))
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _plan(key)
    return plan


_PLANS = plan_cache()  # (M, C, row stride, flags, card) -> Plan of batch_stats


def _plan(key) -> Plan:
    M, C, _, write_rstd, update, from_nbt, inc, card = key
    tile = tiles("batch_stats", card)
    num_blocks, c_blocks = cdiv(M, tile["BLOCK_M"]), cdiv(C, tile["BLOCK_C"])
    return Plan(key, ((2, num_blocks, C), c_blocks + 1, M / max(M - 1, 1)),
                dict(BLOCK_M=tile["BLOCK_M"], BLOCK_C=tile["BLOCK_C"], BLOCK_P=tile["BLOCK_P"], WRITE_RSTD=write_rstd,
                     UPDATE_RUNNING=update, MOMENTUM_FROM_NBT=from_nbt, INCREMENT_NBT=inc, num_warps=tile["num_warps"]),
                grid=(num_blocks, c_blocks))
