"""Ahead-of-time compile check of every Triton kernel of fastpreact for each card it is built for
(kernels/cards.py: sm_80 A100, sm_89 L4/L40S/RTX 4090, sm_90 H100/H200, sm_100 B200, sm_120 RTX 5090),
without a GPU.

The CPU tests run the kernels through TRITON_INTERPRET=1, which accepts code the GPU compiler rejects
(tl.dot blocks under 16, non-constexpr shapes, Python control flow on tensors, dtype mismatches, ...) and
knows nothing of shared memory, registers or tensor cores. This script compiles the kernel variants the
library launches on one card down to PTX and a cubin (ptxas from the triton wheel; no CUDA driver
needed) for GPUTarget("cuda", arch, 32). It runs WITHOUT the interpreter. Nothing in it names a kernel, a
flag or a tile parameter: everything is derived, so a kernel that gains a constexpr flag, a tuned
kernel or a config needs no edit here.

1. record: grids of options of the public entry points (fastpreact.functional's ops and the fused nets
   of fastpreact.models, forward and backward, in every compute dtype, and the fused backward's
   kernel-level entry point with both of its paths forced) run on CPU tensors inside
   kernels.cards.pretend("sm_<arch>"), so the launchers take that card's fixed tiles and split counts,
   with every kernel launch replaced by a record of its GPU specialisation (triton's own launch binder:
   pointer dtypes, i32/i64, divisibility hints, constexprs, options). A tuned launch
   (kernels/tuning.py TunedKernel.run) never times anything here: it records the launch once per config
   of configs.all_configs(kernel, card) (every config the card may build, also those the runtime's
   shared-memory estimate drops), with that tile's grid. The Triton path is forced (functional.backends
   .INTERPRET is set: backend() says "triton" for CPU tensors); outputs are never written and nothing
   downstream depends on their values (the library never branches on tensor data on the host).
2. derive: the tile constexprs of a kernel are the keys of its configs' params; every other constexpr
   selects code. A boolean code constexpr that the entry points only ever launch one way is flipped on
   a recorded variant (with each of its configs), so both of its code paths compile.
3. plan (default): per kernel and compute dtype, a greedy set of variants covering every argument type
   and every value of every code constexpr (tuned ones each with one config, rotating), plus EVERY config
   of the variant with the most optional code; then, for each planned code variant of a tuned kernel
   whose compiled configs all exceed the card's shared memory, its other configs (smallest estimate
   first) until one fits. `--full`: every variant x config. `--plan runtime`: a cheaper per-card plan,
   per kernel and dtype the richest variant only, with every config configs.candidates() offers on the
   card (what its tuner may launch there; for a fixed-tile kernel its one tile): what depends on the card
   (shared memory, registers, tensor cores) for what can run there, while the code paths are covered by
   the default plan of another card. `--dtypes bf16,fp32` runs the entry points in those compute dtypes
   only (what they launch then, in any dtype, is planned).
4. compile: triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32)) in worker processes, with
   a fresh TRITON_CACHE_DIR. Per variant: shared memory (compiled), registers and spills (local memory,
   from the cubin via cuobjdump) and the tensor-core instructions in the PTX (wgmma.mma_async on sm_90,
   tcgen05.mma on sm_100, mma.sync on sm_80/89/120).

The check fails (exit 1) when: a planned variant does not compile; a variant spills registers; a 16-bit
(fp16/bf16) variant whose IR keeps a tl.dot (after constexpr folding) has none of its card's tensor-core
instructions; a code variant of a tuned kernel has no config whose compiled shared memory fits the card
(cards.CARDS[...].shared_bytes; configs over it are warnings: the runtime skips them); a fixed-tile
kernel needs more shared memory than the card has; the runtime's filter (configs.candidates, by the
estimate configs.shared_bytes) offers a config whose compiled shared memory does not fit; an entry point
raised; a kernel is never exercised; or the self-test (an 8x8 tl.dot must fail, a 16x16 one compile)
does not hold. The JSON report (--out) holds every compiled variant and, per tuned kernel and dtype,
whether some config fits and each config's compiled shared bytes beside the runtime's estimate.

Run:  python tests/kernels/_triton_aot.py [--arch 80|89|90|100|120] [--out report.json] [--jobs 2] [--full]
      [--plan default|full|runtime] [--dtypes fp32,fp16,bf16] [--quiet]
Exit status 0 when the check passes, 1 when not, 3 when this triton's launch internals are not the ones
the recorder replays (triton < 3.6).
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
    raise SystemExit("tests/kernels/_triton_aot.py must run without TRITON_INTERPRET=1 (it compiles for the GPU)")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from fastpreact.kernels import cards, configs, tuning  # noqa: E402

KERNEL_PACKAGE = "fastpreact.kernels"
DEFAULT_ARCH = 90
ARCHS = sorted(card.arch for card in cards.CARDS.values())
# Kernels no entry point launches on purpose: "module:function" -> why. Keep it empty unless there is a reason.
UNEXERCISED_ALLOWED: dict[str, str] = {}
# Tensor-core instruction families as they appear in triton's PTX, and which one each card's 16-bit tl.dot
# must reach: Hopper's warpgroup MMA, Blackwell datacenter's 5th-generation (tensor memory) MMA, and the
# warp-level mma.sync of Ampere, Ada and consumer Blackwell (sm_120 has neither wgmma nor tcgen05).
TENSOR_CORE_OPS = {"wgmma.mma_async": r"\bwgmma\.mma_async\b", "tcgen05.mma": r"\btcgen05\.mma\b",
                   "mma.sync": r"\bmma\.sync\b"}
TENSOR_CORE_BY_ARCH = {80: "mma.sync", 89: "mma.sync", 90: "wgmma.mma_async", 100: "tcgen05.mma", 120: "mma.sync"}
PLANS = ("default", "full", "runtime")

# The card under check (set_card): the recorder pretends to be it, the compiler targets it.
CARD = cards.CARDS[f"sm_{DEFAULT_ARCH}"]
TARGET = GPUTarget("cuda", DEFAULT_ARCH, 32)


def set_card(arch: int):
    global CARD, TARGET
    CARD = cards.CARDS[f"sm_{arch}"]
    TARGET = GPUTarget("cuda", arch, 32)


def expected_tensor_core():
    return TENSOR_CORE_BY_ARCH.get(TARGET.arch) or ("mma.sync" if TARGET.arch >= 80 else None)


# ----------------------------------------------------------------------------------------- discovery
def _unwrap(obj):
    """The JITFunction behind a module attribute (through triton wrappers: .fn), or None."""
    for _ in range(8):
        if obj is None or isinstance(obj, JITFunction):
            break
        obj = getattr(obj, "fn", None)
    return obj if isinstance(obj, JITFunction) else None


def kernel_name(jf):
    return f"{jf.fn.__module__}:{jf.fn.__qualname__}"


def discover():
    """Every triton JIT function defined in fastpreact.kernels and its subpackages: name -> JITFunction."""
    pkg = importlib.import_module(KERNEL_PACKAGE)
    found = {}
    for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{KERNEL_PACKAGE}."):
        mod = importlib.import_module(info.name)
        for value in vars(mod).values():
            jf = _unwrap(value)
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
            callee = _unwrap(target)
            if callee is not None and kernel_name(callee) not in seen:
                seen.add(kernel_name(callee))
                frontier.append(kernel_name(callee))
    return seen


def uses_dot(name, found):
    """Whether kernel `name` or a JIT function it calls (e.g. a tensor-core helper) calls tl.dot."""
    return any("tl.dot(" in found[n].src for n in reachable([name], found) if n in found)


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


def _identity(spec):
    """What makes two recorded launches the same compile job. Divisibility hints (attrs) come from this
    run's small shapes and do not change what compiles; they are kept from a variant's first launch."""
    return json.dumps([spec["kernel"], spec["signature"], spec["constexprs"],
                       {k: _plain(v) for k, v in spec["options"].items()}], sort_keys=True, default=str)


class Recorder:
    """Replaces kernel launches by records of their GPU specialisation on CARD."""

    def __init__(self):
        self.backend = make_backend(TARGET)
        self.binders = {}
        self.launches = {}  # kernel -> number of launches
        self.variants = {}  # identity key -> spec (first seen)
        self.config_keys = {}  # kernel -> names its configs' params set (the tile constexprs)
        self.tuned = {}  # kernel -> its name in kernels/configs.py
        self.context = "?"
        self.config = None  # dict(index, count, tuned) while a tuned launch replays its configs
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
        cfg = self.config or {}
        spec = dict(kernel=name, signature=signature, constexprs=cx, attrs=[[list(p), v] for p, v in attrs.items()],
                    options=opts, config_index=cfg.get("index"), num_configs=cfg.get("count"),
                    tuned=cfg.get("tuned"), first_seen=self.context)
        self.variants.setdefault(_identity(spec), spec)

    def tuned_run(self, tk, grid, args, *, card, device, dtype, **constexprs):
        """TunedKernel.run while recording: the launch once per config the card may build, no timing."""
        name = kernel_name(_unwrap(tk.kernel))
        self.launches[name] = self.launches.get(name, 0) + 1
        self.tuned[name] = tk.name
        every = configs.all_configs(tk.name, card)
        elem = dtype.itemsize if isinstance(dtype, torch.dtype) else 2  # as the tuner sizes its candidates
        offered = {t.name for t in configs.candidates(tk.name, card, elem)}
        keys = self.config_keys.setdefault(name, set())
        for i, tile in enumerate(every):
            keys.update(k for k, _ in tile.params)
            self.config = dict(index=i, count=len(every), tuned=dict(
                name=tk.name, config=tile.name, elem_bytes=elem,
                estimate=configs.shared_bytes(tk.name, tile, elem), offered=tile.name in offered))
            try:
                tuning.launch(tk.kernel, grid(tile), args, device, **constexprs, **tile.kwargs)
            finally:
                self.config = None
        return every[0]

    def install(self):
        recorder = self
        self._saved = (JITFunction.run, tuning.TunedKernel.run, tuning.benchmark)

        def jit_run(jf, *args, grid=None, warmup=False, **kwargs):
            if recorder.config is None:  # a plain launch (a tuned one is counted by tuned_run)
                recorder.launches[kernel_name(jf)] = recorder.launches.get(kernel_name(jf), 0) + 1
            recorder.record(jf, args, kwargs)

        def tuned_run(tk, grid, args, *, card, device, dtype, **constexprs):
            return recorder.tuned_run(tk, grid, args, card=card, device=device, dtype=dtype, **constexprs)

        def no_benchmark(call):
            raise RuntimeError("tests/kernels/_triton_aot.py: a kernel launch was timed while recording (nothing runs here)")

        JITFunction.run, tuning.TunedKernel.run, tuning.benchmark = jit_run, tuned_run, no_benchmark
        tuning._forget_plans()  # a kept launch plan would skip TunedKernel.run, and with it the recording

    def uninstall(self):
        if self._saved:
            JITFunction.run, tuning.TunedKernel.run, tuning.benchmark = self._saved
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
    # The fused backward's kernel-level entry point with its path forced: the launcher picks two or three
    # passes by a roofline of the card and the shapes, and this script's small shapes never reach the
    # three-pass side of it (fastpreact.kernels.bn_relu_conv1x1.backward).
    "bn_relu_conv1x1_bwd": dict(dtype=DTYPES, tf32=(True, False), passes=(2, 3), stride=(1, 2), dual=(False, True),
                                extras=({}, dict(batch_stats=False), dict(add_grad=True), dict(accumulate_into=True),
                                        dict(need_w=False), dict(need_x=False), dict(need_bn=False, batch_stats=False))),
    "create_model": dict(dtype=DTYPES, tf32=(True,), training=(True, False),
                         net=(("resnet11", dict(widths=(16, 16, 16)), 8),
                              ("resnet14", dict(family="imagenet", layers=(1, 1, 1, 1), widths=(4, 4, 8, 8)), 64))),
}
DEFAULTS = dict(residual=False, bias=False, output_stats=False, input_stats=False, momentum=0.1, batch_stats=True,
                add_grad=False, accumulate_into=False, need_w=True, need_x=True, need_bn=True)
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
        elif entry == "bn_relu_conv1x1_bwd":
            from fastpreact.kernels.bn_relu_conv1x1 import bn_relu_conv1x1_bwd
            ho, dt = (HW - 1) // o["stride"] + 1, o["dtype"]
            xk = x.detach().to(dt)
            dy = _cl(torch.randn(N, COUT, ho, ho)).to(dt)
            dys = (_cl(dy[:, :C // 2]), _cl(dy[:, C // 2:])) if o["dual"] else (dy, None)
            addend = _cl(torch.randn(N, C, HW, HW)).to(dt)
            bn = [torch.zeros(C), torch.ones(C), torch.rand(C) + 0.5, torch.randn(C)]  # mean, rstd, gamma, beta
            bn_relu_conv1x1_bwd(xk, dys[0], torch.randn(COUT, C), *bn, stride=o["stride"], dy2=dys[1],
                                batch_stats=o["batch_stats"], need_x=o["need_x"], need_w=o["need_w"],
                                need_bn=o["need_bn"], add_grad=addend if o["add_grad"] else None,
                                accumulate_into=addend if o["accumulate_into"] else None, passes=o["passes"])
            return
        else:
            arch, kw, size = o["net"]
            net = create_model(arch, 10, kernels="fused", **kw).to(memory_format=torch.channels_last)
            # eval too: fine-tuning through frozen BN takes the running-statistics path
            outs = [net.train(o["training"])(_cl(torch.randn(2, 3, size, size)))]
    sum(y.float().sum() for y in outs).backward()


def exercise(recorder, dtypes=tuple(DTYPES)):
    """Run every combination of GRIDS in the compute dtypes `dtypes`; returns [(context, error)] for the
    calls that raised."""
    from fastpreact.functional import backends
    backends.INTERPRET = True  # the Triton path on CPU tensors, for every op (TRITON_INTERPRET stays unset)
    errors, saved_tf32 = [], torch.backends.cudnn.allow_tf32
    for entry, grid in GRIDS.items():
        for values in itertools.product(*grid.values()):
            o = dict(zip(grid, values))
            if (not o["tf32"] and o["dtype"] != "fp32") or o["dtype"] not in dtypes:
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
    """The constexprs that select code: all but the tile constexprs its configs set."""
    return {k: v for k, v in spec["constexprs"].items() if k not in config_keys.get(spec["kernel"], ())}


def _code_key(spec, config_keys):
    """One code variant of a kernel: its argument types and code constexprs (and, for a fixed-tile kernel,
    its launch options); the configs of a tuned kernel are the same code variant."""
    return json.dumps(sorted(_code_features(spec, config_keys), key=str))


def flip_one_sided_flags(variants, config_keys):
    """Variants with each boolean code constexpr that the entry points launch only one way flipped, on
    the recorded variant of that kernel and dtype with the most flags on (with each of its configs): both
    code paths compile."""
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
        code = _code_key(base[group], config_keys)
        siblings = [s for s in variants.values() if (s["kernel"], _dtype_of(s)) == group
                    and _code_key(s, config_keys) == code]  # the base variant with each of its configs
        for flag, values in flags.items():
            if len(values) != 1:
                continue
            value = next(iter(values))
            for s in siblings:
                spec = dict(s, constexprs=dict(s["constexprs"], **{flag: not value}),
                            first_seen=f"derived: {flag} flipped on a variant first launched by {s['first_seen']}")
                added[_identity(spec)] = spec
    return added


def _code_features(spec, config_keys):
    """(kind, name, value) triples that select the code a variant compiles: its argument types, its code
    constexprs and, for a kernel without configs, its launch options."""
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


def variant_groups(variants, config_keys):
    """{(kernel, dtype): {code key: {config index (None: fixed tile): spec}}}"""
    groups = {}
    for spec in variants.values():
        groups.setdefault((spec["kernel"], _dtype_of(spec)), {}).setdefault(
            _code_key(spec, config_keys), {})[spec["config_index"]] = spec
    return groups


def plan(groups, config_keys, mode="default"):
    """The compile jobs. default: per kernel and compute dtype, a greedy cover of every code feature (tuned
    variants each with one config, rotating through them), plus every config of the richest variant.
    full: every variant with every config. runtime: the richest variant only, with every config that
    configs.candidates() offers on the card (what the tuner may launch there)."""
    jobs, rotation = [], {}
    for (kernel, _), codes in groups.items():
        items = list(codes.values())
        first = [next(iter(c.values())) for c in items]
        richest = max(range(len(items)), key=lambda n: _richness(first[n], config_keys))
        chosen = {}
        if mode == "full":
            chosen = {(n, i): "every variant x config (--full)" for n, c in enumerate(items) for i in c}
        elif mode == "runtime":
            chosen = {(richest, i): "the richest variant with a config the runtime offers (--plan runtime)"
                      for i, spec in items[richest].items() if spec.get("tuned") is None or spec["tuned"]["offered"]}
        else:
            uncovered = set().union(*(_code_features(s, config_keys) for s in first))
            while uncovered:
                n = max(range(len(items)), key=lambda n: (len(_code_features(first[n], config_keys) & uncovered),
                                                          _richness(first[n], config_keys)))
                uncovered -= _code_features(first[n], config_keys)
                idxs = sorted(items[n], key=lambda i: -1 if i is None else i)
                r = rotation[kernel] = rotation.get(kernel, -1) + 1
                chosen.setdefault((n, idxs[r % len(idxs)]), "covers a code path")
            if len(items[richest]) > 1:
                for i in items[richest]:
                    chosen.setdefault((richest, i), "config sweep")
        for (n, i), why in sorted(chosen.items(), key=lambda kv: (kv[0][0], -1 if kv[0][1] is None else kv[0][1])):
            jobs.append(_job(items[n][i], why))
    return jobs


def _job(spec, why):
    t = spec.get("tuned")
    cfg = "" if t is None else f"; config {spec['config_index'] + 1}/{spec['num_configs']} {t['config']}"
    return dict(spec, reason=why + cfg)


def fit_search(jobs, entries, groups, config_keys):
    """More jobs for the planned code variants of tuned kernels whose compiled configs all exceed the
    card's shared memory: the next untried config of each (smallest estimate first)."""
    tried, fits = {}, {}
    for job, e in zip(jobs, entries):
        if job.get("tuned") is None:
            continue
        key = (job["kernel"], _dtype_of(job), _code_key(job, config_keys))
        tried.setdefault(key, set()).add(job["config_index"])
        fits[key] = fits.get(key, False) or _fits(e)
    extra = []
    for key, done in tried.items():
        if fits[key]:
            continue
        rest = [s for i, s in groups[key[:2]][key[2]].items() if i not in done]
        if rest:
            spec = min(rest, key=lambda s: s["tuned"]["estimate"])
            extra.append(_job(spec, f"fit search: no compiled config of this variant fits {CARD.name}'s "
                                    f"{CARD.shared_bytes} bytes"))
    return extra


def _fits(entry):
    return entry["status"] == "compiled" and entry.get("shared_bytes", 0) <= CARD.shared_bytes


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


def tensor_core_ops(ptx):
    """({family: instruction count}, [distinct spellings]) of the tensor-core instructions in a PTX text."""
    counts = {fam: len(re.findall(pat, ptx)) for fam, pat in TENSOR_CORE_OPS.items()}
    spellings = sorted({m.group(0) for pat in TENSOR_CORE_OPS.values()
                        for m in re.finditer(pat[:-2] + r"[\w.:]*", ptx)})
    return counts, spellings


def compile_one(job):
    """Compile one variant for TARGET; returns the job's result fields."""
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
    # A tl.dot kernel without its card's tensor-core instructions runs on an older, slower path (or on
    # FMAs), which only the PTX shows.
    counts, spellings = tensor_core_ops(ptx)
    # tl.dot calls left after constexpr folding (a flag may switch every product of a GEMM kernel off)
    ir_dots = len(re.findall(r"\btt\.dot\s", compiled.asm.get("ttir", "")))
    result = dict(status="compiled", seconds=round(time.time() - start, 2), ir_dots=ir_dots,
                  shared_bytes=int(getattr(compiled.metadata, "shared", 0) or 0), stages=sorted(compiled.asm),
                  ptx_bytes=len(ptx), cubin_bytes=len(compiled.asm.get("cubin", b"")),
                  tensor_core=counts, tensor_core_ops=spellings, wgmma=counts["wgmma.mma_async"])
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
    # fork: the workers inherit the imported kernel modules and the card (no torch re-import per worker).
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
def _short(kernel):
    return kernel.split(":")[1]


def _judge(job, res):
    """The report entry of one compile job: shared memory over the card's fails a fixed-tile kernel (its
    launch would raise) and warns for a tuned kernel's config (the runtime skips it there)."""
    entry = {k: job[k] for k in ("kernel", "signature", "constexprs", "reason", "first_seen")}
    entry.update(num_warps=job["options"].get("num_warps"), num_stages=job["options"].get("num_stages"),
                 dtype=_dtype_of(job), uses_dot=job["uses_dot"], code=job["code"], **res)
    if job.get("tuned"):
        entry.update(config=job["tuned"]["config"], tuned_as=job["tuned"]["name"], elem_bytes=job["tuned"]["elem_bytes"],
                     shared_estimate=job["tuned"]["estimate"], offered_by_runtime=job["tuned"]["offered"])
    over = res["status"] == "compiled" and res.get("shared_bytes", 0) > CARD.shared_bytes
    if over and job.get("tuned") is None:
        entry.update(status="failed", error=f"needs {res['shared_bytes']} bytes of shared memory, more than "
                                            f"{CARD.name}'s {CARD.shared_bytes}: the launch would raise OutOfResources")
    elif over:
        entry["warning"] = (f"{res['shared_bytes']} bytes of shared memory > {CARD.shared_bytes}: the runtime "
                            f"will skip this config on {CARD.name}")
    return entry


def shared_memory_table(entries):
    """Per tuned kernel and dtype: whether some config fits (for each of its compiled code variants), and
    per config the compiled shared bytes (max
    and min over the compiled code variants) beside the runtime's estimate (configs.shared_bytes for the
    element size the launch is tuned on; the largest of them), whether the estimate was at least the
    compiled size for every variant, and whether the runtime offers the config."""
    table = {}
    for e in entries:
        if "tuned_as" not in e or e["status"] != "compiled":
            continue
        row = table.setdefault(f"{_short(e['kernel'])} [{e['dtype']}]", dict(tuned_as=e["tuned_as"], configs={}))
        row["configs"].setdefault(e["config"], []).append(e)
        codes = row.setdefault("code_variants", {})
        codes[e["code"]] = codes.get(e["code"], False) or _fits(e)
    for row in table.values():
        for name, es in row["configs"].items():
            compiled = [x["shared_bytes"] for x in es]
            row["configs"][name] = dict(
                shared_bytes=max(compiled), shared_bytes_min=min(compiled), variants=len(es),
                estimate=max(x["shared_estimate"] for x in es),
                estimate_is_conservative=all(x["shared_estimate"] >= x["shared_bytes"] for x in es),
                offered_by_runtime=any(x["offered_by_runtime"] for x in es),
                fits=max(compiled) <= CARD.shared_bytes)
        codes = row.pop("code_variants")
        # every compiled code variant of the kernel in this dtype has a config that fits
        row.update(some_config_fits=all(codes.values()), code_variants=len(codes))
    return dict(sorted(table.items()))


def run(mode, processes, dtypes=tuple(DTYPES)):
    """Record, derive, plan and compile; returns the report (without "ok"), or None on an unsupported triton."""
    t0 = time.time()
    found = discover()
    check = selftest()
    _KERNELS.update(found)
    recorder = Recorder()
    recorder.install()
    try:
        torch.manual_seed(0)
        with cards.pretend(CARD.name):
            errors = exercise(recorder, dtypes)
    finally:
        recorder.uninstall()
    if any(e.startswith("UnsupportedTriton") for _, e in errors):
        print(next(e for _, e in errors if e.startswith("UnsupportedTriton")))
        return None
    t_record = time.time() - t0
    launched = set(recorder.launches)
    reached = reachable(launched, found)
    keys = recorder.config_keys
    derived = flip_one_sided_flags(recorder.variants, keys)
    groups = variant_groups({**recorder.variants, **derived}, keys)
    dots = {k: uses_dot(k, found) for k in launched}

    def prepare(jobs):
        return [dict(job, uses_dot=dots.get(job["kernel"], False), code=_code_key(job, keys)) for job in jobs]

    jobs = prepare(plan(groups, keys, mode))
    t1 = time.time()
    entries = [_judge(job, res) for job, res in zip(jobs, compile_all(jobs, processes))]
    while extra := prepare(fit_search(jobs, entries, groups, keys)):
        jobs += extra
        entries += [_judge(job, res) for job, res in zip(extra, compile_all(extra, processes))]
    t_compile = time.time() - t1

    # The code variants of tuned kernels (kernel, dtype, code) with no config that fits the card.
    fit, labels = {}, {}
    for e in entries:
        if "tuned_as" in e:
            key = (e["kernel"], e["code"])
            fit[key] = fit.get(key, False) or _fits(e)
            labels[key] = f"{_short(e['kernel'])} [{e['dtype']}] {_code_label(e, keys)}"
    compiled = [e for e in entries if e["status"] == "compiled"]
    tc = expected_tensor_core()
    gemm16 = [e for e in compiled if e["ir_dots"] and e["dtype"] in ("fp16", "bf16")]
    return dict(
        triton_version=triton.__version__, torch_version=torch.__version__,
        target=dict(backend=TARGET.backend, arch=TARGET.arch, warp_size=TARGET.warp_size), arch=TARGET.arch,
        card=dict(name=CARD.name, examples=CARD.examples, family=CARD.family, sms=CARD.sms),
        shared_limit_bytes=CARD.shared_bytes, plan=mode, dtypes=list(dtypes),
        discovered=sorted(found), launched=sorted(launched), device_functions=sorted(reached - launched),
        unexercised=sorted(set(found) - reached - set(UNEXERCISED_ALLOWED)),
        allowed_unexercised=UNEXERCISED_ALLOWED, derived_variants=len(derived),
        config_constexprs={k: sorted(v) for k, v in keys.items()}, tuned_kernels=recorder.tuned,
        entry_point_errors=[dict(context=c, error=e) for c, e in errors], selftest=check,
        variants_recorded=len(recorder.variants), jobs=len(jobs),
        compiled=len(compiled), failed=sum(e["status"] != "compiled" for e in entries),
        max_registers=max((e.get("registers", 0) for e in compiled), default=0),
        spilling=[_label(e) + f": {e['local_bytes']} bytes of local memory" for e in compiled if e.get("local_bytes")],
        tensor_core_instruction=tc,
        gemm16_variants=len(gemm16),
        gemm16_tensor_core={fam: sum(1 for e in gemm16 if e["tensor_core"][fam]) for fam in TENSOR_CORE_OPS},
        gemm16_tensor_core_ops=sorted({op for e in gemm16 for op in e["tensor_core_ops"]}),
        no_tensor_core=[_label(e) for e in gemm16 if not e["tensor_core"].get(tc)],
        configs_over_shared=sorted({f"{_short(e['kernel'])} [{e['dtype']}] {e['config']}: {e['shared_bytes']} bytes"
                                    for e in compiled if "warning" in e}),
        no_config_fits=sorted(labels[k] for k, ok in fit.items() if not ok),
        shared_memory=shared_memory_table(entries),
        estimate_below_compiled=sorted({f"{_short(e['kernel'])} [{e['dtype']}] {e['config']}: compiled "
                                        f"{e['shared_bytes']} bytes, estimated {e['shared_estimate']}"
                                        for e in compiled if "shared_estimate" in e
                                        and e["shared_estimate"] < e["shared_bytes"]}),
        runtime_offers_unfit=sorted({f"{_short(e['kernel'])} [{e['dtype']}] {e['config']}: compiled "
                                     f"{e['shared_bytes']} bytes, estimated {e['shared_estimate']}"
                                     for e in compiled if e.get("offered_by_runtime") and not _fits(e)}),
        seconds=dict(record=round(t_record, 1), compile=round(t_compile, 1), total=round(time.time() - t0, 1)),
        results=entries)


def _code_label(e, config_keys):
    cx = ", ".join(f"{k}={v}" for k, v in _code_constexprs(e, config_keys).items())
    ptrs = ",".join(sorted({t[1:] for t in e["signature"].values() if str(t).startswith("*")}))
    return f"{{{cx}; pointers {ptrs}}}"


def _label(e):
    cx = ", ".join(f"{k}={v}" for k, v in e["constexprs"].items())
    return f"{_short(e['kernel'])} [{e['dtype']}; {cx}; warps={e['num_warps']} stages={e['num_stages']}]"


def verdict(report):
    st = report["selftest"]
    return not (report["failed"] or report["unexercised"] or report["entry_point_errors"] or report["spilling"]
                or report["no_tensor_core"] or report["no_config_fits"] or report["runtime_offers_unfit"]
                or not st["rejects_small_dot"] or not st["accepts_16x16_dot"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=DEFAULT_ARCH, choices=ARCHS,
                        help=f"the card to check (kernels/cards.py CARDS), default {DEFAULT_ARCH}")
    parser.add_argument("--out", help="write the JSON report here")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes")
    parser.add_argument("--full", action="store_true", help="every variant with every config (--plan full)")
    parser.add_argument("--plan", choices=PLANS, default="default", help="which variants to compile")
    parser.add_argument("--dtypes", default=",".join(DTYPES),
                        help=f"compute dtypes the entry points run in (comma-separated, of {','.join(DTYPES)})")
    parser.add_argument("--quiet", action="store_true", help="print the headline and the problems only")
    args = parser.parse_args(argv)
    dtypes = [d for d in args.dtypes.split(",") if d]
    if not dtypes or set(dtypes) - set(DTYPES):
        parser.error(f"--dtypes: give some of {', '.join(DTYPES)}")
    set_card(args.arch)
    cache = tempfile.mkdtemp(prefix="fastpreact-aot-")
    os.environ["TRITON_CACHE_DIR"] = cache  # a fresh cache: every variant really compiles
    try:
        report = run("full" if args.full else args.plan, args.jobs, dtypes)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if report is None:
        return 3
    report["ok"] = verdict(report)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1, default=str)
    print(summary(report, verbose=not args.quiet))
    return 0 if report["ok"] else 1


def headline(report):
    """One line per card: what compiled, registers, spills, the tensor-core instruction, shared memory."""
    gemm = report["gemm16_tensor_core"]
    got = ", ".join(f"{fam} {n}/{report['gemm16_variants']}" for fam, n in gemm.items() if n) or "none"
    return (f"{report['card']['name']} ({report['card']['examples']}; {report['shared_limit_bytes']} bytes shared "
            f"per block) triton {report['triton_version']}, plan {report['plan']}"
            f"{'' if len(report['dtypes']) == len(DTYPES) else ' (' + ','.join(report['dtypes']) + ')'}: {report['compiled']}/"
            f"{report['jobs']} variants compiled ({report['variants_recorded']} recorded, "
            f"{report['derived_variants']} derived); max registers {report['max_registers']}; "
            f"{len(report['spilling'])} spilling; 16-bit GEMMs: {got} (want {report['tensor_core_instruction']}); "
            f"{len(report['configs_over_shared'])} configs over shared memory; {report['seconds']}")


def summary(report, verbose=True):
    """A human-readable digest of the report: one line per compiled variant with its registers and spills."""
    lines = [headline(report)]
    for e in report["results"]:
        if not verbose and e["status"] == "compiled":
            continue
        cfg = f" {e['config']}" if "config" in e else ""
        line = f"  {e['status']:8s} {_label(e)}{cfg} {e.get('seconds', '?')}s"
        if e["status"] == "compiled":
            line += f" shared={e.get('shared_bytes')} regs={e.get('registers', '?')} spill={e.get('local_bytes', '?')}"
            if e.get("ir_dots"):
                line += " " + " ".join(f"{fam}={n}" for fam, n in e["tensor_core"].items() if n) if any(
                    e["tensor_core"].values()) else " no-tensor-core"
        lines.append(line + (f"  WARNING {e['warning']}" if "warning" in e and verbose else ""))
        if e["status"] != "compiled":
            lines.append("      " + e.get("error", "").replace("\n", "\n      "))
    for name, row in report["shared_memory"].items():
        cfgs = ", ".join(f"{c}={v['shared_bytes']}" + ("" if v["fits"] else "(over)")
                         + ("" if v["estimate_is_conservative"] else f"(estimate {v['estimate']})")
                         for c, v in row["configs"].items())
        lines.append(f"  shared memory {name}: {'fits' if row['some_config_fits'] else 'NO CONFIG FITS'}: {cfgs}")
    if report["unexercised"]:
        lines.append(f"NOT EXERCISED (no entry point launches them): {report['unexercised']}")
    lines += [f"ENTRY POINT RAISED: {err['context']}: {err['error']}" for err in report["entry_point_errors"]]
    if not (report["selftest"]["rejects_small_dot"] and report["selftest"]["accepts_16x16_dot"]):
        lines.append(f"SELF-TEST FAILED (the check cannot tell good from bad kernels): {report['selftest']}")
    lines += [f"SPILLS REGISTERS: {s}" for s in report["spilling"]]
    lines += [f"NO {report['tensor_core_instruction']} IN A 16-BIT GEMM: {s}" for s in report["no_tensor_core"]]
    lines += [f"NO CONFIG FITS IN SHARED MEMORY: {k}" for k in report["no_config_fits"]]
    lines += [f"THE RUNTIME OFFERS A CONFIG THAT DOES NOT FIT: {k}" for k in report["runtime_offers_unfit"]]
    lines += [f"note: configs.shared_bytes is below the compiled size (harmless while the runtime does not "
              f"offer it): {k}" for k in report["estimate_below_compiled"] if k not in report["runtime_offers_unfit"]]
    lines.append(("OK " if report["ok"] else "FAILED ") + report["card"]["name"])
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
