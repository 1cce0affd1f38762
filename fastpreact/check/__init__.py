"""Check the fused kernels on this machine before a long training run: are they right, and fast?

Usage:
    python -m fastpreact.check                     every check in fp32, fp16 and bf16, then speed (GPU)
    python -m fastpreact.check --dtypes bf16 --no-speed --json check.json
    python -m fastpreact.check --only unit         only the checks whose name contains "unit"

Each kernel path runs one training step against stock PyTorch with the same weights and inputs: the fused
1x1 op (BNReLUConv1x1, stride 1 and 2; with a residual and output statistics; the dual op of a projection
shortcut), the BN-ReLU pass feeding a 3x3 conv (bn_relu_conv2d), the batch statistics, and two
pre-activation bottleneck units (FusedPreActBottleneck against PreActBottleneck: identity shortcut, and
stride 2 with a projection). Compared: outputs, gradients (input, residual, conv weights, BN gamma and
beta), running mean and variance and num_batches_tracked after the step, against ref64, the same step by
stock PyTorch in float64, relative to stock's own error at the same precision (tests/oracle.py):
    |fused - ref64| <= 2 |stock - ref64| + atol * max(max|ref64|, 1)   per element
atol: 2 eps of fp16/bf16 (1.95e-3, 1.56e-2), 5e-5 in fp32, 1e-5 for batch and running statistics (fp32
in every implementation). Units, where fp16/bf16 roundoff flips ReLU masks downstream, are judged per
tensor on norms: ||fused - ref64|| / ||ref64|| <= 2x stock's + atol (5e-5 fp32, 1e-2 fp16, 2e-2 bf16).
Statistics a kernel emits for its own output are judged against that output's float64 statistics. fp32
runs with TF32 off (stock and fused: the fused op follows cudnn.allow_tf32). BN inputs are centred away
from ReLU's threshold (beta shifted per channel; in a unit, its inner BNs too in fp32), so roundoff flips
no ReLU there.

On a GPU the tuner is the real one (a shape's first call times its tile candidates, as in training;
Triton compiles each kernel variant on first use and caches it on disk: a first run is the slowest). Then
the forward + backward of the fused 1x1 op (256->64) and of one fused unit (256-64-256) are timed against
stock PyTorch (cuDNN, channels-last, bf16 autocast) at ResNet-200's 56x56 stage, batch 64, after warm-up
(tuning excluded); --compile adds torch.compile of the stock unit (tens of seconds to compile: off by
default). Without a GPU the same correctness checks run through Triton's CPU interpreter
(TRITON_INTERPRET=1, set here before triton is imported) at small shapes, with no speed rows; bf16 bounds
are doubled there, as the interpreter rounds fp32 to bf16 by truncation (a GPU rounds to nearest).

Prints one table, the card, the versions and a verdict. Exit status: 0 every result right (speed never
fails it), 1 a result wrong or a check crashed, 2 the check cannot run here.

Here: the command (main, the table, the verdict); correctness.py: the cases, the training steps and the
oracle; speed.py: the timings; __main__.py: `python -m fastpreact.check`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from .. import functional as Fp
from .correctness import DTYPES, cases, check_case, precision
from .speed import speed_rows

__all__ = ["main", "verdict", "prepare_backend"]
COLS = (("check", 33), ("dtype", 5), ("worst", 16), ("max err", 9), ("allowed", 9), ("stock ms", 8),
        ("fused ms", 8), ("fused/stock", 11), ("result", 6))


def prepare_backend():
    """(device, None), or (None, why the kernels cannot run in this process)."""
    if torch.cuda.is_available():
        return torch.device("cuda"), None
    if os.environ.get("TRITON_INTERPRET") != "1":
        if "triton" in sys.modules:
            return None, ("no GPU, and triton was imported in this process before TRITON_INTERPRET=1 could be "
                          "set, so the kernels cannot run through the interpreter here; run "
                          "`TRITON_INTERPRET=1 python -m fastpreact.check` in a fresh process")
    from ..functional import backends
    backends.interpret()  # before triton's first import (fastpreact imports it lazily)
    return torch.device("cpu"), None


def _header(device):
    import triton  # after prepare_backend: with the interpreter set where there is no GPU

    from ..kernels.cards import card_of
    card = card_of(device)
    if device.type == "cuda":
        quick = os.environ.get("FASTPREACT_QUICK_AUTOTUNE") == "1"
        lines = [f"card: {torch.cuda.get_device_name(device)} (fastpreact card {card.name}, {card.family} tiles, "
                 f"{card.sms} SMs), CUDA {torch.version.cuda}",
                 "tuner: " + ("QUICK (FASTPREACT_QUICK_AUTOTUNE=1 is set: rough tile choices)" if quick else
                              "real (a shape's first call times its tile candidates, as in training)")]
    else:
        lines = [f"card: none; Triton's CPU interpreter (fastpreact card {card.name}: one tile per kernel, "
                 "nothing to tune); bf16 bounds doubled there: it rounds fp32 to bf16 by truncation"]
    return lines + [f"torch {torch.__version__}, triton {triton.__version__}, fastpreact backend "
                    f"{Fp.backend(device)}; fp32 with TF32 off (stock and fused), fp16/bf16 under autocast",
                    "oracle: |fused - ref64| <= 2 |stock - ref64| + atol per element (units: per tensor on "
                    "norms); worst = the tensor nearest its bound, max err and allowed there"]


def _fmt(row):
    def num(key, spec):
        return format(row[key], spec) if row.get(key) is not None else ""
    err = num("max_err", ".2e") or ("inf" if row.get("worst") else "")  # None: missing or not finite
    cells = (row["check"], row["dtype"], row.get("worst", row.get("error", "")[:16]), err,
             num("allowed", ".2e"), num("stock_ms", ".3f"), num("fused_ms", ".3f"),
             num("ratio", ".2f") + ("x" if row.get("ratio") else ""), row["result"])
    return " | ".join(str(c).ljust(w) for c, (_, w) in zip(cells, COLS))


def verdict(rows):
    """(every result right, one line)."""
    checks = [r for r in rows if not r.get("speed")]
    wrong = [r for r in rows if r["result"] in ("FAIL", "ERROR")]

    def what(r):
        failed = r.get("failed") or [r["result"]]
        return f"{r['check']} [{r['dtype']}] ({', '.join(failed[:3])}{', ...' if len(failed) > 3 else ''})"
    if wrong:
        line = (f"FAIL: {len(wrong)} of {len(rows)} results wrong: " + ", ".join(what(r) for r in wrong[:5])
                + (", ..." if len(wrong) > 5 else ""))
    else:
        dtypes = ", ".join(dict.fromkeys(r["dtype"] for r in checks))
        line = f"PASS: all {len(checks)} correctness results right ({dtypes})"
    for result, label in (("faster", "faster than stock"), ("slower", "slower than stock")):
        hits = [r for r in rows if r["result"] == result]
        if hits:
            line += f"; {label}: " + ", ".join(f"{r['check']} {r['ratio']:.2f}x" for r in hits)
    return not wrong, line


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m fastpreact.check",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="\n\n".join(__doc__.split("\n\n")[2:-1]))
    p.add_argument("--dtypes", default="fp32,fp16,bf16", help="comma-separated subset of fp32,fp16,bf16")
    p.add_argument("--no-speed", action="store_true", help="skip the speed rows (measured on a GPU only)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the stock unit (GPU; slow)")
    p.add_argument("--only", default="", metavar="TEXT", help="run only the checks whose name contains TEXT")
    p.add_argument("--json", metavar="PATH", help="also write the rows and the verdict as JSON to PATH")
    args = p.parse_args(argv)
    names = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in names if d not in DTYPES]
    if bad or not names:
        p.error(f"--dtypes: unknown {', '.join(bad) or '(empty)'}; choose from fp32, fp16, bf16")
    args.dtypes = [DTYPES[d] for d in dict.fromkeys(names)]
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        p.error(f"--json: the folder of {args.json!r} does not exist")
    return args


def main(argv=None):
    """Run the checks, print the table and the verdict; returns the exit status (0 right, 1 wrong, 2 cannot run)."""
    args = _parse(argv)
    t0 = time.perf_counter()
    device, why = prepare_backend()
    if device is None:
        print(f"fastpreact.check: cannot check the kernels: {why}")
        return 2
    selected = [c for c in cases(device.type == "cuda") if args.only in c[0]]
    if not selected:
        print(f"fastpreact.check: --only {args.only!r} matches no check")
        return 2
    if device.type != "cuda":
        print("no GPU: checking the kernels through Triton's CPU interpreter (TRITON_INTERPRET=1) at small shapes; "
              "no speed rows (the interpreter's speed says nothing about a GPU's)")
    header = _header(device)
    print("\n".join(header + [" | ".join(name.ljust(w) for name, w in COLS), "-+-".join("-" * w for _, w in COLS)]))
    rows = []

    def emit(row):
        rows.append(row)
        print(_fmt(row) + (f"\n    {row['error']}" if row.get("error") else ""), flush=True)
    for dtype in args.dtypes:
        with precision(dtype):
            for name, kernel, build in selected:
                emit(check_case(name, kernel, build, dtype, device))
    if device.type == "cuda" and not args.no_speed:
        for row in speed_rows(device, args.compile):
            emit(row)
    from ..kernels import tuning
    choices = tuning.table()  # the tuner's choices of this process, {card: {kernel: {key: tile}}}
    ok, line = verdict(rows)
    seconds = time.perf_counter() - t0
    if device.type == "cuda":
        print(f"tuner: {sum(len(keys) for k in choices['cards'].values() for keys in k.values())} tile choices "
              "(fastpreact.kernels.tuning.table(); in the JSON)")
    print(f"VERDICT: {line} ({seconds:.0f} s)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(dict(ok=ok, verdict=line, seconds=seconds, device=str(device), header=header, rows=rows,
                           tuning=choices), f, indent=1)
    return 0 if ok else 1
