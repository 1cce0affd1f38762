"""Shared machinery of the benchmark suites: device and size selection, timing, results file.

The suites run in two sizes, chosen from the device (override with FASTPREACT_BENCH_SCALE=full|tiny):
  full  on a GPU: the real shapes (ResNet-200 at batch 64 / 224 px, ResNet-1001 at batch 128 / 32 px), bf16
        autocast, channels-last; these are the numbers the README quotes, always with the card's name.
  tiny  on a CPU: scaled-down shapes and tiny nets, fp32, the fused path through the Triton interpreter.
        They exist so the suites cannot rot; their numbers are labelled CPU and never quoted.

Every benchmark appends rows to benchmarks/results/<date>-<slug>.json (and a markdown table beside it)
as soon as it ends, so a run cut short keeps what it measured. Rows of several pytest runs on the same
device and day merge into one file only when they share FASTPREACT_RESULTS_RUN (a re-measured row
replaces its older copy), which lets gpu_check.sh run the suites in stages as one run; otherwise a new run
replaces the file, so that every ratio in it compares rows of one run. FASTPREACT_RESULTS_DIR and
FASTPREACT_RESULTS_DATE override the directory and the date in the file name.
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import platform
import re
import time

import torch

# Peaks of the cards, (bf16 matmul FLOP/s, copy bytes/s): one table for the whole project, with its
# sources, in fastpreact.cost; used here only to say what fraction of the card a kernel reaches.
from fastpreact.cost import CARD_PEAKS

HERE = os.path.dirname(os.path.abspath(__file__))
ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
SCALE = os.environ.get("FASTPREACT_BENCH_SCALE") or ("full" if ON_GPU else "tiny")
if SCALE not in ("full", "tiny"):
    raise ValueError(f"FASTPREACT_BENCH_SCALE must be 'full' or 'tiny', got {SCALE!r}")
FULL = SCALE == "full"
# bf16 autocast on a GPU (the training recipe); fp32 on a CPU, where the interpreter cannot run bf16 dots.
AMP_DTYPE = torch.bfloat16 if ON_GPU else None
DTYPE_NAME = "bf16" if AMP_DTYPE is torch.bfloat16 else "fp32"


# Fields that are measurements: everything else in a row identifies it (for merging and pairing).
MEASURES = {"ms", "img_per_s", "peak_mem_gb", "tflops", "gbps", "speedup", "mem_vs_stock", "status",
            "reason", "rounds", "inner", "compile_s", "backend", "pct_peak_flops", "pct_peak_bw",
            "flops", "bytes", "fused_counts", "stands_for", "count", "notes", "unit", "input", "workers", "saved_mb_per_img",
            # the step-cost model's outputs (bench_cost.py)
            "launches", "aten", "triton", "gb", "gflop", "host_ms", "h100_ms", "h200_ms", "h100_gpu_ms",
            "h200_gpu_ms", "h100_img_per_s", "h200_img_per_s", "bound", "launches_vs_stock", "bytes_vs_stock",
            "h100_vs_stock", "predicted_ms", "measured_ms", "predicted_vs_measured", "measured_in",
            # the host suite (bench_host.py)
            "stock_ms", "fused_ms", "ratio", "met"}


def device_name() -> str:
    return torch.cuda.get_device_name() if ON_GPU else "cpu"


def device_slug(name: str | None = None) -> str:
    """Short file-name slug of a device name: h100, h200, a100, ... or cpu."""
    name = device_name() if name is None else name
    if name == "cpu":
        return "cpu"
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Za-z]?)\b", name.upper())
    if m:
        return m.group(1).lower()
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug[:24] or "gpu"


def autocast():
    """The benchmarks' precision context: bf16 autocast on a GPU, nothing (fp32) on a CPU."""
    if AMP_DTYPE is None:
        return contextlib.nullcontext()
    return torch.autocast(DEVICE.type, dtype=AMP_DTYPE)


def eager_step(model, opt, x, y):
    """One eager training step (forward under autocast, cross-entropy, backward, optimizer step) as a closure."""
    import torch.nn.functional as F

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return step


def sync():
    if ON_GPU:
        torch.cuda.synchronize()


def free_memory():
    gc.collect()
    if ON_GPU:
        torch.cuda.empty_cache()


def reset_peak():
    if ON_GPU:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gb():
    """Peak GPU memory allocated since reset_peak(), in GB (1e9 bytes); None on a CPU."""
    if not ON_GPU:
        return None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 1e9


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def rounds(gpu: int, cpu: int = 1) -> int:
    return gpu if FULL else cpu


def warmup_steps(kernels: str, gpu: int = 2) -> int:
    """Untimed steps before timing: compilation, autotuning, cuDNN's algorithm search. On a CPU the fused
    path is the Triton interpreter, which has nothing to warm up and costs seconds a step: none."""
    if FULL:
        return gpu
    return 0 if kernels == "fused" else 1


def time_call(benchmark, target, *, setup=None, rounds_=None, warmup=None, inner=1):
    """Time `target` with pytest-benchmark's pedantic mode; return seconds per call (median of rounds).

    target runs `inner` calls and synchronises the device itself, so each round is the wall time of
    finished device work; the result is divided by `inner`. setup (untimed) runs before every round.
    Warm-up rounds (compilation, autotuning, cuDNN algorithm search) are not timed.
    """
    rounds_ = rounds_ if rounds_ is not None else rounds(5, 2)
    warmup = warmup if warmup is not None else rounds(2, 1)
    benchmark.pedantic(target, setup=setup, rounds=rounds_, warmup_rounds=warmup, iterations=1)
    stats = getattr(benchmark, "stats", None)
    if stats is None or getattr(stats, "stats", None) is None:
        import pytest
        pytest.skip("pytest-benchmark timing is disabled (--benchmark-disable): nothing to record")
    benchmark.extra_info["inner"] = inner
    benchmark.extra_info["rounds"] = rounds_
    return stats.stats.median / inner


def sig(value: float, digits: int = 4) -> float:
    """Round to `digits` significant figures (tiny CPU figures must not round to 0.0)."""
    return float(f"{value:.{digits}g}")


def pct_of_peak(flops: float | None, nbytes: float | None, seconds: float) -> dict:
    """Fraction (percent) of the card's measured peak FLOP/s and bandwidth, where the card is known."""
    peaks = CARD_PEAKS.get(device_slug()) if ON_GPU else None
    if peaks is None or seconds <= 0:
        return {}
    out = {}
    if flops:
        out["pct_peak_flops"] = round(100 * flops / seconds / peaks[0], 1)
    if nbytes:
        out["pct_peak_bw"] = round(100 * nbytes / seconds / peaks[1], 1)
    return out


def _versions():
    out = {"torch": torch.__version__}
    for mod in ("triton", "torchvision", "timm"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # not installed: recorded as absent
            out[mod] = None
    return out


def _identity(row: dict) -> tuple:
    return tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in row.items() if k not in MEASURES))


def _stock_partner(row: dict) -> tuple | None:
    if row.get("kernels") in (None, "stock") and not row.get("cuda_graph"):
        return None
    partner = {k: v for k, v in row.items() if k not in MEASURES}
    partner["kernels"] = "stock"
    if "cuda_graph" in partner:
        partner["cuda_graph"] = False
    return _identity(partner)


def _fmt(v):
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v == 0 or not math.isfinite(v):
            return str(v)
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True).replace("|", "/")
    return str(v).replace("|", "/")


class ResultsLog:
    """This run's results: rows appended one at a time, JSON + markdown rewritten after each."""

    def __init__(self, directory: str | None = None, date: str | None = None):
        self.directory = directory or os.environ.get("FASTPREACT_RESULTS_DIR") or os.path.join(HERE, "results")
        self.date = date or os.environ.get("FASTPREACT_RESULTS_DATE") or time.strftime("%Y-%m-%d", time.gmtime())
        if not re.fullmatch(r"[A-Za-z0-9._-]+", self.date):
            raise ValueError(f"FASTPREACT_RESULTS_DATE must hold only letters, digits, '.', '_' and '-', "
                             f"got {self.date!r}")
        self.slug = device_slug()
        stem = f"{self.date}-{self.slug}"
        self.json_path = os.path.join(self.directory, stem + ".json")
        self.md_path = os.path.join(self.directory, stem + ".md")
        # One results file holds one run: rows of another run (earlier today, another machine) are never
        # paired with this run's. gpu_check.sh sets FASTPREACT_RESULTS_RUN so its stages share one file.
        run = os.environ.get("FASTPREACT_RESULTS_RUN") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.header = {"device": device_name(), "slug": self.slug, "date": self.date, "run": run, "scale": SCALE,
                       "dtype": DTYPE_NAME, **_versions(),
                       "cuda": torch.version.cuda if ON_GPU else None,
                       "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
                       "note": ("CPU run at tiny sizes through the Triton interpreter: never quote as "
                                "performance") if not ON_GPU else "measured in one run on one card"}
        self.rows: list[dict] = []
        self._load_existing()

    def _load_existing(self):
        try:
            with open(self.json_path, encoding="utf-8") as f:
                old = json.load(f)
        except (OSError, ValueError):
            return
        same = all(old.get(k) == self.header[k] for k in ("device", "run", "torch", "triton", "scale"))
        if same and isinstance(old.get("results"), list):
            self.rows = [r for r in old["results"] if isinstance(r, dict)]

    def add(self, row: dict) -> dict:
        """Record one row (replacing an older measurement of the same thing) and rewrite the files."""
        row = {k: v for k, v in row.items() if v is not None or k in ("peak_mem_gb",)}
        ident = _identity(row)
        self.rows = [r for r in self.rows if _identity(r) != ident] + [row]
        self._derive()
        self.write()
        return next(r for r in self.rows if _identity(r) == ident)

    def _derive(self):
        by_id = {_identity(r): r for r in self.rows}
        for r in self.rows:
            partner = _stock_partner(r)
            stock = by_id.get(partner) if partner else None
            r.pop("speedup", None)
            r.pop("mem_vs_stock", None)
            if r.get("kernels") == "stock" and not r.get("cuda_graph") and r.get("status", "ok") == "ok":
                r["speedup"] = 1.0
            if stock is None or stock.get("status", "ok") != "ok" or r.get("status", "ok") != "ok":
                continue
            if r.get("ms") and stock.get("ms"):
                r["speedup"] = sig(stock["ms"] / r["ms"], 3)
            elif r.get("img_per_s") and stock.get("img_per_s"):
                r["speedup"] = sig(r["img_per_s"] / stock["img_per_s"], 3)
            if r.get("peak_mem_gb") and stock.get("peak_mem_gb"):
                r["mem_vs_stock"] = sig(r["peak_mem_gb"] / stock["peak_mem_gb"], 3)

    def write(self):
        os.makedirs(self.directory, exist_ok=True)
        doc = dict(self.header, results=self.rows)
        _atomic_write(self.json_path, json.dumps(doc, indent=1, sort_keys=False) + "\n")
        _atomic_write(self.md_path, self.markdown())

    def markdown(self) -> str:
        h = self.header
        lines = [f"# Benchmarks on {h['device']} ({h['date']})", "",
                 f"torch {h['torch']}, triton {h['triton']}, torchvision {h['torchvision']}, "
                 f"scale {h['scale']}, autocast {h['dtype']}. {h['note']}.", ""]
        if not ON_GPU:
            lines += ["**CPU numbers: tiny sizes, interpreter; they show the suites run, not speed.**", ""]
        suites: dict[str, list[dict]] = {}
        for r in self.rows:
            suites.setdefault(r.get("name", "?"), []).append(r)
        for name, rows in suites.items():
            cols: list[str] = []
            for r in rows:
                cols += [k for k in r if k not in cols and k != "name"]
            lines += [f"## {name}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
            lines.append("")
        return "\n".join(lines)


def _atomic_write(path: str, text: str):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def record(results: ResultsLog, benchmark, row: dict) -> dict:
    """Add `row` to the results file and mirror it (with the derived speedup) into extra_info."""
    stored = results.add(row)
    if benchmark is not None:
        for k, v in stored.items():
            if k != "name":
                benchmark.extra_info[k] = v
    return stored


def unavailable(results: ResultsLog, row: dict, reason: str):
    """Record a row that could not be measured (with why), then skip the test with the same reason."""
    import pytest
    reason = " ".join(str(reason).split())[:300]
    results.add(dict(row, status="unavailable", reason=reason))
    pytest.skip(reason)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
