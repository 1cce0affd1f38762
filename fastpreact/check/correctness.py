"""The correctness checks of `python -m fastpreact.check`: cases, one training step per implementation
(fused, stock, float64 reference) and the oracle that judges them (see the package docstring)."""
from __future__ import annotations

import contextlib
import copy
import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional as Fp
from ..models import FusedPreActBottleneck, PreActBottleneck
from ..nn import BNReLUConv1x1, BNReLUConv1x1Dual, FusedBatchNormReLU2d

__all__ = ["DTYPES", "cases", "check_case", "precision"]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NAMES = {v: k for k, v in DTYPES.items()}
LOW = (torch.float16, torch.bfloat16)
ATOL = {torch.float32: 5e-5, torch.float16: 2 * 2.0 ** -10, torch.bfloat16: 2 * 2.0 ** -7}
UNIT_ATOL = {torch.float32: 5e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}  # on norms (tests' bf16 step: 2e-2)
STAT_ATOL = 1e-5


# --------------------------------------------------------------------------------------------- inputs
def channels_last(t):
    return t.contiguous(memory_format=torch.channels_last)


def _out(n, c, hw, stride):
    return (n, c, (hw - 1) // stride + 1, (hw - 1) // stride + 1)


@torch.no_grad()
def init_model(model, g):
    """Seeded, non-trivial parameters and running statistics."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.copy_(1 + 0.3 * torch.randn(c, generator=g))
            m.bias.copy_(0.5 * torch.randn(c, generator=g))
            m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
            m.running_var.copy_(0.5 + torch.rand(c, generator=g))
        elif isinstance(m, nn.Conv2d):
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * m.weight[0].numel() ** -0.5)
    return model


@torch.no_grad()
def _center(bn, x):
    """Shift bn's beta per channel so that ReLU's threshold lies midway between the two batch-normalised
    values of x nearest to it (as the tests do): no implementation's roundoff can flip a ReLU there."""
    x64 = x.double()
    var, mean = torch.var_mean(x64, dim=(0, 2, 3), unbiased=False)
    scale = (bn.weight.double() * (var + bn.eps).rsqrt())[None, :, None, None]
    z = (x64 - mean[None, :, None, None]) * scale + bn.bias.double()[None, :, None, None]
    below = torch.where(z < 0, z, -math.inf).amax(dim=(0, 2, 3))
    above = torch.where(z >= 0, z, math.inf).amin(dim=(0, 2, 3))
    bn.bias.sub_(torch.where(below.isfinite() & above.isfinite(), (below + above) / 2, 0.0).to(bn.bias.dtype))


def _x(shape, g, dtype, bn=None, shift=0.3):
    """An fp32 channels-last input already on `dtype`'s grid (activations arrive in the compute dtype),
    with bn (the BatchNorm it feeds) centred on it."""
    x = torch.randn(shape, generator=g) * 1.5 + shift
    x = channels_last(x.to(dtype).float() if dtype in LOW else x)
    if bn is not None:
        _center(bn, x)
    return x


# ---------------------------------------------------------------------------------------------- cases
# A builder(dtype, generator) returns a case: the stock model ("fused_model" too where its class differs),
# the stock and fused forwards (model, compute dtype, **inputs) -> {name: tensor}, the inputs (fp32, CPU),
# the gradients of the outputs ("dys"), and "norm" where tensors are judged on norms.
def _case_1x1(shape, cout, stride, extras, dtype, g):
    n, c, hw = shape
    model = init_model(BNReLUConv1x1(c, cout, stride), g)
    inputs = {"x": _x((n, c, hw, hw), g, dtype, model.bn)}
    if extras:
        inputs["residual"] = _x(_out(n, cout, hw, stride), g, dtype, shift=0.0)

    def stock(m, dt, x, residual=None):
        y = m.conv(F.relu(m.bn(x)))
        return {"y": y if residual is None else y + residual}

    def fused(m, dt, x, residual=None):
        if not extras:
            return {"y": m(x)}
        y, stats = Fp.bn_relu_conv1x1(x, m.conv.weight, **Fp.bn_args(m.bn), stride=stride, residual=residual,
                                      output_stats=True)
        return {"y": y, "mean(y)": stats[0], "var(y)": stats[1]}  # (mean, biased var, ...) of y as stored
    return dict(model=model, stock=stock, fused=fused, inputs=inputs,
                dys={"y": torch.randn(_out(n, cout, hw, stride), generator=g)})


def _case_dual(shape, ca, cb, dtype, g):
    n, c, hw = shape
    model = init_model(BNReLUConv1x1Dual(c, ca, cb), g)

    def stock(m, dt, x):
        a = F.relu(m.bn(x))
        return {"y_a": m.conv_a(a), "y_b": m.conv_b(a)}
    return dict(model=model, stock=stock, fused=lambda m, dt, x: dict(zip(("y_a", "y_b"), m(x))),
                inputs={"x": _x((n, c, hw, hw), g, dtype, model.bn)},
                dys={k: torch.randn(_out(n, co, hw, 1), generator=g) for k, co in (("y_a", ca), ("y_b", cb))})


def _case_3x3(shape, cout, dtype, g):
    n, c, hw = shape
    model = nn.ModuleDict(dict(bn=nn.BatchNorm2d(c), conv=nn.Conv2d(c, cout, 3, padding=1, bias=False)))
    init_model(model, g)
    return dict(model=model, inputs={"x": _x((n, c, hw, hw), g, dtype, model.bn)},
                dys={"y": torch.randn(_out(n, cout, hw, 1), generator=g)},
                stock=lambda m, dt, x: {"y": m.conv(F.relu(m.bn(x)))},
                fused=lambda m, dt, x: {"y": Fp.bn_relu_conv2d(x, m.bn, m.conv)})


def _case_stats(shape, dtype, g):
    n, c, hw = shape

    def stock(m, dt, x):  # fp32 (float64 for ref64) statistics of the same values
        var, mean = torch.var_mean(x.detach(), dim=(0, 2, 3), unbiased=False)
        return {"mean": mean, "var": var}
    return dict(model=nn.Module(), stock=stock, dys={},
                fused=lambda m, dt, x: dict(zip(("mean", "var"), Fp.batch_stats(x.detach().to(dt)))),
                inputs={"x": _x((n, c, hw, hw), g, dtype, shift=100.0)})  # mean 100: cancellation


def _case_unit(shape, cout, stride, dtype, g):
    n, c, hw = shape
    model = init_model(PreActBottleneck(c, cout, stride), g)
    inputs = {"x": _x((n, c, hw, hw), g, dtype, model.norm1)}
    # fp32: norm2 and norm3 centred on their float64 inputs too, so that no ReLU flips and fp32 is judged
    # strictly. fp16/bf16: their roundoff flips ReLUs in stock and fused alike (the tests' bf16 regime).
    if dtype is torch.float32:
        with torch.no_grad():
            m64 = copy.deepcopy(model).double()
            h1 = m64.conv1(m64.norm1(inputs["x"].double()))
            _center(model.norm2, h1)
            m64.norm2.bias.copy_(model.norm2.bias)
            _center(model.norm3, m64.conv2(m64.norm2(h1)))
    fused_model = FusedPreActBottleneck(c, cout, stride, norm_layer=FusedBatchNormReLU2d)
    fused_model.load_state_dict(model.state_dict())

    def fused(m, dt, x):
        y, stats = m.forward_with_stats(x)
        return {"y": y, "mean(y)": stats[0], "var(y)": stats[1]}
    return dict(model=model, fused_model=fused_model, stock=lambda m, dt, x: {"y": m(x)}, fused=fused,
                inputs=inputs, dys={"y": torch.randn(_out(n, cout, hw, stride), generator=g)}, norm=True)


def cases(big: bool):
    """[(check name, kernel, builder)]: small odd shapes (C=72 at 13x13 on a GPU) and ResNet-200 channel
    counts (the 256-64-256 unit, a 1024->256 conv1), both scaled down for the interpreter."""
    n, c, hw, co = (8, 72, 13, 40) if big else (3, 24, 7, 20)  # interpreter: M = 147 > one dW split
    rn, rc, rhw, rmid, deep, dhw = (8, 256, 14, 64, 1024, 14) if big else (2, 64, 6, 16, 128, 4)
    odd, r200 = (n, c, hw), (rn, rmid, rhw)
    return [
        (f"1x1 s1 {c}->{co} {hw}x{hw}", "bn_relu_conv1x1", partial(_case_1x1, odd, co, 1, False)),
        (f"1x1 s2 {c}->{co} {hw}x{hw}", "bn_relu_conv1x1", partial(_case_1x1, odd, co, 2, False)),
        (f"1x1 s1 {deep}->{deep // 4} {dhw}x{dhw}", "bn_relu_conv1x1",
         partial(_case_1x1, (rn, deep, dhw), deep // 4, 1, False)),
        (f"1x1 +res +stats {rmid}->{rc} {rhw}x{rhw}", "bn_relu_conv1x1", partial(_case_1x1, r200, rc, 1, True)),
        (f"dual {rmid}->{rmid}|{rc} {rhw}x{rhw}", "bn_relu_conv1x1_dual", partial(_case_dual, r200, rmid, rc)),
        (f"bn-relu-3x3 {c}->{co} {hw}x{hw}", "bn_relu_conv2d", partial(_case_3x3, odd, co)),
        (f"batch stats {c}ch {hw}x{hw} mean 100", "batch_stats", partial(_case_stats, odd)),
        (f"unit {rc}-{rmid}-{rc} {rhw}x{rhw}", "unit", partial(_case_unit, (rn, rc, rhw), rc, 1)),
        (f"unit {c}-{c // 2}-{2 * c} s2 {hw}x{hw}", "unit", partial(_case_unit, odd, 2 * c, 2)),
    ]


# ------------------------------------------------------------------------------------ running, judging
def _step(case, impl, dtype, device):
    """One training step of `impl` ('fused', 'stock' at dtype, or 'ref64': the stock forward in float64):
    {name: tensor} of the outputs, the input and parameter gradients (d<name>) and the buffers after it."""
    ref = impl == "ref64"
    wide = torch.float64 if ref else torch.float32
    model = copy.deepcopy(case.get("fused_model", case["model"]) if impl == "fused" else case["model"])
    model = model.to(device=device, dtype=wide, memory_format=torch.channels_last).train()
    leaves = {k: channels_last(t.to(device, wide, copy=True)).requires_grad_()  # fresh leaves every run
              for k, t in case["inputs"].items()}
    with torch.autocast(device.type, dtype=dtype, enabled=not ref and dtype in LOW):
        got = case["fused" if impl == "fused" else "stock"](model, torch.float64 if ref else dtype, **leaves)
    pairs = [(got[k], dy.to(device, got[k].dtype)) for k, dy in case["dys"].items()]
    if pairs:
        torch.autograd.backward([o for o, _ in pairs], [d for _, d in pairs])
    got.update({f"d{k}": v.grad for k, v in leaves.items()})
    got.update({f"d{k}": p.grad for k, p in model.named_parameters()})
    got.update(dict(model.named_buffers()))
    return got


def _error(ours, stock, ref, atol, norm, k=2.0):
    """(err, allowed) of one tensor at its worst element, or on relative norms (norm=True), allowed being
    k |stock - ref| + atol (scaled); integers (num_batches_tracked) must be equal."""
    if ours is None or tuple(ours.shape) != tuple(ref.shape):
        return math.inf, 0.0
    exact = not ref.is_floating_point()
    ours, stock, ref = (t.detach().double() for t in (ours, stock, ref))
    if not torch.isfinite(ours).all():
        return math.inf, 0.0
    if exact:
        return (ours - ref).abs().max().item(), 0.0
    if norm:
        size = max(ref.norm().item(), 1e-30)
        return (ours - ref).norm().item() / size, k * (stock - ref).norm().item() / size + atol
    err = (ours - ref).abs().flatten()
    bound = (k * (stock - ref).abs() + atol * max(ref.abs().max().item(), 1.0)).flatten()
    worst = (err - bound).argmax()
    return err[worst].item(), bound[worst].item()


def _tensor_errors(fused, stock, ref, dtype, norm, loose=1.0):
    """{tensor: (err, allowed)}; statistics a kernel emits for its own output ('mean(y)') are judged
    against that output's float64 statistics (its fp32 statistics standing for stock). loose scales
    the bounds of low-precision tensors (see check_case)."""
    out = {}
    for name, r in ref.items():
        if r is not None:
            tight = name in ("mean", "var") or name.endswith(("running_mean", "running_var"))
            atol = UNIT_ATOL[dtype] if norm else STAT_ATOL if tight else ATOL[dtype]
            scale = 1.0 if tight and not norm else loose
            out[name] = _error(fused.get(name), stock[name], r, atol * scale, norm, 2.0 * scale)
    for name in [k for k in fused if k not in ref and k.startswith(("mean(", "var("))]:
        y = fused[name[name.index("(") + 1:-1]].detach()
        (v64, m64), (v32, m32) = (torch.var_mean(y.to(t), dim=(0, 2, 3), unbiased=False)
                                  for t in (torch.float64, torch.float32))
        mean = name.startswith("mean")
        out[name] = _error(fused[name], m32 if mean else v32, m64 if mean else v64, STAT_ATOL, False)
    return out


def _ratio(err, allowed):
    return err / allowed if allowed > 0 else (0.0 if err == 0 else math.inf)


def crash(row, exc):
    return dict(row, result="ERROR", error=f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}")


def interpreter_loose(dtype, device):
    """2 for bf16 in Triton's CPU interpreter, else 1. The interpreter (numpy, which has no bf16) converts
    fp32 to bf16 by truncation, not by rounding to nearest as a GPU and PyTorch do: up to one ulp of error
    per rounding instead of half, so there the bf16 bounds (factor on stock's error, atol) are doubled."""
    return 2.0 if device.type == "cpu" and dtype is torch.bfloat16 else 1.0


def check_case(name, kernel, build, dtype, device):
    """One row: the case's worst tensor (highest err / allowed), its error and what was allowed there."""
    row = dict(check=name, kernel=kernel, dtype=NAMES[dtype])
    try:
        case = build(dtype, torch.Generator().manual_seed(sum(map(ord, name))))
        results = [_step(case, impl, dtype, device) for impl in ("fused", "stock", "ref64")]
        errors = _tensor_errors(*results, dtype, case.get("norm", False), interpreter_loose(dtype, device))
    except Exception as exc:  # a crash is a wrong result, reported as such
        return crash(row, exc)
    worst = max(errors, key=lambda k: _ratio(*errors[k]))
    bad = sorted(k for k, e in errors.items() if _ratio(*e) > 1)
    err, allowed = errors[worst]
    return dict(row, worst=worst, max_err=err if math.isfinite(err) else None, allowed=allowed,  # JSON: no inf
                tensors=len(errors), failed=bad, judged="norm" if case.get("norm") else "elementwise",
                result="FAIL" if bad else "ok")


@contextlib.contextmanager
def precision(dtype):
    """TF32 off for fp32 (stock convs and matmuls, and the fused op, which follows cudnn.allow_tf32)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    if dtype is torch.float32:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
