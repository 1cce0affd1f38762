"""Ahead-of-time compile check of every Triton kernel of fastpreact for an H100 (sm_90), without a GPU.

The CPU tests run the kernels through TRITON_INTERPRET=1, which accepts code the GPU compiler rejects
(tl.dot blocks under 16, non-constexpr shapes, Python control flow on tensors, dtype mismatches, ...).
This script compiles the kernel variants the library launches down to PTX and a cubin (ptxas from the
triton wheel; no CUDA driver needed) for GPUTarget("cuda", 90, 32). It runs WITHOUT the interpreter, so
the kernel modules take their GPU tile constants and their GPU autotune configs. Nothing in it names a
kernel, a flag or a tile parameter: everything is derived, so a kernel that gains a constexpr flag or an
autotune config needs no edit here.

1. record: grids of options of the public entry points (fastpreact.functional's ops and the fused nets
   of fastpreact.models, forward and backward, in every compute dtype) run on CPU tensors with every
   kernel launch replaced by a record of its GPU specialisation (triton's own launch binder: pointer
   dtypes, i32/i64, divisibility hints, constexprs, options); an autotuned launch records every config.
   The Triton path is forced (functional.backends.backend says "triton"); outputs are never written and
   nothing downstream depends on their values (the library never branches on tensor data on the host).
2. derive: the tile constexprs of a kernel are the keys of its autotune configs; every other constexpr
   selects code. A boolean code constexpr that the entry points only ever launch one way is flipped on
   a recorded variant, so both of its code paths compile.
3. plan (default): per kernel and compute dtype, a greedy set of variants covering every argument type
   and every value of every code constexpr (autotuned ones each with one config, rotating), plus EVERY
   autotune config of the variant with the most optional code. `--full`: every variant x config.
4. compile: triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32)) in worker processes, with a
   fresh TRITON_CACHE_DIR. Shared memory is checked against the H100's 227 KiB per block; registers and
   spills (local memory) are read from the cubin (cuobjdump).

Run:  python tests/_triton_aot.py --out report.json [--jobs 2] [--full]
Exit status 0 when every planned variant compiled and every kernel was exercised, 1 when not, 3 when
this triton's launch internals are not the ones the recorder replays (triton < 3.6).
"""
from __future__ import annotations

import argparse
import ast
import importlib
import itertools
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
H100_MAX_SHARED_BYTES = 232448  # 227 KiB: cudaDevAttrMaxSharedMemoryPerBlockOptin on sm_90
KERNEL_PACKAGE = "fastpreact.kernels"
# Kernels no entry point launches on purpose: "module:function" -> why. Keep it empty unless there is a reason.
UNEXERCISED_ALLOWED: dict[str, str] = {}


# ----------------------------------------------------------------------------------------- discovery
def _unwrap(obj):
    """(JITFunction, Autotuner or None) behind a module attribute, or (None, None)."""
    autotuner = None
    for _ in range(8):
        if obj is None or isinstance(obj, JITFunction):
            break
        if isinstance(obj, Autotuner) and autotuner is None:
            autotuner = obj
        obj = getattr(obj, "fn", None)
    return (obj, autotuner) if isinstance(obj, JITFunction) else (None, None)


def kernel_name(jf):
    return f"{jf.fn.__module__}:{jf.fn.__qualname__}"


def discover():
    """Every triton JIT function defined in fastpreact.kernels.*: name -> JITFunction."""
    pkg = importlib.import_module(KERNEL_PACKAGE)
    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{KERNEL_PACKAGE}.{info.name}")
        for value in vars(mod).values():
            jf, _ = _unwrap(value)
            if jf is not None and jf.fn.__module__ == mod.__name__:
                found[kernel_name(jf)] = jf
    return found


def reachable(launched, found):
    """The launched kernels and every JIT function their bodies call, transitively."""
    seen, frontier = set(launched), list(launched)
    while frontier:
        jf = found.get(frontier.pop())
        if jf is None:  # a JIT function from outside fastpreact.kernels
            continue
        for node in ast.walk(ast.parse(jf.src)):
            target = None
            if isinstance(node, ast.Name):
                target = jf.fn.__globals__.get(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                target = getattr(jf.fn.__globals__.get(node.value.id), node.attr, None)
            callee, _ = _unwrap(target)
            if callee is not None and kernel_name(callee) not in seen:
                seen.add(kernel_name(callee))
                frontier.append(kernel_name(callee))
    return seen


# ----------------------------------------------------------------------------------------- recording
class UnsupportedTriton(RuntimeError):
    """This triton's internals differ from those the recorder replays (JITFunction's launch binder)."""


def _plain(v):
    """JSON-friendly value of a constexpr or an option (tl.dtype -> str, tuples kept as lists)."""
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    return str(v)


class Recorder:
    """Replaces kernel launches by records of their GPU specialisation."""

    def __init__(self):
        self.backend = make_backend(TARGET)
        self.binders = {}
        self.launches = {}  # kernel -> number of launches
        self.variants = {}  # identity key -> spec (first seen)
        self.config_keys = {}  # kernel -> names its autotune configs set (the tile constexprs)
        self.context = "?"
        self.config = None  # (index, count) while an autotuner replays its configs
        self._saved = None

    def specialize(self, jf, args, kwargs):
        """(signature, constexprs, attrs, options) exactly as JITFunction.run builds them on a device."""
        kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        kwargs.setdefault("debug", False)
        if jf not in self.binders:
            try:
                from triton.runtime.jit import create_function_from_signature
                self.binders[jf] = create_function_from_signature(jf.signature, jf.params, self.backend)
            except (ImportError, TypeError) as exc:
                raise UnsupportedTriton(f"triton {triton.__version__}: no create_function_from_signature(sig, "
                                        f"params, backend) ({exc})") from exc
        if not hasattr(jf, "_pack_args"):
            raise UnsupportedTriton(f"triton {triton.__version__}: no JITFunction._pack_args (triton >= 3.6)")
        bound_args, specialization, options = self.binders[jf](*args, **kwargs)
        options, signature, constexprs, attrs = jf._pack_args(self.backend, kwargs, bound_args, specialization,
                                                              options)
        return signature, constexprs, attrs, options

    def record(self, jf, args, kwargs):
        name = kernel_name(jf)
        signature, constexprs, attrs, options = self.specialize(jf, args, kwargs)
        names = [p.name for p in jf.params]
        cx = {names[p[0]] if len(p) == 1 else str(p): _plain(v) for p, v in constexprs.items()}
        opts = dict(sorted(vars(options).items()))  # raw: triton.compile needs its tuples
        # Divisibility hints (attrs) come from this run's small shapes and do not change what compiles;
        # they are kept from the first launch of a variant but are not part of its identity.
        key = json.dumps([name, signature, cx, {k: _plain(v) for k, v in opts.items()}], sort_keys=True,
                         default=str)
        index, count = self.config or (None, None)
        self.variants.setdefault(key, dict(
            kernel=name, signature=signature, constexprs=cx, attrs=[[list(p), v] for p, v in attrs.items()],
            options=opts, config_index=index, num_configs=count, first_seen=self.context))

    def install(self):
        recorder = self
        self._saved = (JITFunction.run, Autotuner.run)

        def jit_run(jf, *args, grid=None, warmup=False, **kwargs):
            if recorder.config is None:  # a plain launch (an autotuned one is counted by autotuner_run)
                recorder.launches[kernel_name(jf)] = recorder.launches.get(kernel_name(jf), 0) + 1
            recorder.record(jf, args, kwargs)

        def autotuner_run(tuner, *args, **kwargs):
            name = kernel_name(_unwrap(tuner)[0])
            recorder.launches[name] = recorder.launches.get(name, 0) + 1
            keys = recorder.config_keys.setdefault(name, set())
            # Every config the GPU may build, through tuner.fn so that a triton.heuristics wrapper under
            # the autotuner still adds its values.
            for i, config in enumerate(tuner.configs):
                keys.update(config.kwargs)
                recorder.config = (i, len(tuner.configs))
                try:
                    tuner.fn.run(*args, **kwargs, **config.all_kwargs())
                finally:
                    recorder.config = None
            tuner.best_config = tuner.configs[0]  # launchers read the chosen tile sizes

        JITFunction.run, Autotuner.run = jit_run, autotuner_run

    def uninstall(self):
        if self._saved:
            JITFunction.run, Autotuner.run = self._saved
            self._saved = None


# ---------------------------------------------------------------------------------------- exercising
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Option grids of the entry points: every combination runs and what it launches is recorded. tf32=False
# is fp32 without TF32 (torch.backends.cudnn.allow_tf32 off): the kernels then use IEEE fp32 dots.
# `extras` are sets of optional arguments, tried one set at a time on top of the other axes.
GRIDS = {
    "bn_relu_conv1x1": dict(dtype=DTYPES, tf32=(True, False), training=(True, False), stride=(1, 2),
                            extras=({}, dict(residual=True, bias=True, output_stats=True),
                                    dict(input_stats=True, output_stats=True), dict(momentum=None),
                                    dict(momentum=None, input_stats=True))),
    "bn_relu_conv1x1_dual": dict(dtype=DTYPES, tf32=(True, False), training=(True, False), stride_a=(1, 2),
                                 stride_b=(1, 2), output_stats_a=(False, True)),
    "batch_stats": dict(dtype=DTYPES, tf32=(True,)),
    "create_model": dict(dtype=DTYPES, tf32=(True,), training=(True, False),
                         net=(("resnet11", dict(widths=(16, 16, 16)), 8),
                              ("resnet14", dict(family="imagenet", layers=(1, 1, 1, 1), widths=(4, 4, 8, 8)), 64))),
}
DEFAULTS = dict(residual=False, bias=False, output_stats=False, input_stats=False, momentum=0.1)
N, C, COUT, HW = 2, 32, 48, 6


def _cl(t):
    return t.contiguous(memory_format=torch.channels_last)


def _bn(ch):
    return dict(bn_weight=(torch.rand(ch) + 0.5).requires_grad_(), bn_bias=torch.randn(ch).requires_grad_(),
                running_mean=torch.zeros(ch), running_var=torch.ones(ch),
                num_batches_tracked=torch.zeros((), dtype=torch.long))


def _run_entry(entry, o):
    """One forward + backward of entry point `entry` with options o, under autocast in o's dtype."""
    import fastpreact.functional as Fp
    from fastpreact.models import create_model
    x = _cl(torch.randn(N, C, HW, HW)).requires_grad_()
    with torch.autocast("cpu", dtype=o["dtype"], enabled=o["dtype"] != torch.float32):
        if entry == "bn_relu_conv1x1":
            ho = (HW - 1) // o["stride"] + 1
            y = Fp.bn_relu_conv1x1(
                x, torch.randn(COUT, C, 1, 1).requires_grad_(), **_bn(C), training=o["training"],
                momentum=o["momentum"], stride=o["stride"],
                conv_bias=torch.randn(COUT).requires_grad_() if o["bias"] else None,
                residual=_cl(torch.randn(N, COUT, ho, ho)).requires_grad_() if o["residual"] else None,
                input_stats=(torch.zeros(C), torch.ones(C)) if o["input_stats"] else None,
                output_stats=o["output_stats"])
            outs = [y[0] if o["output_stats"] else y]
        elif entry == "bn_relu_conv1x1_dual":
            ya, yb = Fp.bn_relu_conv1x1_dual(
                x, torch.randn(COUT, C, 1, 1).requires_grad_(), torch.randn(2 * C, C, 1, 1).requires_grad_(),
                **_bn(C), training=o["training"], stride_a=o["stride_a"], stride_b=o["stride_b"],
                output_stats_a=o["output_stats_a"])
            outs = [ya[0] if o["output_stats_a"] else ya, yb]
        elif entry == "batch_stats":
            Fp.batch_stats(x.detach().to(o["dtype"]))
            return
        else:
            arch, kw, size = o["net"]
            net = create_model(arch, 10, kernels="fused", **kw).to(memory_format=torch.channels_last)
            # eval too: fine-tuning through frozen BN takes the running-statistics path
            outs = [net.train(o["training"])(_cl(torch.randn(2, 3, size, size)))]
    sum(y.float().sum() for y in outs).backward()


def exercise(recorder):
    """Run every combination of GRIDS; returns [(context, error)] for the calls that raised."""
    from fastpreact.functional import backends
    backends.backend = lambda device=None: "triton"  # the Triton path on CPU tensors, for every op
    errors, saved_tf32 = [], torch.backends.cudnn.allow_tf32
    for entry, grid in GRIDS.items():
        for values in itertools.product(*grid.values()):
            o = dict(zip(grid, values))
            if not o["tf32"] and o["dtype"] != "fp32":
                continue
            recorder.context = f"{entry} " + " ".join(f"{k}={v}" for k, v in o.items() if k != "net") + (
                f" net={o['net'][0]}" if "net" in o else "")
            o = {**DEFAULTS, **o.pop("extras", {}), **o}
            o["dtype"] = DTYPES[o["dtype"]]
            torch.backends.cudnn.allow_tf32 = o["tf32"]
            try:
                _run_entry(entry, o)
            except Exception as exc:  # noqa: BLE001 - reported, and fails the check
                where = traceback.extract_tb(exc.__traceback__)[-1]
                errors.append((recorder.context, f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:400]} "
                                                 f"(at {os.path.relpath(where.filename)}:{where.lineno})"))
            finally:
                torch.backends.cudnn.allow_tf32 = saved_tf32
    return errors


# -------------------------------------------------------------------------------- deriving, planning
def _dtype_of(spec):
    """The compute dtype of a variant: the first 16-bit pointer type, else fp32."""
    return next((t[1:] for t in spec["signature"].values() if t in ("*fp16", "*bf16")), "fp32")


def _code_constexprs(spec, config_keys):
    """The constexprs that select code: all but the tile constexprs its autotune configs set."""
    return {k: v for k, v in spec["constexprs"].items() if k not in config_keys.get(spec["kernel"], ())}


def flip_one_sided_flags(variants, config_keys):
    """Variants with each boolean code constexpr that the entry points launch only one way flipped, on
    the recorded variant of that kernel and dtype with the most flags on: both code paths compile."""
    seen, base = {}, {}
    for spec in variants.values():
        group = (spec["kernel"], _dtype_of(spec))
        for k, v in _code_constexprs(spec, config_keys).items():
            if isinstance(v, bool):
                seen.setdefault(group, {}).setdefault(k, set()).add(v)
        if group not in base or _richness(spec, config_keys) > _richness(base[group], config_keys):
            base[group] = spec
    added = {}
    for group, flags in seen.items():
        for flag, values in flags.items():
            if len(values) == 1:
                spec = dict(base[group], constexprs=dict(base[group]["constexprs"], **{flag: not values.pop()}))
                spec["first_seen"] = f"derived: {flag} flipped on a variant first launched by {spec['first_seen']}"
                added[json.dumps([spec["kernel"], spec["signature"], spec["constexprs"],
                                  spec["config_index"], group[1]], default=str)] = spec
    return added


def _code_features(spec, config_keys):
    """(kind, name, value) triples that select the code a variant compiles: its argument types, its code
    constexprs and, for a kernel without autotune configs, its launch options."""
    feats = {("sig", k, v) for k, v in spec["signature"].items()}
    feats |= {("cx", k, json.dumps(v, default=str)) for k, v in _code_constexprs(spec, config_keys).items()}
    if spec["config_index"] is None:
        feats |= {("opt", k, json.dumps(spec["options"].get(k), default=str))
                  for k in ("num_warps", "num_stages", "num_ctas", "maxnreg")}
    return feats


def _richness(spec, config_keys):
    """How much optional code a variant switches on: its True flags and its ints above 1."""
    return sum(1 for v in _code_constexprs(spec, config_keys).values()
               if v is True or (type(v) is int and v > 1))


def plan(variants, config_keys, full=False):
    """The compile jobs: per kernel and compute dtype, a greedy cover of every code feature (autotuned
    variants each with one config, rotating through them), plus every config of the richest variant;
    full=True: every variant with every config."""
    groups = {}  # (kernel, dtype) -> {code key: {config index: spec}}
    for spec in variants.values():
        code = json.dumps(sorted(_code_features(spec, config_keys), key=str))
        groups.setdefault((spec["kernel"], _dtype_of(spec)), {}).setdefault(code, {})[spec["config_index"]] = spec
    jobs, rotation = [], {}
    for (kernel, _), codes in groups.items():
        items = list(codes.values())
        chosen = {}
        if full:
            chosen = {(n, i): "every variant x config (--full)" for n, c in enumerate(items) for i in c}
        else:
            first = [next(iter(c.values())) for c in items]
            uncovered = set().union(*(_code_features(s, config_keys) for s in first))
            while uncovered:
                n = max(range(len(items)), key=lambda n: (len(_code_features(first[n], config_keys) & uncovered),
                                                          _richness(first[n], config_keys)))
                uncovered -= _code_features(first[n], config_keys)
                idxs = sorted(items[n], key=lambda i: -1 if i is None else i)
                r = rotation[kernel] = rotation.get(kernel, -1) + 1
                chosen.setdefault((n, idxs[r % len(idxs)]), "covers a code path")
            richest = max(range(len(items)), key=lambda n: _richness(first[n], config_keys))
            if len(items[richest]) > 1:
                for i in items[richest]:
                    chosen.setdefault((richest, i), "autotune config sweep")
        for (n, i), why in sorted(chosen.items(), key=lambda kv: (kv[0][0], -1 if kv[0][1] is None else kv[0][1])):
            spec = items[n][i]
            cfg = "" if i is None else f"; autotune config {i + 1}/{spec['num_configs']}"
            jobs.append(dict(spec, reason=why + cfg))
    return jobs


# ----------------------------------------------------------------------------------------- compiling
_KERNELS = {}


def _resource_usage(cubin):
    """{"registers": int, "local_bytes": int} of a cubin, via the wheel's cuobjdump (empty if absent)."""
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
    return {key: int(m.group(1)) for key, pat in (("registers", r"REG:(\d+)"), ("local_bytes", r"LOCAL:(\d+)"))
            if (m := re.search(pat, out))}


def compile_one(job):
    """Compile one variant for sm_90; returns the job's result fields."""
    jf = _KERNELS[job["kernel"]]
    names = [p.name for p in jf.params]
    constexprs = {(names.index(k),): v for k, v in job["constexprs"].items() if k in names}
    start = time.time()
    try:
        src = ASTSource(jf, job["signature"], constexprs, {tuple(p): v for p, v in job["attrs"]})
        compiled = triton.compile(src, target=TARGET, options=job["options"])
    except Exception as exc:  # noqa: BLE001 - the compiler's error is the result
        msg = str(exc).strip() or type(exc).__name__
        return dict(status="failed", seconds=round(time.time() - start, 2), error=f"{type(exc).__name__}: {msg}"[-3000:])
    ptx = compiled.asm.get("ptx", "")
    # wgmma: Hopper's warpgroup matrix instructions; a tl.dot kernel without them runs on the older,
    # slower mma path (or none), which only the PTX shows.
    result = dict(status="compiled", seconds=round(time.time() - start, 2),
                  shared_bytes=int(getattr(compiled.metadata, "shared", 0) or 0), stages=sorted(compiled.asm),
                  ptx_bytes=len(ptx), cubin_bytes=len(compiled.asm.get("cubin", b"")),
                  uses_dot="tl.dot" in jf.src, wgmma=ptx.count("wgmma.mma_async"))
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
    if processes <= 1 or len(jobs) <= 1:
        return [_worker((i, job))[1] for i, job in enumerate(jobs)]
    import multiprocessing as mp
    results = [None] * len(jobs)

    def cost(job):  # the largest tiles (slowest compiles) first, so that the pool finishes evenly
        ints = [v for v in job["constexprs"].values() if type(v) is int and v >= 16]
        return (job["config_index"] is not None, sum(ints), job["options"].get("num_stages", 1))
    order = sorted(range(len(jobs)), key=lambda i: cost(jobs[i]), reverse=True)
    # fork: the workers inherit the imported kernel modules (no torch re-import per worker).
    with mp.get_context("fork").Pool(processes) as pool:
        for i, res in pool.imap_unordered(_worker, [(i, jobs[i]) for i in order]):
            results[i] = res
    return results


# ---------------------------------------------------------------------------------------- self-test
# A kernel the interpreter runs for any BLOCK but the GPU compiler only accepts with BLOCK >= 16 (tensor
# core tiles): the check must reject BLOCK=8 and accept BLOCK=16, or it proves nothing.
@triton.jit
def _selftest_dot_kernel(a_ptr, b_ptr, c_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tile = offs[:, None] * BLOCK + offs[None, :]
    tl.store(c_ptr + tile, tl.dot(tl.load(a_ptr + tile), tl.load(b_ptr + tile)))


def selftest():
    """{"rejects_small_dot": bool, "accepts_16x16_dot": bool, "small_dot_error": str, "dot_16_error": str}"""
    name = kernel_name(_selftest_dot_kernel)
    _KERNELS[name] = _selftest_dot_kernel
    sig = {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32", "BLOCK": "constexpr"}
    out = {block: compile_one(dict(kernel=name, signature=sig, constexprs={"BLOCK": block}, attrs=[],
                                   options={"num_warps": 4})) for block in (8, 16)}
    return dict(rejects_small_dot=out[8]["status"] == "failed", accepts_16x16_dot=out[16]["status"] == "compiled",
                small_dot_error=out[8].get("error", "")[:300], dot_16_error=out[16].get("error", "")[:300])


# --------------------------------------------------------------------------------------------- main
def _judge(job, res):
    """The report entry of one compile job: shared memory over the H100's fails a plain kernel (its launch
    would raise) and warns for an autotune config (the autotuner skips it there)."""
    entry = {k: job[k] for k in ("kernel", "signature", "constexprs", "reason", "first_seen")}
    entry.update(num_warps=job["options"].get("num_warps"), num_stages=job["options"].get("num_stages"), **res)
    over = res["status"] == "compiled" and res.get("shared_bytes", 0) > H100_MAX_SHARED_BYTES
    if over and job["config_index"] is None:
        entry.update(status="failed", error=f"needs {res['shared_bytes']} bytes of shared memory, more than the "
                                            f"H100's {H100_MAX_SHARED_BYTES}: the launch would raise OutOfResources")
    elif over:
        entry["warning"] = (f"{res['shared_bytes']} bytes of shared memory > {H100_MAX_SHARED_BYTES}: the "
                            "autotuner will skip this config on an H100")
    return entry


def run(full, processes):
    """Record, derive, plan and compile; returns the report (without "ok"), or None on an unsupported triton."""
    t0 = time.time()
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
    if any(e.startswith("UnsupportedTriton") for _, e in errors):
        print(next(e for _, e in errors if e.startswith("UnsupportedTriton")))
        return None
    t_record = time.time() - t0
    launched = set(recorder.launches)
    reached = reachable(launched, found)
    derived = flip_one_sided_flags(recorder.variants, recorder.config_keys)
    jobs = plan({**recorder.variants, **derived}, recorder.config_keys, full=full)
    t1 = time.time()
    entries = [_judge(job, res) for job, res in zip(jobs, compile_all(jobs, processes))]
    sweeps = {}  # an autotuned kernel whose configs all exceed the shared memory cannot run at all
    for job, entry in zip(jobs, entries):
        if "config sweep" in job["reason"] and entry["status"] == "compiled":
            sweeps.setdefault(f"{job['kernel']} [{_dtype_of(job)}]", []).append("warning" in entry)
    return dict(
        triton_version=triton.__version__,
        target=dict(backend=TARGET.backend, arch=TARGET.arch, warp_size=TARGET.warp_size),
        discovered=sorted(found), launched=sorted(launched), device_functions=sorted(reached - launched),
        unexercised=sorted(set(found) - reached - set(UNEXERCISED_ALLOWED)),
        allowed_unexercised=UNEXERCISED_ALLOWED, derived_variants=len(derived),
        config_constexprs={k: sorted(v) for k, v in recorder.config_keys.items()},
        entry_point_errors=[dict(context=c, error=e) for c, e in errors], selftest=check,
        variants_recorded=len(recorder.variants), jobs=len(jobs),
        compiled=sum(e["status"] == "compiled" for e in entries),
        failed=sum(e["status"] != "compiled" for e in entries),
        no_config_fits=sorted(k for k, over in sweeps.items() if all(over)),
        seconds=dict(record=round(t_record, 1), compile=round(time.time() - t1, 1), total=round(time.time() - t0, 1)),
        results=entries)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the JSON report here")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes")
    parser.add_argument("--full", action="store_true", help="every variant with every autotune config")
    args = parser.parse_args(argv)
    cache = tempfile.mkdtemp(prefix="fastpreact-aot-")
    os.environ["TRITON_CACHE_DIR"] = cache  # a fresh cache: every variant really compiles
    try:
        report = run(args.full, args.jobs)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if report is None:
        return 3
    st = report["selftest"]
    report["ok"] = not (report["failed"] or report["unexercised"] or report["entry_point_errors"]
                        or report["no_config_fits"] or not st["rejects_small_dot"] or not st["accepts_16x16_dot"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1, default=str)
    print(summary(report))
    return 0 if report["ok"] else 1


def summary(report):
    """A human-readable digest of the report: one line per compiled variant with its registers and spills."""
    lines = [f"triton {report['triton_version']} -> {report['target']['backend']} sm_{report['target']['arch']}: "
             f"{report['compiled']}/{report['jobs']} variants compiled ({report['variants_recorded']} recorded, "
             f"{report['derived_variants']} derived), {report['seconds']}"]
    for e in report["results"]:
        cx = ", ".join(f"{k}={v}" for k, v in e["constexprs"].items())
        line = (f"  {e['status']:8s} {e['kernel'].split(':')[1]} [{_dtype_of(e)}; {cx}; warps={e['num_warps']} "
                f"stages={e['num_stages']}] {e.get('seconds', '?')}s")
        if e["status"] == "compiled":
            line += f" shared={e.get('shared_bytes')} regs={e.get('registers', '?')} spill={e.get('local_bytes', '?')}"
            line += f" wgmma={e['wgmma']}" if e.get("uses_dot") else ""
        lines.append(line + (f"  WARNING {e['warning']}" if "warning" in e else ""))
        if e["status"] != "compiled":
            lines.append("      " + e.get("error", "").replace("\n", "\n      "))
    if report["unexercised"]:
        lines.append(f"NOT EXERCISED (no entry point launches them): {report['unexercised']}")
    lines += [f"ENTRY POINT RAISED: {err['context']}: {err['error']}" for err in report["entry_point_errors"]]
    if not (report["selftest"]["rejects_small_dot"] and report["selftest"]["accepts_16x16_dot"]):
        lines.append(f"SELF-TEST FAILED (the check cannot tell good from bad kernels): {report['selftest']}")
    lines += [f"NO AUTOTUNE CONFIG FITS IN SHARED MEMORY: {k}" for k in report["no_config_fits"]]
    lines.append("OK" if report["ok"] else "FAILED")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
