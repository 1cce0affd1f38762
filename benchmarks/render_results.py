"""Render the newest GPU benchmark results into README.md's performance table and a bar chart.

    python -m benchmarks.render_results            # print the table (markdown) for the newest GPU run
    python -m benchmarks.render_results --write    # also replace README.md's block between
                                                   #   <!-- perf-table:start --> and <!-- perf-table:end -->
    python -m benchmarks.render_results --results benchmarks/results/2026-11-27-h100.json

It reads benchmarks/results/<date>-<slug>.json (written by `pytest benchmarks --benchmark`), skips CPU
runs (tiny sizes through the Triton interpreter: never performance) unless --results names one, and
writes the chart beside the JSON as <date>-<slug>.png. Every number comes from the file; targets
(the project's speed and memory goals for one H100) are shown as met / MISSED, and a measurement that
is absent says so.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
START, END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"
NAME_RE = re.compile(r"^(\d{4}-\d{2}-\d{2})-([A-Za-z0-9_.-]+)\.json$")


def newest_gpu_results(directory: str) -> str | None:
    """Path of the newest (date in the name, then mtime) results JSON of a GPU run in `directory`."""
    found = []
    for path in glob.glob(os.path.join(directory, "*.json")):
        m = NAME_RE.match(os.path.basename(path))
        if not m or m.group(2) == "cpu":
            continue
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, ValueError):
            continue
        if doc.get("device", "cpu") == "cpu" or not isinstance(doc.get("results"), list):
            continue
        found.append((m.group(1), os.path.getmtime(path), path))
    return max(found)[2] if found else None


def ok(r):
    return r.get("status", "ok") == "ok"


def fmt(v, digits=3):
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if abs(v) >= 100:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def ratio(v):
    if v is None:
        return "n/a"
    return f"{v:.2f}x" if v >= 0.1 else f"{v:.2g}x"


def _find(rows, **kw):
    for r in rows:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def op_summary(rows, net):
    """Count-weighted fwd+bwd time of the net's 1x1 shapes per variant, and per-shape fused/stock ratios."""
    both = [r for r in rows if r.get("name") == "op" and r.get("net") == net and r.get("pass") == "both"]
    shapes = {}
    for r in both:
        key = (r["cin"], r["cout"], r["h"], r["w"], r["stride"])
        shapes.setdefault(key, {})[r["kernels"]] = r
    total = {}
    per_shape = []
    for key, variants in shapes.items():
        st, fu = variants.get("stock"), variants.get("fused")
        if st and fu and ok(st) and ok(fu):
            per_shape.append(st["ms"] / fu["ms"])
    for kernels in ("stock", "fused", "compile"):
        rs = [v.get(kernels) for v in shapes.values()]
        if rs and all(r is not None and ok(r) for r in rs):
            total[kernels] = sum(r["ms"] * r.get("count", 1) for r in rs)
    return dict(n=len(shapes), total=total, per_shape=per_shape)


def targets(rows):
    """[(target, measured text, met: True/False/None)] for the project's speed and memory targets."""
    out = []
    ts = {k: _find(rows, name="train_step", arch="resnet200", kernels=k, cuda_graph=False)
          for k in ("stock", "fused", "compile")}

    def good(r, field):
        return r is not None and ok(r) and r.get(field)

    st, fu, co = ts["stock"], ts["fused"], ts["compile"]
    if good(st, "img_per_s") and good(fu, "img_per_s"):
        v = fu["img_per_s"] / st["img_per_s"]
        out.append(("resnet200 train step: fused >= 1.35x stock img/s", ratio(v), v >= 1.35))
    else:
        out.append(("resnet200 train step: fused >= 1.35x stock img/s", "not measured", None))
    if good(co, "img_per_s") and good(fu, "img_per_s"):
        v = fu["img_per_s"] / co["img_per_s"]
        out.append(("resnet200 train step: fused >= 1.15x torch.compile img/s", ratio(v), v >= 1.15))
    else:
        out.append(("resnet200 train step: fused >= 1.15x torch.compile img/s", "not measured", None))
    if good(st, "peak_mem_gb") and good(fu, "peak_mem_gb"):
        v = fu["peak_mem_gb"] / st["peak_mem_gb"]
        out.append(("resnet200 peak memory: fused <= 0.7x stock (batch 64)", ratio(v), v <= 0.7))
    else:
        out.append(("resnet200 peak memory: fused <= 0.7x stock (batch 64)", "not measured", None))
    for net in ("resnet200", "resnet1001"):
        s = op_summary(rows, net)
        t = s["total"]
        label = f"op fwd+bwd at the {net} 1x1 shapes: fused >= 1.5x stock"
        if "stock" in t and "fused" in t:
            v = t["stock"] / t["fused"]
            below = sum(1 for x in s["per_shape"] if x < 1.5)
            out.append((label, f"{ratio(v)} (count-weighted); {below} of {len(s['per_shape'])} shapes below 1.5x",
                        v >= 1.5))
        else:
            out.append((label, "not measured", None))
        label = f"op fwd+bwd at the {net} 1x1 shapes: fused faster than torch.compile"
        if "compile" in t and "fused" in t:
            v = t["compile"] / t["fused"]
            out.append((label, f"{ratio(v)} (count-weighted)", v > 1.0))
        else:
            out.append((label, "not measured", None))
    st = _find(rows, name="train_step", arch="resnet1001", kernels="stock", cuda_graph=False)
    fg = _find(rows, name="train_step", arch="resnet1001", kernels="fused", cuda_graph=True)
    label = "resnet1001 train step: fused + CUDA graph >= 2.5x stock eager img/s"
    if good(st, "img_per_s") and good(fg, "img_per_s"):
        v = fg["img_per_s"] / st["img_per_s"]
        out.append((label, ratio(v), v >= 2.5))
    else:
        out.append((label, "not measured", None))
    return out


def render_table(doc, source: str) -> str:
    rows = doc["results"]
    lines = [f"Measured on **{doc['device']}** ({doc.get('date', '?')}; torch {doc.get('torch')}, "
             f"triton {doc.get('triton')}) by `pytest benchmarks --benchmark`; every ratio compares "
             f"variants measured in that same run. Source: `{source}`."]
    if doc.get("device") == "cpu":
        lines.append("")
        lines.append("**CPU run at tiny sizes through the Triton interpreter: these numbers are NOT performance.**")

    lines += ["", "| target (set for one H100) | measured in this run | |", "|---|---|---|"]
    cpu = doc.get("device") == "cpu"
    for label, measured, met in targets(rows):
        verdict = "met" if met else ("MISSED" if met is False else "not measured")
        lines.append(f"| {label} | {measured} | {'not judged (CPU run)' if cpu else verdict} |")

    steps = [r for r in rows if r.get("name") == "train_step"]
    if steps:
        lines += ["", "Training step (forward + backward + SGD), synthetic data on the device:", "",
                  "| net | batch | variant | img/s | peak GB | speed vs stock | memory vs stock | saved for backward, MB/img |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in steps:
            variant = r["kernels"] + (" + CUDA graph" if r.get("cuda_graph") else "")
            if ok(r):
                lines.append(f"| {r['arch']} | {r['batch']} | {variant} | {fmt(r.get('img_per_s'))} | "
                             f"{fmt(r.get('peak_mem_gb'))} | {ratio(r.get('speedup'))} | {ratio(r.get('mem_vs_stock'))} | "
                             f"{fmt(r.get('saved_mb_per_img'))} |")
            else:
                lines.append(f"| {r['arch']} | {r['batch']} | {variant} | n/a: {r.get('reason', '')} | | | | |")

    nets = sorted({r["net"] for r in rows if r.get("name") == "op"})
    if nets:
        lines += ["", "BN + ReLU + 1x1 conv, forward + backward, summed over the net's 1x1 convs (each distinct "
                  "shape timed once, weighted by how often it occurs):", "",
                  "| net | distinct shapes | stock ms | fused ms | compile ms | fused vs stock | fused vs compile | "
                  "per-shape fused vs stock (min..max) |", "|---|---|---|---|---|---|---|---|"]
        for net in nets:
            s = op_summary(rows, net)
            t = s["total"]
            vs_stock = t["stock"] / t["fused"] if "stock" in t and "fused" in t else None
            vs_comp = t["compile"] / t["fused"] if "compile" in t and "fused" in t else None
            span = (f"{min(s['per_shape']):.2f}x..{max(s['per_shape']):.2f}x" if s["per_shape"] else "n/a")
            lines.append(f"| {net} | {s['n']} | {fmt(t.get('stock'))} | {fmt(t.get('fused'))} | "
                         f"{fmt(t.get('compile'))} | {ratio(vs_stock)} | {ratio(vs_comp)} | {span} |")

    maxb = [r for r in rows if r.get("name") == "max_batch"]
    if maxb:
        lines += ["", "Largest batch that fits (training step):", "", "| net | variant | batch | peak GB | img/s |",
                  "|---|---|---|---|---|"]
        for r in maxb:
            if ok(r):
                lines.append(f"| {r['arch']} | {r['kernels']} | {r['batch']} | {fmt(r.get('peak_mem_gb'))} | "
                             f"{fmt(r.get('img_per_s'))} |")
            else:
                lines.append(f"| {r['arch']} | {r['kernels']} | n/a: {r.get('reason', '')} | | |")

    fuses = [r for r in rows if r.get("name") == "fuse"]
    if fuses:
        lines += ["", "`fastpreact.fuse(model)` on third-party ResNets (training step):", "",
                  "| model | batch | variant | img/s | peak GB | speed vs unfused | memory vs unfused |",
                  "|---|---|---|---|---|---|---|"]
        for r in fuses:
            variant = "unfused" if r["kernels"] == "stock" else "fuse(model)"
            if ok(r):
                lines.append(f"| {r['model']} | {r['batch']} | {variant} | {fmt(r.get('img_per_s'))} | "
                             f"{fmt(r.get('peak_mem_gb'))} | {ratio(r.get('speedup'))} | {ratio(r.get('mem_vs_stock'))} |")
            else:
                lines.append(f"| {r['model']} | {r['batch']} | {variant} | n/a: {r.get('reason', '')} | | | |")

    loaders = [r for r in rows if r.get("name") == "loader"]
    if loaders:
        lines += ["", "Data loaders (images per second delivered to the device):", "",
                  "| data set | loader | batch | img/s |", "|---|---|---|---|"]
        for r in loaders:
            value = fmt(r.get("img_per_s")) if ok(r) else f"n/a: {r.get('reason', '')}"
            lines.append(f"| {r['dataset']} | {r['loader']} | {r['batch']} | {value} |")
    return "\n".join(lines) + "\n"


def render_chart(doc, png_path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["results"]
    steps = [r for r in rows if r.get("name") == "train_step" and ok(r) and r.get("speedup")]
    nets = [n for n in dict.fromkeys(r["arch"] for r in steps)]
    variants = list(dict.fromkeys(r["kernels"] + (" + graph" if r.get("cuda_graph") else "") for r in steps))
    op_rows = [r for r in rows if r.get("name") == "op" and r.get("pass") == "both" and ok(r)
               and r.get("speedup") and r["kernels"] != "stock"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    ax = axes[0]
    width = 0.8 / max(1, len(variants))
    for i, v in enumerate(variants):
        xs, ys, labels = [], [], []
        for j, net in enumerate(nets):
            r = next((r for r in steps if r["arch"] == net
                      and r["kernels"] + (" + graph" if r.get("cuda_graph") else "") == v), None)
            if r:
                xs.append(j + i * width)
                ys.append(r["speedup"])
                labels.append(f"{r['img_per_s']:.0f}")
        bars = ax.bar(xs, ys, width, label=v)
        for b, lab in zip(bars, labels):
            ax.annotate(lab, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=7)
    ax.set_xticks([j + width * (len(variants) - 1) / 2 for j in range(len(nets))], nets)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_ylabel("img/s relative to stock eager (labels: img/s)")
    ax.set_title("training step")
    if variants:
        ax.legend(fontsize=8)

    ax = axes[1]
    shapes = list(dict.fromkeys((r["net"], r["cin"], r["cout"], r["h"], r["stride"]) for r in op_rows))
    kinds = list(dict.fromkeys(r["kernels"] for r in op_rows))
    width = 0.8 / max(1, len(kinds))
    for i, k in enumerate(kinds):
        xs, ys = [], []
        for j, s in enumerate(shapes):
            r = next((r for r in op_rows if (r["net"], r["cin"], r["cout"], r["h"], r["stride"]) == s
                      and r["kernels"] == k), None)
            if r:
                xs.append(j + i * width)
                ys.append(r["speedup"])
        ax.bar(xs, ys, width, label=k)
    ax.set_xticks([j + width * (len(kinds) - 1) / 2 for j in range(len(shapes))],
                  [f"{n[6:]}:{ci}>{co}@{h}{'/2' if st == 2 else ''}" for n, ci, co, h, st in shapes],
                  rotation=90, fontsize=6)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.axhline(1.5, color="red", lw=0.6, ls="--")
    ax.set_ylabel("fwd+bwd speed relative to stock")
    ax.set_title("BN + ReLU + 1x1 conv")
    if kinds:
        ax.legend(fontsize=8)
    fig.suptitle(f"fastpreact on {doc['device']} ({doc.get('date', '')})"
                 + ("  [CPU, tiny sizes: not performance]" if doc.get("device") == "cpu" else ""))
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def replace_block(readme: str, block: str) -> str:
    if START not in readme or END not in readme or readme.index(START) > readme.index(END):
        raise ValueError(f"README has no '{START}' ... '{END}' block; add the two markers where the table goes")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{block}{END}{tail}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", help="a results JSON to render (default: the newest GPU run in --dir)")
    ap.add_argument("--dir", default=os.path.join(HERE, "results"), help="where results JSON files are")
    ap.add_argument("--write", action="store_true", help="replace the README block between the perf-table markers")
    ap.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    ap.add_argument("--no-chart", action="store_true", help="do not write the PNG bar chart")
    args = ap.parse_args(argv)

    path = args.results or newest_gpu_results(args.dir)
    if path is None:
        print(f"render_results: no GPU results in {args.dir} (CPU runs are never rendered as performance); "
              "run benchmarks/gpu_check.sh on a GPU first", file=sys.stderr)
        return 2
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        if not isinstance(doc.get("results"), list):
            raise ValueError("no 'results' list")
    except (OSError, ValueError) as exc:
        print(f"render_results: cannot read {path} ({exc}); pass a results JSON written by "
              "pytest benchmarks --benchmark", file=sys.stderr)
        return 2
    source = os.path.relpath(path, ROOT) if os.path.abspath(path).startswith(ROOT + os.sep) else path
    table = render_table(doc, source)
    print(table, end="")
    if not args.no_chart:
        png = os.path.splitext(path)[0] + ".png"
        try:
            render_chart(doc, png)
            print(f"\nchart: {png}", file=sys.stderr)
        except OSError as exc:
            print(f"render_results: cannot write the chart {png} ({exc}); pass --no-chart", file=sys.stderr)
            return 2
    if args.write:
        try:
            with open(args.readme, encoding="utf-8") as f:
                readme = f.read()
            new = replace_block(readme, table)
        except (OSError, ValueError) as exc:
            print(f"render_results: {exc}", file=sys.stderr)
            return 2
        with open(args.readme, "w", encoding="utf-8") as f:
            f.write(new)
        print(f"updated {args.readme}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
