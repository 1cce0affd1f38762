"""What a GPU does and the Triton interpreter hides, emulated on the CPU (the interpreter runs the kernels).

  autotuning(monkeypatch)   every tuned kernel gets several tile configs on the interpreter card, and a
                            stand-in benchmarker that runs each candidate REPEATS times on the real
                            arguments, as triton's do_bench does (warm-up, then repeats); the LAST
                            candidate wins, so the chosen tile is not the default one. In-place state
                            (running statistics, num_batches_tracked) must survive it.
  shuffled_grid(seed)       each launch runs its programs in a seeded random order instead of the
                            interpreter's in-order loop, so the last program to finish (the one that
                            takes the last atomic ticket and merges) is not always the highest id.
  launch_devices()          records, for every kernel launch, the device the launch ran under
                            (kernels/tuning.py's guard) and the devices of its tensor arguments.
"""
from __future__ import annotations

import contextlib
import itertools

import numpy as np
import torch

REPEATS = 3
# Extra interpreter configs per tuned kernel (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): other tile
# shapes than the default 32x32x16, so that the reduction orders and tails differ between candidates.
EXTRA_INTERPRETER_CONFIGS = {
    "bn_relu_conv1x1_fwd": [(16, 32, 16, 4, 1), (32, 16, 32, 4, 1)],
    "bn_relu_conv1x1_bwd_dz": [(16, 32, 16, 4, 1), (32, 16, 32, 4, 1)],
    "bn_relu_conv1x1_bwd_reduce": [(16, 16, 32, 4, 1), (64, 16, 16, 4, 1)],
    "bn_relu_conv1x1_bwd_dgrad": [(16, 32, 16, 4, 1), (32, 16, 32, 4, 1)],
}


class Autotuning:
    """What autotuning() installed: `calls` counts candidate runs per kernel; `configs` the lists."""

    def __init__(self):
        self.calls = 0
        self.timed = 0


@contextlib.contextmanager
def autotuning(monkeypatch, repeats=REPEATS):
    from fastpreact.kernels import configs, tuning
    state = Autotuning()
    interp = {k: list(v) + EXTRA_INTERPRETER_CONFIGS.get(k, []) for k, v in configs.FAMILY_CONFIGS["interpreter"].items()}
    missing = set(configs.TUNED_KERNELS) - set(EXTRA_INTERPRETER_CONFIGS)
    assert not missing, f"give these tuned kernels extra interpreter configs: {missing}"
    monkeypatch.setitem(configs.FAMILY_CONFIGS, "interpreter", interp)
    order = itertools.count()

    def benchmark(call):
        state.timed += 1
        for _ in range(repeats):
            call()
            state.calls += 1
        return -float(next(order))  # every later candidate is "faster": the last one wins

    monkeypatch.setattr(tuning, "benchmark", benchmark)
    configs._MIN.clear()
    tuning.clear()
    try:
        yield state
    finally:
        configs._MIN.clear()
        tuning.clear()


@contextlib.contextmanager
def shuffled_grid(seed):
    """The interpreter's grid loop visits programs (x, y, z) in order; each visit is remapped to the
    program at a seeded random permutation of the launch's linear ids (a new permutation per launch)."""
    from triton.runtime import interpreter
    builder = interpreter.interpreter_builder
    cls = type(builder)
    rng = np.random.default_rng(seed)
    state = {}
    orig_dim, orig_idx = cls.set_grid_dim, cls.set_grid_idx

    def set_grid_dim(self, nx, ny, nz):
        state["dims"] = (nx, ny, nz)
        state["perm"] = rng.permutation(nx * ny * nz)
        return orig_dim(self, nx, ny, nz)

    def set_grid_idx(self, x, y, z):
        nx, ny, nz = state["dims"]
        linear = int(state["perm"][(x * ny + y) * nz + z])
        return orig_idx(self, linear // (ny * nz), (linear // nz) % ny, linear % nz)

    cls.set_grid_dim, cls.set_grid_idx = set_grid_dim, set_grid_idx
    try:
        yield
    finally:
        cls.set_grid_dim, cls.set_grid_idx = orig_dim, orig_idx


@contextlib.contextmanager
def launch_devices(monkeypatch):
    """Yields a list of (kernel name, device under the launch guard or None, {devices of its tensors})."""
    from triton.runtime.interpreter import InterpretedFunction

    from fastpreact.kernels import tuning
    records, current = [], [None]
    orig_guard, orig_run = tuning._on_device, InterpretedFunction.run

    @contextlib.contextmanager
    def guard(device):
        current.append(device)
        try:
            with orig_guard(device) or contextlib.nullcontext():
                yield
        finally:
            current.pop()

    def run(self, *args, **kwargs):
        devices = {a.device for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)}
        records.append((self.fn.__name__, current[-1], devices))
        return orig_run(self, *args, **kwargs)

    monkeypatch.setattr(tuning, "_on_device", guard)
    monkeypatch.setattr(InterpretedFunction, "run", run)
    yield records
