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

