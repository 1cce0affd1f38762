"""Op suite: BatchNorm(train) + ReLU + 1x1 conv, forward / backward / both, fused vs stock vs compile.

Shapes: every distinct 1x1 convolution of ResNet-200 (ImageNet, batch 64, 224 px) and ResNet-1001
(CIFAR, batch 128, 32 px), read off the models themselves (forward hooks on the meta device; an
analytic list when fastpreact.models cannot be built), with how often each occurs in the net ("count",
used to weight the net-level speedup). On a CPU, three representative shapes per net, scaled down.

Variants, on the same modules and inputs in the same run:
  stock    nn.BatchNorm2d -> nn.ReLU(inplace) -> nn.Conv2d, channels-last, under bf16 autocast (GPU)
  fused    fastpreact.BNReLUConv1x1 on the same modules (the Triton kernels)
  compile  torch.compile(stock, dynamic=False)

Passes: forward (with autograd recording, as in training), backward (dx and the three parameter
gradients of a forward done in the untimed setup), both.

FLOPs and bytes per call are counted analytically and are the same for every variant:
  FLOPs: the useful GEMMs only, 2*Mo*Cin*Cout per GEMM (forward 1, backward 2: dgrad + wgrad),
         Mo = N*Ho*Wo (the fused backward's two-pass path computes dz twice: 3 GEMMs, not counted).
  bytes: the traffic of the fused kernels, each tensor once per pass: forward reads x and W and writes y;
         backward (two passes, kernels/bn_relu_conv1x1/backward.py) reads x at the sampled rows and dy
         in its first pass, dy and x again in its second, writes dx, reads W and writes dW:
         e(Mo*Cin + 2*M*Cin + 2*Mo*Cout) + 2 Cin*Cout*e, M = N*H*W, i.e. e(3MK + 2MN + 2NK) at stride 1.
         So GB/s is effective bandwidth against the fused path's own traffic (the stock path moves more),
         not a hardware counter.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from benchmarks import _bench as B

NETS = {  # the nets whose shapes are benchmarked, at the batch and image size of the training recipes
    "resnet200": dict(batch=64, image=224, num_classes=1000, tiny_div=8),
    "resnet1001": dict(batch=128, image=32, num_classes=10, tiny_div=4),
}
PASSES = ("forward", "backward", "both")
KERNELS = ("stock", "fused", "compile")
TINY_BATCH = 2


def _analytic_shapes(arch):
    """The 1x1 convs of fastpreact's pre-act bottleneck nets, as fastpreact/models builds them."""
    if arch == "resnet200":
        family, layers, widths, size = "imagenet", (3, 24, 36, 3), (64, 128, 256, 512), 56
    elif arch == "resnet1001":
        family, layers, widths, size = "cifar", (111, 111, 111), (16, 32, 64), 32
    else:
        raise ValueError(f"no analytic 1x1 shapes for {arch}")
    shapes = []
    cin, h = widths[0], size
    for i, (n, w) in enumerate(zip(layers, widths)):
        for j in range(n):
            stride = 2 if i > 0 and j == 0 else 1
            s1 = stride if family == "cifar" else 1  # CIFAR: stride on the first 1x1; ImageNet: on the 3x3
            shapes.append((cin, h, h, w, s1))
            h_out = (h - 1) // stride + 1
            shapes.append((w, h_out, h_out, 4 * w, 1))
            if stride != 1 or cin != 4 * w:
                shapes.append((cin, h, h, 4 * w, stride))
            cin, h = 4 * w, h_out
    return shapes


def _model_shapes(arch, num_classes, batch, image):
    from fastpreact.models import create_model
    with torch.device("meta"):
        model = create_model(arch, num_classes)
    seen = []

    def hook(conv, inputs, _out):
        x = inputs[0]
        seen.append((x.shape[1], x.shape[2], x.shape[3], conv.out_channels, conv.stride[0]))

    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1):
            m.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.empty(batch, 3, image, image, device="meta"))
    return seen


def conv1x1_shapes(arch):
    """[(dict(n, cin, h, w, cout, stride), count)] of the distinct 1x1 convs of `arch`, in order."""
    cfg = NETS[arch]
    try:
        raw, source = _model_shapes(arch, cfg["num_classes"], cfg["batch"], cfg["image"]), "model"
    except Exception:  # the models package cannot build or run on meta: use the architecture's definition
        raw, source = _analytic_shapes(arch), "analytic"
    counts: dict = {}
    for s in raw:
        counts[s] = counts.get(s, 0) + 1
    out = [(dict(n=cfg["batch"], cin=c, h=h, w=w, cout=co, stride=s, source=source), k)
           for (c, h, w, co, s), k in counts.items()]
    if B.FULL:
        return out
    # CPU: a reducing, an expanding and a strided shape, channels and sides divided to interpreter size.
    picks, wanted = [], [lambda d: d["stride"] == 1 and d["cout"] > d["cin"],
                         lambda d: d["stride"] == 1 and d["cout"] < d["cin"],
                         lambda d: d["stride"] == 2]
    for want in wanted:
        for d, k in out:
            if want(d) and (d, k) not in picks:
                picks.append((d, k))
                break
    div = cfg["tiny_div"]
    return [(dict(d, n=TINY_BATCH, cin=max(8, d["cin"] // div), cout=max(8, d["cout"] // div),
                  h=max(4, d["h"] // div), w=max(4, d["w"] // div)), k) for d, k in picks]


def _cases():
    cases = []
    for arch in NETS:
        for idx, (shape, count) in enumerate(conv1x1_shapes(arch)):
            sid = f"{arch}-{shape['cin']}to{shape['cout']}-{shape['h']}px-s{shape['stride']}"
            for pass_ in PASSES:
                for kernels in KERNELS:
                    cases.append(pytest.param(arch, idx, shape, count, pass_, kernels,
                                              id=f"{sid}-{pass_}-{kernels}"))
    return cases


def flops_and_bytes(shape, pass_, elem_bytes):
    n, cin, h, w, cout, s = (shape[k] for k in ("n", "cin", "h", "w", "cout", "stride"))
    ho, wo = (h - 1) // s + 1, (w - 1) // s + 1
    m, mo = n * h * w, n * ho * wo
    gemm = 2 * mo * cin * cout
    weights = cin * cout * elem_bytes
    fwd = (gemm, (m * cin + mo * cout) * elem_bytes + weights)
    bwd = (2 * gemm, (mo * cin + 2 * m * cin + 2 * mo * cout) * elem_bytes + 2 * weights)
    if pass_ == "forward":
        return fwd
    if pass_ == "backward":
        return bwd
    return fwd[0] + bwd[0], fwd[1] + bwd[1]


_VARIANTS: dict = {}  # (arch, idx, kernels) -> variant; holds only the current shape's variants


def _variant(arch, idx, shape, kernels):
    key = (arch, idx, kernels)
    if key in _VARIANTS:
        return _VARIANTS[key]
    stale = [k for k in _VARIANTS if k[:2] != (arch, idx)]
    for k in stale:
        del _VARIANTS[k]
    if stale and B.ON_GPU:
        B.free_memory()
    base = _VARIANTS.get((arch, idx, "modules"))
    if base is None:
        torch.manual_seed(idx)
        bn = nn.BatchNorm2d(shape["cin"])
        conv = nn.Conv2d(shape["cin"], shape["cout"], 1, stride=shape["stride"], bias=False)
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        bn, conv = bn.to(B.DEVICE), conv.to(B.DEVICE, memory_format=torch.channels_last)
        act_dtype = B.AMP_DTYPE or torch.float32
        x = torch.randn(shape["n"], shape["cin"], shape["h"], shape["w"], device=B.DEVICE, dtype=act_dtype)
        x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
        ho, wo = (shape["h"] - 1) // shape["stride"] + 1, (shape["w"] - 1) // shape["stride"] + 1
        dy = torch.randn(shape["n"], shape["cout"], ho, wo, device=B.DEVICE, dtype=act_dtype)
        dy = dy.contiguous(memory_format=torch.channels_last)
        stock = nn.Sequential(bn, nn.ReLU(inplace=True), conv)
        base = _VARIANTS[(arch, idx, "modules")] = dict(bn=bn, conv=conv, x=x, dy=dy, stock=stock)
    if kernels == "stock":
        module = base["stock"]
    elif kernels == "fused":
        from fastpreact import BNReLUConv1x1
        module = BNReLUConv1x1.from_modules(base["bn"], base["conv"])
    else:
        torch._dynamo.reset()  # a fresh cache per shape: no recompile limit, no dynamic-shape fallback
        module = torch.compile(base["stock"], dynamic=False)
    inputs = [base["x"], base["bn"].weight, base["bn"].bias, base["conv"].weight]
    v = _VARIANTS[key] = dict(module=module, inputs=inputs, x=base["x"], dy=base["dy"])
    return v


@pytest.mark.parametrize("arch,idx,shape,count,pass_,kernels", _cases())
def test_op(benchmark, results, arch, idx, shape, count, pass_, kernels):
    from fastpreact import functional
    row = dict(name="op", net=arch, batch=shape["n"], cin=shape["cin"], cout=shape["cout"], h=shape["h"],
               w=shape["w"], stride=shape["stride"], count=count, kernels=kernels, dtype=B.DTYPE_NAME,
               **{"pass": pass_})
    if kernels == "compile" and not B.ON_GPU and idx != 0:
        B.unavailable(results, row, "CPU run: torch.compile rows only for the first shape of each net "
                                    "(compiling takes ~20 s per graph on a CPU; the CPU run must stay under 5 min)")
    try:
        v = _variant(arch, idx, shape, kernels)
    except Exception as exc:  # e.g. fastpreact or torch.compile unavailable on this machine
        B.unavailable(results, row, f"cannot build the {kernels} variant: {B.first_line(exc)}")
    module, inputs, x, dy = v["module"], v["inputs"], v["x"], v["dy"]

    def forward():
        with B.autocast():
            return module(x)

    def backward_of(y):
        torch.autograd.grad(y, inputs, dy)

    elem = (B.AMP_DTYPE or torch.float32).itemsize
    flops, nbytes = flops_and_bytes(shape, pass_, elem)
    if B.FULL:  # enough calls per round that launch and sync overheads do not dominate small shapes
        est = max(flops / 400e12, nbytes / 1.5e12, 20e-6)
        inner = int(min(50, max(2, math.ceil(2e-3 / est))))
    else:
        inner = 1

    if pass_ == "forward":
        def target():
            for _ in range(inner):
                forward()
            B.sync()
        setup = None
    elif pass_ == "backward":
        def setup():
            ys = [forward() for _ in range(inner)]
            B.sync()
            return (ys,), {}

        def target(ys):
            for y in ys:
                backward_of(y)
            B.sync()
    else:
        def target():
            for _ in range(inner):
                backward_of(forward())
            B.sync()
        setup = None

    try:
        seconds = B.time_call(benchmark, target, setup=setup, inner=inner)
    except Exception as exc:
        if kernels == "stock":
            raise
        B.unavailable(results, row, f"{kernels} failed: {B.first_line(exc)}")
    row.update(ms=B.sig(seconds * 1e3), tflops=B.sig(flops / seconds / 1e12),
               gbps=B.sig(nbytes / seconds / 1e9), flops=flops, bytes=nbytes,
               backend=functional.backend(B.DEVICE) if kernels == "fused" else "torch",
               **B.pct_of_peak(flops, nbytes, seconds))
    B.record(results, benchmark, row)
