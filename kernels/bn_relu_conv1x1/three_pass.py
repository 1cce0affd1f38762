"""The fused 1x1 backward in three passes, for the shapes where recomputing dz costs more than storing it
(backward.py says which): dW (the two-pass reduce kernel without the sums), dz stored with the BatchNorm
sums in its epilogue, and the elementwise dx pass. The three launchers are public on their own too.

Dtypes: x in its own dtype; dy in the compute dtype (read off dy_ptr), to which the GEMM operands are
rounded; dz stored in the compute dtype; dx in x's dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..batch_stats import _take_last_ticket
from ..cards import card_of
from ..configs import min_param, tiles
from ..tickets import tickets
from ..tuning import TunedKernel, cdiv, launch
from .common import (_bn_apply, _bn_coeffs, _grouped_tile, _input_rows, _load_rows_cols, _mma, _sum_partials,
                     check_addend, dot_precision, empty, out_size, tune_dtype)
from .two_pass import reduce_rows

__all__ = ["bn_relu_conv1x1_bwd_dw", "bn_relu_conv1x1_bwd_dz", "bn_relu_conv1x1_bwd_dx"]


# ---------------------------------------------------------------------------------------------------
# Gradient at the pre-activation (at the sampled rows m, input row r(m)):
#   da[m, k] = sum_n dy[m, n] * W[n, k];   dz = da * [z > 0]   (the forward's own z, _bn_apply)
# Epilogue: per tile of BLOCK_M rows, partial sums of dz and dz * xhat per column (xhat = (x-mean)*rstd);
# the last row tile of each column block to finish (atomic ticket) sums the block's partials in a fixed
# order: dbeta = sum dz, dgamma = sum dz * xhat. Rows a stride-2 conv skips have dz = 0 and contribute
# nothing to either sum. dz is stored in the compute dtype.
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _bn_relu_conv1x1_bwd_dz_kernel(
    dy_ptr,           # [M, N] gradient of y, compute dtype; with SPLIT_OUT [M, split]
    dy2_ptr,          # [M, N - split] gradient of the second output with SPLIT_OUT (else unused)
    w_ptr,            # [N, K] conv weight, any float dtype (rounded to the compute dtype)
    x_ptr,            # [M_in, K] input rows, x's own dtype
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
    split,          # columns of the first output when SPLIT_OUT
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
    cdt = dy_ptr.dtype.element_ty

    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + offs_n
        n_ok = ns < N
        dyt = _load_rows_cols(dy_ptr, dy2_ptr, rows64, ns, m_ok, n_ok, split, N, SPLIT_OUT)
        wt = tl.load(w_ptr + ns.to(tl.int64)[:, None] * K + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :],
                     other=0.0)
        acc = _mma(dyt.to(cdt), wt.to(cdt), acc, DOT_PRECISION)

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


# ---------------------------------------------------------------------------------------------------
# Input gradient (elementwise over all M_in input rows; dz read at the row's output position, 0 where a
# stride-2 conv skipped the row):
#   batch statistics:  dx = scale * (dz - dbeta / Mb - xhat * dgamma / Mb),  xhat = (x - mean) * rstd
#   running statistics (eval): dx = scale * dz
#   ACCUMULATE: dx += dx_in (a gradient already flowing into x, e.g. an identity shortcut's).
# out may alias dz (stride 1, same dtype) or dx_in: every element is read and written by one program.
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _bn_relu_conv1x1_bwd_dx_kernel(
    x_ptr,            # [M_in, K] input rows, x's own dtype
    dz_ptr,           # [M, K] dz at the sampled rows, compute dtype
    mean_ptr,         # [K] fp32
    rstd_ptr,         # [K] fp32
    gamma_ptr,        # [K] fp32 (scale = gamma * rstd)
    dbeta_ptr,        # [K] fp32 sum of dz
    dgamma_ptr,       # [K] fp32 sum of dz * xhat
    dx_in_ptr,        # [M_in, K] gradient to accumulate into, x's dtype (unused unless ACCUMULATE)
    dx_ptr,           # [M_in, K] out: dx, x's dtype
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


DZ = TunedKernel(_bn_relu_conv1x1_bwd_dz_kernel, "bn_relu_conv1x1_bwd_dz")


def bn_relu_conv1x1_bwd_dw(x, dy, mean, rstd, gamma, beta, *, stride=1, dy2=None, out_dtype=torch.float32,
                           poison=False):
    """dW [Cout, K] = relu(z)[rows]^T @ dy in out_dtype (dy2: second output's gradient, dual), in one
    launch (the reduce kernel without the BN sums): fp32 accumulation, split partials summed in-kernel,
    rounded once to out_dtype. x in its own dtype; dy (and dy2) in the compute dtype."""
    dw, _ = reduce_rows(x, dy, dy2, None, mean, rstd, gamma, beta, stride=stride, w_dtype=out_dtype, need_w=True,
                        need_sums=False, poison=poison)
    return dw


def bn_relu_conv1x1_bwd_dz(dy, weight2d, x, mean, rstd, gamma, beta, *, stride=1, dy2=None, poison=False):
    """dz [N, K, Ho, Wo] channels-last in dy's dtype (the compute dtype) at the sampled rows, and (dbeta,
    dgamma) fp32 [K] (two rows of one [2, K] buffer), in one launch; weight2d of any float dtype, rounded
    to the compute dtype as it is loaded; x in its own dtype."""
    Nb, K, H, W = x.shape
    Ho, Wo = out_size(H, stride), out_size(W, stride)
    split = dy.shape[1] if dy2 is not None else 0
    Cout = weight2d.shape[0]
    M = Nb * Ho * Wo
    dev, cdt = x.device, dy.dtype
    card = card_of(dev)
    dz = empty((Nb, K, Ho, Wo), cdt, dev, poison, channels_last=True)
    max_blocks = cdiv(M, min_param(DZ.name, card, "BLOCK_M"))
    parts = empty((2, max_blocks, K), torch.float32, dev, poison)
    sums = empty((2, K), torch.float32, dev, poison)

    def grid(tile):
        return (cdiv(M, tile["BLOCK_M"]) * cdiv(K, tile["BLOCK_K"]),)

    args = (dy, dy2 if dy2 is not None else dy, weight2d, x, mean, rstd, gamma, beta, dz,
            parts[0], parts[1], sums[0], sums[1], tickets(dev, cdiv(K, min_param(DZ.name, card, "BLOCK_K"))),
            M, K, Cout, H, W, Ho, Wo, split)
    DZ.run(grid, args, card=card, device=dev, dtype=tune_dtype(x.dtype, cdt),
           STRIDE=stride, SPLIT_OUT=dy2 is not None, DOT_PRECISION=dot_precision(cdt))
    return dz, sums[0], sums[1]


def bn_relu_conv1x1_bwd_dx(x, dz, mean, rstd, gamma, dbeta, dgamma, *, stride=1, batch_stats=True,
                           accumulate_into=None, add_grad=None, poison=False):
    """dx [N, K, H, W] channels-last in x's dtype from dz and the BN sums (see the kernel's comment).

    accumulate_into: a channels-last contiguous gradient of x's shape and dtype to ADD dx into, in place
    (the identity shortcut's gradient); it is returned. add_grad: the same addend, read only: dx +
    add_grad is written where dx would be. Otherwise dx is written over dz when stride == 1 and dz has
    x's dtype (dz is dead afterwards), or into a new tensor.
    """
    Nb, K, H, W = x.shape
    Ho, Wo = out_size(H, stride), out_size(W, stride)
    M_in = Nb * H * W
    addend = check_addend("bn_relu_conv1x1_bwd_dx", x, add_grad, accumulate_into)
    if accumulate_into is not None:
        out = accumulate_into
    elif stride == 1 and dz.dtype == x.dtype and not poison:
        out = dz
    else:
        out = empty(tuple(x.shape), x.dtype, x.device, poison, channels_last=True)
    tile = tiles("bn_relu_conv1x1_bwd_dx", card_of(x.device))
    grid = (cdiv(M_in, tile["BLOCK_M"]), cdiv(K, tile["BLOCK_K"]))
    launch(_bn_relu_conv1x1_bwd_dx_kernel, grid,
           (x, dz, mean, rstd, gamma, dbeta, dgamma, out if addend is None else addend, out, M_in, K, H, W, Ho, Wo,
            1.0 / M_in), x.device, STRIDE=stride, BATCH_STATS=batch_stats, ACCUMULATE=addend is not None, **tile)
    return out
