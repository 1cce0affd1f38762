"""The fused 1x1 backward in two passes: one over the rows that reduces (dW and the BatchNorm sums, with
dz recomputed and never stored), one that writes dx (dz recomputed again). See backward.py for the math,
the costs and when the launcher takes the three-pass path (three_pass.py) instead.

Dtypes: x in its own dtype (fp32, fp16 or bf16); dy (and dy2) in the compute dtype, which the kernels
read off dy_ptr: the GEMM operands relu(z) and W are rounded to it, and dz's products accumulate in fp32;
z, the ReLU mask, xhat and the sums are fp32 from x as stored, exactly as the forward forms them.
"""
from __future__ import annotations

import math

import triton
import triton.language as tl

from ..batch_stats import _take_last_ticket
from ..cards import card_of
from ..configs import min_param
from ..tickets import tickets
from ..tuning import Plan, TunedKernel, cdiv, fp32_buffer, plan_cache
from .common import (_bn_apply, _bn_coeffs, _grouped_tile, _input_rows, _load_rows_cols, _mma, _sum_partials,
                     channels_last_buffer, channels_last_strides, check_addend, dot_precision, empty,
                     out_size, tune_dtype)

__all__ = ["REDUCE", "DGRAD", "reduce_rows", "reduce_plan", "reduce_splits", "dgrad", "dgrad_plan"]


# ---------------------------------------------------------------------------------------------------
# Pass 1, the reductions over rows. Program (pid_n, pid_k, pid_s) owns output channels n in its N tile,
# input channels k in its K tile and the rows of split s (M / num_splits output rows, rounded up to
# whole BLOCK_M steps), and computes
#   COMPUTE_DW:   dW_s[n, k]  = sum_m dy[m, n] * relu(z[r(m), k])          (rounded a, fp32 accumulation)
#   COMPUTE_SUMS: da_n[m, k]  = sum_{n in tile} dy[m, n] * W[n, k]         (its N tile's share of da)
#                 S_b[k] += sum_m da_n[m, k] * [z > 0],  S_g[k] += sum_m da_n[m, k] * [z > 0] * xhat[m, k]
# Both sums are linear in dz = da * [z > 0] = sum over N tiles of da_n * [z > 0], so the partials of every
# (split, N tile) add up to dbeta = sum dz and dgamma = sum dz * xhat without any program holding all of
# da. dz exists only in registers. The W tile is loaded once per program. Merges, each by the last
# program to take its ticket, in a fixed order (deterministic): dW[n-tile, k-tile] sums its splits'
# fp32 partials (one split: stored directly) and is stored in dw's dtype; the sums of a K tile add the
# [splits * N tiles] partial rows. Rows a stride-2 conv skips have dz = 0 and add nothing.
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _bn_relu_conv1x1_bwd_reduce_kernel(
    x_ptr,            # [M_in, K] input rows, x's own dtype
    dy_ptr,           # [M, N] gradient of y, compute dtype; with SPLIT_OUT [M, split]
    dy2_ptr,          # [M, N - split] gradient of the second output with SPLIT_OUT (else unused)
    w_ptr,            # [N, K] conv weight, any float dtype (unused unless COMPUTE_SUMS)
    mean_ptr,         # [K] fp32 BN mean used in forward
    rstd_ptr,         # [K] fp32 1/sqrt(var + eps) used in forward
    gamma_ptr,        # [K] fp32
    beta_ptr,         # [K] fp32
    dw_part_ptr,      # [num_splits, N, K] fp32 partial dW (unused unless COMPUTE_DW with several splits)
    dw_ptr,           # [N, K] out: dW in its own dtype (unused unless COMPUTE_DW)
    part_sums_ptr,    # [2, num_splits * cdiv(N, BLOCK_N), K] fp32 partial sums (unused unless COMPUTE_SUMS)
    sums_ptr,         # [2, K] fp32 out: dbeta = sum dz, dgamma = sum dz * xhat (unused unless COMPUTE_SUMS)
    ticket_ptr,       # [cdiv(N, BLOCK_N) * cdiv(K, BLOCK_K) + cdiv(K, BLOCK_K)] int32 tickets at 0
    part_rows,        # rows of each of the two halves of part_sums (its allocation, >= the rows used)
    M, K, N,          # output rows, input channels, output channels
    H, W, Ho, Wo,     # spatial sizes for the row gather
    split,          # columns of the first output when SPLIT_OUT
    STRIDE: tl.constexpr, SPLIT_OUT: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_SUMS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_k = tl.cdiv(K, BLOCK_K)
    pid_n = pid // num_pid_k
    pid_k = pid % num_pid_k
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    k_ok = offs_k < K
    cdt = dy_ptr.dtype.element_ty
    mean, scale, beta = _bn_coeffs(offs_k, k_ok, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr)
    rstd = tl.load(rstd_ptr + offs_k, mask=k_ok, other=0.0)
    tile_ok = n_ok[:, None] & k_ok[None, :]
    if COMPUTE_SUMS:
        wt = tl.load(w_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :], mask=tile_ok, other=0.0).to(cdt)
    acc_dw = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    sum_dz = tl.zeros([BLOCK_K], dtype=tl.float32)
    sum_dzx = tl.zeros([BLOCK_K], dtype=tl.float32)
    rows_per_split = tl.cdiv(tl.cdiv(M, tl.num_programs(1)), BLOCK_M) * BLOCK_M
    m_start = pid_s * rows_per_split
    m_end = tl.minimum(M, m_start + rows_per_split)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < m_end
        in_rows = _input_rows(tl.where(m_ok, offs_m, 0), H, W, Ho, Wo, STRIDE).to(tl.int64)
        xt = tl.load(x_ptr + in_rows[:, None] * K + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                     other=0.0).to(tl.float32)
        z = _bn_apply(xt, mean, scale, beta)  # exactly the forward's z
        dyt = _load_rows_cols(dy_ptr, dy2_ptr, offs_m.to(tl.int64), offs_n, m_ok, n_ok, split, N, SPLIT_OUT)
        dyt = dyt.to(cdt)
        if COMPUTE_DW:
            a = tl.where(m_ok[:, None], tl.maximum(z, 0.0), 0.0).to(cdt)
            acc_dw = _mma(tl.trans(dyt), a, acc_dw, DOT_PRECISION)
        if COMPUTE_SUMS:
            da = _mma(dyt, wt, tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32), DOT_PRECISION)
            dz = tl.where(z > 0.0, da, 0.0)  # rows outside the split: dy is 0 there, so da is too
            sum_dz += tl.sum(dz, axis=0)
            sum_dzx += tl.sum(dz * ((xt - mean[None, :]) * rstd[None, :]), axis=0)

    if COMPUTE_DW:
        _finish_dw(acc_dw, dw_part_ptr, dw_ptr, ticket_ptr + pid, offs_n, offs_k, tile_ok, pid_s, N, K)
    if COMPUTE_SUMS:
        rows = tl.num_programs(1) * num_pid_n
        row = pid_s * num_pid_n + pid_n
        tl.store(part_sums_ptr + row * K + offs_k, sum_dz, mask=k_ok)
        tl.store(part_sums_ptr + (part_rows + row) * K + offs_k, sum_dzx, mask=k_ok)
        if _take_last_ticket(ticket_ptr + num_pid_n * num_pid_k + pid_k, rows):
            _sum_partials(part_sums_ptr, part_sums_ptr + part_rows * K, sums_ptr, sums_ptr + K, offs_k, k_ok,
                          rows, K, 8, BLOCK_K)


@triton.jit
def _finish_dw(acc, dw_part_ptr, dw_ptr, ticket_ptr, offs_n, offs_k, tile_ok, pid_s, N, K):
    """Store a program's dW tile (one split), or its fp32 partial; the last split of the tile to take its
    ticket sums the partials in split order and stores dW in dw's dtype."""
    tile = offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
    num_splits = tl.num_programs(1)
    if num_splits == 1:
        tl.store(dw_ptr + tile, acc.to(dw_ptr.dtype.element_ty), mask=tile_ok)
    else:
        tl.store(dw_part_ptr + pid_s.to(tl.int64) * N * K + tile, acc, mask=tile_ok)
        if _take_last_ticket(ticket_ptr, num_splits):
            total = tl.zeros(acc.shape, dtype=tl.float32)
            for s in range(0, num_splits):
                total += tl.load(dw_part_ptr + s * N * K + tile, mask=tile_ok, other=0.0, cache_modifier=".cg")
            tl.store(dw_ptr + tile, total.to(dw_ptr.dtype.element_ty), mask=tile_ok)


# ---------------------------------------------------------------------------------------------------
# Pass 2, dx. Program (pid_m, pid_k) owns output rows m in its M tile and input channels k in its K tile:
#   da[m, k] = sum_n dy[m, n] * W[n, k]  (fp32, over all N),  dz = da * [z > 0]  at input row r(m)
#   BATCH_STATS:  dx = scale * (dz - dbeta / M_in - xhat * dgamma / M_in)      (scale = gamma * rstd)
#   else (eval):  dx = scale * dz
#   ACCUMULATE:   dx += dx_in  (a gradient already flowing into x; dx_in may be dx itself: in place)
# and dx is stored in x's dtype. A stride-s conv reads input row (n, s*ho, s*wo); the program of output
# row (n, ho, wo) also writes the input rows (n, s*ho + i, s*wo + j), 0 <= i, j < s, that the conv skips
# (every input row has exactly one such owner), with dz = 0 there. Every element of dx is read (when
# accumulating) and written by one program.
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _bn_relu_conv1x1_bwd_dgrad_kernel(
    dy_ptr,           # [M, N] gradient of y, compute dtype; with SPLIT_OUT [M, split]
    dy2_ptr,          # [M, N - split] gradient of the second output with SPLIT_OUT (else unused)
    w_ptr,            # [N, K] conv weight, any float dtype
    x_ptr,            # [M_in, K] input rows, x's own dtype
    mean_ptr,         # [K] fp32
    rstd_ptr,         # [K] fp32
    gamma_ptr,        # [K] fp32
    beta_ptr,         # [K] fp32
    sums_ptr,         # [2, K] fp32 dbeta, dgamma from pass 1 (unused unless BATCH_STATS)
    dx_in_ptr,        # [M_in, K] gradient to add, x's dtype (unused unless ACCUMULATE; may be dx_ptr)
    dx_ptr,           # [M_in, K] out: dx, x's dtype
    M, K, N,          # output rows, input channels, output channels
    H, W, Ho, Wo,     # spatial sizes for the row gather
    split,          # columns of the first output when SPLIT_OUT
    inv_count,        # 1 / M_in (the BatchNorm's values per channel)
    STRIDE: tl.constexpr, SPLIT_OUT: tl.constexpr, BATCH_STATS: tl.constexpr, ACCUMULATE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    num_pid_m = tl.cdiv(M, BLOCK_M)
    pid_m, pid_k = _grouped_tile(tl.program_id(0), num_pid_m, tl.cdiv(K, BLOCK_K), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    k_ok = offs_k < K
    cdt = dy_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + offs_n
        n_ok = ns < N
        dyt = _load_rows_cols(dy_ptr, dy2_ptr, offs_m.to(tl.int64), ns, m_ok, n_ok, split, N, SPLIT_OUT)
        wt = tl.load(w_ptr + ns.to(tl.int64)[:, None] * K + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :],
                     other=0.0)
        acc = _mma(dyt.to(cdt), wt.to(cdt), acc, DOT_PRECISION)

    mean, scale, beta = _bn_coeffs(offs_k, k_ok, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr)
    rstd = tl.load(rstd_ptr + offs_k, mask=k_ok, other=0.0)
    if BATCH_STATS:
        dbeta = tl.load(sums_ptr + offs_k, mask=k_ok, other=0.0)
        dgamma = tl.load(sums_ptr + K + offs_k, mask=k_ok, other=0.0)
    else:
        dbeta = tl.zeros([BLOCK_K], dtype=tl.float32)
        dgamma = tl.zeros([BLOCK_K], dtype=tl.float32)
    m_safe = tl.where(m_ok, offs_m, 0)
    rows = _input_rows(m_safe, H, W, Ho, Wo, STRIDE).to(tl.int64)
    mask = m_ok[:, None] & k_ok[None, :]
    x = tl.load(x_ptr + rows[:, None] * K + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
    dz = tl.where(_bn_apply(x, mean, scale, beta) > 0.0, acc, 0.0)  # the forward's own mask
    _store_dx(dz, x, rows, mask, offs_k, mean, rstd, scale, dbeta, dgamma, inv_count, dx_in_ptr, dx_ptr, K,
              BATCH_STATS, ACCUMULATE)
    if STRIDE > 1:  # the input rows this tile's output rows own and the conv skips: dz = 0
        n_img = m_safe // (Ho * Wo)
        rem = m_safe - n_img * (Ho * Wo)
        ho = rem // Wo
        wo = rem - ho * Wo
        for d in tl.static_range(1, STRIDE * STRIDE):
            h = ho * STRIDE + d // STRIDE
            w = wo * STRIDE + d % STRIDE
            row_ok = m_ok & (h < H) & (w < W)
            rows_d = (n_img * (H * W) + h * W + w).to(tl.int64)
            mask_d = row_ok[:, None] & k_ok[None, :]
            x_d = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
            if BATCH_STATS:  # xhat is needed; in eval dx = 0 (+ dx_in) there
                x_d = tl.load(x_ptr + rows_d[:, None] * K + offs_k[None, :], mask=mask_d, other=0.0).to(tl.float32)
            _store_dx(tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32), x_d, rows_d, mask_d, offs_k, mean, rstd,
                      scale, dbeta, dgamma, inv_count, dx_in_ptr, dx_ptr, K, BATCH_STATS, ACCUMULATE)


@triton.jit
def _store_dx(dz, x, rows64, mask, offs_k, mean, rstd, scale, dbeta, dgamma, inv_count, dx_in_ptr, dx_ptr, K,
              BATCH_STATS: tl.constexpr, ACCUMULATE: tl.constexpr):
    """dx of a tile of input rows from its dz (fp32) and x (fp32; unused in eval), stored in dx's dtype."""
    if BATCH_STATS:
        xhat = (x - mean[None, :]) * rstd[None, :]
        dx = scale[None, :] * (dz - (dbeta * inv_count)[None, :] - xhat * (dgamma * inv_count)[None, :])
    else:
        dx = scale[None, :] * dz
    offs = rows64[:, None] * K + offs_k[None, :]
    if ACCUMULATE:
        dx += tl.load(dx_in_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


REDUCE = TunedKernel(_bn_relu_conv1x1_bwd_reduce_kernel, "bn_relu_conv1x1_bwd_reduce")
# Accumulating in place (dx_in is dx): the tuner puts dx back after each timed candidate.
DGRAD = TunedKernel(_bn_relu_conv1x1_bwd_dgrad_kernel, "bn_relu_conv1x1_bwd_dgrad", restore=("dx_ptr",))


def reduce_splits(M, K, N, block_n, block_k, card, block_m=128):
    """Row splits of the reduce pass for a (BLOCK_N, BLOCK_K) tile: the grid's second axis.

    A program streams M / S rows of x and dy; the last program of each (N, K) tile then reads all S fp32
    partials of it (S * BLOCK_N * BLOCK_K * 4 bytes) alone. The sum of the two, M (BN + BK) e / S +
    4 S BN BK (e = 2), is least at S = sqrt(M (BN + BK) e / (4 BN BK)); more than one wave of programs
    (card.sms) only adds merge work. So S = min(that, cdiv(sms, tiles)), at least 1 and at most one split
    per BLOCK_M rows. At most the fp32 partials of sms tiles are written and read back per call. The
    interpreter takes splits of 128 rows, so the tests' shapes cover the merges."""
    if card.is_interpreter:
        return cdiv(M, 128)
    tiles = cdiv(N, block_n) * cdiv(K, block_k)
    balanced = math.isqrt(M * (block_n + block_k) * 2 // (4 * block_n * block_k))
    return max(1, min(balanced, cdiv(card.sms, tiles), cdiv(M, block_m)))


# (M, K, N, card) -> the reduce pass's buffer plan, computed once per shape. A plan cache: clear() empties
# it, since it is sized for the card's configs of the moment (the tests' tuner emulation adds smaller
# tiles, whose partials and tickets would overrun buffers sized before).
_PLANS = plan_cache()


def _reduce_plan(M, K, N, card):
    """(N tiles, K tiles, splits) at the smallest tiles of the card's configs: the partial buffers and
    tickets are sized for them, so they fit whichever config the tuner picks."""
    key = (M, K, N, card)
    plan = _PLANS.get(key)
    if plan is None:
        min_n, min_k = min_param(REDUCE.name, card, "BLOCK_N"), min_param(REDUCE.name, card, "BLOCK_K")
        splits = reduce_splits(M, K, N, min_n, min_k, card, min_param(REDUCE.name, card, "BLOCK_M"))  # the most
        plan = _PLANS[key] = (cdiv(N, min_n), cdiv(K, min_k), splits)
    return plan


def reduce_rows(x, dy, dy2, weight2d, mean, rstd, gamma, beta, *, stride, w_dtype, need_w, need_sums, poison,
                plan=None):
    """Pass 1 in one launch: (dW [Cout, K] in w_dtype or None, [2, K] fp32 rows (dbeta; dgamma) or None).
    weight2d is read only for the sums (None without them). plan: reduce_plan's, or None."""
    if plan is None:
        plan = reduce_plan(x, dy, dy2, stride=stride, w_dtype=w_dtype, need_w=need_w, need_sums=need_sums)
    dw_shape, part_shape, part_sums_shape, n_tickets, part_rows, M, K, Cout, H, W, Ho, Wo, split, grid = plan.sizes
    dev = x.device
    dw = empty(dw_shape, w_dtype, dev, poison) if need_w else None
    part = fp32_buffer(mean, poison, *part_shape) if part_shape is not None else None
    if need_sums:  # mean is fp32: the template of the fp32 buffers
        sums = fp32_buffer(mean, poison, 2, K)
        part_sums = fp32_buffer(mean, poison, *part_sums_shape)
    else:
        sums = part_sums = None
    args = (x, dy, dy if dy2 is None else dy2, dy if weight2d is None else weight2d, mean, rstd, gamma, beta,
            mean if part is None else part, mean if dw is None else dw, mean if part_sums is None else part_sums,
            mean if sums is None else sums, tickets(dev, n_tickets), part_rows, M, K, Cout, H, W, Ho, Wo, split)
    REDUCE.run_planned(plan, grid, args, card=plan.key[9], device=dev, dtype=tune_dtype(x.dtype, dy.dtype))
    return dw, sums


def reduce_plan(x, dy, dy2, *, stride, w_dtype, need_w, need_sums) -> Plan:
    """The launch plan of reduce_rows with these arguments' shapes, dtypes and flags."""
    cdt = dy.dtype
    key = (x.shape, x.dtype, dy.shape[1], None if dy2 is None else dy2.shape[1], stride, w_dtype, need_w, need_sums,
           cdt, card_of(x.device), dot_precision(cdt))
    plan = _REDUCE_PLANS.get(key)
    if plan is None:
        plan = _REDUCE_PLANS[key] = _reduce_launch_plan(key)
    return plan


_REDUCE_PLANS = plan_cache()  # reduce_rows's key -> Plan
_DGRAD_PLANS = plan_cache()   # dgrad's key -> Plan


def _reduce_launch_plan(key) -> Plan:
    x_shape, _, c_a, c_b, stride, _, need_w, need_sums, _, card, precision = key
    Nb, K, H, W = x_shape
    Ho, Wo = out_size(H, stride), out_size(W, stride)
    split = c_a if c_b is not None else 0
    Cout = c_a + (c_b or 0)
    M = Nb * Ho * Wo
    tiles_n, tiles_k, splits = _reduce_plan(M, K, Cout, card)
    part_rows = splits * tiles_n

    def grid(tile):
        return (cdiv(Cout, tile["BLOCK_N"]) * cdiv(K, tile["BLOCK_K"]),
                reduce_splits(M, K, Cout, tile["BLOCK_N"], tile["BLOCK_K"], card, tile["BLOCK_M"]))

    sizes = ((Cout, K), (splits, Cout, K) if need_w and splits > 1 else None, (2, part_rows, K),
             tiles_n * tiles_k + tiles_k, part_rows, M, K, Cout, H, W, Ho, Wo, split, grid)
    return Plan(key, sizes, dict(STRIDE=stride, SPLIT_OUT=c_b is not None, COMPUTE_DW=need_w, COMPUTE_SUMS=need_sums,
                            DOT_PRECISION=precision))


def dgrad(x, dy, dy2, weight2d, mean, rstd, gamma, beta, sums, *, stride, batch_stats, add_grad=None,
          accumulate_into=None, poison=False, plan=None):
    """Pass 2 in one launch: dx [N, K, H, W] channels-last in x's dtype (sums: pass 1's [2, K], read with
    batch statistics). accumulate_into / add_grad: as bn_relu_conv1x1_bwd_dx's. plan: dgrad_plan's, or None
    (with a plan the addend is taken as checked)."""
    if plan is None:
        addend = check_addend("bn_relu_conv1x1_bwd", x, add_grad, accumulate_into)
        plan = dgrad_plan(x, dy, dy2, weight2d, stride=stride, batch_stats=batch_stats, accumulate=addend is not None)
    else:
        addend = accumulate_into if accumulate_into is not None else add_grad
    dev = x.device
    out = accumulate_into if accumulate_into is not None else channels_last_buffer(x, plan.key[0], plan.sizes[-2],
                                                                                 x.dtype, poison)
    args = (dy, dy2 if dy2 is not None else dy, weight2d, x, mean, rstd, gamma, beta,
            sums if sums is not None else mean, addend if addend is not None else out, out, *plan.sizes[:-2])
    DGRAD.run_planned(plan, plan.sizes[-1], args, card=plan.key[8], device=dev, dtype=tune_dtype(x.dtype, dy.dtype))
    return out


def dgrad_plan(x, dy, dy2, weight2d, *, stride, batch_stats, accumulate) -> Plan:
    """The launch plan of dgrad with these arguments' shapes, dtypes and flags (accumulate: an addend given)."""
    cdt = dy.dtype
    key = (x.shape, x.dtype, weight2d.shape[0], dy2 is not None and dy.shape[1], stride, batch_stats, accumulate,
           cdt, card_of(x.device), dot_precision(cdt))
    plan = _DGRAD_PLANS.get(key)
    if plan is None:
        plan = _DGRAD_PLANS[key] = _dgrad_launch_plan(key)
    return plan


def _dgrad_launch_plan(key) -> Plan:
    x_shape, _, Cout, split, stride, batch_stats, accumulate, _, _, precision = key
    Nb, K, H, W = x_shape
    Ho, Wo = out_size(H, stride), out_size(W, stride)
    M = Nb * Ho * Wo

    def grid(tile):
        return (cdiv(M, tile["BLOCK_M"]) * cdiv(K, tile["BLOCK_K"]),)

    return Plan(key, (M, K, Cout, H, W, Ho, Wo, split or 0, 1.0 / (Nb * H * W), channels_last_strides(*x_shape), grid),
                dict(STRIDE=stride, SPLIT_OUT=split is not False, BATCH_STATS=batch_stats, ACCUMULATE=accumulate,
                     DOT_PRECISION=precision))
