"""The fused ops as PyTorch operators (torch.library, namespace "fastpreact"), so that dynamo traces
them and fake tensors flow through them, and torch.compile sees the Triton kernels they launch.

Each operator wraps one implementation function of this package (the function that launches the
kernels) and gets a fake implementation (output shapes, strides and dtypes only). The forward
operators' backward is an operator too, called from a plain-PyTorch autograd Function that saves only
what the op's contract allows (x, W, gamma, beta, mean, rstd) and that dynamo traces: a forward
operator that finishes the next BatchNorm mutates that BatchNorm's buffers, and an operator that
mutates its arguments cannot carry a registered autograd formula. Running statistics and
num_batches_tracked updated in place are declared as mutated arguments, so compiled graphs keep the
update. Operator outputs never alias their inputs or each other (PyTorch's rule for custom operators).

torch.compile sees the kernels. AOTAutograd functionalizes the graph under FunctionalTensorMode; there
each operator is decomposed into its implementation with every launch wrapped by
torch.library.wrap_triton (kernels/tracing.py), so the graph holds a triton_kernel_wrapper node per
launch, naming the kernel, and inductor calls the kernels from its generated code, with no Python
operator or launcher left at run time (mode="reduce-overhead" replays them in CUDA graphs). This is the
decomposition torch.library.triton_op registers, written here for two reasons: triton_op imports
triton when the operator is defined (fastpreact imports without it), and it runs the implementation as
the fake one (fake tensors would go through the launchers' planning for nothing). Three rules of its
own, under which the operator stays one opaque node, as with torch.export (which never decomposes):
  - CPU tensors: inductor cannot lower Triton for the CPU; trace_kernels_on_cpu() decomposes them too,
    for graphs that run the traced nodes themselves (the aot_eager backend: the tests);
  - symbolic sizes or scalars (dynamic shapes): a launch plan is keyed by concrete sizes;
  - a torch without torch.library.wrap_triton, or FASTPREACT_COMPILE_KERNELS=0 (below).
Inside a decomposition a launch takes its tile from kernels/tuning.py's table; a shape not tuned yet is
timed there on real stand-ins of the traced arguments (which are fake), and its winner enters the table.

torch.library.custom_op and register_fake are PyTorch 2.4's API; register_torch_dispatch and
wrap_triton 2.6's.
"""
from __future__ import annotations

import contextlib
import os

import torch

__all__ = ["NAMESPACE", "custom_op", "implementation", "no_tensor", "trace_kernels_on_cpu"]

NAMESPACE = "fastpreact"
_IMPLS = {}  # "fastpreact::op" -> the Python implementation the operator runs (not the fake)
_ON_CPU = [False]  # trace_kernels_on_cpu() is active


def custom_op(name: str, mutates_args=()):
    """torch.library.custom_op("fastpreact::<name>"), remembering the implementation (see implementation)
    and decomposed into its kernels under FunctionalTensorMode (the module docstring)."""
    def register(fn):
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=tuple(mutates_args))(fn)
        _IMPLS[f"{NAMESPACE}::{name}"] = fn
        if hasattr(op, "register_torch_dispatch") and hasattr(torch.library, "wrap_triton"):
            from torch._subclasses.functional_tensor import FunctionalTensorMode
            op.register_torch_dispatch(FunctionalTensorMode, _decomposition(fn))
        return op
    return register


def _decomposition(fn):
    def decompose(mode, func, types, args, kwargs):
        from torch._subclasses.fake_tensor import FakeTensor
        from torch._subclasses.functional_tensor import FunctionalTensor
        if any(not issubclass(t, (FakeTensor, FunctionalTensor)) and t is not torch.Tensor for t in types):
            return NotImplemented  # another tensor subclass: its own rules first
        if not _decomposes(args, kwargs):
            return mode.__torch_dispatch__(func, types, args, kwargs)
        from ..kernels.tracing import traced_launches
        with mode, traced_launches():
            return fn(*args, **kwargs)
    return decompose


# FASTPREACT_COMPILE_KERNELS=0 keeps every operator one opaque node in compiled graphs (inductor then
# calls it as a Python operator, as it calls any custom op): the way back should inductor fail to lower
# a kernel on some torch or triton version.
COMPILE_KERNELS = os.environ.get("FASTPREACT_COMPILE_KERNELS", "1") != "0"


def _decomposes(args, kwargs) -> bool:
    import torch._functorch.config as functorch_config
    if not COMPILE_KERNELS or not getattr(functorch_config, "decompose_custom_triton_ops", True):  # or export
        return False
    symbolic = (torch.SymInt, torch.SymFloat, torch.SymBool)
    for a in (*args, *kwargs.values()):
        if isinstance(a, symbolic):
            return False
        if isinstance(a, torch.Tensor):
            if a.device.type != "cuda" and not (a.device.type == "cpu" and _ON_CPU[0]):
                return False
            if any(isinstance(d, torch.SymInt) for d in (*a.shape, *a.stride())):
                return False
    return True


@contextlib.contextmanager
def trace_kernels_on_cpu(on: bool = True):
    """Decompose the operators into their kernels for CPU tensors too (Triton's interpreter runs them)
    while active: for graphs whose backend runs the traced nodes itself (aot_eager), never inductor."""
    from ..kernels.tracing import front_end_without_gpu
    previous, _ON_CPU[0] = _ON_CPU[0], bool(on)
    try:
        with front_end_without_gpu():
            yield
    finally:
        _ON_CPU[0] = previous


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
