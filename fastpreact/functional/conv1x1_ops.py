"""The Triton side of bn_relu_conv1x1: the forward and backward launches (implementation functions), the
PyTorch operators that run them (torch.ops.fastpreact.bn_relu_conv1x1, bn_relu_conv1x1_dual,
bn_relu_conv1x1_backward, with fake implementations) and the autograd Function around them.

The forward operators may finish the BatchNorm that consumes their output (the kernel's last program
computes its rstd, updates its running statistics and increments its num_batches_tracked): those
buffers are declared as mutated arguments. An operator that mutates its arguments cannot carry a
registered autograd formula, so _BNReLUConv1x1Triton (plain PyTorch around the operators, which dynamo
traces without a graph break) is the autograd of both forward operators; its backward is the backward
operator. The identity shortcut's gradient (ShortcutGrad) is the backward operator's optional add_grad,
which the dx pass adds.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .backends import kernels, poison
from .library import custom_op, no_tensor

__all__ = ["ShortcutGrad", "conv1x1_forward_impl", "conv1x1_backward_impl", "out_shape"]


def out_shape(x, cout, stride):
    n, _, h, w = x.shape
    return (n, cout, (h - 1) // stride + 1, (w - 1) // stride + 1)


# ---------------------------------------------------------------------------------------------------
# The implementation (forward and backward launches)
# ---------------------------------------------------------------------------------------------------
def conv1x1_forward_impl(x, weight, gamma, beta, mean, rstd, conv_bias, residual, stride, output_stats, n_split,
                         out_bn=None):
    """The forward launch: ([y] or [y_a, y_b], (mean, var[, rstd with out_bn]) of the output as stored,
    or None). out_bn: the consuming BatchNorm's finishing arguments (see kernels' bn_relu_conv1x1_fwd)."""
    kc = kernels("bn_relu_conv1x1")
    w2d = weight.reshape(weight.shape[0], -1).contiguous()  # the kernels round it to x's dtype as they load it
    out, stats = kc.bn_relu_conv1x1_fwd(
        x, w2d, mean, rstd, gamma, beta, stride=stride,
        bias=None if conv_bias is None else conv_bias.detach().float().contiguous(),
        residual=residual, n_split=n_split, out_stats=output_stats, out_bn=out_bn, poison=poison())
    return (list(out) if n_split else [out]), stats


def conv1x1_backward_impl(dy, dy2, x, weight, gamma, beta, mean, rstd, stride, use_batch_stats, need_x, need_w,
                          need_bn, add_grad=None):
    """The backward launches: (dx, dW, dbeta, dgamma), None where not needed; dbeta, dgamma fp32, dW in
    the weight's dtype. dy (and dy2, the second output's gradient of a split op) channels-last in x's
    dtype; add_grad (x's shape and dtype, channels-last): added to dx in its pass."""
    kc = kernels("bn_relu_conv1x1")
    poisoned = poison()
    dx = dw = dgamma = dbeta = None
    if need_w:
        dw = kc.bn_relu_conv1x1_bwd_dw(x, dy, mean, rstd, gamma, beta, stride=stride, dy2=dy2,
                                       out_dtype=weight.dtype, poison=poisoned).view(weight.shape)
    if need_x or need_bn:
        w2d = weight.reshape(weight.shape[0], -1).contiguous()
        dz, dbeta, dgamma = kc.bn_relu_conv1x1_bwd_dz(dy, w2d, x, mean, rstd, gamma, beta, stride=stride,
                                                      dy2=dy2, poison=poisoned)
        if need_x:
            dx = kc.bn_relu_conv1x1_bwd_dx(x, dz, mean, rstd, gamma, dbeta, dgamma, stride=stride,
                                           batch_stats=use_batch_stats, add_grad=add_grad, poison=poisoned)
    return dx, dw, dbeta, dgamma


# ---------------------------------------------------------------------------------------------------
# The operators
# ---------------------------------------------------------------------------------------------------
# (no defaults: some torch versions drop defaulted trailing arguments before bumping the mutated ones'
# versions by position)
_OUT_BN = ("out_running_mean", "out_running_var", "out_num_batches_tracked")


def _out_bn(out_running_mean, out_running_var, out_num_batches_tracked, out_momentum, out_eps):
    """The kernel's out_bn from the operator's arguments (out_eps None: no BatchNorm to finish)."""
    if out_eps is None:
        return None
    return dict(eps=out_eps, running_mean=out_running_mean, running_var=out_running_var,
                num_batches_tracked=out_num_batches_tracked, momentum=out_momentum)


def _out_like(x, cout, stride):
    return x.new_empty(out_shape(x, cout, stride)).contiguous(memory_format=torch.channels_last)


def _stats_out(stats, like):
    """(mean, var, rstd) of the output; an empty tensor for each one not computed (operators return a
    fixed number of tensors)."""
    stats = tuple(stats or ())
    return stats + tuple(no_tensor(like) for _ in range(3 - len(stats)))


def _stats_fake(mean, cout, output_stats, finished, out_eps):
    k = cout if output_stats else 0
    return mean.new_empty((k,)), mean.new_empty((k,)), mean.new_empty((finished if out_eps is not None else 0,))


@custom_op("bn_relu_conv1x1", mutates_args=_OUT_BN)
def _conv1x1_op(x: Tensor, weight: Tensor, gamma: Tensor, beta: Tensor, mean: Tensor, rstd: Tensor,
                conv_bias: Optional[Tensor], residual: Optional[Tensor], stride: int, use_batch_stats: bool,
                output_stats: bool, out_running_mean: Optional[Tensor], out_running_var: Optional[Tensor],
                out_num_batches_tracked: Optional[Tensor], out_momentum: Optional[float],
                out_eps: Optional[float]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, var, rstd): the output's statistics when output_stats, the consuming BatchNorm's rstd
    when out_eps is given (its running statistics and counter updated in the same launch)."""
    fin = _out_bn(out_running_mean, out_running_var, out_num_batches_tracked, out_momentum, out_eps)
    outs, stats = conv1x1_forward_impl(x, weight, gamma, beta, mean, rstd, conv_bias, residual, stride,
                                       output_stats, 0, fin)
    return (outs[0], *_stats_out(stats, mean))


@_conv1x1_op.register_fake
def _(x, weight, gamma, beta, mean, rstd, conv_bias, residual, stride, use_batch_stats, output_stats,
      out_running_mean, out_running_var, out_num_batches_tracked, out_momentum, out_eps):
    cout = weight.shape[0]
    return (_out_like(x, cout, stride), *_stats_fake(mean, cout, output_stats, cout, out_eps))


@custom_op("bn_relu_conv1x1_dual", mutates_args=_OUT_BN)
def _dual_op(x: Tensor, weight: Tensor, gamma: Tensor, beta: Tensor, mean: Tensor, rstd: Tensor, stride: int,
             use_batch_stats: bool, output_stats: bool, n_split: int, out_running_mean: Optional[Tensor],
             out_running_var: Optional[Tensor], out_num_batches_tracked: Optional[Tensor],
             out_momentum: Optional[float], out_eps: Optional[float]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y_a, y_b, mean, var, rstd) of one GEMM over the concatenated weights (n_split rows for y_a); the
    BatchNorm finished with out_eps is y_a's."""
    fin = _out_bn(out_running_mean, out_running_var, out_num_batches_tracked, out_momentum, out_eps)
    outs, stats = conv1x1_forward_impl(x, weight, gamma, beta, mean, rstd, None, None, stride, output_stats,
                                       n_split, fin)
    return (*outs, *_stats_out(stats, mean))


@_dual_op.register_fake
def _(x, weight, gamma, beta, mean, rstd, stride, use_batch_stats, output_stats, n_split, out_running_mean,
      out_running_var, out_num_batches_tracked, out_momentum, out_eps):
    cout = weight.shape[0]
    return (_out_like(x, n_split, stride), _out_like(x, cout - n_split, stride),
            *_stats_fake(mean, cout, output_stats, n_split, out_eps))


@custom_op("bn_relu_conv1x1_backward")
def _backward_op(dy: Tensor, dy2: Optional[Tensor], x: Tensor, weight: Tensor, gamma: Tensor, beta: Tensor,
                 mean: Tensor, rstd: Tensor, stride: int, use_batch_stats: bool, need_x: bool, need_w: bool,
                 need_bn: bool, add_grad: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx [+ add_grad], dW, [dbeta; dgamma] as one fp32 [2, C] tensor); an empty tensor for what is not
    needed."""
    dx, dw, dbeta, dgamma = conv1x1_backward_impl(dy, dy2, x, weight, gamma, beta, mean, rstd, stride,
                                                  use_batch_stats, need_x, need_w, need_bn, add_grad)
    return (no_tensor(x) if dx is None else dx, no_tensor(x) if dw is None else dw,
            _two_rows(dbeta, dgamma) if need_bn else no_tensor(x))


def _two_rows(a, b):
    """[a; b] as one [2, C] tensor: a view where the kernels wrote them as rows of one buffer (an operator
    may not return two aliasing tensors), else a copy."""
    c = a.shape[0]
    if (torch._C._is_alias_of(a, b) and a.stride() == b.stride() == (1,)
            and b.storage_offset() - a.storage_offset() == c):
        return a.as_strided((2, c), (c, 1), a.storage_offset())
    return torch.stack((a, b))


@_backward_op.register_fake
def _(dy, dy2, x, weight, gamma, beta, mean, rstd, stride, use_batch_stats, need_x, need_w, need_bn,
      add_grad=None):
    dx = torch.empty_like(x, memory_format=torch.channels_last) if need_x else no_tensor(x)
    dw = weight.new_empty(weight.shape).contiguous() if need_w else no_tensor(x)
    return dx, dw, (x.new_empty((2, x.shape[1]), dtype=torch.float32) if need_bn else no_tensor(x))


# ---------------------------------------------------------------------------------------------------
# The identity shortcut's gradient, and the autograd Function
# ---------------------------------------------------------------------------------------------------
class ShortcutGrad:
    """An identity shortcut's gradient, handed between the two fused 1x1 calls of one residual unit: the
    call that reads x (shortcut_grad=slot, no residual) and the later call that adds x back
    (residual=x, shortcut_grad=slot, its output computed from the first call's). The later call's
    backward leaves the residual's gradient here instead of returning it, and the first call's dx pass
    adds it, so no separate gradient add is launched. Make one per forward; Triton calls in eager mode
    only (the torch fallback and compiled graphs return the gradient as usual)."""

    __slots__ = ("armed", "grad")

    def __init__(self):
        self.armed, self.grad = None, None  # armed: (shape, dtype) of the receiving call's x


def _link_shortcut(ctx, shortcut, x, residual):
    """Arm `shortcut` for the receiving call (no residual) or take it for the sending one (residual of
    the receiver's x's shape and dtype); ctx.shortcut is the slot this call uses, or None."""
    ctx.shortcut = None
    if shortcut is None:
        return
    if residual is None:
        shortcut.armed, shortcut.grad = (tuple(x.shape), x.dtype), None
        ctx.shortcut = shortcut
    elif shortcut.armed == (tuple(residual.shape), residual.dtype):
        ctx.shortcut = shortcut


def _grad_in(g, x, channels, stride):
    """An output's gradient as the kernels take it: x's dtype, channels-last contiguous; None (the output
    does not reach the loss) is 0."""
    if g is None:
        return x.new_zeros(out_shape(x, channels, stride)).contiguous(memory_format=torch.channels_last)
    return g.to(x.dtype).contiguous(memory_format=torch.channels_last)


class _BNReLUConv1x1Triton(torch.autograd.Function):
    """relu((x - mean)*gamma*rstd + beta) (*) W on the fused operators. Outputs: y (or y_a, y_b when
    n_split > 0), then (mean, var, rstd): the output's statistics as stored when output_stats and the
    consuming BatchNorm's rstd when out_eps is given (empty tensors otherwise; no gradient). Saves x, W,
    gamma, beta, mean, rstd (nothing else)."""

    @staticmethod
    def forward(ctx, x, weight, gamma, beta, mean, rstd, conv_bias, residual, stride, use_batch_stats,
                output_stats, n_split, shortcut=None, out_running_mean=None, out_running_var=None,
                out_num_batches_tracked=None, out_momentum=None, out_eps=None):
        _link_shortcut(ctx, shortcut, x, residual)
        # The statistics outputs take no gradient: backward gets None for them, not zeros filled per call.
        ctx.set_materialize_grads(False)
        fin = (out_running_mean, out_running_var, out_num_batches_tracked, out_momentum, out_eps)
        if n_split:
            outs = torch.ops.fastpreact.bn_relu_conv1x1_dual(x, weight, gamma, beta, mean, rstd, stride,
                                                             use_batch_stats, output_stats, n_split, *fin)
        else:
            outs = torch.ops.fastpreact.bn_relu_conv1x1(x, weight, gamma, beta, mean, rstd, conv_bias, residual,
                                                        stride, use_batch_stats, output_stats, *fin)
        ctx.save_for_backward(x, weight, gamma, beta, mean, rstd)
        ctx.stride, ctx.use_batch_stats, ctx.n_split = stride, use_batch_stats, n_split
        ctx.has_bias, ctx.has_residual = conv_bias is not None, residual is not None
        ctx.bias_dtype = None if conv_bias is None else conv_bias.dtype
        ctx.mark_non_differentiable(*outs[-3:])
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        x, weight, gamma, beta, mean, rstd = ctx.saved_tensors
        s, n_split = ctx.stride, ctx.n_split
        cout = weight.shape[0]
        splits = (n_split, cout - n_split) if n_split else (cout,)
        nones = (None,) * 18
        if all(g is None for g in grads[:len(splits)]):  # no output reaches the loss
            return nones
        dy, *dy2 = (_grad_in(g, x, c, s) for g, c in zip(grads, splits))
        dy2 = dy2[0] if n_split else None
        need_x, need_w, need_g, need_b = ctx.needs_input_grad[:4]
        shortcut_grad = None
        if ctx.shortcut is not None and not ctx.has_residual:  # the identity shortcut's gradient, if sent
            shortcut_grad, ctx.shortcut.grad = ctx.shortcut.grad, None
        dx, dw, sums = torch.ops.fastpreact.bn_relu_conv1x1_backward(
            dy, dy2, x, weight, gamma, beta, mean, rstd, s, ctx.use_batch_stats, need_x, need_w,
            need_x or need_g or need_b, shortcut_grad if need_x else None)
        dbias = None
        if ctx.has_bias and ctx.needs_input_grad[6]:
            dbias = dy.float().sum(dim=(0, 2, 3)).to(ctx.bias_dtype)
        dres = dy if ctx.has_residual and ctx.needs_input_grad[7] else None
        if dres is not None and ctx.shortcut is not None:  # the receiving call's dx pass adds it
            ctx.shortcut.grad, dres = dres, None
        return (dx if need_x else None, dw if need_w else None, sums[1].to(gamma.dtype) if need_g else None,
                sums[0].to(beta.dtype) if need_b else None, None, None, dbias, dres) + nones[8:]
