"""Host suite: the host's time of the fused path against stock, with every Triton launch stubbed
(fastpreact.cost.host): one BN-ReLU-1x1 op forward + backward, a resnet164 training step and resnet1001
forward + backward, at tiny sizes where stock's own compute is small. A CPU measurement on any machine:
on a GPU machine it runs in a subprocess with the interpreter on and CUDA hidden.

Targets (fused / stock): the op at most 1.5x; a training step at most 1.0x (aiming for 0.7x). Rows say
met or MISSED; a missed target is a finding of the run, not a failure of the suite.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks import _bench as B

TARGETS = {"op": 1.5, "step": 1.0, "fwdbwd": 1.0}


def _measure(case):
    if not B.ON_GPU:
        from fastpreact.cost import host
        return host.measure(case, rounds=5)
    code = ("import json, os; os.environ['TRITON_INTERPRET'] = '1'\n"
            f"from fastpreact.cost import host; print(json.dumps(host.measure({case!r}, rounds=5)))")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", list(TARGETS))
def test_host(results, case):
    got = _measure(case)
    from fastpreact.cost.host import machine
    ratio = got["fused_ms"] / got["stock_ms"]
    row = dict(name="host (Triton launches stubbed)", case=case, stock_ms=B.sig(got["stock_ms"]),
               fused_ms=B.sig(got["fused_ms"]), ratio=B.sig(ratio, 3), target=TARGETS[case],
               met="met" if ratio <= TARGETS[case] else "MISSED", measured_in=machine())
    B.record(results, None, row)
    print(f"\nhost {case}: stock {got['stock_ms']:.3g} ms, fused {got['fused_ms']:.3g} ms, fused / stock {ratio:.2f} "
          f"(target {TARGETS[case]}: {row['met']})")
