"""Ahead-of-time compile check of every Triton kernel of fastpreact for an H100 (sm_90), without a GPU.

The CPU tests run the kernels through TRITON_INTERPRET=1, which accepts code the GPU compiler rejects
(tl.dot blocks under 16, non-constexpr shapes, Python control flow on tensors, dtype mismatches, ...).
This script compiles each kernel variant the library really launches down to PTX and a cubin (ptxas from
the triton wheel; no CUDA driver needed) for GPUTarget("cuda", 90, 32). It runs WITHOUT the interpreter,
so the kernel modules take their GPU tile constants and their GPU autotune configs:

1. record: the public entry points (fastpreact.functional, fastpreact.nn through two tiny fused models,
   and launcher options no entry point reaches yet) run on CPU tensors with the kernel launches
   replaced by a recorder (JITFunction.run records the launch and does nothing; the autotuner records
   every one of its configs). `functional.backend` is forced to "triton" so the Triton path is taken.
   Outputs are garbage (never written) and nothing downstream depends on their values: the library
   never branches on tensor data on the host.
   Each launch is specialised exactly as JITFunction.run would on a GPU (triton's own binder:
   pointer dtypes, i32/i64 by value, divisibility-by-16 hints, constexprs, options).
2. plan (CI default): per kernel and compute dtype, a greedy set of the recorded variants that together
   cover every argument type and every value of every code-path constexpr (STRIDE, HAS_BIAS, SPLIT_OUT,
   DOT_PRECISION, ...), autotuned ones each with one config (rotating through the list), plus EVERY
   autotune config for the variant with the most optional code, per dtype. `--full` compiles every
   recorded variant with every config (~450 compiles, ~3.5 min on 2 cores: a manual check).
3. compile: triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32)) in worker processes, with a
   fresh TRITON_CACHE_DIR (nothing is reused across runs). Shared memory is checked against the H100's
   227 KiB per block and register/spill use is read from the cubin (cuobjdump).

Run:  python tests/_triton_aot.py --out report.json [--jobs 2] [--full]
Exit status 0 when every planned variant compiled and every discovered kernel was exercised, 1 when
not, 3 when this triton's launch internals are not the ones the recorder replays (triton < 3.4).
Works with triton 3.6 (the GPU machine) and 3.8 (this one); it never touches a CUDA device.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

if os.environ.get("TRITON_INTERPRET") == "1":  # must be decided before triton is imported
    raise SystemExit("tests/_triton_aot.py must run without TRITON_INTERPRET=1 (it compiles for the GPU)")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)  # H100 / H200: sm_90, 32-thread warps
# Largest shared memory one block may use on sm_90 (227 KiB opt-in; cudaDevAttrMaxSharedMemoryPerBlockOptin).
H100_MAX_SHARED_BYTES = 232448
KERNEL_PACKAGE = "fastpreact.kernels"

# JIT functions that are kernels (launched with a grid) but that no entry point launches on purpose.
# Each entry: "module:function" -> why it may stay unexercised. Keep it empty unless there is a reason.
UNEXERCISED_ALLOWED: dict[str, str] = {}


# ----------------------------------------------------------------------------------------- discovery
def _unwrap(obj):
    """(JITFunction, autotuner or None) behind a module attribute, or (None, None)."""
    autotuner = None
    seen = 0
    while obj is not None and not isinstance(obj, JITFunction) and seen < 8:
        if isinstance(obj, Autotuner) and autotuner is None:
            autotuner = obj
        obj = getattr(obj, "fn", None)
        seen += 1
    return (obj, autotuner) if isinstance(obj, JITFunction) else (None, None)


def kernel_name(jf):
    return f"{jf.fn.__module__}:{jf.fn.__qualname__}"


def discover():
    """Every triton JIT function defined in fastpreact.kernels.*: name -> (JITFunction, Autotuner|None)."""
    pkg = importlib.import_module(KERNEL_PACKAGE)
    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{KERNEL_PACKAGE}.{info.name}")
        for value in vars(mod).values():
            jf, autotuner = _unwrap(value)
            if jf is not None and jf.fn.__module__ == mod.__name__:
                found[kernel_name(jf)] = (jf, autotuner)
    return found


def called_jit_functions(jf):
    """JIT functions that jf's body references by name (its device-function callees)."""
    callees = set()
    for node in ast.walk(ast.parse(jf.src)):
        name = None
        if isinstance(node, ast.Name):
            name = node.id
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            target = jf.fn.__globals__.get(node.value.id)
            if target is not None and hasattr(target, "__dict__"):
                callee, _ = _unwrap(getattr(target, node.attr, None))
                if callee is not None:
                    callees.add(kernel_name(callee))
            continue
        if name is not None:
            callee, _ = _unwrap(jf.fn.__globals__.get(name))
            if callee is not None and callee is not jf:
                callees.add(kernel_name(callee))
    return callees


# ----------------------------------------------------------------------------------------- recording
def _find_paths_if(values, pred):
    try:
        from triton._utils import find_paths_if
        return find_paths_if(values, pred)
    except ImportError:  # pragma: no cover - flat signatures only
        return [(i,) for i, v in enumerate(values) if pred((i,), v)]


def _get_path(values, path):
    for i in path:
        values = values[i]
    return values


class UnsupportedTriton(RuntimeError):
    """This triton's internals differ from those the recorder replays (JITFunction's launch binder)."""


class Recorder:
    """Replaces kernel launches by records of their GPU specialisation."""

    def __init__(self):
        self.backend = make_backend(TARGET)
        self.binders = {}
        self.launches = {}  # name -> number of launches seen
        self.variants = {}  # key -> spec dict (first seen)
        self.bool_constexprs = {}  # name -> {constexpr name: set of values seen}
        self.context = "?"
        self.config = None  # (index, count) while an autotuner replays its configs
        self._saved = None

    # --- specialisation, as JITFunction.run does it on a device
    def _binder(self, jf):
        if jf not in self.binders:
            try:
                from triton.runtime.jit import create_function_from_signature
                self.binders[jf] = create_function_from_signature(jf.signature, jf.params, self.backend)
            except (ImportError, TypeError) as exc:
                raise UnsupportedTriton(f"triton {triton.__version__}: no create_function_from_signature(sig, "
                                        f"params, backend) ({exc})") from exc
        return self.binders[jf]

    def specialize(self, jf, args, kwargs):
        kwargs = dict(kwargs)
        kwargs.pop("grid", None)
        kwargs.pop("warmup", None)
        kwargs.setdefault("debug", False)
        bound = self._binder(jf)(*args, **kwargs)
        if not (isinstance(bound, tuple) and len(bound) == 3 and isinstance(bound[0], dict)):
            raise UnsupportedTriton(f"triton {triton.__version__}: its launch binder returns another format "
                                    "than (args, specialization, options) (triton >= 3.4)")
        bound_args, specialization, options = bound
        if hasattr(jf, "_pack_args"):
            options, signature, constexprs, attrs = jf._pack_args(self.backend, kwargs, bound_args,
                                                                  specialization, options)
        else:  # triton without _pack_args (<= 3.5): the same steps as its JITFunction.run
            options = self.backend.parse_options(kwargs)
            sigkeys = [p.name for p in jf.params]
            sigvals = [s[0] for s in specialization]
            signature = dict(zip(sigkeys, sigvals))
            paths = _find_paths_if(sigvals, lambda _, v: v == "constexpr")
            constexprs = {p: _get_path(list(bound_args.values()), p) for p in paths}
            attrvals = ["" if s[0] == "constexpr" else s[1] for s in specialization]
            attr_paths = _find_paths_if(attrvals, lambda _, v: isinstance(v, str))
            attrs = {p: self.backend.parse_attr(_get_path(attrvals, p)) for p in attr_paths}
        return signature, constexprs, attrs, options

    def record(self, jf, args, kwargs, config_index=None, num_configs=None):
        name = kernel_name(jf)
        signature, constexprs, attrs, options = self.specialize(jf, args, kwargs)
        names = [p.name for p in jf.params]
        cx = {names[p[0]] if len(p) == 1 else str(p): _plain(v) for p, v in constexprs.items()}
        opts = dict(sorted(vars(options).items()))  # raw: triton.compile needs its tuples
        for k, v in cx.items():
            if isinstance(v, bool):
                self.bool_constexprs.setdefault(name, {}).setdefault(k, set()).add(v)
        # Divisibility hints (attrs) come from this run's small shapes and do not change what compiles;
        # they are kept from the first launch of a variant but not part of its identity.
        key = json.dumps([name, signature, cx, {k: _plain(v) for k, v in opts.items()}], sort_keys=True,
                         default=str)
        if key not in self.variants:
            self.variants[key] = dict(
                kernel=name, signature=signature, constexprs=cx,
                attrs=[[list(p), v] for p, v in attrs.items()], options=opts,
                config_index=config_index, num_configs=num_configs, first_seen=self.context)

    # --- patches
    def install(self):
        recorder = self
        self._saved = (JITFunction.run, Autotuner.run)

        def jit_run(jf, *args, grid=None, warmup=False, **kwargs):
            name = kernel_name(jf)
            config = recorder.config
            if config is None:  # a plain launch (an autotuned one is counted by autotuner_run)
                recorder.launches[name] = recorder.launches.get(name, 0) + 1
            recorder.record(jf, args, kwargs, *(config or (None, None)))
            return None

        def autotuner_run(tuner, *args, **kwargs):
            jf, _ = _unwrap(tuner)
            name = kernel_name(jf)
            recorder.launches[name] = recorder.launches.get(name, 0) + 1
            # Every config the GPU may build (the tuner benchmarks all that survive pruning, and other
            # problem sizes keep others), in order; through tuner.fn so that a triton.heuristics
            # wrapper under the autotuner still adds its values.
            for i, config in enumerate(tuner.configs):
                recorder.config = (i, len(tuner.configs))
                try:
                    tuner.fn.run(*args, **kwargs, **config.all_kwargs())
                finally:
                    recorder.config = None
            tuner.best_config = tuner.configs[0]  # launchers read the chosen tile sizes
            return None

        JITFunction.run = jit_run
        Autotuner.run = autotuner_run

    def uninstall(self):
        if self._saved:
            JITFunction.run, Autotuner.run = self._saved
            self._saved = None


def _plain(v):
    """JSON-friendly value of a constexpr or an option (tl.dtype -> str, tuples kept as lists)."""
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    return str(v)


# ---------------------------------------------------------------------------------------- exercising
def exercise(recorder):
    """Run every public entry point that launches kernels, in every compute dtype, forward and backward.

    Small shapes: only the launches matter. Returns a list of (context, error) for calls that raised.
    """
    import fastpreact.functional as Fp

    Fp.backend = lambda device=None: "triton"  # take the Triton path on CPU tensors (nn uses Fp.backend too)
    errors = []

    def attempt(context, fn):
        recorder.context = context
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - reported, and fails the check
            where = traceback.extract_tb(exc.__traceback__)[-1]
            first_line = (str(exc).splitlines() or [""])[0][:400]
            errors.append((context, f"{type(exc).__name__}: {first_line} "
                                    f"(at {os.path.relpath(where.filename)}:{where.lineno})"))

    dtypes = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}

    def autocast(dt):
        return torch.autocast("cpu", dtype=dt) if dt is not None else torch.autocast("cpu", enabled=False)

    def cl(t):
        return t.contiguous(memory_format=torch.channels_last)

    n, c, cout, hw = 2, 32, 48, 6

    def bn_params(ch):
        return (torch.rand(ch) + 0.5).requires_grad_(), torch.randn(ch).requires_grad_(), \
            torch.zeros(ch), torch.ones(ch), torch.zeros((), dtype=torch.long)

    def single(dt, training, stride, residual, bias, output_stats, input_stats, momentum):
        x = cl(torch.randn(n, c, hw, hw)).requires_grad_()
        w = torch.randn(cout, c, 1, 1).requires_grad_()
        g, b, rm, rv, nbt = bn_params(c)
        ho = (hw - 1) // stride + 1
        res = cl(torch.randn(n, cout, ho, ho)).requires_grad_() if residual else None
        cb = torch.randn(cout).requires_grad_() if bias else None
        stats = (torch.zeros(c), torch.ones(c)) if input_stats else None
        with autocast(dt):
            out = Fp.bn_relu_conv1x1(x, w, g, b, rm, rv, num_batches_tracked=nbt, training=training,
                                     momentum=momentum, stride=stride, conv_bias=cb, residual=res,
                                     input_stats=stats, output_stats=output_stats)
        y = out[0] if output_stats else out
        y.float().sum().backward()

    def dual(dt, training, stride_a, stride_b, output_stats_a):
        x = cl(torch.randn(n, c, hw, hw)).requires_grad_()
        wa = torch.randn(cout, c, 1, 1).requires_grad_()
        wb = torch.randn(2 * c, c, 1, 1).requires_grad_()
        g, b, rm, rv, nbt = bn_params(c)
        with autocast(dt):
            ya, yb = Fp.bn_relu_conv1x1_dual(x, wa, wb, g, b, rm, rv, num_batches_tracked=nbt,
                                             training=training, stride_a=stride_a, stride_b=stride_b,
                                             output_stats_a=output_stats_a)
        if output_stats_a:
            ya = ya[0]
        (ya.float().sum() + yb.float().sum()).backward()

    def model(dt, arch, kw, size, training):
        from fastpreact.models import create_model
        net = create_model(arch, 10, kernels="fused", **kw).to(memory_format=torch.channels_last)
        net.train(training)
        x = cl(torch.randn(2, 3, size, size))
        with autocast(dt):
            out = net(x)
        out.float().sum().backward()  # eval too: fine-tuning through frozen BN takes the running-stats path

    def launcher_options(dt):
        # Launcher features no entry point uses yet (accumulating dx into a shortcut's gradient).
        import inspect

        from fastpreact.kernels import bn_relu_conv1x1 as kc
        if "accumulate_into" not in inspect.signature(kc.bn_relu_conv1x1_bwd_dx).parameters:
            return
        dtype = dt or torch.float32
        for stride in (1, 2):
            x = cl(torch.randn(n, c, hw, hw)).to(dtype)
            ho = (hw - 1) // stride + 1
            dz = cl(torch.randn(n, c, ho, ho)).to(dtype)
            vec = torch.ones(c)
            kc.bn_relu_conv1x1_bwd_dx(x, dz, vec, vec, vec, vec, vec, stride=stride, batch_stats=True,
                                      accumulate_into=torch.zeros_like(x))

    for dname, dt in dtypes.items():
        for training in (True, False):
            for stride in (1, 2):
                attempt(f"bn_relu_conv1x1 {dname} train={training} stride={stride}",
                        lambda: single(dt, training, stride, False, False, False, False, 0.1))
                attempt(f"bn_relu_conv1x1 {dname} train={training} stride={stride} residual+bias+output_stats",
                        lambda: single(dt, training, stride, True, True, True, False, 0.1))
            attempt(f"bn_relu_conv1x1 {dname} train={training} input_stats",
                    lambda: single(dt, training, 1, False, False, True, True, 0.1))
            attempt(f"bn_relu_conv1x1 {dname} train={training} momentum=None",
                    lambda: single(dt, training, 1, False, False, False, False, None))
            attempt(f"bn_relu_conv1x1 {dname} train={training} momentum=None input_stats",
                    lambda: single(dt, training, 1, False, False, False, True, None))
            for sa, sb in ((1, 1), (2, 2), (1, 2)):
                for ostats in (False, True):
                    attempt(f"bn_relu_conv1x1_dual {dname} train={training} strides={sa},{sb} "
                            f"output_stats_a={ostats}", lambda: dual(dt, training, sa, sb, ostats))
        attempt(f"batch_stats {dname}", lambda: Fp.batch_stats(cl(torch.randn(n, c, hw, hw)).to(dt or torch.float32)))
        for training in (True, False):
            attempt(f"create_model resnet11 fused {dname} train={training}",
                    lambda: model(dt, "resnet11", dict(widths=(16, 16, 16)), 8, training))
            attempt(f"create_model resnet14 imagenet fused {dname} train={training}",
                    lambda: model(dt, "resnet14", dict(family="imagenet", layers=(1, 1, 1, 1),
                                                       widths=(4, 4, 8, 8)), 64, training))
        attempt(f"launcher options {dname}", lambda: launcher_options(dt))

    # fp32 without TF32 (torch.backends.cudnn.allow_tf32 = False): the kernels then use IEEE fp32 dots.
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        for stride in (1, 2):
            attempt(f"bn_relu_conv1x1 fp32 ieee stride={stride} residual+bias+output_stats",
                    lambda: single(None, True, stride, True, True, True, False, 0.1))
            attempt(f"bn_relu_conv1x1_dual fp32 ieee strides={stride},{stride}",
                    lambda: dual(None, True, stride, stride, True))
    finally:
        torch.backends.cudnn.allow_tf32 = saved
    return errors


# ------------------------------------------------------------------------------------------ planning
# Constexprs that an autotune config sets (tile shape), as opposed to those that select code paths.
_CONFIG_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def _is_config_constexpr(name):
    return name.startswith("BLOCK_") or name == "GROUP_M"


def _dtype_of(spec):
    """The compute dtype of a variant: the first 16-bit pointer type, else fp32."""
    for t in spec["signature"].values():
        if isinstance(t, str) and t in ("*fp16", "*bf16"):
            return t[1:]
    return "fp32"


def _code_features(spec):
    """(name, value) pairs that select the code a variant compiles: its argument types (an int equal to 1
    becomes a constexpr) and its code-path constexprs; for plain kernels also the launch options."""
    feats = {("sig", k, v) for k, v in spec["signature"].items()}
    autotuned = spec["config_index"] is not None
    for k, v in spec["constexprs"].items():
        if not (autotuned and _is_config_constexpr(k)):
            feats.add(("cx", k, json.dumps(v, default=str)))
    if not autotuned:
        feats |= {("opt", k, spec["options"].get(k)) for k in _CONFIG_OPTIONS}
    return feats


def _richness(spec):
    """How much optional code a variant switches on: True flags and a stride above 1."""
    return sum(1 for k, v in spec["constexprs"].items()
               if v is True or (k == "STRIDE" and isinstance(v, int) and v > 1))


def plan(variants, full=False):
    """The compile jobs.

    Default (CI): per kernel and compute dtype, a greedy set of recorded variants that together cover
    every argument type and every value of every code-path constexpr seen (autotuned kernels: each with
    one config, rotating through the configs), plus every autotune config for the variant with the most
    optional code switched on, per dtype. full=True: every recorded variant with every config.
    """
    by_kernel = {}
    for spec in variants.values():
        code_key = json.dumps(sorted(_code_features(spec), key=str), default=str)
        code = by_kernel.setdefault(spec["kernel"], {}).setdefault(_dtype_of(spec), {})
        code.setdefault(code_key, {})[spec["config_index"]] = spec
    jobs = []
    for kernel, by_dtype in by_kernel.items():
        rotation = 0
        for dtype, codes in by_dtype.items():
            items = list(codes.values())  # each: {config_index (None for plain kernels): spec}
            chosen = {}  # (item index, config index)
            if full:
                for n, configs in enumerate(items):
                    for i in configs:
                        chosen[(n, i)] = "every variant x config (--full)"
            else:
                uncovered = set().union(*(_code_features(next(iter(c.values()))) for c in items))
                remaining = list(range(len(items)))
                while uncovered and remaining:
                    def gain(n):
                        spec = next(iter(items[n].values()))
                        return len(_code_features(spec) & uncovered), _richness(spec)
                    best = max(remaining, key=gain)
                    remaining.remove(best)
                    spec = next(iter(items[best].values()))
                    if not _code_features(spec) & uncovered:
                        break
                    uncovered -= _code_features(spec)
                    idxs = sorted(items[best], key=lambda i: -1 if i is None else i)
                    pick = idxs[rotation % len(idxs)]
                    rotation += 1
                    chosen[(best, pick)] = "covers a code path"
                richest = max(range(len(items)), key=lambda n: _richness(next(iter(items[n].values()))))
                if len(items[richest]) > 1:
                    for i in items[richest]:
                        chosen.setdefault((richest, i), "autotune config sweep")
            for (n, i), why in sorted(chosen.items(), key=lambda kv: (kv[0][0], -1 if kv[0][1] is None
                                                                       else kv[0][1])):
                spec = items[n][i]
                cfg = "" if i is None else f"; autotune config {i + 1}/{spec['num_configs']}"
                jobs.append(dict(spec, reason=why + cfg))
    return jobs


# ----------------------------------------------------------------------------------------- compiling
_KERNELS = {}


def _resource_usage(cubin):
    """{"registers": int, "local_bytes": int} of a cubin, via the wheel's cuobjdump (empty if absent)."""
    tool = None
    try:
        from triton import knobs
        tool = knobs.nvidia.cuobjdump.path
    except Exception:  # noqa: BLE001 - older triton: the wheel's copy
        import triton.backends.nvidia as nv
        tool = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    if not tool or not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                             timeout=60).stdout
    except Exception:  # noqa: BLE001
        return {}
    finally:
        os.unlink(f.name)
    usage = {}
    m = re.search(r"REG:(\d+)", out)
    if m:
        usage["registers"] = int(m.group(1))
    m = re.search(r"LOCAL:(\d+)", out)
    if m:
        usage["local_bytes"] = int(m.group(1))
    return usage


def compile_one(job):
    """Compile one variant for sm_90; returns the job's result fields."""
    jf, _ = _KERNELS[job["kernel"]]
    names = [p.name for p in jf.params]
    constexprs = {}
    for k, v in job["constexprs"].items():
        if k in names:
            constexprs[(names.index(k),)] = v
    attrs = {tuple(p): v for p, v in job["attrs"]}
    start = time.time()
    try:
        src = ASTSource(jf, job["signature"], constexprs, attrs)
        compiled = triton.compile(src, target=TARGET, options=job["options"])
    except Exception as exc:  # noqa: BLE001 - the compiler's error is the result
        msg = str(exc).strip() or type(exc).__name__
        return dict(status="failed", seconds=round(time.time() - start, 2),
                    error=f"{type(exc).__name__}: {msg}"[-3000:],
                    trace="".join(traceback.format_exception_only(type(exc), exc))[-1500:])
    shared = int(getattr(compiled.metadata, "shared", 0) or 0)
    result = dict(status="compiled", seconds=round(time.time() - start, 2), shared_bytes=shared,
                  stages=sorted(compiled.asm.keys()), ptx_bytes=len(compiled.asm.get("ptx", "")),
                  cubin_bytes=len(compiled.asm.get("cubin", b"")))
    if "cubin" in compiled.asm:
        result.update(_resource_usage(compiled.asm["cubin"]))
    return result


def _worker(index_and_job):
    index, job = index_and_job
    try:
        return index, compile_one(job)
    except Exception as exc:  # noqa: BLE001
        return index, dict(status="failed", error=f"{type(exc).__name__}: {exc}"[-3000:])


def compile_all(jobs, processes):
    results = [None] * len(jobs)
    if processes <= 1 or len(jobs) <= 1:
        for i, job in enumerate(jobs):
            results[i] = _worker((i, job))[1]
        return results
    import multiprocessing as mp
    # fork: the workers inherit the imported kernel modules (no torch re-import per worker).
    ctx = mp.get_context("fork")
    # The slowest (largest tile) jobs first, so that the pool finishes evenly.
    order = sorted(range(len(jobs)), key=lambda i: -_cost(jobs[i]))
    with ctx.Pool(processes) as pool:
        for i, res in pool.imap_unordered(_worker, [(i, jobs[i]) for i in order]):
            results[i] = res
    return results


def _cost(job):
    c = job["constexprs"]
    tile = 1
    for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_C"):
        if isinstance(c.get(k), int):
            tile *= c[k]
    return tile * job["options"].get("num_stages", 1)


# ---------------------------------------------------------------------------------------- self-test
# A kernel the interpreter runs for any BLOCK but the GPU compiler only accepts with BLOCK >= 16 (tensor
# core tiles): the check must reject BLOCK=8 and accept BLOCK=16, or it proves nothing.
@triton.jit
def _selftest_dot_kernel(a_ptr, b_ptr, c_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tile = offs[:, None] * BLOCK + offs[None, :]
    tl.store(c_ptr + tile, tl.dot(tl.load(a_ptr + tile), tl.load(b_ptr + tile)))


def selftest():
    """{"rejects_small_dot": bool, "accepts_16x16_dot": bool, "small_dot_error": str}"""
    name = kernel_name(_selftest_dot_kernel)
    _KERNELS[name] = (_selftest_dot_kernel, None)
    sig = {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32", "BLOCK": "constexpr"}
    out = {}
    for block in (8, 16):
        job = dict(kernel=name, signature=sig, constexprs={"BLOCK": block}, attrs=[], options={"num_warps": 4})
        out[block] = compile_one(job)
    return dict(rejects_small_dot=out[8]["status"] == "failed", accepts_16x16_dot=out[16]["status"] == "compiled",
                small_dot_error=out[8].get("error", "")[:300], dot_16_error=out[16].get("error", "")[:300])


# --------------------------------------------------------------------------------------------- main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the JSON report here")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes")
    parser.add_argument("--full", action="store_true", help="every variant with every autotune config")
    args = parser.parse_args(argv)

    cache = tempfile.mkdtemp(prefix="fastpreact-aot-")
    os.environ["TRITON_CACHE_DIR"] = cache  # a fresh cache: every variant really compiles
    t0 = time.time()
    try:
        found = discover()
        check = selftest()
        _KERNELS.update(found)
        recorder = Recorder()
        recorder.install()
        try:
            torch.manual_seed(0)
            errors = exercise(recorder)
        finally:
            recorder.uninstall()
        unsupported = [e for c, e in errors if e.startswith("UnsupportedTriton")]
        if unsupported:
            print(unsupported[0])
            return 3
        t_record = time.time() - t0

        launched = set(recorder.launches)
        reachable = set(launched)
        frontier = list(launched)
        while frontier:
            name = frontier.pop()
            if name not in found:  # a JIT function from outside fastpreact.kernels
                continue
            jf, _ = found[name]
            for callee in called_jit_functions(jf):
                if callee in found and callee not in reachable:
                    reachable.add(callee)
                    frontier.append(callee)
        unexercised = sorted(set(found) - reachable - set(UNEXERCISED_ALLOWED))
        one_sided = {k: {c: sorted(v) for c, v in flags.items() if len(v) == 1}
                     for k, flags in recorder.bool_constexprs.items()}
        one_sided = {k: v for k, v in one_sided.items() if v}

        jobs = plan(recorder.variants, full=args.full)
        t1 = time.time()
        results = compile_all(jobs, args.jobs)
        t_compile = time.time() - t1
    finally:
        shutil.rmtree(cache, ignore_errors=True)

    entries, failures = [], []
    for job, res in zip(jobs, results):
        entry = {k: job[k] for k in ("kernel", "signature", "constexprs", "reason", "first_seen")}
        entry["num_warps"] = job["options"].get("num_warps")
        entry["num_stages"] = job["options"].get("num_stages")
        entry.update(res)
        if res["status"] == "compiled" and res.get("shared_bytes", 0) > H100_MAX_SHARED_BYTES:
            if job["config_index"] is None:
                entry["status"] = "failed"
                entry["error"] = (f"needs {res['shared_bytes']} bytes of shared memory, more than the H100's "
                                  f"{H100_MAX_SHARED_BYTES}: the launch would raise OutOfResources")
            else:
                entry["warning"] = (f"{res['shared_bytes']} bytes of shared memory > {H100_MAX_SHARED_BYTES}: "
                                    "the autotuner will skip this config on an H100")
        if entry["status"] != "compiled":
            failures.append(entry)
        entries.append(entry)

    # An autotuned kernel whose swept configs all exceed the shared memory cannot run at all.
    sweeps = {}
    for job, entry in zip(jobs, entries):
        if "config sweep" in job["reason"] and entry["status"] == "compiled":
            sweeps.setdefault(f"{job['kernel']} [{_dtype_of(job)}]", []).append("warning" in entry)
    no_config_fits = sorted(k for k, over in sweeps.items() if all(over))

    report = dict(
        triton_version=triton.__version__, target=dict(backend=TARGET.backend, arch=TARGET.arch,
                                                         warp_size=TARGET.warp_size),
        discovered=sorted(found), launched=sorted(launched),
        device_functions=sorted(reachable - launched), unexercised=unexercised,
        allowed_unexercised=UNEXERCISED_ALLOWED, one_sided_bool_constexprs=one_sided,
        entry_point_errors=[dict(context=c, error=e) for c, e in errors],
        selftest=check, variants_recorded=len(recorder.variants), jobs=len(jobs),
        compiled=sum(e["status"] == "compiled" for e in entries), failed=len(failures),
        no_config_fits=no_config_fits,
        seconds=dict(record=round(t_record, 1), compile=round(t_compile, 1), total=round(time.time() - t0, 1)),
        results=entries,
    )
    ok = (not failures and not unexercised and not errors and not no_config_fits
          and check["rejects_small_dot"] and check["accepts_16x16_dot"])
    report["ok"] = ok
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1, default=str)
    print(summary(report))
    return 0 if ok else 1


def summary(report):
    """A human-readable digest of the report."""
    lines = [f"triton {report['triton_version']} -> {report['target']['backend']} sm_{report['target']['arch']}: "
             f"{report['compiled']}/{report['jobs']} variants compiled ({report['variants_recorded']} recorded), "
             f"{report['seconds']}"]
    for e in report["results"]:
        cx = ", ".join(f"{k}={v}" for k, v in e["constexprs"].items())
        ptr = _dtype_of(e)
        line = (f"  {e['status']:8s} {e['kernel'].split(':')[1]} [{ptr}; {cx}; warps={e['num_warps']} "
                f"stages={e['num_stages']}] {e.get('seconds', '?')}s")
        if e["status"] == "compiled":
            line += f" shared={e.get('shared_bytes')} regs={e.get('registers', '?')} local={e.get('local_bytes', '?')}"
        if "warning" in e:
            line += f"  WARNING {e['warning']}"
        lines.append(line)
        if e["status"] != "compiled":
            lines.append("      " + e.get("error", "").replace("\n", "\n      "))
    if report["unexercised"]:
        lines.append(f"NOT EXERCISED (no entry point launches them): {report['unexercised']}")
    for err in report["entry_point_errors"]:
        lines.append(f"ENTRY POINT RAISED: {err['context']}: {err['error']}")
    if not (report["selftest"]["rejects_small_dot"] and report["selftest"]["accepts_16x16_dot"]):
        lines.append(f"SELF-TEST FAILED (the check cannot tell good from bad kernels): {report['selftest']}")
    for k in report["no_config_fits"]:
        lines.append(f"NO AUTOTUNE CONFIG FITS IN SHARED MEMORY: {k}")
    if report["one_sided_bool_constexprs"]:
        lines.append(f"note: constexpr flags seen with one value only: {report['one_sided_bool_constexprs']}")
    lines.append("OK" if report["ok"] else "FAILED")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
