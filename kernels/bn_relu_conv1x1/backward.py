"""The fused 1x1 backward: one entry point, bn_relu_conv1x1_bwd, which runs two passes (two_pass.py) or,
where recomputing dz would cost more than storing it, three (three_pass.py).

Backward (xhat = (x - mean) * rstd, M_in = the BatchNorm's rows, r(m) the input row of output row m):
    dW    = a[rows]^T @ dy                      a = relu(z) recomputed from x, rounded to the compute dtype
    dz    = (dy @ W) * [z > 0]                  at the sampled rows; 0 at rows a stride-2 conv skips
    dbeta = sum_rows dz,  dgamma = sum_rows dz * xhat
    dx    = scale * (dz - dbeta / M_in - xhat * dgamma / M_in)    (batch statistics; eval: scale * dz)
          [+ a gradient already flowing into x, e.g. through an identity shortcut]
dx needs the sums, which need all of dz: something must either store dz or compute it twice.

Two passes (the default), e = element bytes (x and dy alike), stride 1:
  1. reduce: per (row split, N tile, K tile): dW's partial a^T dy and the sums' partials from dz
     recomputed as (dy_ntile @ W_ntile) * mask (both sums are linear in dz, so N tiles add up); the last
     program merges (dW in w_dtype, dbeta, dgamma fp32). Reads x, dy, W.          4MKN FLOPs
  2. dgrad: per (M tile, K tile): dz = (dy @ W) * mask again, dx from it and the sums; the program of
     an output row also writes the input rows a stride-2 conv skips. Reads dy, W, x; writes dx. 2MKN FLOPs
  e(3MK + 2MN + 2NK) bytes and 6MKN FLOPs per call, against e(6MK + 2MN + 2NK) and 4MKN for three passes
  (dW: x, dy; dz: dy, W, x, writes dz; dx: x, dz, writes dx). At stride 2 the rows the conv skips are
  read and written by the dx pass only: 2 * M_in * K of the bytes either way.
Where only the sums, only dW or only dx are needed the trade does not arise (nothing is computed
twice): one or two passes, never three.

When three passes. The trade is 2MKN FLOPs against (ex + 2e)MK bytes (x read once more, dz written and
read back; ex: x's element size). By a per-launch roofline, t(launch) = max(FLOPs / R, bytes / B) with R
the card's dense tensor-core rate in the compute dtype and B its copy bandwidth, the launcher takes three
passes where their predicted time is below two passes' (backward_passes: a function of M, M_in, K, N,
the element sizes, what is needed and the card's ridge point R / B), with the third launch's boundary
counted as 4 MB moved (LAUNCH_BYTES, ~1.4 us on an H100), so small shapes keep two. The fp32 partials
and the host's launch cost are left out (the host runs ahead of the GPU in a large step). With the cost
model's H100 (800 TFLOP/s bf16, 3.0 TB/s: ridge 267 FLOP/byte, fastpreact/cost/roofline.py), bf16
activations and fp32 weights, the reduce pass (4MKN FLOPs) turns compute-bound only where both K and N
are large and M is small, i.e. in the last stages of the ImageNet nets. Predicted us per call (launch
boundary not included), two passes / three [chosen]:
    ResNet-200, -50:   512->2048  7x7            24.6 / 19.6 [3]
                       1024->2048 s2 14x14 proj  57.0 / 52.1 [3]
                       512->1024  s2 28x28 proj  76.4 / 72.8 [3]
                       2048->512  7x7 (+ dx add) 31.7 / 36.4 [2]
                       256->1024  14x14          29.6 / 30.7 [2]
                       256->64    56x56 (+ add) 154.2 / 256.9 [2]
  Sums over a step's 1x1 backward calls (ms): ResNet-200 6.93 two-pass only, 9.66 three-pass only,
  6.91 with the rule; ResNet-50 2.21 / 3.02 / 2.18; ResNet-164 and -1001 (CIFAR, K, N <= 256): always
  two (1.31 / 1.96, 7.92 / 11.98).
Ridge points per card (RIDGE): 16-bit dense tensor-core FLOP/s over ~90% of the datasheet bandwidth;
TF32 halves the rate, IEEE fp32 (no tensor cores) divides it by 16. The interpreter takes the H100's,
so the CPU tests and the cost model see the decisions an H100 takes.

FASTPREACT_BACKWARD_PASSES=2 or 3 in the environment forces one path for every call (to time both on a
card, or to compile the three-pass kernels from small shapes).

Launchers: bn_relu_conv1x1_bwd (the whole backward) and, public for the three-pass path and for tests,
bn_relu_conv1x1_bwd_dw / _dz / _dx (three_pass.py).
"""
from __future__ import annotations

import os

from ..cards import card_of
from .common import check_addend, dot_precision, out_size
from .three_pass import bn_relu_conv1x1_bwd_dw, bn_relu_conv1x1_bwd_dx, bn_relu_conv1x1_bwd_dz
from .two_pass import dgrad, dgrad_plan, reduce_plan, reduce_rows

__all__ = ["bn_relu_conv1x1_bwd", "bwd_plan", "backward_passes", "RIDGE", "bn_relu_conv1x1_bwd_dw",
           "bn_relu_conv1x1_bwd_dz", "bn_relu_conv1x1_bwd_dx"]

# Dense 16-bit tensor-core FLOP/s (fp32 accumulation) over ~90% of the DRAM datasheet bandwidth, FLOP per
# byte, by architecture: A100 312 T / 1.84 TB/s; L40S, L4, RTX 6000 Ada ~440 (an RTX 4090 ~180); H100 the
# cost model's 800 T / 3.0 TB/s; B200 2250 T / 7.2 TB/s; RTX 5090 210 T / 1.6 TB/s. Others: by family.
RIDGE = {80: 170.0, 89: 440.0, 90: 267.0, 100: 312.0, 120: 130.0}
# A kernel boundary (the grid's drain and ramp-up, ~1-2 us), in bytes moved (~1.4 us at an H100's 3 TB/s):
# three passes make one launch more, which small shapes do not earn back.
LAUNCH_BYTES = 4 << 20
_RIDGE_BY_FAMILY = {"ampere": 170.0, "small": 300.0, "hopper": 267.0, "interpreter": 267.0}
_RATE_BY_PRECISION = {"16-bit": 1.0, "tf32": 0.5, "ieee": 1.0 / 16}


def _ridge(card, dtype):
    ridge = RIDGE.get(card.arch) or _RIDGE_BY_FAMILY.get(card.family, 267.0)
    precision = "16-bit" if dtype.itemsize == 2 else dot_precision(dtype)
    return ridge * _RATE_BY_PRECISION[precision]


def backward_passes(M, M_in, K, N, *, x_bytes, e, w_bytes, card, dtype, need_w=True, accumulate=False):
    """2 or 3: the passes of a backward that needs dx and the BatchNorm sums, whichever the per-launch
    roofline predicts faster on `card` (see the module docstring). M / M_in: output / input rows; x_bytes,
    e, w_bytes: element sizes of x, dy (the compute dtype `dtype`) and W; accumulate: dx adds a gradient."""
    ridge = _ridge(card, dtype)
    gemm = 2.0 * M * K * N

    def t(flops, nbytes):  # a launch's time in bytes at the card's bandwidth
        return max(flops / ridge, nbytes)
    dx_bytes = x_bytes * M_in * K * (2 + accumulate)
    two = (t(gemm * (1 + need_w), x_bytes * M * K + e * M * N + w_bytes * N * K * (1 + need_w))
           + t(gemm, e * M * N + w_bytes * N * K + dx_bytes))
    three = (t(gemm, x_bytes * M * K + e * M * N + w_bytes * N * K) if need_w else 0.0) \
        + t(gemm, e * M * N + w_bytes * N * K + x_bytes * M * K + e * M * K) + dx_bytes + e * M * K
    return 2 if two <= three + LAUNCH_BYTES else 3


def forced_passes():
    """2 or 3 when FASTPREACT_BACKWARD_PASSES says so (to time or compile both paths on any shape), else
    None: the rule decides."""
    value = os.environ.get("FASTPREACT_BACKWARD_PASSES")
    return int(value) if value in ("2", "3") else None


FORCED_PASSES = forced_passes()  # read once: the rule is asked at every backward call
_PASSES: dict = {}  # (shapes, dtypes, stride, flags, card) -> 2 or 3: the rule once per shape


def _planned_passes(x, dy, weight2d, stride, need_w, accumulate):
    card = card_of(x.device)
    key = (x.shape, x.dtype, dy.dtype, weight2d.shape, weight2d.dtype, stride, need_w, accumulate, card)
    passes = _PASSES.get(key)
    if passes is None:
        Nb, K, H, W = x.shape
        M = Nb * out_size(H, stride) * out_size(W, stride)
        passes = _PASSES[key] = backward_passes(
            M, Nb * H * W, K, weight2d.shape[0], x_bytes=x.element_size(), e=dy.element_size(),
            w_bytes=weight2d.element_size(), card=card, dtype=dy.dtype, need_w=need_w, accumulate=accumulate)
    return passes


def bn_relu_conv1x1_bwd(x, dy, weight2d, mean, rstd, gamma, beta, *, stride=1, dy2=None, batch_stats=True,
                        need_x=True, need_w=True, need_bn=True, add_grad=None, accumulate_into=None, w_dtype=None,
                        passes=None, poison=False, plan=None):
    """The backward of y = relu((x - mean) * gamma * rstd + beta) (*) weight2d: (dx, dW, dbeta, dgamma),
    None for each one not needed.

    x: [N, K, H, W] channels-last contiguous, its own dtype (fp32, fp16, bf16); dy: [N, Cout, Ho, Wo]
    channels-last contiguous in the compute dtype (the forward's out_dtype), or with dy2 (a dual op's two
    outputs: dy's channels first) [N, split, Ho, Wo] and [N, Cout - split, Ho, Wo]; weight2d: [Cout, K]
    contiguous, any float dtype (rounded to the compute dtype as it is loaded); mean, rstd, gamma, beta:
    [K] fp32 contiguous (the statistics the forward normalised with).
    batch_stats: the forward used batch statistics (dx through mean and rstd), else running ones.
    need_x / need_w / need_bn: which gradients to compute (dbeta and dgamma come together).
    add_grad: a gradient of x's shape and dtype (channels-last) added to dx (read only);
    accumulate_into: the same, but dx is added into it in place and it is returned as dx.
    w_dtype: dW's dtype (default weight2d's). passes: 2 or 3 to force a path (tests); None: the rule, or
    the environment's FASTPREACT_BACKWARD_PASSES (2 or 3) where set when the kernels are imported.
    plan: bwd_plan's for these arguments (kept by a caller that repeats them; the arguments are then taken
    as checked), or None.
    Returns dx (x's dtype, channels-last), dW ([Cout, K], w_dtype), dbeta and dgamma (fp32 [K], two rows
    of one [2, K] buffer).
    """
    need_sums = need_bn or (need_x and batch_stats)
    w_dtype = weight2d.dtype if w_dtype is None else w_dtype
    if plan is None:
        _check(x, dy, dy2, need_x, add_grad, accumulate_into)
        check_addend("bn_relu_conv1x1_bwd", x, add_grad, accumulate_into)
        plan = bwd_plan(x, dy, weight2d, stride=stride, dy2=dy2, batch_stats=batch_stats, need_x=need_x,
                        need_w=need_w, need_bn=need_bn, accumulate=add_grad is not None or accumulate_into is not None,
                        w_dtype=w_dtype, passes=passes)
    passes, red, dg = plan
    dx = dw = sums = None
    if passes == 3:
        if need_w:
            dw = bn_relu_conv1x1_bwd_dw(x, dy, mean, rstd, gamma, beta, stride=stride, dy2=dy2, out_dtype=w_dtype,
                                        poison=poison)
        dz, dbeta, dgamma = bn_relu_conv1x1_bwd_dz(dy, weight2d, x, mean, rstd, gamma, beta, stride=stride, dy2=dy2,
                                                   poison=poison)
        sums = (dbeta, dgamma)  # rows of one [2, K] buffer, as the two-pass path's
        dx = bn_relu_conv1x1_bwd_dx(x, dz, mean, rstd, gamma, dbeta, dgamma, stride=stride, batch_stats=batch_stats,
                                    add_grad=add_grad, accumulate_into=accumulate_into, poison=poison)
    else:
        if red is not None:
            dw, sums = reduce_rows(x, dy, dy2, weight2d if need_sums else None, mean, rstd, gamma, beta,
                                   stride=stride, w_dtype=w_dtype, need_w=need_w, need_sums=need_sums, poison=poison,
                                   plan=red)
        if dg is not None:
            dx = dgrad(x, dy, dy2, weight2d, mean, rstd, gamma, beta, sums, stride=stride, batch_stats=batch_stats,
                       add_grad=add_grad, accumulate_into=accumulate_into, poison=poison, plan=dg)
    if need_bn:
        return dx, dw, sums[0], sums[1]
    return dx, dw, None, None


def bwd_plan(x, dy, weight2d, *, stride=1, dy2=None, batch_stats=True, need_x=True, need_w=True, need_bn=True,
             accumulate=False, w_dtype=None, passes=None):
    """The plan of bn_relu_conv1x1_bwd with these arguments (tensors for their shapes and dtypes;
    accumulate: an add_grad or accumulate_into is given): (3, None, None) for the three-pass path, else
    (2, reduce_rows's plan or None, dgrad's plan or None)."""
    need_sums = need_bn or (need_x and batch_stats)
    w_dtype = weight2d.dtype if w_dtype is None else w_dtype
    if passes is None:
        passes = FORCED_PASSES
    if passes is None:
        passes = 2
        if need_x and need_sums:
            passes = _planned_passes(x, dy, weight2d, stride, need_w, accumulate)
    if passes not in (2, 3):
        raise ValueError(f"bn_relu_conv1x1_bwd: passes must be 2, 3 or None, got {passes!r}")
    if passes == 3 and need_x and need_sums:
        return 3, None, None
    red = reduce_plan(x, dy, dy2, stride=stride, w_dtype=w_dtype, need_w=need_w,
                      need_sums=need_sums) if need_w or need_sums else None
    dg = (dgrad_plan(x, dy, dy2, weight2d, stride=stride, batch_stats=batch_stats, accumulate=accumulate)
          if need_x else None)
    return 2, red, dg


def _check(x, dy, dy2, need_x, add_grad, accumulate_into):
    if dy2 is not None and dy2.dtype != dy.dtype:
        raise TypeError(f"bn_relu_conv1x1_bwd: dy2 must have dy's dtype {dy.dtype}, got {dy2.dtype}")
    if not (x.is_floating_point() and dy.is_floating_point()):
        raise TypeError("bn_relu_conv1x1_bwd: x and dy must be floating point")
    if (add_grad is not None or accumulate_into is not None) and not need_x:
        raise ValueError("bn_relu_conv1x1_bwd: add_grad / accumulate_into are added to dx: they need need_x=True")
