"""Launches that become graph nodes: while an operator of fastpreact is decomposed into its kernels for
torch.compile (fastpreact.functional.library), every launch goes through torch.library.wrap_triton, so
the traced graph holds one triton_kernel_wrapper node per launch, naming the kernel, and inductor calls
the kernel from its generated code (no Python operator, no launcher, at run time).

  traced_launches()   the context the decomposition runs its implementation in; launch() and
                      launch_planned() (tuning.py) wrap their kernel while it is active, and tickets()
                      hands out fresh zeroed tickets (a graph must not capture a buffer made outside it).
  traceable(kernel)   wrap_triton of traceable_kernel(kernel): the kernel itself (a JITFunction) or,
                      under Triton's CPU interpreter, a JITFunction twin of it (below).
_ACTIVE[0] says whether traced_launches() is active (one list read: every eager launch asks).

The interpreter's @triton.jit makes InterpretedFunctions, which wrap_triton passes through unwrapped
(they carry no JIT metadata), so nothing could be traced on a CPU. The twin is a JITFunction of the same
Python function whose launches run the interpreted kernel. torch builds the twin's IR with Triton's front
end to learn which arguments the kernel writes (exactly those are copied in the functional graph), so
everything the twin calls must be a JITFunction too: its interpreted helpers become twins, and
triton.language's modules copies whose interpreted functions (tl.sum, tl.cdiv: the interpreter made
those too) are twins. Inductor cannot lower Triton for CPU tensors, so on a CPU only graphs that run the
traced nodes themselves (the aot_eager backend: the tests) decompose.
"""
from __future__ import annotations

import contextlib
import types

__all__ = ["traced_launches", "traceable", "traceable_kernel"]

_ACTIVE = [False]
# id(interpreted kernel or triton.language module) -> (it, its twin): holding it keeps its id from being
# reused by another object (the tests load kernels from emitted source files).
_TWINS: dict = {}


@contextlib.contextmanager
def traced_launches():
    previous, _ACTIVE[0] = _ACTIVE[0], True
    try:
        yield
    finally:
        _ACTIVE[0] = previous


def traceable(kernel):
    """wrap_triton of `kernel` (or of its twin): calling it with [grid](...) records a graph node."""
    from torch.library import wrap_triton
    return wrap_triton(traceable_kernel(kernel))


def traceable_kernel(kernel):
    """The kernel wrap_triton is given for `kernel`: itself, or its twin under the interpreter."""
    interpreted_type = _interpreted_type()
    if interpreted_type is None or not isinstance(kernel, interpreted_type):
        return kernel
    _restore_language()  # before a twin copies triton.language (below)
    return _twin(kernel, interpreted_type)


def _interpreted_type():
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # a triton without the interpreter
        return None
    return InterpretedFunction


def _twin(interpreted, interpreted_type):
    entry = _TWINS.get(id(interpreted))
    return entry[1] if entry is not None else _make_twin(interpreted, interpreted_type)


def _make_twin(interpreted, interpreted_type):
    from triton.runtime.jit import JITFunction

    class InterpretedTwin(JITFunction):
        """A JITFunction for torch's tracing whose launches run the interpreted kernel."""

        def __getitem__(self, grid):
            return interpreted[grid]

        def run(self, *args, **kwargs):
            return interpreted.run(*args, **kwargs)

    # The same code over a copy of its globals with twins for what it names. The twin is cached before
    # those are made: two kernels of one module see each other in its globals.
    fn = interpreted.fn
    scope = dict(fn.__globals__)
    copy = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__module__, copy.__qualname__, copy.__doc__ = fn.__module__, fn.__qualname__, fn.__doc__
    copy.__annotations__ = dict(getattr(fn, "__annotations__", {}))
    twin = InterpretedTwin(copy, **interpreted.kwargs)
    _TWINS[id(interpreted)] = (interpreted, twin)
    for name in fn.__code__.co_names:
        if name in scope:
            scope[name] = _twin_value(scope[name], interpreted_type)
    return twin


def _twin_value(value, interpreted_type):
    if isinstance(value, interpreted_type):
        return _twin(value, interpreted_type)
    if isinstance(value, types.ModuleType) and value.__name__.startswith("triton.language"):
        return _language_module(value, interpreted_type)
    return value


def _language_module(module, interpreted_type):
    """A copy of a triton.language module whose interpreted functions are twins (cached per module)."""
    entry = _TWINS.get(id(module))
    if entry is not None:
        return entry[1]
    proxy = types.ModuleType(module.__name__)
    _TWINS[id(module)] = (module, proxy)
    content = dict(vars(module))
    proxy.__dict__.update(content)
    for name, value in content.items():
        twin = _twin_value(value, interpreted_type)
        if twin is not value:
            setattr(proxy, name, twin)
    return proxy


# Triton's interpreter patches triton.language's builtins while a kernel runs and, for every helper
# (device function) call, patches them again without restoring them (triton 3.6 and 3.8): after an
# interpreted launch, the front end would build a twin's IR with the interpreter's builtins and fail, and
# torch would then assume that the kernel writes every argument (wrong where one tensor is passed for two
# of them). So the attributes those patches touch are saved when this module is imported, before any
# launch, and put back before a twin is traced.
def _language_objects():
    import triton.language as tl
    return (tl, tl.core, tl.math, tl.tensor, tl.dtype, getattr(tl.core, "tensor_descriptor_base", tl.tensor))


def _snapshot():
    try:
        return [(obj, dict(vars(obj))) for obj in _language_objects()]
    except ImportError:
        return []


_PRISTINE = _snapshot()
_MISSING = object()


def _restore_language():
    for obj, saved in _PRISTINE:
        now = vars(obj)
        for name in [n for n in now if n not in saved]:
            delattr(obj, name)
        for name, value in saved.items():
            if now.get(name, _MISSING) is not value:
                setattr(obj, name, value)


@contextlib.contextmanager
def front_end_without_gpu():
    """Triton's front end for a machine without a GPU driver, while active: torch asks the active
    driver for its target before building a traced kernel's IR, and a CPU has no driver. The IR torch
    reads (which arguments a kernel writes) does not depend on the target; an H100's stands in."""
    import triton
    try:
        triton.runtime.driver.active.get_current_target()
        has_driver = True
    except RuntimeError:  # "0 active drivers"
        has_driver = False
    if has_driver:
        yield
        return
    from triton.backends.compiler import GPUTarget

    class FrontEndOnly:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    config = triton.runtime.driver
    saved = config._active  # reset_active() would look for a driver again, and raise
    config.set_active(FrontEndOnly())
    try:
        yield
    finally:
        config._active = saved
