"""Where one training step's time goes: launches, bytes and FLOPs counted without running it, and a
roofline prediction of the step time on a GPU. A MODEL, not a measurement.

count_step(model, x, y) runs one training step (forward under autocast, cross-entropy, backward, SGD
with momentum through foreach ops) with every tensor a FakeTensor on the CPU (shapes, dtypes and layouts
only, so ResNet-200 at batch 64 / 224 px takes seconds) and records, in order:
  - every aten op that would launch a kernel on a GPU (views, allocations and metadata ops excluded:
    see NO_LAUNCH), seen by a TorchDispatchMode, with the bytes it must read and write and its FLOPs;
  - every Triton launch, intercepted at the launcher (triton's Autotuner.run, JITFunction.run and the
    interpreter's run) and recorded instead of run, with its grid and, from the kernel's arguments, the
    bytes and FLOPs of TRITON_COSTS (the analytic per-call formulas of the kernels' module headers).
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
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["CLASSES", "CARDS", "CARD_PEAKS", "HOST_US", "TRITON_COSTS", "NO_LAUNCH", "Launch", "StepCost",
           "count_step", "count_model", "predict"]

CLASSES = ("fused 1x1", "3x3 conv", "BN-ReLU passes", "statistics", "glue", "loss and optimizer")
MATMUL_CLASSES = ("fused 1x1", "3x3 conv")  # at the card's bf16 matmul rate; the rest at its bandwidth

# ---------------------------------------------------------------------------------------------------
# The constants of the roofline, in one place.
# Cards: (bf16 dense matmul FLOP/s, device-to-device copy bytes/s) MEASURED on the cards (an 8192^3 bf16
# matmul and a large device-to-device copy); the H200's matmul rate is the GPU machine's documented
# ~790 TFLOP/s. benchmarks/_bench.py reads CARD_PEAKS from here.
# Host: microseconds the host spends per launch. ASSUMPTIONS, not measurements (eager PyTorch dispatch of
# one aten op with autograd bookkeeping; a Triton launch adds Python argument binding and the autotuner's
# cache lookup); change them here, or pass host_us= to predict().
# ---------------------------------------------------------------------------------------------------
CARDS = {
    "h100": {"matmul_flops": 800e12, "copy_bytes_per_s": 3.0e12, "source": "measured on the card"},
    "h200": {"matmul_flops": 790e12, "copy_bytes_per_s": 4.3e12,
             "source": "matmul: GPU machine's documentation; copy: measured on the card"},
}
CARD_PEAKS = {name: (c["matmul_flops"], c["copy_bytes_per_s"]) for name, c in CARDS.items()}
HOST_US = {"aten": 6.0, "triton": 15.0}  # ASSUMED host cost per launch, microseconds

# aten ops that launch no kernel: allocations, metadata and aliasing ops and the profiler's record-function
# markers (every view op, found by its schema, is excluded as well, and so are ops outside the aten
# namespace, e.g. prim.device).
NO_LAUNCH = frozenset({
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_unsafe_view", "detach",
    "alias", "lift_fresh", "set_", "resize_", "_reshape_alias", "as_strided", "view", "_to_dense",
    "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size", "_has_compatible_shallow_copy_type",
    "_record_function_enter_new", "_record_function_exit",
})


def _nb(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


# ---------------------------------------------------------------------------------------------------
# Triton kernels: op class and per-call cost from the launch arguments `a` (the kernel's named arguments,
# its constexprs and config, and "grid"). Bytes are the compulsory traffic, each tensor once (the kernel
# headers' formulas); fp32 partials are counted at this run's tile sizes. Returns (bytes, FLOPs).
# ---------------------------------------------------------------------------------------------------
def _conv1x1_fwd(a):
    M, K, N, e = a["M"], a["K"], a["N"], a["x_ptr"].element_size()
    extra = e * M * N if a["HAS_RESIDUAL"] else 0
    parts = 2 * 4 * -(-M // a["BLOCK_M"]) * N if a["OUT_STATS"] else 0
    return e * (M * K + N * K + M * N) + extra + parts + 16 * K, 2 * M * K * N


def _conv1x1_dw(a):
    M, K, N, e = a["M"], a["K"], a["N"], a["x_ptr"].element_size()
    return e * (M * K + M * N) + 4 * a["grid"][1] * N * K + 16 * K, 2 * M * K * N


def _conv1x1_dz(a):
    M, K, N, e = a["M"], a["K"], a["N"], a["x_ptr"].element_size()
    return e * (M * N + N * K + 2 * M * K) + 2 * 4 * -(-M // a["BLOCK_M"]) * K + 16 * K, 2 * M * K * N


def _conv1x1_dx(a):
    Mi, K, e = a["M_in"], a["K"], a["x_ptr"].element_size()
    M = Mi * a["Ho"] * a["Wo"] // (a["H"] * a["W"])
    return e * (2 * Mi * K + M * K + (Mi * K if a["ACCUMULATE"] else 0)) + 24 * K, 0


def _stats_partial(a):
    M, C = a["M"], a["C"]
    return _nb(a["x_ptr"]) * M // max(a["x_ptr"].shape[0], 1) + 2 * 4 * -(-M // a["BLOCK_M"]) * C, 0


def _stats_merge(a):
    C = a["C"]
    return 2 * 4 * a["num_blocks"] * C + 3 * 4 * C + (4 * 4 * C if a["UPDATE_RUNNING"] else 0), 0


def _bn_finalize(a):
    return 3 * 4 * a["C"] + (4 * 4 * a["C"] if a["UPDATE_RUNNING"] else 0), 0


def _bn_relu_fwd(a):
    return _nb(a["x_ptr"]) + _nb(a["a_ptr"]) + 16 * a["C"], 0


def _bn_relu_reduce(a):
    return _nb(a["da_ptr"]) + _nb(a["x_ptr"]) + _nb(a["part_ptr"]) + 16 * a["C"], 0


def _bn_relu_dx(a):
    return _nb(a["da_ptr"]) + _nb(a["x_ptr"]) + _nb(a["dx_ptr"]) + 24 * a["C"], 0


TRITON_COSTS = {
    "_bn_relu_conv1x1_fwd_kernel": ("fused 1x1", _conv1x1_fwd),
    "_bn_relu_conv1x1_bwd_dw_kernel": ("fused 1x1", _conv1x1_dw),
    "_bn_relu_conv1x1_bwd_dz_kernel": ("fused 1x1", _conv1x1_dz),
    "_bn_relu_conv1x1_bwd_dx_kernel": ("fused 1x1", _conv1x1_dx),
    "_batch_stats_partial_kernel": ("statistics", _stats_partial),
    "_merge_partial_stats_kernel": ("statistics", _stats_merge),
    "_bn_finalize_kernel": ("statistics", _bn_finalize),
    "_bn_relu_fwd_kernel": ("BN-ReLU passes", _bn_relu_fwd),
    "_bn_relu_bwd_reduce_kernel": ("BN-ReLU passes", _bn_relu_reduce),
    "_bn_relu_bwd_dx_kernel": ("BN-ReLU passes", _bn_relu_dx),
}


# ---------------------------------------------------------------------------------------------------
# aten ops: op class and cost
# ---------------------------------------------------------------------------------------------------
_BN_RELU_OPS = frozenset({
    "native_batch_norm", "native_batch_norm_backward", "cudnn_batch_norm", "cudnn_batch_norm_backward",
    "_native_batch_norm_legit", "_native_batch_norm_legit_no_training", "batch_norm_backward", "relu", "relu_",
    "threshold_backward", "max_pool2d_with_indices", "max_pool2d_with_indices_backward",
})
_WRITE_ONLY_FIRST = frozenset({"copy_", "fill_", "zero_", "_foreach_zero_", "_foreach_copy_"})


def _aten_class(name, args):
    if name in ("convolution", "convolution_backward"):
        w = args[1] if name == "convolution" else args[2]
        return "fused 1x1" if tuple(w.shape[2:]) == (1, 1) else "3x3 conv"
    if name in _BN_RELU_OPS:
        return "BN-ReLU passes"
    return "glue"


def _aten_cost(name, args, kwargs, out):
    """(bytes read + written, FLOPs) of one aten op; FLOPs only for convolutions and matrix products."""
    outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    if name.endswith("_") and not outs and args:
        outs = [t for t in tree_leaves(args[0]) if isinstance(t, torch.Tensor)]  # in-place foreach ops
    skip = args[0] if name in _WRITE_ONLY_FIRST else None
    skip_ids = {id(t) for t in tree_leaves(skip)} if skip is not None else set()
    seen, ins = set(), []
    for t in tree_leaves((args, kwargs)):
        if isinstance(t, torch.Tensor) and id(t) not in seen and id(t) not in skip_ids:
            seen.add(id(t))
            ins.append(t)
    nbytes = sum(map(_nb, ins)) + sum(map(_nb, outs))
    flops = 0
    if name == "convolution":
        flops = 2 * outs[0].numel() * args[1][0].numel()
    elif name == "convolution_backward":
        mask = args[10]
        flops = 2 * args[0].numel() * args[2][0].numel() * (int(mask[0]) + int(mask[1]))
    elif name in ("mm", "addmm"):
        a, b = (args[0], args[1]) if name == "mm" else (args[1], args[2])
        flops = 2 * a.shape[0] * a.shape[1] * b.shape[1]
    elif name in ("native_batch_norm", "cudnn_batch_norm") and bool(args[5]):
        nbytes += _nb(args[0])  # training: a statistics pass over x, then the normalising pass
    elif name in ("native_batch_norm_backward", "cudnn_batch_norm_backward"):
        nbytes += _nb(args[0]) + _nb(args[1])  # a reduction pass over (dy, x), then the dx pass
    return nbytes, flops


@dataclass
class Launch:
    kind: str          # "aten" or "triton"
    name: str          # aten op (e.g. "add_") or Triton kernel name
    cls: str           # one of CLASSES
    bytes: int
    flops: int
    grid: tuple | None = None


@dataclass
class StepCost:
    """The launches of one training step, and per-class totals."""
    launches: list = field(default_factory=list)

    def by_class(self):
        """{class: {"aten", "triton", "launches", "bytes", "flops"}} over CLASSES, in order."""
        out = {c: dict(aten=0, triton=0, launches=0, bytes=0, flops=0) for c in CLASSES}
        for r in self.launches:
            d = out[r.cls]
            d[r.kind] += 1
            d["launches"] += 1
            d["bytes"] += r.bytes
            d["flops"] += r.flops
        return out

    def totals(self):
        t = dict(aten=0, triton=0, launches=0, bytes=0, flops=0)
        for d in self.by_class().values():
            for k in t:
                t[k] += d[k]
        return t

    def op_counts(self, cls=None, kind=None):
        """{op or kernel name: launches}, most frequent first (optionally of one class / kind)."""
        counts = {}
        for r in self.launches:
            if (cls is None or r.cls == cls) and (kind is None or r.kind == kind):
                counts[r.name] = counts.get(r.name, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


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
        self.phase, self.head, self.paused = "forward", False, False
        self.region = {}  # id -> node: autograd nodes of the head and the loss (kept alive here)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.paused and not getattr(_TLS, "inside", False):
            name = func._overloadpacket.__name__
            if name == "_local_scalar_dense":
                raise RuntimeError(f"step_cost: the step reads a tensor value on the host ({func}); a training "
                                   "step must not synchronise (it could not be captured in a CUDA graph)")
            if func.namespace == "aten" and not func.is_view and name not in NO_LAUNCH:
                nbytes, flops = _aten_cost(name, args, kwargs, out)
                self.cost.launches.append(Launch("aten", name, self._classify(name, args), nbytes, flops))
        return out

    def _classify(self, name, args):
        if self.phase != "forward" and self.phase != "backward" or self.head:
            return "loss and optimizer"
        if self.phase == "backward":
            node = torch._C._current_autograd_node()
            if node is None or id(node) in self.region:
                return "loss and optimizer"
        return _aten_class(name, args)

    def triton(self, name, meta, grid):
        if name not in TRITON_COSTS:
            raise KeyError(f"step_cost: no cost formula for the Triton kernel {name}; add one to "
                           "fastpreact.step_cost.TRITON_COSTS")
        cls, cost = TRITON_COSTS[name]
        grid = tuple(grid(meta) if callable(grid) else grid)
        nbytes, flops = cost(dict(meta, grid=grid))
        self.cost.launches.append(Launch("triton", name, cls, int(nbytes), int(flops), grid))


def _kernel_name(fn):
    while not hasattr(fn, "__code__") and hasattr(fn, "fn"):
        fn = fn.fn
    return fn.__name__


@contextlib.contextmanager
def _intercept_triton(rec):
    """Record every Triton launch; run it only when rec.fake is False (then its own calls go uncounted)."""
    from triton.runtime.autotuner import Autotuner
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

    def autotuned(orig):
        def run(self, *args, **kwargs):
            if getattr(_TLS, "inside", False):
                return orig(self, *args, **kwargs)
            self.nargs = dict(zip(self.arg_names, args))
            config = self.configs[0] if len(self.configs) == 1 else self.prune_configs(kwargs)[0]
            rec.triton(_kernel_name(self), {**self.nargs, **kwargs, **config.all_kwargs()}, kwargs["grid"])
            if not rec.fake:
                return run_for_real(orig, self, *args, **kwargs)
            self.best_config, self.nargs = config, None
            return None
        return run

    def plain(orig):
        def run(self, *args, grid, warmup, **kwargs):
            if getattr(_TLS, "inside", False) or warmup:
                return orig(self, *args, grid=grid, warmup=warmup, **kwargs)
            rec.triton(_kernel_name(self), {**dict(zip(self.arg_names, args)), **kwargs}, grid)
            if not rec.fake:
                return run_for_real(orig, self, *args, grid=grid, warmup=warmup, **kwargs)
            return None
        return run

    saved = [(Autotuner, Autotuner.run)] + [(c, c.run) for c in classes]
    Autotuner.run = autotuned(Autotuner.run)
    for c in classes:
        c.run = plain(c.run)
    try:
        yield
    finally:
        for c, orig in saved:
            c.run = orig


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


def count_step(make, *, amp_dtype=torch.bfloat16, real=False, lr=0.1, momentum=0.9, weight_decay=1e-4):
    """Launches, bytes and FLOPs of one steady-state training step (momentum buffers already exist).

    make() -> (model, x, y) builds the model (on the CPU, channels-last where wanted) and a batch; it is
    called under FakeTensorMode unless real=True (then everything, Triton kernels included, runs for real:
    small nets only). Optimizer: SGD with momentum, foreach. amp_dtype: the autocast dtype, or None.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_mode = contextlib.nullcontext() if real else FakeTensorMode()
    rec = _Recorder(fake=not real)
    with fake_mode:
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


def count_model(arch, num_classes, *, kernels, batch, image, amp_dtype=torch.bfloat16, real=False,
                **create_kw):
    """count_step of fastpreact.models.create_model(arch, num_classes, kernels=kernels, **create_kw),
    channels-last, on a [batch, 3, image, image] input."""
    from .models import create_model

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
    return count_step(make, amp_dtype=amp_dtype, real=real)
