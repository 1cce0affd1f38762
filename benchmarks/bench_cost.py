"""Where a training step's time goes: the step-cost MODEL (fastpreact.cost), at full size, on any
machine, in seconds. Its rows are predictions, never measurements.

For resnet200 / resnet50 (batch 64, 224 px) and resnet1001 / resnet164 (batch 128, 32 px), stock and fused, bf16
autocast, channels-last: one training step (forward, backward, SGD with momentum through foreach ops)
runs under FakeTensorMode with every Triton launch recorded instead of run. Per op class: launches (aten
and Triton), GB read + written, GFLOP, and the roofline's predicted ms on an H100 and an H200 (GPU time
per class; the "total" row's h100_ms / h200_ms are the step, max(GPU, host): the host's launch cost is
overlapped with the GPU's work, and <card>_gpu_ms and host_ms are the two terms), predicted
img/s, and fused / stock ratios. Where committed GPU results (benchmarks/results/<date>-h100.json, ...)
hold a measured eager train_step row of the same net, a "step_cost vs measured" row puts prediction and
measurement side by side.

    python -m benchmarks.bench_cost            # the resnet200 table of the README ("Where the time goes"),
                                               # then one fused / stock line per net
"""
from __future__ import annotations

import glob
import json
import os

import pytest

from benchmarks import _bench as B

NAME = "step_cost (MODEL: predicted, not measured)"
NAME_VS = "step_cost vs measured (MODEL / measurement)"
CASES = {
    "resnet200": dict(batch=64, image=224, num_classes=1000),
    "resnet50": dict(batch=64, image=224, num_classes=1000),
    "resnet1001": dict(batch=128, image=32, num_classes=10),
    "resnet164": dict(batch=128, image=32, num_classes=10),
}
_COUNTS: dict = {}


def step_cost(arch, kernels, batch=None):
    """The StepCost of one bf16 training step of `arch` at its CASES batch or `batch` (cached)."""
    import torch

    from fastpreact import cost as sc
    cfg = CASES[arch]
    batch = batch or cfg["batch"]
    if (arch, kernels, batch) not in _COUNTS:
        _COUNTS[arch, kernels, batch] = sc.count_model(arch, cfg["num_classes"], kernels=kernels, batch=batch,
                                                       image=cfg["image"], amp_dtype=torch.bfloat16)
    return _COUNTS[arch, kernels, batch]


def class_rows(arch, kernels):
    """Rows per op class, then a "total" row, of one net (fused rows carry their ratio to stock)."""
    from fastpreact import cost as sc
    cost, batch = step_cost(arch, kernels), CASES[arch]["batch"]
    preds = {card: sc.predict(cost, card) for card in sc.CARDS}
    stock = step_cost(arch, "stock") if kernels == "fused" else None
    # "variant", not "kernels": these rows are not timings, so the results file derives no speedup from them.
    base = dict(name=NAME, arch=arch, variant=kernels, batch=batch, image=CASES[arch]["image"], dtype="bf16")
    rows = []
    totals = {c: d for c, d in cost.by_class().items()}
    totals["total"] = cost.totals()
    stock_totals = None
    if stock is not None:
        stock_totals = dict(stock.by_class(), total=stock.totals())
    for cls, d in totals.items():
        row = dict(base, op_class=cls, launches=d["launches"], aten=d["aten"], triton=d["triton"],
                   gb=B.sig(d["bytes"] / 1e9), gflop=B.sig(d["flops"] / 1e9))
        for card, p in preds.items():
            row[f"{card}_ms"] = B.sig(p["step_ms"] if cls == "total" else p["gpu_ms"][cls])
        if cls == "total":
            for card, p in preds.items():
                row[f"{card}_gpu_ms"] = B.sig(p["gpu_total_ms"])
            row["host_ms"] = B.sig(preds["h100"]["host_ms"])
            row["bound"] = "/".join(f"{card}: {p['bound']}" for card, p in preds.items())
            for card, p in preds.items():
                row[f"{card}_img_per_s"] = B.sig(batch / p["step_ms"] * 1e3)
        if stock_totals is not None:
            s = stock_totals[cls]
            row["launches_vs_stock"] = B.sig(d["launches"] / s["launches"], 3) if s["launches"] else None
            row["bytes_vs_stock"] = B.sig(d["bytes"] / s["bytes"], 3) if s["bytes"] else None
            if cls == "total":
                row["h100_vs_stock"] = B.sig(preds["h100"]["step_ms"] / sc.predict(stock, "h100")["step_ms"], 3)
        rows.append(row)
    return rows


def measured_step_ms(directory):
    """{(card, arch, kernels, batch): (ms, file name)} of the eager train_step rows in the newest GPU
    results file of each card the model knows (CPU files are never measurements)."""
    from fastpreact.cost import CARDS
    found = {}
    for card in CARDS:
        paths = sorted(glob.glob(os.path.join(directory, f"*-{card}.json")))
        if not paths:
            continue
        try:
            with open(paths[-1], encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, ValueError):
            continue
        for r in doc.get("results", []) if isinstance(doc, dict) else []:
            if (isinstance(r, dict) and r.get("name") == "train_step" and not r.get("cuda_graph")
                    and r.get("status", "ok") == "ok" and r.get("ms")):
                key = (card, r.get("arch"), r.get("kernels"), r.get("batch"))
                found[key] = (r["ms"], os.path.basename(paths[-1]))
    return found


def versus_rows(predicted_total_rows, directory):
    """Prediction beside measurement, with their ratio, for every total row that has a measurement."""
    measured = measured_step_ms(directory)
    out = []
    for row in predicted_total_rows:
        for (card, arch, kernels, batch), (ms, source) in measured.items():
            if (arch, kernels, batch) == (row["arch"], row["variant"], row["batch"]):
                out.append(dict(name=NAME_VS, arch=arch, variant=kernels, batch=batch, card=card,
                                predicted_ms=row[f"{card}_ms"], measured_ms=ms,
                                predicted_vs_measured=B.sig(row[f"{card}_ms"] / ms, 3), measured_in=source))
    return out


@pytest.mark.parametrize("kernels", ["stock", "fused"])
@pytest.mark.parametrize("arch", list(CASES))
def test_step_cost(results, arch, kernels):
    rows = class_rows(arch, kernels)
    for row in rows:
        results.add(row)
    for row in versus_rows([rows[-1]], os.path.join(B.HERE, "results")):
        results.add(row)
    total = rows[-1]
    assert total["launches"] == total["aten"] + total["triton"] > 0
    assert (total["triton"] > 0) == (kernels == "fused")
    assert total["h100_ms"] > 0 and total["gflop"] > 0


def test_versus_measured_reads_a_results_file(tmp_path):
    """The side-by-side path on a made-up GPU results file (no GPU results are committed yet)."""
    doc = {"device": "NVIDIA H100 80GB HBM3", "results": [
        dict(name="train_step", arch="resnet164", kernels="fused", cuda_graph=False, batch=128, ms=200.0),
        dict(name="train_step", arch="resnet164", kernels="fused", cuda_graph=True, batch=128, ms=100.0),
        dict(name="train_step", arch="resnet164", kernels="stock", cuda_graph=False, batch=128,
             status="unavailable")]}
    (tmp_path / "2026-01-01-h100.json").write_text(json.dumps(doc))
    (tmp_path / "2026-01-02-cpu.json").write_text(json.dumps(dict(doc, device="cpu")))
    total = dict(arch="resnet164", variant="fused", batch=128, h100_ms=50.0, h200_ms=40.0)
    out = versus_rows([total, dict(total, variant="stock")], str(tmp_path))
    assert out == [dict(name=NAME_VS, arch="resnet164", variant="fused", batch=128, card="h100",
                        predicted_ms=50.0, measured_ms=200.0, predicted_vs_measured=0.25,
                        measured_in="2026-01-01-h100.json")]


def readme_table(arch="resnet200"):
    """The README's "Where the time goes" table: per class, stock vs fused (a MODEL)."""
    stock, fused = class_rows(arch, "stock"), class_rows(arch, "fused")
    lines = ["| op class | launches stock | launches fused (Triton) | GB stock | GB fused | GFLOP | "
             "H100 ms stock | H100 ms fused |", "|---|---|---|---|---|---|---|---|"]
    for s, f in zip(stock, fused):
        cls = "**total** (step: max(GPU, host))" if s["op_class"] == "total" else s["op_class"]
        lines.append(f"| {cls} | {s['launches']} | {f['launches']} ({f['triton']}) | {s['gb']:.3g} | "
                     f"{f['gb']:.3g} | {f['gflop']:.4g} | {s['h100_ms']:.3g} | {f['h100_ms']:.3g} |")
    s, f = stock[-1], fused[-1]
    lines += ["", f"Predicted H100 step: GPU {s['h100_gpu_ms']:.3g} ms stock, {f['h100_gpu_ms']:.3g} ms fused; "
              f"host (per-launch costs measured with launches stubbed: fastpreact/cost/roofline.py) {s['host_ms']:.3g} ms "
              f"stock, {f['host_ms']:.3g} ms fused.",
              f"Fused / stock: launches {f['launches_vs_stock']}, bytes {f['bytes_vs_stock']}, "
              f"predicted H100 step time {f['h100_vs_stock']}."]
    return "\n".join(lines)


def summary_lines():
    """One line per net: launches, GB and predicted H100 ms, stock and fused, and fused / stock."""
    lines = ["| net | launches stock / fused | GB stock / fused | H100 GPU ms stock / fused | eager step ms "
             "(max of GPU, host) stock / fused | fused / stock: launches, bytes, GPU time, eager step |",
             "|---|---|---|---|---|---|"]
    for arch in CASES:
        s, f = class_rows(arch, "stock")[-1], class_rows(arch, "fused")[-1]
        gpu = B.sig(f["h100_gpu_ms"] / s["h100_gpu_ms"], 3)
        lines.append(f"| {arch} | {s['launches']} / {f['launches']} | {s['gb']:.3g} / {f['gb']:.3g} | "
                     f"{s['h100_gpu_ms']:.3g} / {f['h100_gpu_ms']:.3g} | {s['h100_ms']:.3g} / {f['h100_ms']:.3g} | "
                     f"{f['launches_vs_stock']}, {f['bytes_vs_stock']}, {gpu}, {f['h100_vs_stock']} |")
    return "\n".join(lines)


# The trainer's ways of running a step, per GPU: (net, GPUs, batch a GPU). ResNet-200 on 8 GPUs takes the
# paper's global batch of 256, 32 images a GPU.
RUNS = (("resnet164", 1, 128), ("resnet1001", 1, 128), ("resnet200", 1, 64), ("resnet200", 8, 32))


def modes_lines():
    """Per run of RUNS, the fused step's predicted H100 ms in each way the trainer can run it (a MODEL):
    eager, max(GPU, host); --compile, at least the GPU time (inductor launches every kernel, the fused
    ones included, from its generated code; that code's host time per launch is not measured on a CPU,
    so no host term is claimed); a CUDA graph, the GPU time alone."""
    from fastpreact import cost as sc
    lines = ["| run (fused, bf16, H100) | batch a GPU | GPU ms | host ms, eager | eager step ms | --compile step ms "
             "| CUDA graph step ms |", "|---|---|---|---|---|---|---|"]
    for arch, gpus, batch in RUNS:
        cost = step_cost(arch, "fused", batch)
        eager = sc.predict(cost, "h100")
        graph = f"{eager['gpu_total_ms']:.3g}" + (" + the all-reduce's unhidden part" if gpus > 1 else "")
        where = "1 GPU" if gpus == 1 else f"{gpus} GPUs, DDP"
        lines.append(f"| {arch}, {where} | {batch} | {eager['gpu_total_ms']:.3g} | {eager['host_ms']:.3g} | "
                     f"{eager['step_ms']:.3g} ({eager['bound']}-bound) | >= {eager['gpu_total_ms']:.3g} | {graph} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(readme_table())
    print()
    print(summary_lines())
    print()
    print(modes_lines())
