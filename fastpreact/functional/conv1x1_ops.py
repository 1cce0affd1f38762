"""The Triton side of bn_relu_conv1x1: the forward and backward launches (implementation functions), the
PyTorch operators that run them under traces (torch.ops.fastpreact.bn_relu_conv1x1 and
bn_relu_conv1x1_backward, with fake implementations) and the autograd Function around them.

An eager call runs the implementations directly (backends.eager): the operators' Python dispatch costs
as much host time as the launches it wraps. Under torch.compile, FakeTensorMode or the cost model's
recorder the operators run, so traces see one node per launch group.

The forward operator may finish the next BatchNorm (the kernel's last program computes its rstd,
updates its running statistics and increments num_batches_tracked): those buffers are declared as
mutated arguments. An operator that mutates its arguments cannot carry a registered autograd formula,
so _BNReLUConv1x1Triton (plain PyTorch around the operators, which dynamo traces without a graph break)
is the autograd of the forward operator; its backward is the backward operator. The identity shortcut's
gradient (ShortcutGrad) is the backward's optional add_grad, which the dx pass adds.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
from torch import Tensor

from .backends import eager, kernels, poison
from .library import custom_op, no_tensor
from .types import BNFinish, BNStats

__all__ = ["Conv1x1Call", "ShortcutGrad", "forward_impl", "backward_impl", "out_shape"]


def out_shape(x, cout, stride):
    n, _, h, w = x.shape
    return (n, cout, (h - 1) // stride + 1, (w - 1) // stride + 1)


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


@dataclass(frozen=True)
class Conv1x1Call:
    """The choices of one fused 1x1 call that are not its differentiable tensors."""
    stride: int = 1
    split: int = 0                      # output channels of the first of two convs (the dual op); 0: one conv
    batch: bool = True                  # normalised with batch stats (training) or the running ones
    output_stats: bool = False          # also the stats of the output, as stored
    next_bn: Optional[BNFinish] = None  # finished in the same launch (with output_stats)
    shortcut: Optional[ShortcutGrad] = field(default=None, compare=False)
    dtype: Optional[torch.dtype] = None  # the compute dtype (the GEMM operands and y); None: x's


# ---------------------------------------------------------------------------------------------------
# The implementation (forward and backward launches)
# ---------------------------------------------------------------------------------------------------
def _finish_dict(next_bn: BNFinish | None):
    if next_bn is None:
        return None
    return dict(eps=next_bn.eps, running_mean=next_bn.running_mean, running_var=next_bn.running_var,
                num_batches_tracked=next_bn.num_batches_tracked, momentum=next_bn.momentum)


def forward_impl(x, weight, gamma, beta, stats: BNStats, call: Conv1x1Call, conv_bias=None, residual=None):
    """The forward launch: (y, y_b or None, output BNStats or None). y_b: the second conv's output of a
    split call. The output stats are finished (rstd) when call.next_bn is given."""
    kc = kernels("bn_relu_conv1x1")
    w2d = weight.reshape(weight.shape[0], -1).contiguous()  # the kernels round it as they load it
    out, out_stats = kc.bn_relu_conv1x1_fwd(
        x, w2d, stats.mean, stats.rstd, gamma, beta, stride=call.stride,
        bias=None if conv_bias is None else conv_bias.detach().float().contiguous(),
        residual=residual, split=call.split, output_stats=call.output_stats, next_bn=_finish_dict(call.next_bn),
        out_dtype=call.dtype, poison=poison())
    y, y_b = out if call.split else (out, None)
    return y, y_b, (None if out_stats is None else BNStats(*out_stats))


def backward_impl(grads, saved, call: Conv1x1Call, need, add_grad=None):
    """The backward launches (two passes, or three where the card's roofline says so: kernels'
    bn_relu_conv1x1_bwd): (dx, dW, dbeta, dgamma), None where not needed; dbeta, dgamma fp32, dW in the
    weight's dtype, dx in x's. grads: (dy, dy_b or None) channels-last in the compute dtype; saved: (x,
    weight, gamma, beta, mean, rstd); need: (x, weight, BatchNorm parameters); add_grad (x's shape and
    dtype, channels-last) is added to dx in its pass."""
    (dy, dy2), (x, weight, gamma, beta, mean, rstd) = grads, saved
    need_x, need_w, need_bn = need
    w2d = weight.reshape(weight.shape[0], -1).contiguous()
    dx, dw, dbeta, dgamma = kernels("bn_relu_conv1x1").bn_relu_conv1x1_bwd(
        x, dy, w2d, mean, rstd, gamma, beta, stride=call.stride, dy2=dy2, batch_stats=call.batch, need_x=need_x,
        need_w=need_w, need_bn=need_bn, add_grad=add_grad, poison=poison())
    return dx, (None if dw is None else dw.view(weight.shape)), dbeta, dgamma


# ---------------------------------------------------------------------------------------------------
# The operators (plain arguments: torch.library's schema; no defaults, since some torch versions drop
# defaulted trailing arguments before bumping the mutated ones' versions by position)
# ---------------------------------------------------------------------------------------------------
_NEXT = ("next_running_mean", "next_running_var", "next_num_batches_tracked")


@custom_op("bn_relu_conv1x1", mutates_args=_NEXT)
def _forward_op(x: Tensor, weight: Tensor, gamma: Tensor, beta: Tensor, mean: Tensor, rstd: Tensor,
                conv_bias: Optional[Tensor], residual: Optional[Tensor], stride: int, split: int, batch: bool,
                output_stats: bool, next_running_mean: Optional[Tensor], next_running_var: Optional[Tensor],
                next_num_batches_tracked: Optional[Tensor], next_momentum: Optional[float],
                next_eps: Optional[float], dtype: Optional[torch.dtype]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, y_b, mean, var, rstd): y_b the second conv's output when split > 0; the output's stats when
    output_stats, finished (rstd) when next_eps is given; an empty tensor for each one not computed."""
    next_bn = None if next_eps is None else BNFinish(next_running_mean, next_running_var,
                                                     next_num_batches_tracked, next_momentum, next_eps)
    call = Conv1x1Call(stride, split, batch, output_stats, next_bn, dtype=dtype)
    stats = BNStats(mean, None, rstd, batch)  # the forward normalises with mean and rstd only
    y, y_b, out = forward_impl(x, weight, gamma, beta, stats, call, conv_bias, residual)
    return _flat_outputs(y, y_b, out, mean)


def _flat_outputs(y, y_b, out_stats, like):
    out = tuple(out_stats or ())[:3]
    out = tuple(t if t is not None else no_tensor(like) for t in out) + tuple(no_tensor(like) for _ in range(3 - len(out)))
    return (y, no_tensor(like) if y_b is None else y_b, *out)


@_forward_op.register_fake
def _(x, weight, gamma, beta, mean, rstd, conv_bias, residual, stride, split, batch, output_stats,
      next_running_mean, next_running_var, next_num_batches_tracked, next_momentum, next_eps, dtype):
    cout = weight.shape[0]
    first = split or cout

    def like(c):
        return x.new_empty(out_shape(x, c, stride), dtype=dtype or x.dtype).contiguous(
            memory_format=torch.channels_last)
    k = cout if output_stats else 0
    return (like(first), like(cout - split) if split else no_tensor(mean), mean.new_empty((k,)),
            mean.new_empty((k,)), mean.new_empty((first if next_eps is not None else 0,)))


@custom_op("bn_relu_conv1x1_backward")
def _backward_op(dy: Tensor, dy2: Optional[Tensor], x: Tensor, weight: Tensor, gamma: Tensor, beta: Tensor,
                 mean: Tensor, rstd: Tensor, stride: int, batch: bool, need_x: bool, need_w: bool, need_bn: bool,
                 add_grad: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx [+ add_grad], dW, [dbeta; dgamma] as one fp32 [2, C] tensor); an empty tensor for what is not
    needed."""
    dx, dw, dbeta, dgamma = backward_impl((dy, dy2), (x, weight, gamma, beta, mean, rstd),
                                          Conv1x1Call(stride, batch=batch), (need_x, need_w, need_bn), add_grad)
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
def _(dy, dy2, x, weight, gamma, beta, mean, rstd, stride, batch, need_x, need_w, need_bn, add_grad):
    dx = torch.empty_like(x, memory_format=torch.channels_last) if need_x else no_tensor(x)
    dw = weight.new_empty(weight.shape).contiguous() if need_w else no_tensor(x)
    return dx, dw, (x.new_empty((2, x.shape[1]), dtype=torch.float32) if need_bn else no_tensor(x))


def _forward(x, weight, gamma, beta, stats, call, conv_bias, residual):
    """forward_impl directly (eager), or through the operator (traces): (y, y_b, mean, var, rstd), each
    output not computed None (eager) or an empty tensor (the operator's fixed outputs)."""
    if eager(x):
        y, y_b, out = forward_impl(x, weight, gamma, beta, stats, call, conv_bias, residual)
        return (y, y_b, *(out[:3] if out is not None else (None, None, None)))
    nb = call.next_bn or BNFinish(None, None, None, None, None)
    return torch.ops.fastpreact.bn_relu_conv1x1(
        x, weight, gamma, beta, stats.mean, stats.rstd, conv_bias, residual, call.stride, call.split, call.batch,
        call.output_stats, *nb, call.dtype)


def _backward(grads, saved, call, need, add_grad):
    """backward_impl directly (eager), or through the operator (traces): (dx, dW, dbeta, dgamma)."""
    x = saved[0]
    if eager(x):
        return backward_impl(grads, saved, call, need, add_grad)
    dx, dw, sums = torch.ops.fastpreact.bn_relu_conv1x1_backward(*grads, *saved, call.stride, call.batch, *need,
                                                                 add_grad)
    return dx, dw, sums[0] if need[2] else None, sums[1] if need[2] else None


# ---------------------------------------------------------------------------------------------------
# The autograd Function
# ---------------------------------------------------------------------------------------------------
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


def _grad_in(g, x, channels, call):
    """An output's gradient as the kernels take it: the compute dtype, channels-last contiguous; None (the
    output does not reach the loss) is 0."""
    dtype = call.dtype or x.dtype
    if g is None:
        return x.new_zeros(out_shape(x, channels, call.stride), dtype=dtype).contiguous(
            memory_format=torch.channels_last)
    return g.to(dtype).contiguous(memory_format=torch.channels_last)


class _BNReLUConv1x1Triton(torch.autograd.Function):
    """relu((x - mean)*gamma*rstd + beta) (*) W on the kernels. Outputs: y, y_b (empty unless
    call.split), then the output's (mean, var, rstd) (empty where not computed; no gradient). Saves x,
    W, gamma, beta, mean, rstd (nothing else)."""

    @staticmethod
    def forward(ctx, x, weight, gamma, beta, conv_bias, residual, stats: BNStats, call: Conv1x1Call):
        _link_shortcut(ctx, call.shortcut, x, residual)
        # The statistics outputs take no gradient: backward gets None for them, not zeros filled per call.
        ctx.set_materialize_grads(False)
        outs = _forward(x, weight, gamma, beta, stats, call, conv_bias, residual)
        ctx.save_for_backward(x, weight, gamma, beta, stats.mean, stats.rstd)
        ctx.call, ctx.has_residual = call, residual is not None
        ctx.bias_dtype = None if conv_bias is None else conv_bias.dtype
        ctx.mark_non_differentiable(*(t for t in outs[1 if not call.split else 2:] if t is not None))
        return outs

    @staticmethod
    def backward(ctx, dy, dy_b, *_):
        saved = ctx.saved_tensors
        x, weight, gamma = saved[:3]
        call = ctx.call
        if dy is None and (dy_b is None or not call.split):  # no output reaches the loss
            return (None,) * 8
        cout = weight.shape[0]
        dy = _grad_in(dy, x, call.split or cout, call)
        dy_b = _grad_in(dy_b, x, cout - call.split, call) if call.split else None
        need_x, need_w, need_g, need_b = ctx.needs_input_grad[:4]
        shortcut_grad = None
        if ctx.shortcut is not None and not ctx.has_residual:  # the identity shortcut's gradient, if sent
            shortcut_grad, ctx.shortcut.grad = ctx.shortcut.grad, None
        dx, dw, dbeta, dgamma = _backward((dy, dy_b), saved, call, (need_x, need_w, need_x or need_g or need_b),
                                          shortcut_grad if need_x else None)
        dbias = None
        if ctx.bias_dtype is not None and ctx.needs_input_grad[4]:
            dbias = dy.float().sum(dim=(0, 2, 3)).to(ctx.bias_dtype)
        dres = dy if ctx.has_residual and ctx.needs_input_grad[5] else None
        if dres is not None and ctx.shortcut is not None:  # the receiving call's dx pass adds it
            ctx.shortcut.grad, dres = dres, None
        return (dx if need_x else None, dw if need_w else None, dgamma.to(gamma.dtype) if need_g else None,
                dbeta.to(saved[3].dtype) if need_b else None, dbias, dres, None, None)
