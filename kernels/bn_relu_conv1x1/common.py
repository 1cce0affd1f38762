"""What the fused 1x1 kernels share: program order, the strided row gather, the BatchNorm prologue, the
tensor-core product, and the small launcher helpers.

Every kernel forms z with `_bn_apply`, so backward's ReLU mask [z > 0] is bit-identical to forward's.
"""
from __future__ import annotations

import triton
import triton.language as tl
import torch

from ..cards import interpreting

# Triton's CPU interpreter multiplies the raw bit patterns of bf16 tl.dot operands (triton issue 11584):
# there, and only there, bf16 operands are widened to fp32 before the product (exact: every bf16 value
# is an fp32 value, and the accumulation is fp32 anyway), so the interpreter computes what a tensor core
# does. On a GPU this branch does not exist (a constexpr False).
_WIDEN_BF16_DOTS = tl.constexpr(interpreting())


@triton.jit
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr):
    """acc + a @ b, fp32 accumulation (the tensor-core product; see _WIDEN_BF16_DOTS)."""
    if _WIDEN_BF16_DOTS:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


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
def _load_rows_cols(ptr_a, ptr_b, rows64, cols, row_ok, col_ok, split, n_total,
                    SPLIT: tl.constexpr):
    """Tile [rows, cols] of a matrix with n_total columns, stored whole (SPLIT False) or as two
    row-major matrices holding columns [0, split) and [split, n_total)."""
    mask = row_ok[:, None] & col_ok[None, :]
    if SPLIT:
        in_a = cols < split
        va = tl.load(ptr_a + rows64[:, None] * split + cols[None, :], mask=mask & in_a[None, :], other=0.0)
        vb = tl.load(ptr_b + rows64[:, None] * (n_total - split) + (cols - split)[None, :],
                     mask=mask & (~in_a)[None, :], other=0.0)
        v = tl.where(in_a[None, :], va, vb)
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
# Launcher helpers
# ---------------------------------------------------------------------------------------------------
def empty(shape, dtype, device, poison, channels_last=False):
    """An output buffer; NaN-filled with poison (tests), so an element no program writes shows."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if poison:
        return torch.full(shape, float("nan"), dtype=dtype, device=device).contiguous(memory_format=fmt)
    return torch.empty(shape, dtype=dtype, device=device, memory_format=fmt)


# Warm launches allocate their channels-last outputs here: new_empty_strided from a tensor of the dtype
# costs the host about half of torch.empty with keywords (the fp32 buffers: tuning.fp32_buffer).
def channels_last_buffer(like, shape, strides, dtype, poison):
    """A channels-last [N, C, H, W] buffer (strides given) of `dtype` on like's device; NaN-filled with
    poison. `like` lends its dtype when it has this one."""
    if poison:
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device).contiguous(
            memory_format=torch.channels_last)
    if like.dtype == dtype:
        return like.new_empty_strided(shape, strides)
    return torch.empty_strided(shape, strides, dtype=dtype, device=like.device)


def channels_last_strides(n, c, h, w):
    return (h * w * c, 1, w * c, c)


def dot_precision(dtype):
    # fp16/bf16 products are exact on tensor cores; fp32 follows cuDNN's convolution TF32 switch (read
    # from torch._C: the torch.backends.cudnn property costs a microsecond, and every launch asks).
    if dtype == torch.float32 and not torch._C._get_cudnn_allow_tf32():
        return "ieee"
    return "tf32"


def out_size(size, stride):
    """Spatial output size of a 1x1 conv without padding."""
    return (size - 1) // stride + 1


def tune_dtype(x_dtype, compute_dtype):
    """The dtype a tuned launch is keyed and its tiles' shared memory estimated on: the compute dtype, or
    x's where x is wider (an fp32 input under 16-bit autocast: its tiles are loaded at 4 bytes)."""
    return x_dtype if x_dtype.itemsize > compute_dtype.itemsize else compute_dtype


def check_addend(who, x, add_grad, accumulate_into):
    """The gradient to add to dx (accumulate_into: in place; add_grad: read only), checked; or None."""
    if accumulate_into is not None and add_grad is not None:
        raise ValueError(f"{who}: give accumulate_into or add_grad, not both")
    addend = accumulate_into if accumulate_into is not None else add_grad
    if addend is not None and (addend.shape != x.shape or addend.dtype != x.dtype
                               or not addend.is_contiguous(memory_format=torch.channels_last)):
        name = "accumulate_into" if accumulate_into is not None else "add_grad"
        raise ValueError(f"{who}: {name} must be a channels-last contiguous {x.dtype} tensor "
                         f"of shape {tuple(x.shape)}, got {addend.dtype} {tuple(addend.shape)}")
    return addend
