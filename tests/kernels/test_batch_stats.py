"""fastpreact.functional.batch_stats (kernels/batch_stats.py) against float64 statistics.

On a CPU the kernels run through TRITON_INTERPRET=1 (tests/conftest.py); outputs start as NaN
(FASTPREACT_POISON=1), so an element a kernel never writes fails.
"""

import pytest
import torch

from conftest import requires_interpreter, use_torch_backend
from hypothesis import given, settings, strategies as st

from fastpreact import functional as Fp
from fastpreact import reference


# Tests that call the kernels on CPU tensors need the interpreter (on a GPU machine the gpu tests run them).


pytestmark = pytest.mark.usefixtures("poison_outputs")


def _check(x, rtol_var=1e-5):
    mean, var, _, _ = Fp.batch_stats(x)
    ref_mean, ref_var = reference.batch_stats(x)
    assert mean.dtype == torch.float32 and var.dtype == torch.float32
    assert mean.shape == (x.shape[1],) and var.shape == (x.shape[1],)
    assert torch.isfinite(mean).all() and torch.isfinite(var).all()
    spread = ref_var.sqrt().clamp_min(1e-6)
    # The mean is checked against the data's spread AND its magnitude (fp32 cannot resolve better).
    mean_tol = 1e-5 * spread + 1e-6 * ref_mean.abs()
    assert ((mean.double() - ref_mean).abs() <= mean_tol + 1e-7).all(), (mean, ref_mean)
    assert ((var.double() - ref_var).abs() <= rtol_var * ref_var + 1e-7).all(), (var, ref_var)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 1, 1), (3, 5, 7, 3), (2, 33, 9, 17), (4, 40, 8, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_batch_stats_grid(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype).contiguous(memory_format=torch.channels_last)
    _check(x)


def test_batch_stats_many_blocks_merge():
    # 2567 rows = many stage-1 tiles and more than one merge chunk (interpreter: 64-row tiles, 32 per chunk).
    g = torch.Generator().manual_seed(1)
    x = torch.randn(17, 3, 151, 1, generator=g).contiguous(memory_format=torch.channels_last)
    x[:, 1] += 50.0
    _check(x)


@pytest.mark.parametrize("backend", ["default", "torch"])
def test_batch_stats_large_mean_is_accurate(backend, monkeypatch):
    # mean 1e3, std 1: E[x^2] - E[x]^2 in fp32 would lose the variance entirely; Chan's merge must not,
    # nor the torch fallback's shifted two-pass.
    if backend == "torch":
        use_torch_backend(monkeypatch)
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(8, 6, 24, 24, generator=g) + 1e3).contiguous(memory_format=torch.channels_last)
    mean, var, _, _ = Fp.batch_stats(x)
    ref_mean, ref_var = reference.batch_stats(x)
    assert (var.double() - ref_var).abs().max() <= 1e-4 * ref_var.min()
    assert (mean.double() - ref_mean).abs().max() <= 2e-4
    naive = x.double().square().mean(dim=(0, 2, 3)).float() - x.float().mean(dim=(0, 2, 3)).square()
    assert (naive.double() - ref_var).abs().max() > 1e-2  # the test case really is hard


def test_batch_stats_layouts():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(3, 10, 6, 7, generator=g)
    _check(base)                                        # NCHW-contiguous: converted once
    _check(base[:, ::2])                                # channel slice (strided view)
    _check(base.permute(0, 1, 3, 2))                    # transposed spatial dims
    _check(base.contiguous(memory_format=torch.channels_last)[:, 1:7])  # channels-last slice


@requires_interpreter
def test_batch_stats_runs_triton_kernel(monkeypatch):
    assert Fp.backend() == "triton"
    from fastpreact.kernels import batch_stats as ks
    calls = []
    original = ks.batch_stats
    monkeypatch.setattr(ks, "batch_stats", lambda *a, **k: calls.append(1) or original(*a, **k))
    _check(torch.randn(2, 4, 3, 3))
    assert calls == [1]


def test_batch_stats_torch_fallback_matches(monkeypatch):
    use_torch_backend(monkeypatch)
    assert Fp.backend() == "torch"
    _check(torch.randn(2, 4, 3, 3))


@pytest.mark.parametrize("bad, err, match", [
    (torch.randn(3, 4), ValueError, "4-D"),
    (torch.ones(2, 3, 2, 2, dtype=torch.int64), TypeError, "floating"),
    (torch.randn(0, 3, 2, 2), ValueError, "empty"),
])
def test_batch_stats_errors(bad, err, match):
    with pytest.raises(err, match=match):
        Fp.batch_stats(bad)


@settings(max_examples=6, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 37), h=st.integers(1, 9), w=st.integers(1, 9),
       offset=st.sampled_from([0.0, 10.0, -300.0]))
def test_batch_stats_property(n, c, h, w, offset):
    g = torch.Generator().manual_seed(n * 1000 + c * 10 + h + w)
    x = (torch.randn(n, c, h, w, generator=g) + offset).contiguous(memory_format=torch.channels_last)
    _check(x, rtol_var=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 256, 56, 56), (64, 2048, 7, 7), (7, 33, 5, 3)])
def test_batch_stats_cuda(shape, dtype):
    x = (torch.randn(shape, device="cuda") * 3 + 100).to(dtype).contiguous(memory_format=torch.channels_last)
    _check(x, rtol_var=1e-4)
