"""Launching a kernel: on its tensors' device, with a tile chosen once per card and shape, the same on
every rank and after a resume, without disturbing the caller's state.

Why not triton.autotune: it times every candidate config several times on the real arguments, so a
kernel that updates a BatchNorm's running statistics in place would apply that update many times on a
shape's first call; it picks by timing, so two ranks, or a run and its resume, can launch different
tiles (and a tile sets the reduction order, hence the bits); and it re-keys every call in Python. Here:

  launch(kernel, grid, args, device)   one launch under `device`'s CUDA guard (Triton launches on the
                                       current device, not the tensors').
  TunedKernel.run(...)                 the same, with the tile of (card, kernel, key) from the table;
                                       on a miss the candidates (configs.candidates) are timed with
                                       every argument the kernel updates in place (`restore`) saved
                                       before and put back after, so the real launch that follows sees
                                       the caller's state; the winner goes into the table.
  table() / pin(t) / save(p) / load(p) the table of choices, {card: {kernel: {key: config name}}}: a
                                       training run keeps it in its folder and pins it on resume.
  coordinate(store, rank)              rank 0 tunes and publishes each choice in a torch.distributed
                                       store, the other ranks wait for it: every rank launches the
                                       same tiles.
Choices are never timed where nothing can run (fake or meta tensors: the cost model); the first
candidate stands for the tuned one there. A launch traced by torch.compile (tracing.py) has fake
arguments too: its tile is timed on real stand-ins of their sizes (_standins) and enters the table.
FASTPREACT_QUICK_AUTOTUNE=1 times each candidate for a few milliseconds instead of ~100 (tests on a GPU
need a valid choice, not the fastest).
"""
from __future__ import annotations

import contextlib
import json
import math
import operator
import os
import warnings

import torch

from . import configs
from .cards import Card
from .tracing import _ACTIVE as _TRACED, traceable

__all__ = ["cdiv", "launch", "launch_planned", "Plan", "plan_cache", "fp32_empty", "fp32_buffer", "TunedKernel",
           "table", "pin", "clear", "save", "read", "load", "coordinate", "benchmark"]

FORMAT = 1
_TABLE: dict[str, dict[str, dict[str, str]]] = {}  # card -> kernel -> key -> config name
_KERNELS: list["TunedKernel"] = []
_COORDINATOR: list = []  # [(store, rank, timeout)] while coordinate() is active
_PLAN_CACHES: list = []  # every launcher's plans: emptied with the table, since a plan holds a tile


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for grids and buffer sizes (triton.cdiv is a JIT function: calling it from Python
    costs microseconds)."""
    return -(-a // b)


def _on_device(device: torch.device):
    """The CUDA guard a launch on `device` needs, or None: none when it is already the current device
    (the common case costs one lookup), none off CUDA."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device.index)
    return None


def launch(kernel, grid, args, device: torch.device, **kwargs):
    """kernel[grid](*args, **kwargs) with `device` current while it launches (a graph node instead while
    an operator is traced: tracing.py)."""
    if _TRACED[0]:
        kernel = traceable(kernel)
    guard = _on_device(device)
    if guard is None:
        return kernel[grid](*args, **kwargs)
    with guard:
        return kernel[grid](*args, **kwargs)


class Plan:
    """What a launcher works out once per shape and flags (its `key`): `sizes`, the launcher's own
    (output shapes, buffer sizes, scalars), and the launch's grid and keywords (constexprs and tile),
    filled on the first launch on real tensors. A warm call then only allocates its outputs, builds the
    argument tuple and launches: the host pays a few microseconds a launch instead of re-deriving tiles,
    grids and flags (fastpreact/cost/host.py measures it). A caller that launches the same shapes again
    and again (the bottleneck node) may keep a launcher's plan (its *_plan function) and hand it back
    with plan=, which also skips the key and the argument checks."""
    __slots__ = ("key", "sizes", "grid", "kwargs")

    def __init__(self, key, sizes, constexprs: dict, grid=None):
        self.key, self.sizes, self.kwargs, self.grid = key, sizes, constexprs, grid


def plan_cache() -> dict:
    """A launcher's {key: Plan}, emptied by clear() and pin() (a plan holds the tile of the table)."""
    cache: dict = {}
    _PLAN_CACHES.append(cache)
    return cache


def launch_planned(kernel, plan: Plan, args, device: torch.device):
    """launch(kernel, plan.grid, args, device, **plan.kwargs), without re-packing the keywords through
    launch's signature (a microsecond or two a launch)."""
    if _TRACED[0]:
        kernel = traceable(kernel)
    guard = _on_device(device)
    if guard is None:
        return kernel[plan.grid](*args, **plan.kwargs)
    with guard:
        return kernel[plan.grid](*args, **plan.kwargs)


# A launch's fp32 buffers (partials, statistics). Tensor.new_empty with int sizes inherits dtype and device
# from a template and costs the host about half of torch.empty with keywords; a step makes over a
# thousand allocations. With poison (tests) every buffer starts as NaN, so an element no program writes shows.
def fp32_empty(shape, device, poison):
    """An fp32 buffer of `shape` on `device`."""
    if poison:
        return torch.full(shape, float("nan"), dtype=torch.float32, device=device)
    return torch.empty(shape, dtype=torch.float32, device=device)


def fp32_buffer(ref, poison, *shape):
    """An fp32 buffer of `shape` on the device of `ref` (an fp32 ref takes the fast path)."""
    if poison or ref.dtype != torch.float32:
        return fp32_empty(shape, ref.device, poison)
    return ref.new_empty(*shape)


def _quick() -> bool:
    return os.environ.get("FASTPREACT_QUICK_AUTOTUNE") == "1"


def benchmark(call) -> float:
    """Milliseconds one call takes on the GPU (triton's do_bench: warm-up, then repeats, median)."""
    import triton.testing
    warmup, rep = (1, 3) if _quick() else (25, 100)
    return triton.testing.do_bench(call, warmup=warmup, rep=rep, return_mode="median")


def _launch_errors():
    """The exceptions that mean 'this config cannot run here' (too much shared memory, registers)."""
    errors = []
    for mod, name in (("triton.runtime.errors", "OutOfResources"), ("triton.runtime.errors", "PTXASError"),
                      ("triton.compiler.errors", "CompileTimeAssertionFailure")):
        try:
            errors.append(getattr(__import__(mod, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors) or (RuntimeError,)


def _runnable(args) -> bool:
    """Whether the arguments are real tensors that a timing can run on (not fake or meta)."""
    from torch._subclasses.fake_tensor import is_fake
    return not any(isinstance(a, torch.Tensor) and (a.device.type == "meta" or is_fake(a)) for a in args)


class TunedKernel:
    """A GEMM kernel whose tile comes from the table (see the module docstring).

    kernel: the JIT function; name: its entry in configs (e.g. "bn_relu_conv1x1_fwd"); key: the
    names of the integer arguments the choice depends on; restore: the names of the arguments it updates
    in place (saved and put back around the timing)."""

    def __init__(self, kernel, name: str, key=("M", "K", "N"), restore=()):
        self.kernel, self.name = kernel, name
        names = list(kernel.arg_names)
        self.key_index = tuple(names.index(k) for k in key)
        self.key_names = tuple(key)
        self.restore_index = tuple(names.index(r) for r in restore)
        self._memo = {}  # (card name, key values, dtype) -> (Tile, its grid, its launch keywords)
        self._key = operator.itemgetter(*self.key_index) if len(self.key_index) > 1 else (
            lambda args, i=self.key_index[0]: (args[i],))
        _KERNELS.append(self)

    def key_string(self, values, dtype) -> str:
        return ",".join(f"{n}={v}" for n, v in zip(self.key_names, values)) + f",dtype={_dtype_name(dtype)}"

    def run(self, grid, args, *, card: Card, device, dtype, **constexprs):
        """Launch with the chosen tile; grid(tile) gives the launch grid, and must depend only on the key's
        values, the card and the tile (it is computed once per shape). Returns the Tile used."""
        values = self._key(args)
        plan = self._memo.get((card.name, values, dtype))
        if plan is None:
            tile = self._choose(card, values, dtype, grid, args, device, constexprs)
            plan = (tile, grid(tile), tile.kwargs)
            if _runnable(args):
                self._memo[(card.name, values, dtype)] = plan
        launch(self.kernel, plan[1], args, device, **constexprs, **plan[2])
        return plan[0]

    def run_planned(self, plan: Plan, grid, args, *, card: Card, device, dtype):
        """run() for a launcher's Plan (its kwargs the constexprs): the plan's first launch on real tensors
        goes through run() (the tile chosen, or tuned, as any launch's) and keeps the tile's grid and
        keywords in the plan; later launches take them from it."""
        if plan.grid is None:
            tile = self.run(grid, args, card=card, device=device, dtype=dtype, **plan.kwargs)
            if _runnable(args):  # a fake run (the cost model) does not settle the launch
                plan.grid, plan.kwargs = grid(tile), {**plan.kwargs, **tile.kwargs}
            return tile
        return launch_planned(self.kernel, plan, args, device)

    def candidates(self, card: Card, values, dtype):
        sizes = dict(zip(self.key_names, values))
        return configs.candidates(self.name, card, _elem_bytes(dtype), sizes if {"M", "K", "N"} <= set(sizes) else None)

    def _choose(self, card, values, dtype, grid, args, device, constexprs):
        cands = self.candidates(card, values, dtype)
        key = self.key_string(values, dtype)
        by_name = {t.name: t for t in cands}
        chosen = _TABLE.get(card.name, {}).get(self.name, {}).get(key)
        tile = by_name.get(chosen) if chosen else None
        if chosen and tile is None:
            warnings.warn(f"fastpreact: the pinned tile {chosen!r} of {self.name} [{key}] is not a config of "
                          f"{card.name} here; tuning again", stacklevel=3)
        if tile is None:
            if _runnable(args):
                tile = self._decide(card, key, cands, grid, args, device, constexprs)
            elif _TRACED[0]:
                with _outside_the_trace():
                    tile = self._decide(card, key, cands, grid, _standins(args), device, constexprs)
            else:  # a fake run (the cost model): the first candidate, which settles no real choice
                return cands[0]
            _TABLE.setdefault(card.name, {}).setdefault(self.name, {})[key] = tile.name
        return tile

    def _decide(self, card, key, cands, grid, args, device, constexprs):
        if len(cands) == 1:
            return cands[0]
        if _COORDINATOR and _COORDINATOR[-1][1] != 0:
            return _wait_for_rank0(self.name, card, key, cands)
        tile = self._time(cands, grid, args, device, constexprs)
        if _COORDINATOR:
            store = _COORDINATOR[-1][0]
            store.set(_store_key(self.name, card, key), tile.name)
        return tile

    def _time(self, cands, grid, args, device, constexprs):
        saved = [(i, args[i].clone()) for i in self.restore_index if isinstance(args[i], torch.Tensor)]
        errors, times, last_error = _launch_errors(), {}, None
        for tile in cands:
            try:
                times[tile.name] = benchmark(
                    lambda tile=tile: launch(self.kernel, grid(tile), args, device, **constexprs, **tile.kwargs))
            except errors as exc:  # this config cannot run on this card: skip it
                times[tile.name], last_error = math.inf, exc
            finally:
                for i, copy in saved:
                    args[i].copy_(copy)
        best = min(cands, key=lambda t: times[t.name])  # ties: the earlier config
        if math.isinf(times[best.name]):
            raise RuntimeError(f"fastpreact: no tile config of {self.name} runs on this card ({last_error})")
        return best


@contextlib.contextmanager
def _outside_the_trace():
    """Real launches while an operator is traced (tuning on stand-ins): no dispatch mode (fake,
    functional, proxy) sees them, and they are not wrapped as graph nodes."""
    from torch.utils._python_dispatch import _disable_current_modes
    previous, _TRACED[0] = _TRACED[0], False
    try:
        with _disable_current_modes(), torch.no_grad():
            yield
    finally:
        _TRACED[0] = previous


def _standins(args):
    """Real tensors of the sizes, strides and dtypes of a traced launch's (fake) arguments, made outside
    the trace: torch.compile traces the operators into their kernels on fake tensors, and a tile is tuned
    once per shape on stand-ins, as inductor tunes its own templates on random inputs. Values: normal
    floats, zero integers (tickets start at 0)."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            t = torch.empty_strided(tuple(a.shape), tuple(a.stride()), dtype=a.dtype, device=a.device)
            a = t.normal_() if t.is_floating_point() else t.zero_()
        out.append(a)
    return tuple(out)


def _wait_for_rank0(name, card, key, cands):
    store, _, timeout = _COORDINATOR[-1]
    skey = _store_key(name, card, key)
    import datetime
    try:
        store.wait([skey], datetime.timedelta(seconds=timeout))
    except Exception as exc:  # noqa: BLE001 - the store's own timeout error names nothing useful
        raise RuntimeError(f"fastpreact: rank 0 did not publish its tile for {name} [{key}] on {card.name} "
                           f"within {timeout:.0f} s ({type(exc).__name__}); every rank must run the same "
                           "shapes on the same card type") from exc
    chosen = store.get(skey).decode()
    for tile in cands:
        if tile.name == chosen:
            return tile
    raise RuntimeError(f"fastpreact: rank 0 chose tile {chosen!r} for {name} [{key}], which is not a "
                       f"config of {card.name} on this rank")


def _store_key(name, card, key):
    return f"fastpreact/tuning/{card.name}/{name}/{key}"


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _elem_bytes(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size() if isinstance(dtype, torch.dtype) else 2


# ---------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------
def table() -> dict:
    """The choices made or pinned so far: {"format": 1, "cards": {card: {kernel: {key: config}}}}."""
    return {"format": FORMAT, "cards": json.loads(json.dumps(_TABLE))}


def clear():
    """Forget every choice (the next launch of each shape tunes again)."""
    _TABLE.clear()
    _forget_plans()


def _forget_plans():
    for k in _KERNELS:
        k._memo.clear()
    for cache in _PLAN_CACHES:
        cache.clear()


def pin(choices: dict):
    """Take the choices of a table() (from another run, rank or file): those shapes are not tuned."""
    _check(choices)
    for card, kernels in choices["cards"].items():
        for kernel, keys in kernels.items():
            _TABLE.setdefault(card, {}).setdefault(kernel, {}).update(keys)
    _forget_plans()


def _check(choices):
    if not isinstance(choices, dict) or choices.get("format") != FORMAT or not isinstance(choices.get("cards"), dict):
        raise ValueError(f"not a fastpreact tuning table (expected {{'format': {FORMAT}, 'cards': {{...}}}})")
    for card, kernels in choices["cards"].items():
        for kernel, keys in (kernels.items() if isinstance(kernels, dict) else [(None, None)]):
            if not isinstance(keys, dict) or not all(isinstance(v, str) for v in keys.values()):
                raise ValueError(f"tuning table: {card}/{kernel} must map shape keys to config names")


def save(path):
    """Write table() to `path` atomically (a temporary file renamed over it)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(table(), f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read(path) -> dict:
    """The table saved at `path`, checked; one clear ValueError for a missing or malformed file."""
    try:
        with open(path) as f:
            choices = json.load(f)
    except OSError as exc:
        raise ValueError(f"cannot read the tuning table {path}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"the tuning table {path} is not valid JSON (line {exc.lineno}); delete it or "
                         "pass another file") from exc
    try:
        _check(choices)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    return choices


def load(path):
    """pin() the table saved at `path` (see read)."""
    pin(read(path))


@contextlib.contextmanager
def coordinate(store, rank: int, timeout_s: float = 600.0):
    """Inside, a shape's first launch is tuned by rank 0 only, which publishes the choice in `store`
    (a torch.distributed Store every rank shares); the other ranks wait for it (up to timeout_s)."""
    _COORDINATOR.append((store, int(rank), float(timeout_s)))
    try:
        yield
    finally:
        _COORDINATOR.pop()
