"""max_batch suite: the largest training batch each variant of ResNet-200 (224 px, bf16) fits on the GPU.

A batch "fits" when two full training steps (forward, backward, SGD with momentum) run without a CUDA
out-of-memory error. The search doubles from batch 32 until a batch fails (or the cap), then bisects
to a multiple of STEP. Rows: name "max_batch", the largest fitting batch, its peak memory and img/s.
compile is left out: every candidate batch would recompile (minutes each). GPU only: a CPU has no
catchable out-of-memory error; on a CPU only the search logic is checked, on a made-up limit.
"""
from __future__ import annotations

import time

import pytest
import torch

from benchmarks import _bench as B
from benchmarks.bench_train_step import build

ARCH, IMAGE, NUM_CLASSES = "resnet200", 224, 1000
START, STEP, CAP = 32, 16, 4096


def largest_fitting(fits, start=START, step=STEP, cap=CAP):
    """Largest multiple of `step` up to `cap` for which fits(batch) is True (fits is monotone); 0 if none.

    Doubling from `start` until a batch fails, then bisection: O(log cap) calls.
    """
    lo, hi = 0, None  # lo fits (0: nothing yet), hi fails
    b = min(start, cap)
    while hi is None:
        if fits(b):
            lo = b
            if b >= cap:
                return b
            b = min(2 * b, cap)
        else:
            hi = b
    while hi - lo > step:
        mid = max(lo + step, (lo + hi) // 2 // step * step)
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


@pytest.mark.parametrize("limit,expected", [(37, 32), (1000, 992), (5, 0), (16, 16), (10**6, CAP)])
def test_search_logic(limit, expected):
    calls = []

    def fits(b):
        calls.append(b)
        return b <= limit

    assert largest_fitting(fits) == expected
    assert len(calls) <= 20


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", ["stock", "fused"])
def test_max_batch(benchmark, results, kernels):
    cfg = dict(num_classes=NUM_CLASSES)
    row = dict(name="max_batch", arch=ARCH, kernels=kernels, image_size=IMAGE, dtype=B.DTYPE_NAME)
    try:
        model, opt = build(ARCH, kernels, cfg)
    except Exception as exc:
        if kernels == "stock":
            raise
        B.unavailable(results, row, f"cannot build the {kernels} model: {B.first_line(exc)}")
    tried = {}

    def data(batch):
        x = torch.randn(batch, 3, IMAGE, IMAGE, device=B.DEVICE, dtype=B.AMP_DTYPE)
        y = torch.randint(0, NUM_CLASSES, (batch,), device=B.DEVICE)
        return x.contiguous(memory_format=torch.channels_last), y

    def fits(batch):
        x = y = None
        try:
            x, y = data(batch)
            step = B.eager_step(model, opt, x, y)
            step()
            B.reset_peak()
            step()
            tried[batch] = B.peak_gb()
            return True
        except Exception as exc:
            if not B.is_oom(exc):
                raise
            tried[batch] = None
            return False
        finally:
            del x, y
            opt.zero_grad(set_to_none=True)
            B.free_memory()

    t0 = time.perf_counter()
    best = largest_fitting(fits)
    search_s = time.perf_counter() - t0
    if best == 0:
        B.unavailable(results, row, f"not even batch {STEP} fits on this GPU")
    row.update(batch=best, peak_mem_gb=B.sig(tried[best]), notes=f"tried {sorted(tried)} in {search_s:.0f} s")
    x, y = data(best)
    step = B.eager_step(model, opt, x, y)

    def target():
        step()
        B.sync()

    try:
        seconds = B.time_call(benchmark, target, warmup=1, rounds_=3)
        row["img_per_s"] = B.sig(best / seconds)
    except Exception as exc:  # at the edge of memory, fragmentation can tip a later step over
        if not B.is_oom(exc):
            raise
        row["notes"] += "; img/s not measured: a later step ran out of memory"
    B.record(results, benchmark, row)
