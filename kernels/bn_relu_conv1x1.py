"""Fused BatchNorm-apply + ReLU + 1x1 convolution, forward and backward, in Triton.

A channels-last activation [N, C, H, W] is the row-major matrix X [M_in = N*H*W, K = C]; a 1x1 conv with
weight W [N_out, K] is a GEMM over its rows, and BatchNorm + ReLU is a per-column affine map and max(0, .)
applied to the GEMM's A operand as it is loaded (the "prologue"), so neither the BN output nor the ReLU
output ever exists in memory, in forward or in backward.

    z = (x - mean) * scale + beta    scale = gamma * rstd          (fp32, per column; centred first)
    a = relu(z)                      rounded to the compute dtype before the tensor-core product
    y = a[rows] @ W^T (+ bias) (+ residual)      rows: output row (n, ho, wo) reads input row (n, s*ho, s*wo)

Backward (xhat = (x - mean) * rstd, Mb = M_in rows of the BN batch):
    dW    = a[rows]^T @ dy                       (a recomputed from x in the prologue; split over M)
    dz    = (dy @ W) * [z > 0]                   at the sampled rows; 0 at rows a stride-2 conv skips
    dbeta = sum_rows dz,  dgamma = sum_rows dz * xhat          (epilogue of the dz GEMM, two-stage)
    dx    = scale * (dz - dbeta / Mb - xhat * dgamma / Mb)    (batch statistics; eval: scale * dz)
          [+ a gradient already flowing into x, e.g. through an identity shortcut]

Design limits: x, W, dy, residual in one compute dtype (fp32, fp16 or bf16); mean/rstd/gamma/beta fp32
(z is formed inside the kernels, so the host launches nothing for scale/shift);
all matrices contiguous row-major (channels-last contiguous tensors); stride 1 or 2; fp32 accumulation.
fp32 products use TF32 exactly when cuDNN convolutions would (torch.backends.cudnn.allow_tf32).
A "dual" output (SPLIT_OUT) writes columns [0, n_split) of y to one tensor and the rest to another, so
two convs sharing one pre-activation run as one GEMM with concatenated weights and still produce two
contiguous channels-last outputs (and take two gradients in backward).

Cost per call (M = output rows, Mi = input rows, K = C_in, N = C_out, e = bytes per element; bytes are
the compulsory traffic, each tensor once: tiles re-read from L2 are not counted):
    forward   2*M*K*N FLOPs;  bytes ~ e*(M*K + N*K + M*N [+ M*N residual]) (+ tiny stats partials)
    backward  dW: 2*M*K*N, dz: 2*M*K*N FLOPs;
              bytes ~ e*(M*K + M*N) [dW] + e*(M*N + N*K + 2*M*K) [dz: reads dy, W, x; writes dz]
                      + e*(2*Mi*K + M*K) [dx: reads x, dz, writes dx (+ Mi*K if accumulating)]
"""
from __future__ import annotations

import inspect
import os

import torch
import triton
import triton.language as tl

from .batch_stats import _bn_finish, _count_batch, _merge_chunks, _running_args, _take_last_ticket, _tile_mean_m2, tickets

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# ---------------------------------------------------------------------------------------------------
# Autotune configurations. Hopper (H100/H200): 128x128/128x256 tiles with 64-wide K steps keep the
# tensor cores fed at 3-4 pipeline stages within 228 KB of shared memory; small tiles serve the 7x7 and
# 14x14 stages where M*N is small. The interpreter cannot autotune over several configs (and every
# program costs Python time), so there it gets ONE small config that still leaves tails in the tests.
# ---------------------------------------------------------------------------------------------------
def _cfg(bm, bn, bk, warps, stages, **extra):
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **extra), num_warps=warps,
                         num_stages=stages)


if INTERPRET:
    _FWD_CONFIGS = [_cfg(32, 32, 16, 4, 1, GROUP_M=4)]
    _DW_CONFIGS = [_cfg(32, 32, 16, 4, 1)]
    _DZ_CONFIGS = [_cfg(32, 32, 16, 4, 1, GROUP_M=4)]
else:
    # Few configs on purpose: each one is compiled per kernel variant on first use (seconds each).
    _FWD_CONFIGS = [
        _cfg(bm, bn, bk, w, s, GROUP_M=8)
        for (bm, bn, bk, w, s) in [
            (128, 256, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4),
            (128, 64, 64, 4, 4), (64, 64, 64, 4, 3),
        ]
    ]
    # dW tile: BLOCK_N (C_out) x BLOCK_K (C_in), reduction over BLOCK_M rows.
    _DW_CONFIGS = [
        _cfg(bm, bn, bk, w, s)
        for (bm, bn, bk, w, s) in [
            (64, 128, 128, 8, 3), (64, 128, 64, 4, 4), (64, 64, 128, 4, 4), (128, 64, 64, 4, 3),
            (64, 64, 64, 4, 4),
        ]
    ]
    # dz tile: BLOCK_M rows x BLOCK_K (C_in), reduction over BLOCK_N (C_out).
    _DZ_CONFIGS = [
        _cfg(bm, bn, bk, w, s, GROUP_M=8)
        for (bm, bn, bk, w, s) in [
            (128, 64, 128, 8, 3), (128, 64, 64, 4, 4), (64, 64, 128, 4, 4), (64, 64, 64, 4, 4),
            (128, 32, 128, 8, 4),
        ]
    ]

_MIN_FWD_BLOCK_M = min(c.kwargs["BLOCK_M"] for c in _FWD_CONFIGS)
_MIN_FWD_BLOCK_N = min(c.kwargs["BLOCK_N"] for c in _FWD_CONFIGS)
_MIN_DZ_BLOCK_M = min(c.kwargs["BLOCK_M"] for c in _DZ_CONFIGS)
_MIN_DZ_BLOCK_K = min(c.kwargs["BLOCK_K"] for c in _DZ_CONFIGS)
_MIN_DW_TILE = min(c.kwargs["BLOCK_N"] for c in _DW_CONFIGS), min(c.kwargs["BLOCK_K"] for c in _DW_CONFIGS)


def _prune_by_size(configs, named_args, **kwargs):
    """Drop tiles far larger than the problem (they only waste autotuning time)."""
    n_cap = max(64, triton.next_power_of_2(named_args["N"]))
    k_cap = max(64, triton.next_power_of_2(named_args["K"]))
    m_cap = max(64, triton.next_power_of_2(named_args["M"]))
    kept = [c for c in configs
            if c.kwargs["BLOCK_N"] <= n_cap and c.kwargs["BLOCK_K"] <= k_cap and c.kwargs["BLOCK_M"] <= m_cap]
    return kept or configs[:1]


_PRUNE = {"early_config_prune": _prune_by_size}
# Tuned choices persist in triton's cache directory where this triton can (>= 3.2), so the benchmarks and
# training runs on one machine tune each shape once.
# FASTPREACT_QUICK_AUTOTUNE=1 (tests/conftest.py sets it on a GPU): each config is timed for ~3 ms instead
# of triton's default 25 + 100 ms, since the tests need a valid choice, not the fastest; every config is
# still compiled and launched. Such rough choices are not written to the disk cache (the tests also turn
# TRITON_CACHE_AUTOTUNING off), so the benchmarks and training tune for themselves.
_AUTOTUNE_PARAMS = inspect.signature(triton.autotune).parameters
_QUICK_AUTOTUNE = os.environ.get("FASTPREACT_QUICK_AUTOTUNE") == "1"
_AUTOTUNE_EXTRA = {}
if not INTERPRET and _QUICK_AUTOTUNE and "do_bench" in _AUTOTUNE_PARAMS:
    import triton.testing

    _AUTOTUNE_EXTRA["do_bench"] = lambda kernel_call, quantiles: triton.testing.do_bench(
        kernel_call, warmup=1, rep=3, quantiles=quantiles)
elif not INTERPRET and "cache_results" in _AUTOTUNE_PARAMS:
    _AUTOTUNE_EXTRA["cache_results"] = True


@triton.jit
def _grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program `pid` in grouped order: GROUP_M row-tiles share their A rows in L2 while
    sweeping the column tiles (the Triton matmul tutorial's swizzle)."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _input_rows(offs_m, H, W, Ho, Wo, STRIDE: tl.constexpr):
    """Input row read by output row m = (n, ho, wo) of a 1x1 conv with this stride: (n, s*ho, s*wo)."""
    if STRIDE == 1:
        rows = offs_m
    else:
        n_img = offs_m // (Ho * Wo)
        rem = offs_m - n_img * (Ho * Wo)
        ho = rem // Wo
        wo = rem - ho * Wo
        rows = n_img * (H * W) + (ho * STRIDE) * W + wo * STRIDE
    return rows


@triton.jit
def _load_rows_cols(ptr_a, ptr_b, rows64, cols, row_ok, col_ok, n_split, n_total,
                    SPLIT: tl.constexpr):
    """Tile [rows, cols] of a matrix with n_total columns, stored whole (SPLIT False) or as two
    row-major matrices holding columns [0, n_split) and [n_split, n_total)."""
    mask = row_ok[:, None] & col_ok[None, :]
    if SPLIT:
        in_a = cols < n_split
        va = tl.load(ptr_a + rows64[:, None] * n_split + cols[None, :], mask=mask & in_a[None, :], other=0.0)
        vb = tl.load(ptr_b + rows64[:, None] * (n_total - n_split) + (cols - n_split)[None, :],
                     mask=mask & (~in_a)[None, :], other=0.0)
        v = va + vb
    else:
        v = tl.load(ptr_a + rows64[:, None] * n_total + cols[None, :], mask=mask, other=0.0)
    return v


@triton.jit
def _bn_coeffs(ks, k_ok, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr):
    """(mean, scale = gamma * rstd, beta) of channels ks, fp32; 0 outside K (so z = 0 there)."""
    mean = tl.load(mean_ptr + ks, mask=k_ok, other=0.0)
    rstd = tl.load(rstd_ptr + ks, mask=k_ok, other=0.0)
    gamma = tl.load(gamma_ptr + ks, mask=k_ok, other=0.0)
    beta = tl.load(beta_ptr + ks, mask=k_ok, other=0.0)
    return mean, gamma * rstd, beta


@triton.jit
def _bn_apply(x, mean, scale, beta):
    """z = (x - mean) * scale + beta for a tile x [rows, channels] (fp32). Centring first keeps z exact
    when |mean| >> std, where x*scale + (beta - mean*scale) would cancel. Every kernel forms z with this
    one function, so backward's ReLU mask [z > 0] is bit-identical to forward's."""
    return (x.to(tl.float32) - mean[None, :]) * scale[None, :] + beta[None, :]


# ---------------------------------------------------------------------------------------------------
# Forward:  y[m, n] = sum_k relu(z[r(m), k]) * W[n, k]  (+ bias[n]) (+ res[m, n]),
#           z = (x - mean) * gamma * rstd + beta  (_bn_apply)
# with fp32 accumulation, r(m) the strided row gather; W of any float dtype, rounded to x's (the compute
# dtype) as it is loaded. Optional epilogue statistics of y AS STORED (after the residual and the
# rounding to y's dtype): per tile of BLOCK_M rows, (mean_t, M2_t about mean_t) per column; the last
# row tile of each column block to finish (atomic ticket) merges them with Chan's formula in a fixed
# order (kernels/batch_stats.py) and writes the mean and biased variance of y; with OUT_FINISH it also
# finishes the BatchNorm that consumes y (rstd, running statistics, num_batches_tracked: _bn_finish).
# ---------------------------------------------------------------------------------------------------
@triton.autotune(configs=_FWD_CONFIGS, key=["M", "K", "N"], prune_configs_by=_PRUNE, **_AUTOTUNE_EXTRA)
@triton.jit
def _bn_relu_conv1x1_fwd_kernel(
    x_ptr,            # [M_in, K] input rows, compute dtype
    w_ptr,            # [N, K] 1x1 conv weight, compute dtype
    mean_ptr,         # [K] fp32 BN mean (batch or running)
    rstd_ptr,         # [K] fp32 BN 1/sqrt(var + eps)
    gamma_ptr,        # [K] fp32 BN weight
    beta_ptr,         # [K] fp32 BN bias
    bias_ptr,         # [N] fp32 conv bias (unused unless HAS_BIAS)
    res_ptr,          # [M, N] residual rows, compute dtype (unused unless HAS_RESIDUAL)
    y_ptr,            # [M, N] output rows; with SPLIT_OUT [M, n_split]
    y2_ptr,           # [M, N - n_split] second output with SPLIT_OUT (else unused)
    part_mean_ptr,    # [cdiv(M, BLOCK_M), N] fp32 per-tile mean of y (unused unless OUT_STATS)
    part_m2_ptr,      # [cdiv(M, BLOCK_M), N] fp32 per-tile M2 of y (unused unless OUT_STATS)
    stats_mean_ptr,   # [N] fp32 out: mean of y (unused unless OUT_STATS)
    stats_var_ptr,    # [N] fp32 out: biased variance of y (unused unless OUT_STATS)
    ticket_ptr,       # [cdiv(N, BLOCK_N) + 1] int32 tickets at 0 (unused unless OUT_STATS)
    out_rstd_ptr,     # [n_finish] fp32 out: the consuming BatchNorm's rstd (unused unless OUT_FINISH)
    out_rm_ptr, out_rv_ptr, out_nbt_ptr,  # its running statistics and counter (OUT_UPDATE_RUNNING, ...)
    out_eps, out_momentum, out_unbias,    # its eps, momentum, M / (M - 1)
    n_finish,         # columns of y the consuming BatchNorm normalises (the first output's)
    M, K, N,          # output rows, input channels, output channels
    H, W, Ho, Wo,     # input / output spatial size (row gather when STRIDE == 2)
    n_split,          # columns of the first output when SPLIT_OUT
    STRIDE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    SPLIT_OUT: tl.constexpr, OUT_STATS: tl.constexpr, OUT_FINISH: tl.constexpr,
    OUT_UPDATE_RUNNING: tl.constexpr, OUT_MOMENTUM_FROM_NBT: tl.constexpr, OUT_INCREMENT_NBT: tl.constexpr,
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

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        k_ok = ks < K
        xt = tl.load(x_rows + ks[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        mean, scale, beta = _bn_coeffs(ks, k_ok, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr)
        a = tl.maximum(_bn_apply(xt, mean, scale, beta), 0.0).to(x_ptr.dtype.element_ty)
        wt = tl.load(w_cols + ks[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, wt.to(x_ptr.dtype.element_ty), acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    rows64 = offs_m.to(tl.int64)
    out_mask = m_ok[:, None] & n_ok[None, :]
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + rows64[:, None] * N + offs_n[None, :], mask=out_mask, other=0.0)
        acc += res.to(tl.float32)
    y = acc.to(y_ptr.dtype.element_ty)
    if SPLIT_OUT:
        in_a = offs_n < n_split
        tl.store(y_ptr + rows64[:, None] * n_split + offs_n[None, :], y, mask=out_mask & in_a[None, :])
        tl.store(y2_ptr + rows64[:, None] * (N - n_split) + (offs_n - n_split)[None, :], y,
                 mask=out_mask & (~in_a)[None, :])
    else:
        tl.store(y_ptr + rows64[:, None] * N + offs_n[None, :], y, mask=out_mask)

    if OUT_STATS:
        count = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
        tile_mean, tile_m2 = _tile_mean_m2(y.to(tl.float32), out_mask, count)
        tl.store(part_mean_ptr + pid_m * N + offs_n, tile_mean, mask=n_ok)
        tl.store(part_m2_ptr + pid_m * N + offs_n, tile_m2, mask=n_ok)
        if _take_last_ticket(ticket_ptr + pid_n, num_pid_m):
            out_mean, out_var = _merge_chunks(part_mean_ptr, part_m2_ptr, offs_n, n_ok, num_pid_m, M, N,
                                              BLOCK_M, 8, BLOCK_N)
            tl.store(stats_mean_ptr + offs_n, out_mean, mask=n_ok)
            tl.store(stats_var_ptr + offs_n, out_var, mask=n_ok)
            if OUT_FINISH:
                num_pid_n = tl.cdiv(N, BLOCK_N)
                _bn_finish(out_mean, out_var, offs_n, n_ok & (offs_n < n_finish), out_rstd_ptr, out_rm_ptr,
                           out_rv_ptr, out_nbt_ptr, out_eps, out_momentum, out_unbias, True, OUT_UPDATE_RUNNING,
                           OUT_MOMENTUM_FROM_NBT, OUT_INCREMENT_NBT)
                _count_batch(ticket_ptr + num_pid_n, num_pid_n, out_nbt_ptr, OUT_INCREMENT_NBT)


# ---------------------------------------------------------------------------------------------------
# Backward, weight gradient:  dW[n, k] = sum_m dy[m, n] * relu(z[r(m), k])
# The pre-activation is recomputed from x in the prologue (never stored). The reduction over M (up to
# ~200k rows against a weight of a few hundred KB) is split into contiguous row ranges, one per grid
# column, each writing an fp32 partial dW; the last split of each (N, K) tile to finish (atomic ticket)
# sums the tile's partials in split order (deterministic) and stores dW in the parameter's dtype.
# ---------------------------------------------------------------------------------------------------
@triton.autotune(configs=_DW_CONFIGS, key=["M", "K", "N"], prune_configs_by=_PRUNE, **_AUTOTUNE_EXTRA)
@triton.jit
def _bn_relu_conv1x1_bwd_dw_kernel(
    x_ptr,            # [M_in, K] input rows, compute dtype
    mean_ptr,         # [K] fp32 BN mean used in forward
    rstd_ptr,         # [K] fp32
    gamma_ptr,        # [K] fp32
    beta_ptr,         # [K] fp32
    dy_ptr,           # [M, N] gradient of y; with SPLIT_OUT [M, n_split]
    dy2_ptr,          # [M, N - n_split] gradient of the second output with SPLIT_OUT (else unused)
    dw_part_ptr,      # [num_splits, N, K] fp32 partial weight gradients (unused with one split)
    dw_ptr,           # [N, K] out: the weight gradient, in its dtype (the parameter's)
    ticket_ptr,       # [tiles] int32 tickets at 0, one per (N, K) tile (unused with one split)
    M, K, N,          # output rows, input channels, output channels
    H, W, Ho, Wo,     # spatial sizes for the row gather
    n_split,          # columns of the first output when SPLIT_OUT
    rows_per_split,   # rows of the reduction handled by one grid column
    STRIDE: tl.constexpr, SPLIT_OUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_pid_k = tl.cdiv(K, BLOCK_K)
    pid_n = pid // num_pid_k
    pid_k = pid % num_pid_k
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    k_ok = offs_k < K
    mean, scale, beta = _bn_coeffs(offs_k, k_ok, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    m_start = pid_s * rows_per_split
    m_end = tl.minimum(M, m_start + rows_per_split)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < m_end
        in_rows = _input_rows(tl.where(m_ok, offs_m, 0), H, W, Ho, Wo, STRIDE).to(tl.int64)
        xt = tl.load(x_ptr + in_rows[:, None] * K + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                     other=0.0)
        a = tl.maximum(_bn_apply(xt, mean, scale, beta), 0.0)
        a = tl.where(m_ok[:, None], a, 0.0).to(x_ptr.dtype.element_ty)
        dyt = _load_rows_cols(dy_ptr, dy2_ptr, offs_m.to(tl.int64), offs_n, m_ok, n_ok, n_split, N, SPLIT_OUT)
        acc = tl.dot(tl.trans(dyt.to(x_ptr.dtype.element_ty)), a, acc, input_precision=DOT_PRECISION)

    tile = offs_n[:, None] * K + offs_k[None, :]
    tile_ok = n_ok[:, None] & k_ok[None, :]
    num_splits = tl.num_programs(1)
    if num_splits == 1:
        tl.store(dw_ptr + tile, acc.to(dw_ptr.dtype.element_ty), mask=tile_ok)
    else:
        tl.store(dw_part_ptr + pid_s.to(tl.int64) * N * K + tile, acc, mask=tile_ok)
        if _take_last_ticket(ticket_ptr + pid, num_splits):
            total = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            for s in range(0, num_splits):
                total += tl.load(dw_part_ptr + s * N * K + tile, mask=tile_ok, other=0.0, cache_modifier=".cg")
            tl.store(dw_ptr + tile, total.to(dw_ptr.dtype.element_ty), mask=tile_ok)


# ---------------------------------------------------------------------------------------------------
# Backward, gradient at the pre-activation (at the sampled rows m, input row r(m)):
#   da[m, k] = sum_n dy[m, n] * W[n, k];   dz = da * [z > 0]   (the forward's own z, _bn_apply)
# Epilogue: per tile of BLOCK_M rows, partial sums of dz and dz * xhat per column (xhat = (x-mean)*rstd);
# the last row tile of each column block to finish (atomic ticket) sums the block's partials in a fixed
# order: dbeta = sum dz, dgamma = sum dz * xhat. Rows a stride-2
# conv skips have dz = 0 and contribute nothing to either sum. dz is stored in the compute dtype.
# ---------------------------------------------------------------------------------------------------
@triton.autotune(configs=_DZ_CONFIGS, key=["M", "K", "N"], prune_configs_by=_PRUNE, **_AUTOTUNE_EXTRA)
@triton.jit
def _bn_relu_conv1x1_bwd_dz_kernel(
    dy_ptr,           # [M, N] gradient of y; with SPLIT_OUT [M, n_split]
    dy2_ptr,          # [M, N - n_split] gradient of the second output with SPLIT_OUT (else unused)
    w_ptr,            # [N, K] conv weight, compute dtype
    x_ptr,            # [M_in, K] input rows, compute dtype
    mean_ptr,         # [K] fp32 mean used in forward
    rstd_ptr,         # [K] fp32 1/sqrt(var + eps) used in forward
    gamma_ptr,        # [K] fp32
    beta_ptr,         # [K] fp32
    dz_ptr,           # [M, K] out: dz at the sampled rows, compute dtype
    part_dbeta_ptr,   # [cdiv(M, BLOCK_M), K] fp32 per-tile sum of dz
    part_dgamma_ptr,  # [cdiv(M, BLOCK_M), K] fp32 per-tile sum of dz * xhat
    dbeta_ptr,        # [K] fp32 out: sum of dz
    dgamma_ptr,       # [K] fp32 out: sum of dz * xhat
    ticket_ptr,       # [cdiv(K, BLOCK_K)] int32 tickets at 0
    M, K, N,          # output rows, input channels, output channels
    H, W, Ho, Wo,     # spatial sizes for the row gather
    n_split,          # columns of the first output when SPLIT_OUT
    STRIDE: tl.constexpr, SPLIT_OUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    num_pid_m = tl.cdiv(M, BLOCK_M)
    pid_m, pid_k = _grouped_tile(tl.program_id(0), num_pid_m, tl.cdiv(K, BLOCK_K), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    k_ok = offs_k < K
    rows64 = offs_m.to(tl.int64)

    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + offs_n
        n_ok = ns < N
        dyt = _load_rows_cols(dy_ptr, dy2_ptr, rows64, ns, m_ok, n_ok, n_split, N, SPLIT_OUT)
        wt = tl.load(w_ptr + ns.to(tl.int64)[:, None] * K + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :],
                     other=0.0)
        acc = tl.dot(dyt.to(x_ptr.dtype.element_ty), wt.to(x_ptr.dtype.element_ty), acc,
                     input_precision=DOT_PRECISION)

    mask = m_ok[:, None] & k_ok[None, :]
    in_rows = _input_rows(tl.where(m_ok, offs_m, 0), H, W, Ho, Wo, STRIDE).to(tl.int64)
    x = tl.load(x_ptr + in_rows[:, None] * K + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
    mean, scale, beta = _bn_coeffs(offs_k, k_ok, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr)
    rstd = tl.load(rstd_ptr + offs_k, mask=k_ok, other=0.0)
    z = _bn_apply(x, mean, scale, beta)  # exactly the forward's z
    dz = tl.where(mask & (z > 0.0), acc, 0.0)
    tl.store(dz_ptr + rows64[:, None] * K + offs_k[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)
    xhat = (x - mean[None, :]) * rstd[None, :]
    tl.store(part_dbeta_ptr + pid_m * K + offs_k, tl.sum(dz, axis=0), mask=k_ok)
    tl.store(part_dgamma_ptr + pid_m * K + offs_k, tl.sum(dz * xhat, axis=0), mask=k_ok)
    if _take_last_ticket(ticket_ptr + pid_k, num_pid_m):
        _sum_partials(part_dbeta_ptr, part_dgamma_ptr, dbeta_ptr, dgamma_ptr, offs_k, k_ok, num_pid_m, K,
                      8, BLOCK_K)


@triton.jit
def _sum_partials(part_a_ptr, part_b_ptr, out_a_ptr, out_b_ptr, cols, col_ok, num_rows, C,
                  BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """out_a[c] = sum_p part_a[p, c], out_b likewise, for [num_rows, C] partials, in a fixed order."""
    acc_a = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for p0 in range(0, num_rows, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        mask = (ps < num_rows)[:, None] & col_ok[None, :]
        offs = ps.to(tl.int64)[:, None] * C + cols[None, :]
        acc_a += tl.load(part_a_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
        acc_b += tl.load(part_b_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
    tl.store(out_a_ptr + cols, tl.sum(acc_a, axis=0), mask=col_ok)
    tl.store(out_b_ptr + cols, tl.sum(acc_b, axis=0), mask=col_ok)


# ---------------------------------------------------------------------------------------------------
# Backward, input gradient (elementwise over all M_in input rows; dz read at the row's output position,
# 0 where a stride-2 conv skipped the row):
#   batch statistics:  dx = scale * (dz - dbeta / Mb - xhat * dgamma / Mb),  xhat = (x - mean) * rstd
#   running statistics (eval): dx = scale * dz
#   ACCUMULATE: dx += dx_in (a gradient already flowing into x, e.g. an identity shortcut's).
# out may alias dz (stride 1) or dx_in: every element is read and written by the same program.
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _bn_relu_conv1x1_bwd_dx_kernel(
    x_ptr,            # [M_in, K] input rows, compute dtype
    dz_ptr,           # [M, K] dz at the sampled rows
    mean_ptr,         # [K] fp32
    rstd_ptr,         # [K] fp32
    gamma_ptr,        # [K] fp32 (scale = gamma * rstd)
    dbeta_ptr,        # [K] fp32 sum of dz
    dgamma_ptr,       # [K] fp32 sum of dz * xhat
    dx_in_ptr,        # [M_in, K] gradient to accumulate into (unused unless ACCUMULATE)
    dx_ptr,           # [M_in, K] out
    M_in, K,          # input rows, channels
    H, W, Ho, Wo,     # spatial sizes (stride-2 scatter)
    inv_count,        # 1 / Mb
    STRIDE: tl.constexpr, BATCH_STATS: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < M_in
    col_ok = cols < K
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    if STRIDE == 1:
        sampled = row_ok
        dz_rows = rows64
    else:
        n_img = rows // (H * W)
        rem = rows - n_img * (H * W)
        h = rem // W
        w = rem - h * W
        sampled = row_ok & (h % STRIDE == 0) & (w % STRIDE == 0)
        dz_rows = (n_img * (Ho * Wo) + (h // STRIDE) * Wo + w // STRIDE).to(tl.int64)
    dz = tl.load(dz_ptr + dz_rows[:, None] * K + cols[None, :], mask=sampled[:, None] & col_ok[None, :],
                 other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + cols, mask=col_ok, other=0.0)
    sc = tl.load(gamma_ptr + cols, mask=col_ok, other=0.0) * rstd
    if BATCH_STATS:
        x = tl.load(x_ptr + rows64[:, None] * K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + cols, mask=col_ok, other=0.0)
        dbeta = tl.load(dbeta_ptr + cols, mask=col_ok, other=0.0)
        dgamma = tl.load(dgamma_ptr + cols, mask=col_ok, other=0.0)
        xhat = (x - mean[None, :]) * rstd[None, :]
        dx = sc[None, :] * (dz - (dbeta * inv_count)[None, :] - xhat * (dgamma * inv_count)[None, :])
    else:
        dx = sc[None, :] * dz
    if ACCUMULATE:
        dx += tl.load(dx_in_ptr + rows64[:, None] * K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(dx_ptr + rows64[:, None] * K + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------
# Launchers: plain functions over channels-last contiguous 4-D tensors (checked by the caller,
# fastpreact.functional). `poison=True` fills every output with NaN first, so tests catch any element a
# kernel fails to write.
# ---------------------------------------------------------------------------------------------------
_DX_BLOCK_M = 64
_DX_BLOCK_K = 32 if INTERPRET else 64


def _empty(shape, dtype, device, poison, channels_last=False):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if poison:
        return torch.full(shape, float("nan"), dtype=dtype, device=device).contiguous(memory_format=fmt)
    return torch.empty(shape, dtype=dtype, device=device, memory_format=fmt)


def _dot_precision(dtype):
    # fp16/bf16 products are exact on tensor cores; fp32 follows cuDNN's convolution TF32 switch.
    if dtype == torch.float32 and not torch.backends.cudnn.allow_tf32:
        return "ieee"
    return "tf32"


def out_size(size, stride):
    """Spatial output size of a 1x1 conv without padding."""
    return (size - 1) // stride + 1


def bn_relu_conv1x1_fwd(x, weight2d, mean, rstd, gamma, beta, *, stride=1, bias=None, residual=None,
                        n_split=0, out_stats=False, out_bn=None, poison=False):
    """y = relu((x - mean) * gamma * rstd + beta) (*) weight2d [+ bias] [+ residual].

    x: [N, K, H, W] channels-last contiguous (compute dtype); weight2d: [Cout, K] contiguous (any float
    dtype: rounded to x's dtype as the kernel loads it);
    mean, rstd, gamma, beta: [K] fp32 contiguous; bias: [Cout] fp32 or None;
    residual: [N, Cout, Ho, Wo] channels-last contiguous (compute dtype) or None.
    n_split > 0: two outputs with n_split and Cout - n_split channels (one GEMM).
    out_bn (with out_stats): dict(eps, running_mean, running_var, num_batches_tracked, momentum) of the
    BatchNorm in training that consumes y (its first n_split channels when n_split): the same launch
    also finishes it (rstd, running-statistics update, num_batches_tracked incremented).
    Returns (y or (y_a, y_b), (mean, biased var[, rstd with out_bn]) of the output as stored, or None).
    """
    Nb, K, H, W = x.shape
    Cout = weight2d.shape[0]
    Ho, Wo = out_size(H, stride), out_size(W, stride)
    M = Nb * Ho * Wo
    dev, dt = x.device, x.dtype
    if n_split:
        y = _empty((Nb, n_split, Ho, Wo), dt, dev, poison, channels_last=True)
        y2 = _empty((Nb, Cout - n_split, Ho, Wo), dt, dev, poison, channels_last=True)
    else:
        y = _empty((Nb, Cout, Ho, Wo), dt, dev, poison, channels_last=True)
        y2 = y
    if out_stats:
        max_blocks = triton.cdiv(M, _MIN_FWD_BLOCK_M)
        part_mean = _empty((max_blocks, Cout), torch.float32, dev, poison)
        part_m2 = _empty((max_blocks, Cout), torch.float32, dev, poison)
        stats = (_empty((Cout,), torch.float32, dev, poison), _empty((Cout,), torch.float32, dev, poison))
        ticket = tickets(dev, triton.cdiv(Cout, _MIN_FWD_BLOCK_N) + 1)
    else:
        part_mean = part_m2 = ticket = mean  # never touched (OUT_STATS is False)
        stats = None
    fin = _finish_args(out_bn, n_split or Cout, M, dev, poison, mean)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(Cout, meta["BLOCK_N"]),)

    _bn_relu_conv1x1_fwd_kernel[grid](
        x, weight2d, mean, rstd, gamma, beta,
        bias if bias is not None else mean,
        residual if residual is not None else x,
        y, y2, part_mean, part_m2, *(stats or (mean, mean)), ticket, *fin["args"],
        M, K, Cout, H, W, Ho, Wo, n_split,
        STRIDE=stride, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        SPLIT_OUT=n_split > 0, OUT_STATS=out_stats, **fin["flags"], DOT_PRECISION=_dot_precision(dt),
    )
    if out_bn is not None:
        stats = (*stats, fin["args"][0])
    return ((y, y2) if n_split else y), stats


def _finish_args(out_bn, channels, M, device, poison, dummy):
    """Kernel arguments that finish the BatchNorm consuming y (out_bn, see bn_relu_conv1x1_fwd)."""
    if out_bn is None:
        return dict(args=(dummy,) * 4 + (0.0, 0.0, 1.0, 0),
                    flags=dict(OUT_FINISH=False, OUT_UPDATE_RUNNING=False, OUT_MOMENTUM_FROM_NBT=False,
                               OUT_INCREMENT_NBT=False))
    rstd = _empty((channels,), torch.float32, device, poison)
    run = _running_args(out_bn.get("running_mean"), out_bn.get("running_var"), out_bn.get("num_batches_tracked"),
                        out_bn.get("momentum", 0.1), True, rstd)
    return dict(args=(rstd, *run["ptrs"], float(out_bn["eps"]), run["momentum"], M / max(M - 1, 1), channels),
                flags=dict(OUT_FINISH=True, **{f"OUT_{k}": v for k, v in run["flags"].items()}))


def _dw_rows_per_split(M, K, N):
    """Rows of the dW reduction per grid column: enough columns to fill the GPU, each long enough to
    amortise its partial (N*K fp32). The interpreter uses short splits so tests cover the merge."""
    if INTERPRET:
        return 128
    # ~2 waves of 132 SMs (H100) over the (C_out, C_in) tiles, at least 1024 rows per split so that the
    # fp32 partials (splits * N * K * 4 bytes) stay small against the activations read (M * (K + N) * e).
    tiles = triton.cdiv(N, 128) * triton.cdiv(K, 128)
    splits = max(1, min(triton.cdiv(264, tiles), triton.cdiv(M, 1024)))
    return triton.cdiv(triton.cdiv(M, splits), 128) * 128


def bn_relu_conv1x1_bwd_dw(x, dy, mean, rstd, gamma, beta, *, stride=1, dy2=None, out_dtype=torch.float32,
                           poison=False):
    """dW [Cout, K] = relu(z)[rows]^T @ dy in out_dtype (dy2: second output's gradient, dual), in one
    launch: fp32 accumulation, the split partials summed in-kernel, rounded once to out_dtype."""
    Nb, K, H, W = x.shape
    Ho, Wo = out_size(H, stride), out_size(W, stride)
    n_split = dy.shape[1] if dy2 is not None else 0
    Cout = dy.shape[1] + (dy2.shape[1] if dy2 is not None else 0)
    M = Nb * Ho * Wo
    rows_per_split = _dw_rows_per_split(M, K, Cout)
    splits = triton.cdiv(M, rows_per_split)
    dw = _empty((Cout, K), out_dtype, x.device, poison)
    if splits > 1:
        part = _empty((splits, Cout, K), torch.float32, x.device, poison)
        ticket = tickets(x.device, triton.cdiv(Cout, _MIN_DW_TILE[0]) * triton.cdiv(K, _MIN_DW_TILE[1]))
    else:
        part = ticket = dw  # never touched with one split

    def grid(meta):
        return (triton.cdiv(Cout, meta["BLOCK_N"]) * triton.cdiv(K, meta["BLOCK_K"]), splits)

    _bn_relu_conv1x1_bwd_dw_kernel[grid](
        x, mean, rstd, gamma, beta, dy, dy2 if dy2 is not None else dy, part, dw, ticket,
        M, K, Cout, H, W, Ho, Wo, n_split, rows_per_split,
        STRIDE=stride, SPLIT_OUT=dy2 is not None, DOT_PRECISION=_dot_precision(x.dtype),
    )
    return dw


def bn_relu_conv1x1_bwd_dz(dy, weight2d, x, mean, rstd, gamma, beta, *, stride=1, dy2=None, poison=False):
    """dz [N, K, Ho, Wo] channels-last (compute dtype) at the sampled rows, and (dbeta, dgamma) fp32 [K],
    in one launch (weight2d of any float dtype, rounded to x's as it is loaded)."""
    Nb, K, H, W = x.shape
    Ho, Wo = out_size(H, stride), out_size(W, stride)
    n_split = dy.shape[1] if dy2 is not None else 0
    Cout = weight2d.shape[0]
    M = Nb * Ho * Wo
    dz = _empty((Nb, K, Ho, Wo), x.dtype, x.device, poison, channels_last=True)
    max_blocks = triton.cdiv(M, _MIN_DZ_BLOCK_M)
    parts = _empty((2, max_blocks, K), torch.float32, x.device, poison)
    sums = _empty((2, K), torch.float32, x.device, poison)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"]),)

    _bn_relu_conv1x1_bwd_dz_kernel[grid](
        dy, dy2 if dy2 is not None else dy, weight2d, x, mean, rstd, gamma, beta, dz,
        parts[0], parts[1], sums[0], sums[1], tickets(x.device, triton.cdiv(K, _MIN_DZ_BLOCK_K)),
        M, K, Cout, H, W, Ho, Wo, n_split,
        STRIDE=stride, SPLIT_OUT=dy2 is not None, DOT_PRECISION=_dot_precision(x.dtype),
    )
    return dz, sums[0], sums[1]


def bn_relu_conv1x1_bwd_dx(x, dz, mean, rstd, gamma, dbeta, dgamma, *, stride=1, batch_stats=True,
                           accumulate_into=None, add_grad=None, poison=False):
    """dx [N, K, H, W] channels-last in x's dtype from dz and the BN sums (see the kernel's comment).

    accumulate_into: a channels-last contiguous gradient of x's shape to ADD dx into, in place (the
    identity shortcut's gradient); it is returned. add_grad: the same addend, read only: dx + add_grad is
    written where dx would be. Otherwise dx is written over dz when stride == 1 (dz is dead afterwards)
    or into a new tensor.
    """
    Nb, K, H, W = x.shape
    Ho, Wo = out_size(H, stride), out_size(W, stride)
    M_in = Nb * H * W
    if accumulate_into is not None and add_grad is not None:
        raise ValueError("bn_relu_conv1x1_bwd_dx: give accumulate_into or add_grad, not both")
    addend = accumulate_into if accumulate_into is not None else add_grad
    if addend is not None and (addend.shape != x.shape or addend.dtype != x.dtype
                               or not addend.is_contiguous(memory_format=torch.channels_last)):
        name = "accumulate_into" if accumulate_into is not None else "add_grad"
        raise ValueError(f"bn_relu_conv1x1_bwd_dx: {name} must be a channels-last contiguous {x.dtype} tensor "
                         f"of shape {tuple(x.shape)}, got {addend.dtype} {tuple(addend.shape)}")
    if accumulate_into is not None:
        out = accumulate_into
    elif stride == 1 and dz.dtype == x.dtype and not poison:
        out = dz
    else:
        out = _empty(tuple(x.shape), x.dtype, x.device, poison, channels_last=True)
    grid = (triton.cdiv(M_in, _DX_BLOCK_M), triton.cdiv(K, _DX_BLOCK_K))
    _bn_relu_conv1x1_bwd_dx_kernel[grid](
        x, dz, mean, rstd, gamma, dbeta, dgamma, out if addend is None else addend, out, M_in, K, H, W, Ho, Wo,
        1.0 / M_in, STRIDE=stride, BATCH_STATS=batch_stats, ACCUMULATE=addend is not None,
        BLOCK_M=_DX_BLOCK_M, BLOCK_K=_DX_BLOCK_K, num_warps=4,
    )
    return out
