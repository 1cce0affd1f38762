"""Test configuration: run the Triton kernels through the CPU interpreter where there is no GPU.

TRITON_INTERPRET must be set before triton is first imported, so it is decided here, at collection
time, from torch.cuda (importing torch does not import triton).
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # The GPU tests autotune dozens of shapes: time each config briefly (kernels/bn_relu_conv1x1.py) and
    # keep those rough choices out of triton's disk cache, which gpu_check.sh's benchmarks then fill.
    os.environ.setdefault("FASTPREACT_QUICK_AUTOTUNE", "1")
    if os.environ.get("FASTPREACT_QUICK_AUTOTUNE") == "1":
        os.environ["TRITON_CACHE_AUTOTUNING"] = "0"

import pytest  # noqa: E402

# The kernels on CPU tensors: the interpreter (and no GPU, whose own tests cover the same ground).
requires_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                          reason="needs TRITON_INTERPRET=1 (the kernels on CPU tensors)")


def channels_last(t):
    """A tensor or a model in the channels-last memory format."""
    if isinstance(t, torch.nn.Module):
        return t.to(memory_format=torch.channels_last)
    return t.contiguous(memory_format=torch.channels_last)


def take_batches(loader, n=None):
    """The first n batches of a loader (all of them when n is None), cloned: a loader may reuse its
    buffers for the next batch."""
    out = []
    for i, (x, y) in enumerate(loader):
        out.append((x.clone(), y.clone()))
        if n is not None and i + 1 == n:
            break
    return out


def run_two_ranks(script, timeout=120):
    """Run `script` (Python source) as ranks 0 and 1 of a two-process gloo job on this machine, one thread
    each; returns [(returncode, stdout, stderr)] by rank."""
    import socket
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    for k in ("TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RESTART_COUNT"):
        env.pop(k, None)
    procs = [subprocess.Popen([sys.executable, "-c", script], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append((p.returncode, out, err))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"a rank of the two-rank job hung for {timeout} s")
    return results


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: tiny nets gain nothing from threads, and one thread gives one
    order of floating-point reduction for runs that are compared bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def poison_outputs(monkeypatch):
    """Every kernel output starts as NaN (FASTPREACT_POISON=1), so an element a kernel never writes fails
    the oracles (tests/oracle.py). Test modules of the kernels use it for every test (pytestmark)."""
    from fastpreact.functional import backends
    monkeypatch.setenv("FASTPREACT_POISON", "1")  # for the subprocesses a test starts
    monkeypatch.setattr(backends, "POISON", True)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def use_torch_backend(monkeypatch):
    """The fused ops run their PyTorch math on CPU tensors (the interpreter turned off for the test)."""
    from fastpreact.functional import backends
    monkeypatch.setattr(backends, "INTERPRET", False)


@pytest.fixture
def torch_backend(monkeypatch):
    """use_torch_backend for the whole test."""
    use_torch_backend(monkeypatch)

