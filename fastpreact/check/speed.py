"""The speed rows of `python -m fastpreact.check` (GPU only): the fused 1x1 op and one fused unit against
stock PyTorch at ResNet-200's 56x56 stage (see the package docstring)."""
from __future__ import annotations

import torch
from torch import nn

from ..models import FusedPreActBottleneck, PreActBottleneck
from ..nn import BNReLUConv1x1, FusedBatchNormReLU2d
from .correctness import channels_last, crash, init_model

__all__ = ["speed_rows"]


def _time_ms(fn, warmup=3, rounds=5, iters=10):
    """Median ms per call over rounds of `iters` calls, after warm-up (tuning, compiling, cuDNN plans)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return sorted(times)[len(times) // 2]


def _speed_row(name, kernel, stock_fn, fused_fn):
    row = dict(check=name, kernel=kernel, dtype="bf16", speed=True)
    try:
        stock_ms, fused_ms = _time_ms(stock_fn), _time_ms(fused_fn)
    except Exception as exc:
        return crash(row, exc)
    ratio = fused_ms / stock_ms
    return dict(row, stock_ms=stock_ms, fused_ms=fused_ms, ratio=ratio, result="faster" if ratio < 1 else "slower")


def speed_rows(device, compile_stock=False):
    """Forward + backward (input and parameter gradients), bf16 autocast, channels-last, cuDNN with
    benchmark=True as in training, at ResNet-200's 56x56 stage (batch 64); yields rows as measured."""
    g = torch.Generator().manual_seed(0)
    x = channels_last(torch.randn(64, 256, 56, 56, generator=g)).to(device, torch.bfloat16).requires_grad_()
    dy = {c: channels_last(torch.randn(64, c, 56, 56, generator=g)).to(device, torch.bfloat16) for c in (64, 256)}

    def step(module, cout):
        def run():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                y = module(x)
            torch.autograd.grad(y, [x, *module.parameters()], dy[cout])
        return run
    saved, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, True
    try:
        op = init_model(BNReLUConv1x1(256, 64), g).to(device, memory_format=torch.channels_last)
        stock_op = nn.Sequential(op.bn, nn.ReLU(inplace=True), op.conv)
        yield _speed_row("1x1 256->64 56x56 b64 fwd+bwd", "bn_relu_conv1x1", step(stock_op, 64), step(op, 64))
        unit = init_model(PreActBottleneck(256, 256), g).to(device, memory_format=torch.channels_last)
        fused = FusedPreActBottleneck(256, 256, norm_layer=FusedBatchNormReLU2d)
        fused = fused.to(device, memory_format=torch.channels_last)
        fused.load_state_dict(unit.state_dict())
        name = "unit 256-64-256 56x56 b64 fwd+bwd"
        yield _speed_row(name, "unit", step(unit, 256), step(fused, 256))
        if compile_stock:
            yield _speed_row("unit vs torch.compile(stock)", "unit", step(torch.compile(unit), 256), step(fused, 256))
    finally:
        torch.backends.cudnn.benchmark = saved
