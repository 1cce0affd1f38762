"""The README's tables that the code computes (models, not measurements), regenerated from that code.

    python -m benchmarks.readme_tables            # print every block
    python -m benchmarks.readme_tables --write    # replace README.md's blocks between their markers
    python -m benchmarks.readme_tables --check    # exit 1 where README.md's blocks differ (a test runs it)

Blocks, each between <!-- table:NAME:start --> and <!-- table:NAME:end -->:
  saved-bytes     activation bytes saved for backward per image, fused / stock (fastpreact.cost.memory)
  cost-resnet200  one ResNet-200 training step per op class: launches, bytes, FLOPs, predicted H100 ms
  cost-nets       the same totals for ResNet-50, -164, -200 and -1001, and fused / stock
  cost-modes      the fused step per way of running it (eager, --compile, CUDA graph), one GPU and DDP
A minute or so on a CPU: everything runs on fake tensors.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

from benchmarks import bench_cost

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
SAVED_NETS = (("resnet50", 224), ("resnet200", 224), ("resnet164", 32), ("resnet1001", 32))


def saved_bytes_table():
    from fastpreact.cost.memory import saved_bytes_of
    lines = ["| net | input | saved MB per image, stock | fused | fused / stock |", "|---|---|---|---|---|"]
    for arch, image in SAVED_NETS:
        stock, fused = saved_bytes_of(arch, "stock", image), saved_bytes_of(arch, "fused", image)
        lines.append(f"| {arch} | {image}x{image} | {stock / 1e6:.1f} | {fused / 1e6:.1f} | {fused / stock:.2f} |")
    return "\n".join(lines)


BLOCKS = {"saved-bytes": saved_bytes_table, "cost-resnet200": bench_cost.readme_table,
          "cost-nets": bench_cost.summary_lines, "cost-modes": bench_cost.modes_lines}


def _markers(name):
    return f"<!-- table:{name}:start -->", f"<!-- table:{name}:end -->"


def replace_blocks(text, blocks):
    """text with each block's content put between its markers; raises ValueError naming a missing pair."""
    for name, content in blocks.items():
        start, end = _markers(name)
        pattern = re.compile(re.escape(start) + r"\n.*?" + re.escape(end), re.S)
        if not pattern.search(text):
            raise ValueError(f"README has no '{start}' ... '{end}' block; add the two markers where it goes")
        text = pattern.sub(lambda _: f"{start}\n{content}\n{end}", text)
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.readme_tables", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="replace README.md's blocks")
    mode.add_argument("--check", action="store_true", help="exit 1 where README.md's blocks differ")
    parser.add_argument("--readme", default=README)
    args = parser.parse_args(argv)
    blocks = {name: make() for name, make in BLOCKS.items()}
    if not (args.write or args.check):
        print("\n\n".join(f"{name}:\n{content}" for name, content in blocks.items()))
        return 0
    with open(args.readme, encoding="utf-8") as f:
        text = f.read()
    new = replace_blocks(text, blocks)
    if args.check:
        stale = [n for n in blocks if _markers(n)[0] + "\n" + blocks[n] + "\n" + _markers(n)[1] not in text]
        if stale:
            print(f"{args.readme}: stale generated tables: {', '.join(stale)}; run python -m benchmarks.readme_tables "
                  "--write", file=sys.stderr)
            return 1
        return 0
    with open(args.readme, "w", encoding="utf-8") as f:
        f.write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
