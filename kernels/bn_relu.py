"""BN-ReLU with given batch statistics, as one elementwise pass, and its backward (Triton).

The pre-activation in front of a 3x3 convolution cannot ride inside a GEMM prologue the way it does for
a 1x1 (cuDNN runs the 3x3 conv), so it runs as its own pass over the channels-last activation viewed as
a row-major matrix [M = N*H*W, C]:

    forward   a = relu(z),  z = (x - mean) * scale + beta,  scale = gamma * rstd
    backward  given da (the conv's input gradient) and x (the pre-BN input, recomputed mask):
              dz = da * [z > 0]
              dbeta = sum_r dz;   dgamma = sum_r dz * xhat,  xhat = (x - mean) * rstd
              dx = scale * dz + coef_b + (x - mean) * coef_c
                 with, in training (statistics of this batch), coef_b = -scale * dbeta / M and
                 coef_c = -scale * rstd * dgamma / M;  in eval (running statistics) both are 0.

z is centred on the mean before scaling, as in the GEMM prologue of bn_relu_conv1x1.py: x*scale + shift
with shift = beta - mean*scale would cancel catastrophically when |mean| >> std (mean 1e3, std 1 leaves
fp32 ~1e-4 of absolute error in z), while x - mean is exact there. Every kernel takes the BN vectors
(gamma, beta, mean, rstd) and derives scale and the backward coefficients per channel itself, so a
BN-ReLU costs no extra small launches for them.

Design limits: x contiguous [M, C] of fp32/fp16/bf16; all arithmetic in fp32; per-channel vectors of any
float dtype (read as fp32). Per-channel reductions take one launch: each program reduces a band of rows
to one partial row, and the last program of each channel block to finish (an atomic ticket) sums the
block's partials [2, P, C] in a fixed order (deterministic) and also writes dgamma = sum dz * xhat, so
the backward launches nothing but its two passes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .batch_stats import _take_last_ticket
from .cards import card_of
from .configs import tiles
from .tickets import tickets
from .tuning import Plan, cdiv, fp32_buffer, fp32_empty, launch_planned, plan_cache

# Tiles (kernels/configs.py, "bn_relu"): the interpreter runs each program (and each loop iteration) in
# Python on numpy blocks, so a few large tiles beat many small ones there; on a GPU a [64 rows x 64
# channels] tile of 2-byte values is 8 KiB, with 128-byte rows for coalescing. The reduction runs two
# waves of programs per channel block (each loops over its band of row tiles), and its finishing
# program sums BLOCK_P partial rows per step.


@triton.jit
def _bn_vectors(gamma_ptr, beta_ptr, mean_ptr, rstd_ptr, cols, col_ok):
    """Per-channel (scale = gamma * rstd, beta, mean, rstd) in fp32 for the channels `cols`."""
    gamma = tl.load(gamma_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    return gamma * rstd, beta, mean, rstd


# a[r, c] = max((x[r, c] - mean[c]) * scale[c] + beta[c], 0), stored in a's dtype.
@triton.jit
def _bn_relu_fwd_kernel(
    x_ptr,        # [M, C] pre-BN input, row-major
    a_ptr,        # [M, C] output relu(bn(x)), row-major
    gamma_ptr, beta_ptr, mean_ptr, rstd_ptr,  # [C] BN weight, bias, mean and 1/sqrt(var + eps)
    M, C,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mask = (rows < M)[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
    scale, beta, mean, rstd = _bn_vectors(gamma_ptr, beta_ptr, mean_ptr, rstd_ptr, cols, col_ok)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.maximum((x - mean[None, :]) * scale[None, :] + beta[None, :], 0.0)
    tl.store(a_ptr + offs, a.to(a_ptr.dtype.element_ty), mask=mask)


# The backward reductions. Program (p, cb) covers row tiles p, p + P, p + 2P, ... and writes
#   part[0, p, c] = sum_r dz[r, c]
#   part[1, p, c] = sum_r dz[r, c] * (x[r, c] - mean[c])
# with dz = da * [(x - mean) * scale + beta > 0] (the forward's ReLU mask, recomputed from x); the last
# program of channel block cb to finish sums the block's partials over p = 0, 1, ..., P-1 into
#   sums[0, c] = dbeta,  sums[1, c] = sum dz * (x - mean),  sums[2, c] = dgamma = sums[1, c] * rstd[c].
@triton.jit
def _bn_relu_bwd_reduce_kernel(
    da_ptr,       # [M, C] gradient w.r.t. a = relu(bn(x)), row-major
    x_ptr,        # [M, C] pre-BN input, row-major
    gamma_ptr, beta_ptr, mean_ptr, rstd_ptr,  # [C] BN vectors, as in the forward
    part_ptr,     # [2, P, C] fp32 partial sums of dz and of dz * (x - mean)
    sums_ptr,     # [3, C] fp32 out: dbeta, sum dz * (x - mean), dgamma
    ticket_ptr,   # [cdiv(C, BLOCK_C)] int32 tickets at 0
    M, C, num_row_tiles,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    scale, beta, mean, rstd = _bn_vectors(gamma_ptr, beta_ptr, mean_ptr, rstd_ptr, cols, col_ok)
    acc_dz = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    acc_dzx = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for tile in range(pid, num_row_tiles, num_programs):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        da = tl.load(da_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        xc = x - mean[None, :]
        dz = tl.where(xc * scale[None, :] + beta[None, :] > 0.0, da, 0.0)  # masked lanes load da = 0
        acc_dz += dz
        acc_dzx += dz * xc
    out = pid * C + cols
    tl.store(part_ptr + out, tl.sum(acc_dz, axis=0), mask=col_ok)
    tl.store(part_ptr + num_programs * C + out, tl.sum(acc_dzx, axis=0), mask=col_ok)
    if _take_last_ticket(ticket_ptr + tl.program_id(1), num_programs):
        tot_dz = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        tot_dzx = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        for p0 in range(0, num_programs, BLOCK_P):
            ps = p0 + tl.arange(0, BLOCK_P)
            pmask = (ps < num_programs)[:, None] & col_ok[None, :]
            poffs = ps[:, None] * C + cols[None, :]
            tot_dz += tl.load(part_ptr + poffs, mask=pmask, other=0.0, cache_modifier=".cg")
            tot_dzx += tl.load(part_ptr + num_programs * C + poffs, mask=pmask, other=0.0, cache_modifier=".cg")
        sum_dzx = tl.sum(tot_dzx, axis=0)
        tl.store(sums_ptr + cols, tl.sum(tot_dz, axis=0), mask=col_ok)
        tl.store(sums_ptr + C + cols, sum_dzx, mask=col_ok)
        tl.store(sums_ptr + 2 * C + cols, sum_dzx * rstd, mask=col_ok)


# dx[r, c] = scale[c] * dz[r, c] + coef_b[c] + (x[r, c] - mean[c]) * coef_c[c],
# dz = da * [(x - mean) * scale + beta > 0], coef_b = -scale * dbeta / M, coef_c = -scale * rstd * dgamma / M
# with dbeta = sums[0], dgamma = sums[1] * rstd (BATCH_STATS; without it, running statistics, both 0).
@triton.jit
def _bn_relu_bwd_dx_kernel(
    da_ptr,       # [M, C] gradient w.r.t. relu(bn(x)), row-major
    x_ptr,        # [M, C] pre-BN input, row-major
    dx_ptr,       # [M, C] output: gradient w.r.t. x, row-major, x's dtype
    gamma_ptr, beta_ptr, mean_ptr, rstd_ptr,  # [C] BN vectors, as in the forward
    sums_ptr,     # [>= 2, C] fp32: sum dz, sum dz * (x - mean) (from the reduction)
    M, C,
    BATCH_STATS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mask = (rows < M)[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
    scale, beta, mean, rstd = _bn_vectors(gamma_ptr, beta_ptr, mean_ptr, rstd_ptr, cols, col_ok)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    da = tl.load(da_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    xc = x - mean[None, :]
    dx = scale[None, :] * tl.where(xc * scale[None, :] + beta[None, :] > 0.0, da, 0.0)
    if BATCH_STATS:
        sum_dz = tl.load(sums_ptr + cols, mask=col_ok, other=0.0)
        sum_dzx = tl.load(sums_ptr + C + cols, mask=col_ok, other=0.0)
        coef_b = -scale * sum_dz / M
        coef_c = -scale * rstd * (sum_dzx * rstd) / M
        dx += coef_b[None, :] + xc * coef_c[None, :]
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------- launchers
def _rows_of(name, t):
    """(M, C) of a contiguous [M, C] matrix or a channels-last contiguous [N, C, H, W] tensor (its rows)."""
    if t.dim() == 2 and t.is_contiguous():
        return t.shape
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        C = t.shape[1]
        return t.numel() // C if C else 0, C
    raise ValueError(f"{name}: expected a contiguous [M, C] matrix or a channels-last contiguous [N, C, H, W] "
                     f"tensor, got shape {tuple(t.shape)} and strides {t.stride()}")


def _empty_like(t, poison):
    """An output buffer; NaN-filled with poison (tests), so an element no program writes shows."""
    return torch.full_like(t, float("nan")) if poison else torch.empty_like(t)


def bn_relu_fwd(x2d, gamma, beta, mean, rstd, poison=False, plan=None):
    """relu(bn(x2d)) for a contiguous [M, C] matrix with given mean and rstd; a new [M, C] matrix.
    x2d may also be a channels-last contiguous [N, C, H, W] tensor (its rows): the output is then one too.
    plan: bn_relu_plan(x2d, "fwd") (kept by a caller that repeats the shape), or None."""
    if plan is None:
        plan = bn_relu_plan(x2d, "fwd")
    a = _empty_like(x2d, poison)
    if plan.grid is not None:  # None: no rows
        launch_planned(_bn_relu_fwd_kernel, plan, (x2d, a, gamma, beta, mean, rstd, *plan.sizes), x2d.device)
    return a


def bn_relu_bwd_reduce(da2d, x2d, gamma, beta, mean, rstd, poison=False, plan=None):
    """fp32 [3, C]: (dbeta = sum dz, sum dz * (x - mean), dgamma = sum dz * xhat) per channel,
    dz = da * [(x - mean)*scale + beta > 0], in one launch (matrices, or channels-last tensors, as
    bn_relu_fwd's). plan: bn_relu_plan(x2d, "reduce", da2d), or None."""
    if plan is None:
        plan = bn_relu_plan(x2d, "reduce", da2d)
    M, C, part_shape, num_row_tiles, n_tickets = plan.sizes
    dev = x2d.device
    part = fp32_empty(part_shape, dev, poison)
    sums = fp32_buffer(part, poison, 3, C)
    launch_planned(_bn_relu_bwd_reduce_kernel, plan,
                   (da2d, x2d, gamma, beta, mean, rstd, part, sums, tickets(dev, n_tickets), M, C, num_row_tiles), dev)
    return sums


def bn_relu_bwd_dx(da2d, x2d, gamma, beta, mean, rstd, sums, batch_stats, poison=False, plan=None):
    """dx of relu(bn(x)) for contiguous [M, C] matrices, or channels-last tensors (x's dtype); sums from
    bn_relu_bwd_reduce. plan: bn_relu_plan(x2d, "dx_batch" or "dx_running", da2d), or None."""
    if plan is None:
        plan = bn_relu_plan(x2d, "dx_batch" if batch_stats else "dx_running", da2d)
    dx = _empty_like(x2d, poison)
    if plan.grid is not None:
        launch_planned(_bn_relu_bwd_dx_kernel, plan, (da2d, x2d, dx, gamma, beta, mean, rstd, sums, *plan.sizes),
                       x2d.device)
    return dx


_PLANS = plan_cache()  # (device's card, M, C, which launch) -> Plan


def bn_relu_plan(x2d, which, da2d=None) -> Plan:
    """The launch plan of a BN-ReLU kernel on x2d's rows (`which`: "fwd", "reduce", "dx_batch" or
    "dx_running"), the arguments checked; grid None where there are no rows (nothing to launch)."""
    name = "bn_relu_fwd" if which == "fwd" else ("bn_relu_bwd_reduce" if which == "reduce" else "bn_relu_bwd_dx")
    M, C = _rows_of(name, x2d)
    if da2d is not None and _rows_of(name, da2d) != (M, C):
        raise ValueError(f"{name}: da2d must have x2d's shape {tuple(x2d.shape)}, got {tuple(da2d.shape)}")
    card = card_of(x2d.device)
    key = (card, M, C, which)
    plan = _PLANS.get(key)
    if plan is None:
        tile = tiles("bn_relu", card)
        block_c = min(tile["BLOCK_C_MAX"], max(16, 1 << (C - 1).bit_length()))
        grid = (cdiv(M, tile["BLOCK_M"]), cdiv(C, block_c))
        kwargs = dict(BLOCK_M=tile["BLOCK_M"], BLOCK_C=block_c)
        sizes = (M, C)
        if which == "reduce":
            num_row_tiles = grid[0]
            programs = max(1, min(tile["reduce_programs"], num_row_tiles))
            grid = (programs, grid[1])
            kwargs["BLOCK_P"] = tile["BLOCK_P"]
            sizes = (M, C, (2, programs, C), num_row_tiles, grid[1])
        elif which != "fwd":
            kwargs["BATCH_STATS"] = which == "dx_batch"
        plan = _PLANS[key] = Plan(key, sizes, kwargs, grid=grid if M > 0 or which == "reduce" else None)
    return plan
