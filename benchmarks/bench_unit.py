"""Unit suite: one pre-activation bottleneck per stage shape, forward + backward, fused vs stock vs compile.

For each stage of ResNet-200 (ImageNet, batch 64, 224 px) and ResNet-1001 (CIFAR, batch 128, 32 px)
the stage's second unit (identity shortcut, the common case; the first where a stage has one unit) is
taken from fastpreact.models.create_model(..., kernels="stock" | "fused"), with the same weights in
both, and timed for forward + backward (gradients of the input and of every parameter) under bf16
autocast, channels-last. compile is torch.compile of the stock unit. On a CPU: resnet11 (one bottleneck
per stage) at batch 2, 8 px, fp32, the fused path through the interpreter, no compile rows.

Models are built on the meta device (cheap, even for ResNet-200) and only the benchmarked unit is
materialised on the benchmark device.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from benchmarks import _bench as B

if B.FULL:
    NETS = {"resnet200": dict(batch=64, image=224, num_classes=1000),
            "resnet1001": dict(batch=128, image=32, num_classes=10)}
else:
    NETS = {"resnet11": dict(batch=2, image=8, num_classes=10)}
KERNELS = ("stock", "fused", "compile")
STAGES = {"resnet200": 4, "resnet1001": 3, "resnet11": 3}


def _meta_model(arch, kernels):
    from fastpreact.models import create_model
    with torch.device("meta"):
        return create_model(arch, NETS[arch]["num_classes"], kernels=kernels)


def _pick_units(arch):
    """[(unit name, input shape)] of one unit per stage, read off the stock model on the meta device."""
    model = _meta_model(arch, "stock")
    picks = []
    for i, stage in enumerate(model.stages):
        j = 1 if len(stage) > 1 else 0
        picks.append((f"stages.{i}.{j}", stage[j]))
    shapes = {}

    def remember(name):
        def hook(_module, inputs):
            shapes.setdefault(name, tuple(inputs[0].shape))  # returns None: the inputs stay as they are
        return hook

    handles = [u.register_forward_pre_hook(remember(name)) for name, u in picks]
    cfg = NETS[arch]
    with torch.no_grad():
        model(torch.empty(cfg["batch"], 3, cfg["image"], cfg["image"], device="meta"))
    for h in handles:
        h.remove()
    return [(name, shapes[name]) for name, _ in picks]


@torch.no_grad()
def _materialise(unit: nn.Module) -> nn.Module:
    """Real storage on the benchmark device for a meta unit, initialised as fastpreact's models are."""
    unit = unit.to_empty(device=B.DEVICE)
    for m in unit.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            m.reset_parameters()
    return unit.to(memory_format=torch.channels_last)


def _cases():
    out = []
    for arch in NETS:
        for stage in range(STAGES[arch]):
            for kernels in KERNELS:
                out.append(pytest.param(arch, stage, kernels, id=f"{arch}-stage{stage + 1}-{kernels}"))
    return out


_UNITS: dict = {}  # (arch, stage) -> stock unit + its input, shared by the three variants


def _stock_unit(arch, stage):
    key = (arch, stage)
    if key not in _UNITS:
        _UNITS.clear()
        B.free_memory()
        name, shape = _pick_units(arch)[stage]
        torch.manual_seed(stage)
        unit = _materialise(copy.deepcopy(_meta_model(arch, "stock").get_submodule(name)))
        x = torch.randn(shape, device=B.DEVICE, dtype=B.AMP_DTYPE or torch.float32)
        _UNITS[key] = dict(name=name, unit=unit, x=x.contiguous(memory_format=torch.channels_last))
    return _UNITS[key]


@pytest.mark.parametrize("arch,stage,kernels", _cases())
def test_unit(benchmark, results, arch, stage, kernels):
    cfg = NETS[arch]
    row = dict(name="unit", net=arch, stage=stage + 1, batch=cfg["batch"], kernels=kernels, dtype=B.DTYPE_NAME)
    if kernels == "compile" and not B.ON_GPU:
        B.unavailable(results, row, "CPU run: no torch.compile rows for units (compiling a unit takes longer "
                                    "than the 5-minute CPU budget allows); measured on a GPU")
    try:
        base = _stock_unit(arch, stage)
    except Exception as exc:
        B.unavailable(results, row, f"cannot build the unit from fastpreact.models: {B.first_line(exc)}")
    stock, x0 = base["unit"], base["x"]
    row.update(unit=base["name"], input="x".join(str(d) for d in x0.shape[1:]))
    try:
        if kernels == "stock":
            module = stock
        elif kernels == "fused":
            module = _materialise(copy.deepcopy(_meta_model(arch, "fused").get_submodule(base["name"])))
            module.load_state_dict(stock.state_dict())
        else:
            torch._dynamo.reset()
            module = torch.compile(stock, dynamic=False)
    except Exception as exc:
        B.unavailable(results, row, f"cannot build the {kernels} unit: {B.first_line(exc)}")
    module.train()
    x = x0.detach().requires_grad_()
    params = [p for p in module.parameters() if p.requires_grad]

    def step():
        with B.autocast():
            y = module(x)
        torch.autograd.grad(y, [x] + params, dy)

    # FLOPs of the unit's convolutions (the GEMM work; elementwise ops are not counted), read off a
    # forward of the stock unit: forward + dgrad + wgrad = 3x the forward's.
    conv_flops: list = []
    hooks = [c.register_forward_hook(lambda c, i, o: conv_flops.append(
        2 * o.numel() * c.in_channels * c.kernel_size[0] * c.kernel_size[1] // c.groups))
        for c in stock.modules() if isinstance(c, nn.Conv2d)]
    with torch.no_grad(), B.autocast():
        y_shape = stock(x0).shape  # the stock unit's: the compiled one would compile a no-grad graph too
    for h in hooks:
        h.remove()
    flops = 3 * sum(conv_flops)
    dy = torch.randn(y_shape, device=B.DEVICE, dtype=x.dtype).contiguous(memory_format=torch.channels_last)
    inner = int(min(20, max(1, math.ceil(3e-3 / (flops / 300e12 + 50e-6))))) if B.FULL else 1

    def target():
        for _ in range(inner):
            step()
        B.sync()

    try:
        for _ in range(B.warmup_steps(kernels)):  # compile / autotune / cuDNN search, outside the peak-memory window
            step()
        B.reset_peak()
        seconds = B.time_call(benchmark, target, inner=inner, warmup=0, rounds_=B.rounds(5, 1))
    except Exception as exc:
        if kernels == "stock":
            raise
        B.unavailable(results, row, f"{kernels} failed: {B.first_line(exc)}")
    row.update(ms=B.sig(seconds * 1e3), img_per_s=B.sig(cfg["batch"] / seconds), tflops=B.sig(flops / seconds / 1e12),
               peak_mem_gb=None if not B.ON_GPU else B.sig(B.peak_gb()), flops=flops,
               **B.pct_of_peak(flops, None, seconds))
    B.record(results, benchmark, row)
