"""Where the fused ops run: the one "use Triton?" rule, the kernel modules (imported on first use) and
the small layout helpers every op shares.

Backends: "triton" (a GPU, or TRITON_INTERPRET=1 on a CPU) and "torch" (the ops' own PyTorch math, so
every model works anywhere). float64 inputs and empty tensors always take the torch path: the kernels
are fp32/fp16/bf16 only.
"""
from __future__ import annotations

import contextlib
import os

import torch

__all__ = ["backend", "use_triton", "eager", "KERNEL_DTYPES"]

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# Whether Triton runs through its CPU interpreter: TRITON_INTERPRET=1 when this module is imported (the
# variable must be set before triton is imported anyway). A module flag, read at every op: an os.environ
# lookup costs microseconds. The tests' torch_backend fixture turns it off to run the PyTorch math.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def interpret(on: bool = True):
    """Run the kernels on CPU tensors through Triton's interpreter (on) or not: sets TRITON_INTERPRET, which
    triton reads when it is first imported, and the backend's flag. Returns the previous flag."""
    global INTERPRET
    previous, INTERPRET = INTERPRET, bool(on)
    if on:
        os.environ["TRITON_INTERPRET"] = "1"
    return previous


def backend(device: torch.device | str | None = None) -> str:
    """'triton' where the kernels can run on `device` (CUDA, or the CPU interpreter), else 'torch'.
    device=None asks about the default device: CUDA when this machine has one."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = device.type if isinstance(device, torch.device) else torch.device(device).type
    return "triton" if kind == "cuda" or (kind == "cpu" and INTERPRET) else "torch"


def use_triton(x: torch.Tensor) -> bool:
    """The rule every op follows: the kernels run x when its device has them (backend), its dtype is one
    they take and it is not empty; otherwise the op's PyTorch math runs."""
    kind = x.device.type
    return (kind == "cuda" or (kind == "cpu" and INTERPRET)) and x.dtype in KERNEL_DTYPES and x.numel() > 0


def eager(x: torch.Tensor) -> bool:
    """Whether an op may call its Triton implementation directly instead of through its torch.library
    operator: a plain eager call (no torch.compile trace, no dispatch mode such as FakeTensorMode or the
    cost model's recorder, not a fake tensor). The operator's Python dispatch costs tens of
    microseconds of host time per call, as much as the kernel launches it wraps; the operators exist for
    the traces, which take the other branch."""
    if torch.compiler.is_compiling():  # first: dynamo cannot trace the dispatch-stack query
        return False
    return torch._C._len_torch_dispatch_stack() == 0 and (type(x) in _PLAIN or not _is_fake(x))


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _is_fake(x):
    from torch._subclasses.fake_tensor import is_fake
    return is_fake(x)


def poison() -> bool:
    """Whether every kernel output starts as NaN, so that an element no program writes fails the tests:
    FASTPREACT_POISON=1 when the module is imported, or POISON set (the tests' poison_outputs fixture).
    A module flag: an os.environ lookup of a missing key costs microseconds, and every launch asks."""
    return POISON


POISON = os.environ.get("FASTPREACT_POISON") == "1"


def kernels(name: str):
    """The kernel module fastpreact.kernels.<name>, imported on first use: `import fastpreact` must work
    where triton is absent (the torch backend)."""
    mod = _KERNEL_MODULES.get(name)
    if mod is None:
        import importlib
        mod = _KERNEL_MODULES[name] = importlib.import_module(f"fastpreact.kernels.{name}")
    return mod


_KERNEL_MODULES: dict = {}


def rows(t: torch.Tensor) -> torch.Tensor:
    """The [M = N*H*W, C] row-major matrix of a channels-last [N, C, H, W] tensor (copies otherwise)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def from_rows(t2d: torch.Tensor, shape) -> torch.Tensor:
    """The channels-last [N, C, H, W] view of a [M, C] matrix."""
    n, c, h, w = shape
    return t2d.view(n, h, w, c).permute(0, 3, 1, 2)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype an op on x computes its GEMMs in: autocast's where autocast is on for x's device and x is a
    kernel dtype (as a conv computes), else x's own."""
    kind = x.device.type
    if (kind == "cuda" or kind == "cpu") and torch.is_autocast_enabled(kind) and x.dtype in KERNEL_DTYPES:
        return torch.get_autocast_dtype(kind)
    return x.dtype


def autocast_dtype(x: torch.Tensor) -> torch.Tensor:
    """x in its compute dtype (compute_dtype): cast under autocast, else x itself."""
    return x.to(compute_dtype(x))


def autocast_off(device: torch.device):
    """Autocast disabled: the Functions cast explicitly (meta tensors, for shape-only runs, have none).
    Nothing to do where it is off already (backward passes run without it): building a torch.autocast
    costs tens of microseconds."""
    kind = device.type
    if (kind == "cuda" or kind == "cpu") and torch.is_autocast_enabled(kind):
        return torch.autocast(kind, enabled=False)
    return contextlib.nullcontext()
