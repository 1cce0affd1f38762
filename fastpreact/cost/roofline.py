"""The roofline: a counted step (count.py's StepCost) turned into a predicted step time on a card. A
MODEL, not a measurement.
"""
from __future__ import annotations

from .launches import MATMUL_CLASSES, StepCost

__all__ = ["CARDS", "CARD_PEAKS", "HOST_US", "predict"]

# ---------------------------------------------------------------------------------------------------
# The constants of the roofline, in one place.
# Cards: bf16 dense matmul FLOP/s and device-to-device copy bandwidth (bytes/s). H200 (measured on an
# H200): an 8192^3 bf16 matmul on random data ran at 769-798 TFLOP/s and a large device-to-device copy
# moved about 4.3 TB/s (read + written). H100 (not measured on an H100): the same chip's matmul rate,
# and about 90% of its 3.35 TB/s datasheet bandwidth, the fraction a copy reaches on the H200.
# benchmarks/_bench.py reads CARD_PEAKS from here.
# Host: microseconds the host spends per launch in an eager step, MEASURED with every Triton launch
# stubbed (python -m fastpreact.cost.host, its resnet164 step case) on an x86-64 CPU (2 cores, Python
# 3.11, torch 2.14.1, one thread): a stock step's time over its aten launches, then the fused step's
# remaining time over its Triton launches (everything the library's Python does around them: the
# autograd nodes, argument checks, allocations, the tile lookup). Not included, for stock and fused
# alike: the CUDA driver's launch and triton's launcher below its Python entry. A faster host scales
# both; change them here, or pass host_us= to predict().
# ---------------------------------------------------------------------------------------------------
CARDS = {
    "h100": {"matmul_flops": 800e12, "copy_bytes_per_s": 3.0e12,
             "source": "not measured: the H200's matmul rate (same chip), 90% of the datasheet bandwidth"},
    "h200": {"matmul_flops": 790e12, "copy_bytes_per_s": 4.3e12, "source": "measured on an H200"},
}
CARD_PEAKS = {name: (c["matmul_flops"], c["copy_bytes_per_s"]) for name, c in CARDS.items()}
HOST_US = {"aten": 29.5, "triton": 52.4}  # measured host cost per launch, microseconds (see above)


def predict(cost: StepCost, card: str, host_us: dict | None = None) -> dict:
    """Predicted step time (ms) on `card` (a key of CARDS): a MODEL, not a measurement.

    GPU time per op class: max(FLOPs / matmul rate, bytes / copy bandwidth) for the GEMM and convolution
    classes (MATMUL_CLASSES, at the card's bf16 matmul rate), bytes / copy bandwidth for the others
    (bandwidth-bound). Host time: launches times HOST_US (aten and Triton separately; measured on a CPU).
    The host is an overlapped pipeline (it enqueues while the GPU runs), so the step takes
    max(GPU time, host time). Returns {"gpu_ms": {class: ms}, "gpu_total_ms", "host_ms", "step_ms",
    "bound": "GPU" | "host"}.
    """
    if card not in CARDS:
        raise ValueError(f"predict: unknown card {card!r}; known: {', '.join(CARDS)} (add it to "
                         "fastpreact.cost.CARDS)")
    host_us = dict(HOST_US, **(host_us or {}))
    rate, bw = CARDS[card]["matmul_flops"], CARDS[card]["copy_bytes_per_s"]
    per_class, host_s = {}, 0.0
    for cls, d in cost.by_class().items():
        seconds = d["bytes"] / bw
        if cls in MATMUL_CLASSES:
            seconds = max(seconds, d["flops"] / rate)
        per_class[cls] = seconds * 1e3
        host_s += (d["aten"] * host_us["aten"] + d["triton"] * host_us["triton"]) * 1e-6
    gpu_ms, host_ms = sum(per_class.values()), host_s * 1e3
    return {"gpu_ms": per_class, "gpu_total_ms": gpu_ms, "host_ms": host_ms, "step_ms": max(gpu_ms, host_ms),
            "bound": "GPU" if gpu_ms >= host_ms else "host"}
