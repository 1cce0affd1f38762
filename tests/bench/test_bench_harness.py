"""Self-checks of the benchmark machinery (results file, pairing, README rendering); no timing.

They run in the test suite (pytest.ini puts the repository on the path, where benchmarks/ is a package)
and take well under a second.
"""
from __future__ import annotations

import json
import os

import pytest

from benchmarks import _bench as B
from benchmarks import render_results as R


@pytest.fixture
def log_in(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTPREACT_RESULTS_DIR", str(tmp_path))
    monkeypatch.setenv("FASTPREACT_RESULTS_DATE", "2030-01-02")

    def make(run):
        monkeypatch.setenv("FASTPREACT_RESULTS_RUN", run)
        return B.ResultsLog()
    return make


def _row(kernels, ms, **kw):
    return dict(name="op", net="resnet200", batch=64, cin=64, cout=256, h=56, w=56, stride=1, count=4,
                kernels=kernels, dtype="bf16", ms=ms, **{"pass": "both"}, **kw)


def test_results_pairing_merge_and_replace(log_in):
    log = log_in("run-a")
    log.add(_row("stock", 2.0))
    fused = log.add(_row("fused", 1.0))
    assert fused["speedup"] == 2.0
    assert log.add(_row("stock", 3.0))["speedup"] == 1.0
    assert [r for r in log.rows if r["kernels"] == "fused"][0]["speedup"] == 3.0  # re-derived
    assert len(log.rows) == 2  # the re-measured stock row replaced its older copy
    with open(log.json_path, encoding="utf-8") as f:
        doc = json.load(f)
    assert doc["run"] == "run-a" and len(doc["results"]) == 2
    assert os.path.basename(log.json_path) == f"2030-01-02-{B.device_slug()}.json"
    assert "| resnet200 |" in open(log.md_path, encoding="utf-8").read()
    assert len(log_in("run-a").rows) == 2   # a later stage of the same run continues the file
    assert log_in("run-b").rows == []       # another run starts afresh: no pairing across runs


def test_unavailable_rows_are_not_paired(log_in):
    log = log_in("run-c")
    log.add(_row("stock", 2.0))
    r = log.add(dict(_row("fused", None), status="unavailable", reason="why"))
    assert "speedup" not in r and r["reason"] == "why"


def test_device_slug():
    assert B.device_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert B.device_slug("NVIDIA H200") == "h200"
    assert B.device_slug("cpu") == "cpu"


def _doc(fused_ips, fused_mem):
    rows = [dict(name="train_step", arch="resnet200", kernels=k, cuda_graph=False, batch=64, img_per_s=v, peak_mem_gb=m)
            for k, v, m in (("stock", 400.0, 30.0), ("fused", fused_ips, fused_mem), ("compile", 450.0, 28.0))]
    return dict(device="NVIDIA H100 80GB HBM3", date="2030-01-02", results=rows)


def test_targets_met_and_missed():
    met = {label: ok for label, _, ok in R.targets(_doc(600.0, 18.0)["results"])}
    assert met["resnet200 train step: fused >= 1.35x stock img/s"] is True
    assert met["resnet200 train step: fused >= 1.15x torch.compile img/s"] is True
    assert met["resnet200 peak memory: fused <= 0.7x stock (batch 64)"] is True
    assert met["resnet1001 train step: fused + CUDA graph >= 2.5x stock eager img/s"] is None  # not measured
    missed = {label: ok for label, _, ok in R.targets(_doc(500.0, 25.0)["results"])}
    assert missed["resnet200 train step: fused >= 1.35x stock img/s"] is False
    assert missed["resnet200 peak memory: fused <= 0.7x stock (batch 64)"] is False
    table = R.render_table(_doc(500.0, 25.0), "x.json")
    assert "MISSED" in table and "| 1.25x |" in table


def test_readme_block_and_newest_gpu_file(tmp_path):
    readme = f"intro\n{R.START}\nold\n{R.END}\ntail\n"
    assert R.replace_block(readme, "new\n") == f"intro\n{R.START}\nnew\n{R.END}\ntail\n"
    with pytest.raises(ValueError, match="perf-table"):
        R.replace_block("no markers", "new\n")
    for name, device in (("2030-01-01-h100.json", "NVIDIA H100"), ("2030-01-03-cpu.json", "cpu"),
                         ("2030-01-02-h200.json", "NVIDIA H200")):
        (tmp_path / name).write_text(json.dumps(dict(device=device, results=[])))
    assert R.newest_gpu_results(str(tmp_path)).endswith("2030-01-02-h200.json")  # CPU runs never chosen
