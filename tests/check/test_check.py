"""`python -m fastpreact.check`: the pre-training check of the kernels (fastpreact/check/).

On a CPU it runs its correctness checks through Triton's interpreter, which it enables itself; it must pass
on the kernels as they are, and it must fail (exit status 1, FAIL or ERROR rows) when a kernel is broken.
The GPU run (the real tuner, speed rows) is the `gpu` test at the end.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastpreact import check

REPO = Path(__file__).resolve().parents[2]
KERNELS = {"bn_relu_conv1x1", "bn_relu_conv1x1_dual", "bn_relu_conv2d", "batch_stats", "unit"}
DTYPES = {"fp32", "fp16", "bf16"}

requires_kernels = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="the kernels need a GPU or TRITON_INTERPRET=1 in this process (tests/conftest.py sets it)")


def _run_command(tmp_path, *args, env=None, timeout=300):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, "-m", "fastpreact.check", "--json", str(out), *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)
    doc = json.loads(out.read_text()) if out.exists() else None
    return proc, doc


def test_command_on_cpu_passes_through_the_interpreter(tmp_path):
    """No GPU (hidden), TRITON_INTERPRET unset: the command enables the interpreter itself, checks every
    kernel path in fp32, fp16 and bf16, passes, and writes the rows and the verdict as JSON."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTPREACT_POISON")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc, doc = _run_command(tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("no GPU:") and "TRITON_INTERPRET=1" in lines[0]
    assert any(line.startswith("VERDICT: PASS") for line in lines)
    assert doc["ok"] is True and doc["verdict"].startswith("PASS") and doc["device"] == "cpu"
    rows = doc["rows"]
    assert {(r["kernel"], r["dtype"]) for r in rows} == {(k, d) for k in KERNELS for d in DTYPES}
    assert not any(r.get("speed") for r in rows)  # no speed rows through the interpreter
    for r in rows:
        assert r["result"] == "ok" and r["failed"] == [], r
        assert 0 <= r["max_err"] <= r["allowed"], r
        assert r["tensors"] >= 2, r  # outputs, gradients and buffers were compared, not nothing
    # every row of the table was printed, once
    assert sum(line.endswith("| ok    ") for line in lines) == len(rows)


# The backward's launchers, by the names the package may export (one entry point, or one per pass):
# each that exists is patched, so the breakage reaches whichever the functional layer calls.
BACKWARD = ("bn_relu_conv1x1_bwd", "bn_relu_conv1x1_bwd_dw", "bn_relu_conv1x1_bwd_dz", "bn_relu_conv1x1_bwd_dx")


def _scaled(out, factor):
    """The launcher's result with every floating tensor in it times factor (new tensors)."""
    if isinstance(out, torch.Tensor):
        return out * factor if out.is_floating_point() else out
    if isinstance(out, (tuple, list)) and not hasattr(out, "_fields"):
        return type(out)(_scaled(o, factor) for o in out)
    if hasattr(out, "_fields"):  # a NamedTuple
        return type(out)(*(_scaled(o, factor) for o in out))
    return out


def _corrupt_forward(kc, monkeypatch):
    orig = kc.bn_relu_conv1x1_fwd

    def wrong(*args, **kwargs):
        y, stats = orig(*args, **kwargs)
        (y[0] if isinstance(y, tuple) else y)[0, 0, 0, 0] += 1.0  # one element of the output
        return y, stats
    monkeypatch.setattr(kc, "bn_relu_conv1x1_fwd", wrong)


def _corrupt_backward(kc, monkeypatch):
    for name in [n for n in BACKWARD if hasattr(kc, n)]:
        monkeypatch.setattr(kc, name, lambda *a, _orig=getattr(kc, name), **k: _scaled(_orig(*a, **k), 1.01))


def _crash_backward(kc, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("simulated launch failure")
    for name in [n for n in BACKWARD if hasattr(kc, n)]:
        monkeypatch.setattr(kc, name, crash)


@requires_kernels
@pytest.mark.parametrize("breakage,result,tensor", [
    (_corrupt_forward, "FAIL", "y"),
    (_corrupt_backward, "FAIL", "dx"),
    (_crash_backward, "ERROR", None),
], ids=["forward-output", "backward-1%-off", "backward-crash"])
def test_broken_kernel_fails_the_check(breakage, result, tensor, monkeypatch, tmp_path, capsys):
    import fastpreact.kernels.bn_relu_conv1x1 as kc
    assert hasattr(kc, "bn_relu_conv1x1_fwd") and any(hasattr(kc, n) for n in BACKWARD)
    breakage(kc, monkeypatch)
    out = tmp_path / "check.json"
    status = check.main(["--dtypes", "fp32", "--only", "1x1", "--no-speed", "--json", str(out)])
    assert status == 1
    doc = json.loads(out.read_text())
    assert doc["ok"] is False and doc["verdict"].startswith("FAIL")
    rows = doc["rows"]
    assert rows and all(r["kernel"] == "bn_relu_conv1x1" and r["dtype"] == "fp32" for r in rows)
    for r in rows:  # every 1x1 row runs the broken launcher
        assert r["result"] == result, r
        if tensor is not None:
            assert tensor in r["failed"] and r["max_err"] > r["allowed"], r
        else:
            assert "simulated launch failure" in r["error"], r
    printed = capsys.readouterr().out
    assert f"| {result}" in printed and "VERDICT: FAIL" in printed


def test_interpreter_cannot_be_enabled_after_triton_was_imported(monkeypatch, capsys):
    """No GPU, TRITON_INTERPRET unset, triton already imported: the check says it cannot run the kernels
    here (exit status 2) instead of checking something else."""
    import triton  # noqa: F401  (in sys.modules, as after any kernel launch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert check.main(["--no-speed"]) == 2
    assert "triton was imported" in capsys.readouterr().out
    assert "TRITON_INTERPRET" not in os.environ


@pytest.mark.parametrize("argv,message", [
    (["--dtypes", "fp8"], "unknown fp8"),
    (["--dtypes", ","], "unknown (empty)"),
    (["--bogus"], "unrecognized arguments"),
    (["--json", "/nonexistent-folder/check.json"], "does not exist"),
])
def test_bad_options_exit_with_one_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        check.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_help_explains_what_it_checks(capsys):
    with pytest.raises(SystemExit) as exc:
        check.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for what in ("BNReLUConv1x1", "bn_relu_conv2d", "FusedPreActBottleneck", "float64", "--json", "--dtypes",
                 "--no-speed", "TF32"):
        assert what in text, what


@pytest.mark.gpu
def test_command_on_gpu_passes_with_speed_rows(tmp_path):
    """The whole check on the GPU: the real tuner, every kernel in three precisions, the speed rows."""
    proc, doc = _run_command(tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert doc["ok"] is True and doc["device"] == "cuda"
    assert torch.cuda.get_device_name() in doc["header"][0]
    checks = [r for r in doc["rows"] if not r.get("speed")]
    assert {(r["kernel"], r["dtype"]) for r in checks} == {(k, d) for k in KERNELS for d in DTYPES}
    assert all(r["result"] == "ok" for r in checks)
    speed = [r for r in doc["rows"] if r.get("speed")]
    assert {r["kernel"] for r in speed} == {"bn_relu_conv1x1", "unit"}
    for r in speed:
        assert r["result"] in ("faster", "slower") and r["stock_ms"] > 0 and r["fused_ms"] > 0, r
    print(proc.stdout)
