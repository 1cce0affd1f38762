"""The fused ops as PyTorch operators (torch.library, namespace "fastpreact"), so that dynamo traces
them, torch.compile keeps them as opaque nodes in its graph and fake tensors flow through them.

Each operator wraps one implementation function of this package (the function that launches the
kernels) and gets a fake implementation (output shapes, strides and dtypes only). The forward
operators' backward is an operator too, called from a plain-PyTorch autograd Function that saves only
what the op's contract allows (x, W, gamma, beta, mean, rstd) and that dynamo traces: a forward
operator that finishes the next BatchNorm mutates that BatchNorm's buffers, and an operator that
mutates its arguments cannot carry a registered autograd formula. Running statistics and
num_batches_tracked updated in place are declared as mutated arguments, so compiled graphs keep the
update. Operator outputs never alias their inputs or each other (PyTorch's rule for custom operators).

torch.library.custom_op and register_fake are PyTorch 2.4's API.
"""
from __future__ import annotations

import torch

__all__ = ["NAMESPACE", "custom_op", "implementation", "no_tensor"]

NAMESPACE = "fastpreact"
_IMPLS = {}  # "fastpreact::op" -> the Python implementation the operator runs (not the fake)


def custom_op(name: str, mutates_args=()):
    """torch.library.custom_op("fastpreact::<name>"), remembering the implementation (see implementation)."""
    def register(fn):
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=tuple(mutates_args))(fn)
        _IMPLS[f"{NAMESPACE}::{name}"] = fn
        return op
    return register


def implementation(func):
    """The Python implementation behind a fastpreact operator (an OpOverload, as a dispatch mode sees
    it), or None for any other operator: a mode that wants to see the kernels an operator launches
    calls this instead of the operator (whose fake implementation, under FakeTensorMode, launches none)."""
    schema = getattr(func, "_schema", None)
    return None if schema is None else _IMPLS.get(schema.name)


def no_tensor(like: torch.Tensor) -> torch.Tensor:
    """The empty fp32 tensor an operator returns in place of an output it was not asked for (operators
    return a fixed number of tensors)."""
    return like.new_empty((0,), dtype=torch.float32)
