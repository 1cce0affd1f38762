"""--compile as a user runs it (a subprocess of `python -m fastpreact.train`, on the CPU, where inductor
compiles C++ with the system compiler): with the stock kernels, and with the fused kernels, where dynamo
traces the fused ops (TRITON_INTERPRET=1: the Triton path is taken on a CPU)."""
import json
import os
import subprocess
import sys

import torch

ENV = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONUNBUFFERED": "1"}
# The smallest sizes that still make whole batches and an evaluation: at the defaults (batch 128, 50k
# images drawn, 10k evaluated) the stock run takes 1-2 minutes on a CPU, most of it outside compilation,
# and the fused kernels in the Triton interpreter take seconds a step.
SMALL = ["--batch-size", "16", "--train-size", "64", "--val-size", "32"]


def train(args, out):
    cmd = [sys.executable, "-m", "fastpreact.train", "shapes10", "--arch", "resnet8", *args, "--out", str(out)]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)


def assert_trained(proc, out, iters):
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert train_records[-1]["step"] == iters and all(r["loss"] is not None for r in train_records)
    assert [r["step"] for r in records if r["kind"] == "eval"] == [iters]
    weights = torch.load(out / "final.pt", map_location="cpu", weights_only=True)
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())


def test_compile_with_stock_kernels_trains(tmp_path):
    out = tmp_path / "run"
    proc = train(["--kernels", "stock", "--compile", "--iters", "20", *SMALL], out)
    assert_trained(proc, out, 20)


def test_compile_with_fused_kernels_trains(tmp_path):
    out = tmp_path / "run"
    proc = train(["--kernels", "fused", "--compile", "--iters", "20", *SMALL], out)
    assert_trained(proc, out, 20)
