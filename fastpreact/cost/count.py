"""Where one training step's time goes: launches, bytes and FLOPs counted without running it, and a
roofline prediction of the step time on a GPU. A MODEL, not a measurement.

count_step(model, x, y) runs one training step (forward under autocast, cross-entropy, backward, SGD
with momentum through foreach ops) with every tensor a FakeTensor on the CPU (shapes, dtypes and layouts
only, so ResNet-200 at batch 64 / 224 px takes seconds) and records, in order:
  - every aten op that would launch a kernel on a GPU (views, allocations and metadata ops excluded:
    see NO_LAUNCH), seen by a TorchDispatchMode, with the bytes it must read and write and its FLOPs;
  - every Triton launch, intercepted at the launcher (triton's JITFunction.run and the interpreter's
    run) and recorded instead of run, with its grid and, from the kernel's arguments, the
    bytes and FLOPs of TRITON_COSTS (the analytic per-call formulas of the kernels' module headers).
    The fused ops are PyTorch operators (torch.ops.fastpreact) whose fake implementations launch
    nothing: the recorder runs each operator's real implementation instead, on the same (fake) tensors,
    and records the aten ops and Triton launches inside it.
With real=True the same step runs for real (small nets only: the Triton kernels go through the
interpreter) and the same records are taken: the test suite checks that both counts agree.

The fused path needs functional.backend() == "triton" on the CPU, i.e. TRITON_INTERPRET=1 (set before
triton is imported); under the fake mode nothing is interpreted. CPU autocast stands in for CUDA
autocast (both run convolutions and linear layers in bf16 and the loss in fp32). The step counted is a
steady-state one: the optimizer's momentum buffers exist and every Triton launch is one launch (no
autotuning).

Every record falls into one op class (CLASSES), decided by what it computes:
  fused 1x1           the fused BN-ReLU-1x1 kernels; in the stock net its 1x1 convolutions
  3x3 conv            the other convolutions (3x3, and the stem's 7x7)
  BN-ReLU passes      BatchNorm and ReLU (aten) and the Triton BN-ReLU passes; the stem's max-pool
  statistics          the Triton batch-statistics kernels (stock BatchNorm takes them inside its pass)
  loss and optimizer  the head (global pool, FC), the loss and their backward, and the optimizer step
  glue                everything else: casts, sums of partials, residual adds, gradient accumulation,
                      running-statistics updates done in torch, fills
An aten op counts as one launch even where it launches several kernels (cuDNN's convolution backward,
a foreach op over many tensors): the count is of host-side launch calls, which is what the host pays.
"""
from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ..functional.library import implementation
from .launches import (CLASSES, NO_LAUNCH, TRITON_COSTS, Launch, StepCost, aten_class,
                           aten_cost)

__all__ = ["CLASSES", "TRITON_COSTS", "NO_LAUNCH", "Launch", "StepCost", "count_step", "count_model"]

# ---------------------------------------------------------------------------------------------------
# Recording
# ---------------------------------------------------------------------------------------------------
_TLS = threading.local()  # .inside: a Triton launch is running for real (its inner calls are not counted)


def _nodes_between(start, stop):
    """Autograd nodes reachable from `start` without passing through `stop` (the graph a region built)."""
    found, todo = {}, [start]
    while todo:
        node = todo.pop()
        if node is None or node is stop or id(node) in found:
            continue
        found[id(node)] = node
        todo.extend(fn for fn, _ in node.next_functions)
    return found


class _Recorder(TorchDispatchMode):
    """Records aten launches (and, through _intercept_triton, Triton launches) into a StepCost."""

    def __init__(self, fake):
        super().__init__()
        self.fake, self.cost = fake, StepCost()
        self.phase, self.head = "forward", False
        self.region = {}  # id -> node: autograd nodes of the head and the loss (kept alive here)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        impl = implementation(func)
        if impl is not None:
            # A fastpreact operator: its fake implementation launches nothing, so its real one runs (on
            # the fake tensors under FakeTensorMode) with this mode on, its Triton launches intercepted.
            with self:
                return impl(*args, **kwargs)
        if func.namespace == "aten" and torch._C._dispatch_has_kernel_for_dispatch_key(
                func.name(), "CompositeImplicitAutograd"):
            # Composite ops reach this mode only inside an operator: record what they decompose into.
            with self:
                return func.decompose(*args, **kwargs)
        out = func(*args, **kwargs)
        if not getattr(_TLS, "inside", False):
            name = func._overloadpacket.__name__
            if name == "_local_scalar_dense":
                raise RuntimeError(f"step_cost: the step reads a tensor value on the host ({func}); a training "
                                   "step must not synchronise (it could not be captured in a CUDA graph)")
            if func.namespace != "aten":
                pass
            elif func.is_view or name in NO_LAUNCH:
                self.cost.excluded[name] = self.cost.excluded.get(name, 0) + 1
            else:
                nbytes, flops = aten_cost(name, args, kwargs, out)
                self.cost.launches.append(Launch("aten", name, self._classify(name, args), nbytes, flops))
        return out

    def _classify(self, name, args):
        if self.head or self.phase not in ("forward", "backward"):
            return "loss and optimizer"
        if self.phase == "backward":
            node = torch._C._current_autograd_node()
            if node is None or id(node) in self.region:
                return "loss and optimizer"
        return aten_class(name, args)

    def triton(self, name, meta, grid):
        if name not in TRITON_COSTS:
            raise KeyError(f"step_cost: no cost formula for the Triton kernel {name}; add one to TRITON_COSTS "
                           "in fastpreact/cost/launches.py")
        cls, cost = TRITON_COSTS[name]
        grid = tuple(grid(meta) if callable(grid) else grid)
        nbytes, flops = cost(dict(meta, grid=grid))
        self.cost.launches.append(Launch("triton", name, cls, int(nbytes), int(flops), grid))


def _kernel_name(fn):
    while not hasattr(fn, "__code__") and hasattr(fn, "fn"):
        fn = fn.fn
    return fn.__name__


@contextlib.contextmanager
def _triton_backend_on_cpu():
    """functional.backend() says "triton" for the CPU while the fake step runs, also where a GPU made
    TRITON_INTERPRET unnecessary; the kernel modules are imported first, as this process imports them."""
    import importlib
    import os
    import pkgutil

    from .. import kernels as pkg
    from ..functional import backends
    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{info.name}")
    old_env, old_flag = os.environ.get("TRITON_INTERPRET"), backends.interpret()
    try:
        yield
    finally:
        backends.interpret(old_flag)
        if old_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old_env


@contextlib.contextmanager
def _intercept_triton(rec):
    """Record every Triton launch; run it only when rec.fake is False (then its own calls go uncounted)."""
    from triton.runtime.jit import JITFunction
    classes = [JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except ImportError:  # a triton without the interpreter
        pass

    def run_for_real(orig, *args, **kwargs):
        _TLS.inside = True
        try:
            return orig(*args, **kwargs)
        finally:
            _TLS.inside = False

    def plain(orig):
        def run(self, *args, grid, warmup, **kwargs):
            if getattr(_TLS, "inside", False) or warmup:
                return orig(self, *args, grid=grid, warmup=warmup, **kwargs)
            rec.triton(_kernel_name(self), {**dict(zip(self.arg_names, args)), **kwargs}, grid)
            if not rec.fake:
                return run_for_real(orig, self, *args, grid=grid, warmup=warmup, **kwargs)
            return None
        return run

    saved = [(c, c.run) for c in classes]
    for c in classes:
        c.run = plain(c.run)
    try:
        yield
    finally:
        for c, orig in saved:
            c.run = orig


@contextlib.contextmanager
def _gpu_tiles():
    """The kernels take an H100's tiles, split counts and tile configs (the first candidate that fits
    stands for the tuned one) while the step is counted."""
    from ..kernels.cards import pretend
    with pretend("sm_90"):
        yield


def _train_step(model, opt, x, y, amp_dtype, rec):
    """One training step; rec.phase tells the recorder where it is."""
    rec.phase = "optimizer"
    opt.zero_grad(set_to_none=True)
    rec.phase = "forward"
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        out = model(x)
        rec.phase = "loss"
        loss = F.cross_entropy(out, y)
    rec.region.update(_nodes_between(loss.grad_fn, out.grad_fn))
    rec.phase = "backward"
    loss.backward()
    rec.phase = "optimizer"
    opt.step()


@contextlib.contextmanager
def _head_region(model, rec):
    """Mark the head (model.forward_head, where the model has one) as part of "loss and optimizer"."""
    orig = getattr(model, "forward_head", None)
    if orig is None:
        yield
        return

    def head(features):
        rec.head = True
        try:
            out = orig(features)
        finally:
            rec.head = False
        rec.region.update(_nodes_between(out.grad_fn, features.grad_fn))
        return out
    model.forward_head = head
    try:
        yield
    finally:
        del model.forward_head


def count_step(make, *, amp_dtype=torch.bfloat16, real=False, tiles=None, lr=0.1, momentum=0.9,
               weight_decay=1e-4):
    """Launches, bytes and FLOPs of one steady-state training step (momentum buffers already exist).

    make() -> (model, x, y) builds the model (on the CPU, channels-last where wanted) and a batch; it is
    called under FakeTensorMode unless real=True (then everything, Triton kernels included, runs for real:
    small nets only). Optimizer: SGD with momentum, foreach. amp_dtype: the autocast dtype, or None.
    tiles: "gpu" (default when not real) gives the kernels the tile sizes, split counts and tile configs
    they have on an H100 (sm_90; the first config that fits stands for the tuned one); "loaded" keeps
    those of the device the step runs on (the interpreter's on a CPU), which a real run needs. Tiles change the partial buffers' sizes,
    and whether a split reduction needs a summing launch.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    tiles = tiles or ("loaded" if real else "gpu")
    if tiles not in ("gpu", "loaded") or (real and tiles == "gpu"):
        raise ValueError(f"count_step: tiles must be 'gpu' or 'loaded' ('loaded' for a real run), got {tiles!r}")
    fake_mode = contextlib.nullcontext() if real else FakeTensorMode()
    rec = _Recorder(fake=not real)
    on_cpu = contextlib.nullcontext() if real else _triton_backend_on_cpu()
    with on_cpu, fake_mode, (_gpu_tiles() if tiles == "gpu" else contextlib.nullcontext()):
        model, x, y = make()
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                              foreach=True)
        with torch.no_grad():  # steady state: the momentum buffers exist (the first step creates them)
            for p in model.parameters():
                if p.requires_grad:
                    opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
        with _intercept_triton(rec), _head_region(model, rec), rec:
            _train_step(model, opt, x, y, amp_dtype, rec)
    return rec.cost


def count_model(arch, num_classes, *, kernels, batch, image, amp_dtype=torch.bfloat16, real=False, tiles=None,
                **create_kw):
    """count_step of fastpreact.models.create_model(arch, num_classes, kernels=kernels, **create_kw),
    channels-last, on a [batch, 3, image, image] input."""
    from ..models import create_model

    def make():
        gen = torch.Generator().manual_seed(0)
        model = create_model(arch, num_classes, kernels=kernels, **create_kw)
        with torch.no_grad():  # (module.to() cannot swap FakeTensor parameters)
            for t in list(model.parameters()) + list(model.buffers()):
                if t.dim() == 4:
                    t.data = t.data.contiguous(memory_format=torch.channels_last)
        x = torch.randn(batch, 3, image, image, generator=gen).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, num_classes, (batch,), generator=gen)
        return model, x, y
    return count_step(make, amp_dtype=amp_dtype, real=real, tiles=tiles)
