"""The host's time per step, measured on a CPU: what the Python around the kernels costs, with every
Triton launch stubbed to a no-op. A GPU runs only as fast as the host feeds it; an eager step whose
Python costs more than its kernels wastes every byte the kernels save.

    python -m fastpreact.cost.host          # the table: fused against stock, and the per-launch constants

Method. The fused path runs through Triton's interpreter with InterpretedFunction.run replaced by a
no-op, so a kernel launch costs only what the library does around it (checks, statistics bookkeeping,
allocations, the tuner's lookup, autograd). Stock runs for real on the CPU at sizes where its compute is
small (narrow nets, 8x8 inputs, batch 2), so its time is an upper bound of its host time and the fused /
stock ratio a conservative one. One intra-op thread, best of several rounds, stock's and fused's rounds
interleaved (a shared host's slow spells then hit both). Cases:
  op      one BNReLUConv1x1(64, 64) forward + backward on [2, 64, 4, 4] against BN -> ReLU -> 1x1 conv
  step    a resnet164 training step (forward, cross-entropy, backward, SGD with momentum), batch 2, 8 px
  fwdbwd  resnet1001 forward + backward, batch 2, 8 px
The per-launch constants of the roofline (roofline.HOST_US) come from the step case: stock's time over
its aten launches, then the fused step's remaining time over its Triton launches (counts from count.py).
What a CPU cannot measure: the CUDA driver's own launch cost and triton's launcher below its Python
entry (both come on top, for stock and fused alike).
"""
from __future__ import annotations

import contextlib
import os
import platform
import time

import torch
import torch.nn.functional as F

__all__ = ["stubbed_launches", "measure", "per_launch_us", "main"]

CASES = ("op", "step", "fwdbwd")


@contextlib.contextmanager
def stubbed_launches():
    """Every Triton launch returns at once (the interpreter's run replaced by a no-op)."""
    from ..functional import backends
    if not backends.INTERPRET:
        raise RuntimeError("the host measurement needs TRITON_INTERPRET=1 set before triton is imported "
                           "(run `python -m fastpreact.cost.host`, which sets it)")
    from triton.runtime.interpreter import InterpretedFunction
    saved = InterpretedFunction.run
    InterpretedFunction.run = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        InterpretedFunction.run = saved


def _best_ms(fns: dict, rounds, calls) -> dict:
    """{name: best ms per call} of each function, the rounds interleaved (stock, fused, stock, ...) so that
    a slow spell of a shared host hits both sides alike."""
    for fn in fns.values():
        fn()  # first call: imports, the tuner's table, the launch plans, allocator warm-up
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t) / calls)
    return {name: b * 1e3 for name, b in best.items()}


def _cl(t):
    return t.contiguous(memory_format=torch.channels_last)


def _op_case(kernels):
    import fastpreact
    torch.manual_seed(0)
    x = _cl(torch.randn(2, 64, 4, 4)).requires_grad_()
    if kernels == "fused":
        mod = fastpreact.BNReLUConv1x1(64, 64)
    else:
        mod = torch.nn.Sequential(torch.nn.BatchNorm2d(64), torch.nn.ReLU(), torch.nn.Conv2d(64, 64, 1, bias=False))
    dy = _cl(torch.ones(2, 64, 4, 4))

    def run():
        mod(x).backward(dy)
    return run, 50


def _net_case(arch, kernels, optimizer):
    from ..models import create_model
    torch.manual_seed(0)
    model = create_model(arch, 10, kernels=kernels).to(memory_format=torch.channels_last)
    x, y = _cl(torch.randn(2, 3, 8, 8)), torch.zeros(2, dtype=torch.long)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=True) if optimizer else None

    def run():
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        if opt is not None:
            opt.step()
    return run, 1


def measure(case: str, rounds: int = 5) -> dict:
    """{"stock_ms", "fused_ms", "ratio"} of one case (see the module docstring), launches stubbed."""
    if case not in CASES:
        raise ValueError(f"unknown case {case!r}; one of {', '.join(CASES)}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with stubbed_launches():
            fns = {}
            for kernels in ("stock", "fused"):
                if case == "op":
                    fns[kernels], calls = _op_case(kernels)
                else:
                    fns[kernels], calls = _net_case("resnet164" if case == "step" else "resnet1001", kernels,
                                                    case == "step")
            out = {f"{k}_ms": ms for k, ms in _best_ms(fns, rounds, calls).items()}
    finally:
        torch.set_num_threads(threads)
    out["ratio"] = out["fused_ms"] / out["stock_ms"]
    return out


def per_launch_us(step: dict) -> dict:
    """The roofline's host constants from a measured resnet164 step: {"aten": us, "triton": us}."""
    from .count import count_model
    counts = {k: count_model("resnet164", 10, kernels=k, batch=2, image=8, amp_dtype=None).totals()
              for k in ("stock", "fused")}
    aten_us = step["stock_ms"] * 1e3 / counts["stock"]["aten"]
    fused_rest = step["fused_ms"] * 1e3 - counts["fused"]["aten"] * aten_us
    return {"aten": aten_us, "triton": max(fused_rest, 0.0) / max(counts["fused"]["triton"], 1),
            "counts": {k: {"aten": v["aten"], "triton": v["triton"]} for k, v in counts.items()}}


def machine() -> str:
    return (f"{platform.machine()} CPU, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(prog="python -m fastpreact.cost.host", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="best of this many rounds (default 5)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    results = {case: measure(case, args.rounds) for case in CASES}
    print(f"host time, Triton launches stubbed ({machine()}, one thread, best of {args.rounds}):")
    print("| case | stock ms | fused ms | fused / stock |\n|---|---|---|---|")
    for case, r in results.items():
        print(f"| {case} | {r['stock_ms']:.3g} | {r['fused_ms']:.3g} | {r['ratio']:.2f} |")
    consts = per_launch_us(results["step"])
    print(f"per launch: aten {consts['aten']:.1f} us, Triton (the library's Python around it) "
          f"{consts['triton']:.1f} us; launches per resnet164 step: {consts['counts']}")
    return 0


if __name__ == "__main__":
    from ..functional import backends
    backends.interpret()  # before triton is imported; the kernels never run
    raise SystemExit(main())
