"""The fused 1x1 forward: y = relu(bn(x))[rows] @ W^T (+ bias) (+ residual), with the statistics of y
(the next BatchNorm's) in the epilogue, and that BatchNorm finished by the last program.

Cost per call (M output rows, K = C_in, N = C_out, e bytes per element): 2*M*K*N FLOPs;
bytes ~ e*(M*K + N*K + M*N [+ M*N residual]) (+ the tiny per-tile statistics partials); x at its own
element size, the rest at the compute dtype's (W at its own).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..batch_stats import (_bn_finish, _count_batch, _merge_chunks, _take_last_ticket, _tile_mean_m2,
                           running_flags)
from ..cards import card_of
from ..configs import min_param
from ..tickets import tickets
from ..tuning import Plan, TunedKernel, cdiv, fp32_buffer, plan_cache
from .common import (_bn_apply, _bn_coeffs, _grouped_tile, _input_rows, _mma, channels_last_buffer,
                     channels_last_strides, dot_precision, out_size, tune_dtype)

__all__ = ["bn_relu_conv1x1_fwd", "fwd_plan"]


# ---------------------------------------------------------------------------------------------------
# Forward:  y[m, n] = sum_k relu(z[r(m), k]) * W[n, k]  (+ bias[n]) (+ res[m, n]),
#           z = (x - mean) * gamma * rstd + beta  (_bn_apply)
# with fp32 accumulation, r(m) the strided row gather; x in its own dtype, z in fp32 from it; a = relu(z)
# and W (any float dtype) rounded to y's dtype (the compute dtype) before the product. Optional epilogue
# statistics of y AS STORED (after the residual and the rounding to y's dtype): per tile of BLOCK_M rows,
# (mean_t, M2_t about mean_t) per column; the last row tile of each column block to finish (atomic
# ticket) merges them with Chan's formula in a fixed order (kernels/batch_stats.py) and writes the mean
# and biased variance of y; with NEXT_FINISH it also finishes the next BatchNorm (the one that consumes y) (rstd,
# running statistics, num_batches_tracked: _bn_finish).
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _bn_relu_conv1x1_fwd_kernel(
    x_ptr,            # [M_in, K] input rows, x's own dtype
    w_ptr,            # [N, K] 1x1 conv weight, any float dtype (rounded to the compute dtype)
    mean_ptr,         # [K] fp32 BN mean (batch or running)
    rstd_ptr,         # [K] fp32 BN 1/sqrt(var + eps)
    gamma_ptr,        # [K] fp32 BN weight
    beta_ptr,         # [K] fp32 BN bias
    bias_ptr,         # [N] fp32 conv bias (unused unless HAS_BIAS)
    res_ptr,          # [M, N] residual rows, compute dtype (unused unless HAS_RESIDUAL)
    y_ptr,            # [M, N] output rows, compute dtype; with SPLIT_OUT [M, split]
    y2_ptr,           # [M, N - split] second output with SPLIT_OUT (else unused)
    part_ptr,         # [2, max_blocks, N] fp32 per-tile mean, then M2, of y (unused unless OUTPUT_STATS)
    stats_mean_ptr,   # [N] fp32 out: mean of y (unused unless OUTPUT_STATS)
    stats_var_ptr,    # [N] fp32 out: biased variance of y (unused unless OUTPUT_STATS)
    ticket_ptr,       # [cdiv(N, BLOCK_N) + 1] int32 tickets at 0 (unused unless OUTPUT_STATS)
    next_rstd_ptr,    # [next_channels] fp32 out: the next BatchNorm's rstd (unused unless NEXT_FINISH)
    next_rm_ptr, next_rv_ptr, next_nbt_ptr,  # its running statistics and counter (NEXT_UPDATE_RUNNING, ...)
    next_eps, next_momentum, next_unbias,    # its eps, momentum, M / (M - 1)
    next_channels,    # columns of y the next BatchNorm normalises (the first output's)
    M, K, N,          # output rows, input channels, output channels
    H, W, Ho, Wo,     # input / output spatial size (row gather when STRIDE == 2)
    split,            # columns of the first output when SPLIT_OUT
    max_blocks,       # row tiles part_ptr holds per half (>= cdiv(M, BLOCK_M))
    STRIDE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    SPLIT_OUT: tl.constexpr, OUTPUT_STATS: tl.constexpr, NEXT_FINISH: tl.constexpr,
    NEXT_UPDATE_RUNNING: tl.constexpr, NEXT_MOMENTUM_FROM_NBT: tl.constexpr, NEXT_INCREMENT_NBT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    num_pid_m = tl.cdiv(M, BLOCK_M)
    pid_m, pid_n = _grouped_tile(tl.program_id(0), num_pid_m, tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    in_rows = _input_rows(tl.where(m_ok, offs_m, 0), H, W, Ho, Wo, STRIDE).to(tl.int64)
    x_rows = x_ptr + in_rows[:, None] * K
    w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * K

    cdt = y_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        k_ok = ks < K
        xt = tl.load(x_rows + ks[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        mean, scale, beta = _bn_coeffs(ks, k_ok, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr)
        a = tl.maximum(_bn_apply(xt, mean, scale, beta), 0.0).to(cdt)
        wt = tl.load(w_cols + ks[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _mma(a, wt.to(cdt), acc, DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    rows64 = offs_m.to(tl.int64)
    out_mask = m_ok[:, None] & n_ok[None, :]
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + rows64[:, None] * N + offs_n[None, :], mask=out_mask, other=0.0)
        acc += res.to(tl.float32)
    y = acc.to(y_ptr.dtype.element_ty)
    _store_output(y, y_ptr, y2_ptr, rows64, offs_n, out_mask, N, split, SPLIT_OUT)

    if OUTPUT_STATS:
        count = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
        tile_mean, tile_m2 = _tile_mean_m2(y.to(tl.float32), out_mask, count)
        part_mean_ptr = part_ptr  # one allocation: the M2 half follows the means
        part_m2_ptr = part_ptr + max_blocks * N
        tl.store(part_mean_ptr + pid_m * N + offs_n, tile_mean, mask=n_ok)
        tl.store(part_m2_ptr + pid_m * N + offs_n, tile_m2, mask=n_ok)
        if _take_last_ticket(ticket_ptr + pid_n, num_pid_m):
            out_mean, out_var = _merge_chunks(part_mean_ptr, part_m2_ptr, offs_n, n_ok, num_pid_m, M, N,
                                              BLOCK_M, 8, BLOCK_N)
            tl.store(stats_mean_ptr + offs_n, out_mean, mask=n_ok)
            tl.store(stats_var_ptr + offs_n, out_var, mask=n_ok)
            if NEXT_FINISH:
                num_pid_n = tl.cdiv(N, BLOCK_N)
                _bn_finish(out_mean, out_var, offs_n, n_ok & (offs_n < next_channels), next_rstd_ptr, next_rm_ptr,
                           next_rv_ptr, next_nbt_ptr, next_eps, next_momentum, next_unbias, True, NEXT_UPDATE_RUNNING,
                           NEXT_MOMENTUM_FROM_NBT, NEXT_INCREMENT_NBT)
                _count_batch(ticket_ptr + num_pid_n, num_pid_n, next_nbt_ptr, NEXT_INCREMENT_NBT)


@triton.jit
def _store_output(y, y_ptr, y2_ptr, rows64, offs_n, out_mask, N, split, SPLIT_OUT: tl.constexpr):
    """y's tile into y (or, with SPLIT_OUT, columns [0, split) into y and the rest into y2)."""
    if SPLIT_OUT:
        in_a = offs_n < split
        tl.store(y_ptr + rows64[:, None] * split + offs_n[None, :], y, mask=out_mask & in_a[None, :])
        tl.store(y2_ptr + rows64[:, None] * (N - split) + (offs_n - split)[None, :], y,
                 mask=out_mask & (~in_a)[None, :])
    else:
        tl.store(y_ptr + rows64[:, None] * N + offs_n[None, :], y, mask=out_mask)


# The kernel finishes the next BatchNorm in place: its running statistics and counter are saved
# before and restored after the tuner times the candidate tiles.
FORWARD = TunedKernel(_bn_relu_conv1x1_fwd_kernel, "bn_relu_conv1x1_fwd",
                      restore=("next_rm_ptr", "next_rv_ptr", "next_nbt_ptr"))


def bn_relu_conv1x1_fwd(x, weight2d, mean, rstd, gamma, beta, *, stride=1, bias=None, residual=None,
                        split=0, output_stats=False, next_bn=None, out_dtype=None, poison=False, plan=None):
    """y = relu((x - mean) * gamma * rstd + beta) (*) weight2d [+ bias] [+ residual].

    x: [N, K, H, W] channels-last contiguous, its own dtype; out_dtype: the compute dtype (default x's):
    y's dtype, and what relu(z) and the weight are rounded to before the product (under autocast with an
    fp32 x, the autocast dtype: x itself is never rounded); weight2d: [Cout, K] contiguous (any float dtype);
    mean, rstd, gamma, beta: [K] fp32 contiguous; bias: [Cout] fp32 or None;
    residual: [N, Cout, Ho, Wo] channels-last contiguous (out_dtype) or None.
    split > 0: two outputs with split and Cout - split channels (one GEMM).
    next_bn (with output_stats): dict(eps, running_mean, running_var, num_batches_tracked, momentum) of the
    BatchNorm in training that consumes y (its first split channels when split): the same launch
    also finishes it (rstd, running-statistics update, num_batches_tracked incremented).
    Returns (y or (y_a, y_b), (mean, biased var[, rstd with next_bn]) of the output as stored, or None).
    plan: fwd_plan's for these arguments' shapes and flags (kept by a caller that repeats them), or None.
    """
    if plan is None:
        plan = fwd_plan(x, weight2d, stride=stride, bias=bias, residual=residual, split=split,
                        output_stats=output_stats, next_bn=next_bn, out_dtype=out_dtype)
    next_flags, dt, card = plan.key[8], plan.key[9], plan.key[10]
    dev = x.device
    (y_shape, y_strides, y2_shape, y2_strides, cout, n_tickets, M, K, H, W, Ho, Wo, max_blocks, unbias, channels,
     grid) = plan.sizes
    like = residual if residual is not None else x
    if split:
        y = channels_last_buffer(like, y_shape, y_strides, dt, poison)
        y2 = channels_last_buffer(like, y2_shape, y2_strides, dt, poison)
    else:
        y = y2 = channels_last_buffer(like, y_shape, y_strides, dt, poison)
    if output_stats:  # mean is fp32 (see above): the template of the fp32 buffers
        part = fp32_buffer(mean, poison, 2, max_blocks, cout)
        stats = (fp32_buffer(mean, poison, cout), fp32_buffer(mean, poison, cout))
        ticket = tickets(dev, n_tickets)
    else:
        part = ticket = mean  # never touched (OUTPUT_STATS is False)
        stats = None
    if next_flags is not None:
        next_rstd = fp32_buffer(mean, poison, channels)
        update, from_nbt, inc = next_flags
        momentum = next_bn.get("momentum", 0.1)
        fin = (next_rstd, next_bn["running_mean"] if update else next_rstd,
               next_bn["running_var"] if update else next_rstd,
               next_bn["num_batches_tracked"] if (from_nbt or inc) else next_rstd,
               float(next_bn["eps"]), 0.0 if momentum is None else float(momentum), unbias, channels)
    else:
        fin = (mean, mean, mean, mean, 0.0, 0.0, 1.0, 0)
    args = (x, weight2d, mean, rstd, gamma, beta, bias if bias is not None else mean,
            residual if residual is not None else x, y, y2, part, *(stats or (mean, mean)), ticket,
            *fin, M, K, cout, H, W, Ho, Wo, split, max_blocks)
    FORWARD.run_planned(plan, grid, args, card=card, device=dev, dtype=tune_dtype(x.dtype, dt))
    if next_flags is not None:
        stats = (*stats, fin[0])
    return ((y, y2) if split else y), stats


def fwd_plan(x, weight2d, *, stride=1, bias=None, residual=None, split=0, output_stats=False, next_bn=None,
             out_dtype=None) -> Plan:
    """The launch plan of bn_relu_conv1x1_fwd with these arguments (tensors for their shapes and dtypes,
    next_bn for its flags: which running statistics it has, momentum None or not)."""
    dt = x.dtype if out_dtype is None else out_dtype
    next_flags = None if next_bn is None else running_flags(
        next_bn.get("running_mean"), next_bn.get("num_batches_tracked"), next_bn.get("momentum", 0.1), True)
    key = (x.shape, x.dtype, weight2d.shape[0], stride, bias is not None, residual is not None, split, output_stats,
           next_flags, dt, card_of(x.device), dot_precision(dt))
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _plan(key)
    return plan


_PLANS = plan_cache()  # key (shapes, dtypes, flags, card) -> Plan


def _plan(key) -> Plan:
    """The sizes of one forward launch (see bn_relu_conv1x1_fwd's key)."""
    x_shape, _, cout, stride, _, _, split, output_stats, _, _, card, _ = key
    Nb, K, H, W = x_shape
    Ho, Wo = out_size(H, stride), out_size(W, stride)
    M = Nb * Ho * Wo
    max_blocks = cdiv(M, min_param(FORWARD.name, card, "BLOCK_M")) if output_stats else 0
    n_tickets = cdiv(cout, min_param(FORWARD.name, card, "BLOCK_N")) + 1

    def grid(tile):
        return (cdiv(M, tile["BLOCK_M"]) * cdiv(cout, tile["BLOCK_N"]),)

    c_a, c_b = split or cout, cout - split
    return Plan(key, ((Nb, c_a, Ho, Wo), channels_last_strides(Nb, c_a, Ho, Wo), (Nb, c_b, Ho, Wo),
                 channels_last_strides(Nb, c_b, Ho, Wo), cout, n_tickets, M, K, H, W, Ho, Wo, max_blocks,
                 M / max(M - 1, 1), c_a, grid), _constexprs(key))


def _constexprs(key) -> dict:
    _, _, _, stride, has_bias, has_residual, split, output_stats, next_flags, dt, _, precision = key
    update, from_nbt, inc = next_flags or (False, False, False)
    return dict(STRIDE=stride, HAS_BIAS=has_bias, HAS_RESIDUAL=has_residual, SPLIT_OUT=split > 0,
                OUTPUT_STATS=output_stats, NEXT_FINISH=next_flags is not None, NEXT_UPDATE_RUNNING=update,
                NEXT_MOMENTUM_FROM_NBT=from_nbt, NEXT_INCREMENT_NBT=inc, DOT_PRECISION=precision)
