"""Fused BatchNorm-apply + ReLU + 1x1 convolution, forward and backward, in Triton.

A channels-last activation [N, C, H, W] is the row-major matrix X [M_in = N*H*W, K = C]; a 1x1 conv with
weight W [N_out, K] is a GEMM over its rows, and BatchNorm + ReLU is a per-column affine map and max(0, .)
applied to the GEMM's A operand as it is loaded (the "prologue"), so neither the BN output nor the ReLU
output ever exists in memory, in forward or in backward.

    z = (x - mean) * scale + beta    scale = gamma * rstd          (fp32, per column; centred first)
    a = relu(z)                      rounded to the compute dtype before the tensor-core product
    y = a[rows] @ W^T (+ bias) (+ residual)      rows: output row (n, ho, wo) reads input row (n, s*ho, s*wo)

Dtypes: x in its own dtype (fp32, fp16 or bf16): z, the ReLU mask and the BatchNorm sums are fp32 from x
as stored. The compute dtype (y, residual and dy; under torch.autocast the autocast dtype) is read off
the output / gradient pointer: a = relu(z) and W (any float dtype) are rounded to it before the
tensor-core product, as stock autocast rounds only the conv's input. mean/rstd/gamma/beta fp32 (z is
formed inside the kernels, so the host launches nothing for scale/shift);
all matrices contiguous row-major (channels-last contiguous tensors); stride 1 or 2; fp32 accumulation.
fp32 products use TF32 exactly when cuDNN convolutions would (torch.backends.cudnn.allow_tf32).
A "dual" output (SPLIT_OUT) writes columns [0, split) of y to one tensor and the rest to another, so
two convs sharing one pre-activation run as one GEMM with concatenated weights and still produce two
contiguous channels-last outputs (and take two gradients in backward).

  common.py    program order, row gather, the BatchNorm prologue, the tensor-core product
  forward.py   the forward kernel (statistics of y and the next BatchNorm's finish in its epilogue)
  backward.py  the backward's entry point (bn_relu_conv1x1_bwd) and its rule: two passes or three
  two_pass.py  reduce (dW and the BatchNorm sums, dz recomputed in registers) and dgrad (dx)
  three_pass.py  dz stored with the sums, the elementwise dx pass, and the dW / dz / dx launchers
Tiles come from kernels/configs.py per card; launches go through kernels/tuning.py (device guard, tile
choice). Launchers: plain functions over channels-last contiguous 4-D tensors (checked by the caller,
fastpreact.functional), each with a *_plan function whose result a caller repeating the shapes may keep
and pass back (plan=); `poison=True` fills every output with NaN first, so tests catch any element a
kernel fails to write.
"""
from .backward import (backward_passes, bn_relu_conv1x1_bwd, bn_relu_conv1x1_bwd_dw,  # noqa: F401
                       bn_relu_conv1x1_bwd_dx, bn_relu_conv1x1_bwd_dz, bwd_plan)
from .common import out_size  # noqa: F401
from .forward import bn_relu_conv1x1_fwd, fwd_plan  # noqa: F401

__all__ = ["bn_relu_conv1x1_fwd", "fwd_plan", "bn_relu_conv1x1_bwd", "bwd_plan", "backward_passes",
           "bn_relu_conv1x1_bwd_dw", "bn_relu_conv1x1_bwd_dz", "bn_relu_conv1x1_bwd_dx", "out_size"]
