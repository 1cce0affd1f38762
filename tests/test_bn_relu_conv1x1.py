"""The fused BN -> ReLU -> 1x1 conv (fastpreact.functional / kernels/bn_relu_conv1x1.py) against
fastpreact.reference (BatchNorm2d -> ReLU -> Conv2d) computed in float64.

On a CPU the Triton kernels run through TRITON_INTERPRET=1 (tests/conftest.py). Every kernel output
starts as NaN (FASTPREACT_POISON=1), so an element a kernel never writes fails. fp32 results must match
float64 closely; low precision uses flash-attention's oracle, relative to PyTorch's own error at that
precision: |ours - ref64| <= 2 * |torch_lowp - ref64| + atol.
"""
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import fastpreact
from fastpreact import functional as Fp
from fastpreact import reference
from oracle import assert_close64, assert_oracle

CUDA = torch.cuda.is_available()


# Tests that call the kernels on CPU tensors need the interpreter (on a GPU machine the gpu tests run them).
requires_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                          reason="needs TRITON_INTERPRET=1 (the kernels on CPU tensors)")


pytestmark = pytest.mark.usefixtures("poison_outputs")


# ---------------------------------------------------------------------------------------------------
# Harness
# ---------------------------------------------------------------------------------------------------
def _make_inputs(n, c, h, w, cout, stride, *, bias, residual, device="cpu", seed=0, x_offset=0.3):
    g = torch.Generator().manual_seed(seed)
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1

    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(device)

    return dict(
        x=r(n, c, h, w, scale=1.5, shift=x_offset).contiguous(memory_format=torch.channels_last),
        w=r(cout, c, 1, 1, scale=c ** -0.5),
        gamma=r(c, scale=0.3, shift=1.0),
        beta=r(c, scale=0.5),
        rm=r(c, scale=0.2),
        rv=r(c).abs() + 0.5,
        cb=r(cout) if bias else None,
        res=r(n, cout, ho, wo).contiguous(memory_format=torch.channels_last) if residual else None,
        dy=r(n, cout, ho, wo),
    )


_GRAD_NAMES = ("x", "w", "gamma", "beta", "cb", "res")


def _run(inp, *, impl, training, stride, dtype, momentum=0.1, out_stats=False):
    """One forward + backward. impl: 'ours', 'ref64' (float64 reference) or 'torch_lowp' (reference in
    `dtype` through autocast, like stock PyTorch). Returns (y, grads dict, running stats, output stats)."""
    cast = torch.float64 if impl == "ref64" else torch.float32
    leaves = {k: inp[k].detach().to(cast).requires_grad_() for k in _GRAD_NAMES if inp[k] is not None}
    rm, rv = inp["rm"].clone().to(cast), inp["rv"].clone().to(cast)
    nbt = torch.tensor(0, dtype=torch.long, device=rm.device)
    dev = inp["x"].device.type
    autocast = impl != "ref64" and dtype != torch.float32
    with torch.autocast(dev, dtype=dtype, enabled=autocast):
        if impl == "ours":
            out = Fp.bn_relu_conv1x1(leaves["x"], leaves["w"], leaves["gamma"], leaves["beta"], rm, rv,
                                     num_batches_tracked=nbt, training=training, momentum=momentum,
                                     stride=stride, conv_bias=leaves.get("cb"), residual=leaves.get("res"),
                                     output_stats=out_stats)
            y, stats = out if out_stats else (out, None)
        else:
            y = reference.bn_relu_conv1x1(leaves["x"], leaves["w"], leaves["gamma"], leaves["beta"], rm, rv,
                                          training=training, momentum=momentum, stride=stride,
                                          conv_bias=leaves.get("cb"), residual=leaves.get("res"))
            nbt += int(training)
            stats = None
    y.backward(inp["dy"].to(y.dtype))
    return y, {k: v.grad for k, v in leaves.items()}, (rm, rv, nbt), stats


def _assert_oracle(name, ours, ref64, lowp=None, rtol=2e-5, dtype=torch.float16):
    """fp32: close to ref64; low precision: relative to stock PyTorch's error at that precision, with
    two units of roundoff at the tensor's scale as atol (where PyTorch's own error happens to vanish,
    ours may still be one rounding away)."""
    if lowp is None:
        assert_close64(name, ours, ref64, rtol)
    else:
        assert_oracle(ours, lowp, ref64, name, 2 * torch.finfo(dtype).eps, min_scale=1.0)


def _center_relu_crossings(inp, training, eps=1e-5):
    """Shift beta per channel so that ReLU's threshold lies midway between the two pre-activations
    z = (x - mean) * gamma * rstd + beta nearest to it (float64 statistics of the rounded x).

    x is on the low-precision grid, so equal values share one z: were a z within fp32 roundoff
    (~1e-7) of 0, ours and the fp32-statistics reference could take the other side of the ReLU there
    than float64 does, and dx, dgamma, dbeta would differ by a whole da at every row holding that value
    (at ResNet sizes, hundreds of rows; likely somewhere among thousands of channels). Centring keeps
    every |z| at half a grid gap (>> 1e-7) without changing x or its statistics."""
    x64 = inp["x"].double()
    if training:
        mean, var = x64.mean(dim=(0, 2, 3)), x64.var(dim=(0, 2, 3), unbiased=False)
    else:
        mean, var = inp["rm"].double(), inp["rv"].double()
    scale = inp["gamma"].double() * (var + eps).rsqrt()
    z = (x64 - mean[None, :, None, None]) * scale[None, :, None, None] + inp["beta"].double()[None, :, None, None]
    below = torch.where(z < 0, z, -torch.inf).amax(dim=(0, 2, 3))
    above = torch.where(z >= 0, z, torch.inf).amin(dim=(0, 2, 3))
    shift = torch.where(below.isfinite() & above.isfinite(), (below + above) / 2, 0.0)
    inp["beta"] = (inp["beta"].double() - shift).to(inp["beta"].dtype)


def _compare(n, c, h, w, cout, stride, training, dtype, extras, seed=0, device="cpu", x_offset=0.3):
    """Ours vs float64 reference: fp32 within a small rtol of each tensor's scale, low precision relative
    to stock PyTorch's own error at that precision."""
    bias = residual = out_stats = extras
    inp = _make_inputs(n, c, h, w, cout, stride, bias=bias, residual=residual, device=device, seed=seed,
                       x_offset=x_offset)
    if dtype != torch.float32:
        # Activations arrive in the low precision (the previous layer's output): all three computations
        # see the same values, so the ReLU masks agree and only the arithmetic's precision differs.
        for k in ("x", "res"):
            if inp[k] is not None:
                inp[k] = inp[k].to(dtype).float()
        _center_relu_crossings(inp, training)
    y, grads, (rm, rv, nbt), stats = _run(inp, impl="ours", training=training, stride=stride, dtype=dtype,
                                          out_stats=out_stats)
    y64, grads64, (rm64, rv64, nbt64), _ = _run(inp, impl="ref64", training=training, stride=stride,
                                                 dtype=dtype)
    relative = dtype != torch.float32
    if relative:
        ylp, gradslp, _, _ = _run(inp, impl="torch_lowp", training=training, stride=stride, dtype=dtype)
    assert y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last)
    _assert_oracle("y", y, y64, ylp if relative else None, dtype=dtype)
    for k in grads64:
        lowp = gradslp[k] if relative else None
        _assert_oracle(f"d{k}", grads[k], grads64[k], lowp, rtol=5e-5, dtype=dtype)
    # Running statistics: fp32 batch statistics of the compute-dtype x (fp16 rounding of x is ~5e-4).
    stat_tol = 2e-6 if dtype == torch.float32 else 3e-3
    assert (rm.double() - rm64).abs().max() <= stat_tol * max(1.0, rm64.abs().max().item())
    assert (rv.double() - rv64).abs().max() <= stat_tol * max(1.0, rv64.abs().max().item())
    assert nbt.item() == nbt64.item() == int(training)
    if out_stats:
        # Statistics of y AS STORED (after the residual and the rounding to y's dtype).
        ref_mean, ref_var = reference.batch_stats(y.detach())
        assert stats[0].dtype == torch.float32 and stats[0].shape == (cout,)
        assert (stats[0].double() - ref_mean).abs().max() <= 1e-5 * max(1.0, ref_mean.abs().max().item())
        assert ((stats[1].double() - ref_var).abs() <= 1e-5 * ref_var + 1e-7).all()


# ---------------------------------------------------------------------------------------------------
# The grid (interpreter-sized: M up to ~300 rows, C up to 40; tails against the 32x32x16 interpreter tile)
# ---------------------------------------------------------------------------------------------------
SHAPES = [  # (N, C, H, W, Cout)
    (2, 3, 3, 3, 5),
    (2, 17, 5, 7, 20),
    (3, 40, 6, 5, 33),
    (2, 24, 11, 13, 40),
]


@pytest.mark.parametrize("extras", [False, True], ids=["plain", "bias+residual+stats"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bn_relu_conv1x1_grid(shape, stride, training, dtype, extras):
    _compare(*shape, stride, training, dtype, extras, seed=sum(shape) + stride)


@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 36), h=st.integers(1, 8), w=st.integers(1, 8),
       cout=st.integers(1, 36), stride=st.sampled_from([1, 2]), training=st.booleans(),
       extras=st.booleans())
def test_bn_relu_conv1x1_property(n, c, h, w, cout, stride, training, extras):
    if training and n * h * w < 2:
        n = 2  # BatchNorm in training needs more than one value per channel
    _compare(n, c, h, w, cout, stride, training, torch.float32, extras, seed=n + c + h + w + cout)


# ---------------------------------------------------------------------------------------------------
# Semantics
# ---------------------------------------------------------------------------------------------------
@requires_interpreter
def test_triton_path_runs_under_interpreter(monkeypatch):
    """The kernels, not the torch fallback, produce the results on a CPU with TRITON_INTERPRET=1."""
    assert Fp.backend() == "triton" and Fp.backend("cpu") == "triton"
    from fastpreact.kernels import batch_stats as ks
    from fastpreact.kernels import bn_relu_conv1x1 as kc
    calls = {}
    for mod, name in [(ks, "batch_stats_rows"), (kc, "bn_relu_conv1x1_fwd"), (kc, "bn_relu_conv1x1_bwd_dw"),
                      (kc, "bn_relu_conv1x1_bwd_dz"), (kc, "bn_relu_conv1x1_bwd_dx")]:
        def counted(*a, _orig=getattr(mod, name), _name=name, **k):
            calls[_name] = calls.get(_name, 0) + 1
            return _orig(*a, **k)
        monkeypatch.setattr(mod, name, counted)
    monkeypatch.setattr(Fp._BNReLUConv1x1Torch, "apply", lambda *a: pytest.fail("torch fallback ran"))
    _compare(2, 5, 4, 3, 6, 1, True, torch.float32, False)
    assert calls == {"batch_stats_rows": 1, "bn_relu_conv1x1_fwd": 1, "bn_relu_conv1x1_bwd_dw": 1,
                     "bn_relu_conv1x1_bwd_dz": 1, "bn_relu_conv1x1_bwd_dx": 1}


def test_torch_fallback_matches_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert Fp.backend() == "torch"
    _compare(2, 7, 5, 4, 9, 2, True, torch.float32, True)
    _compare(2, 7, 5, 4, 9, 1, False, torch.float32, True)


def test_saves_only_x_w_and_channel_vectors():
    """Saved for backward: x, W and per-channel vectors (gamma, beta, mean, rstd) -- never BN/ReLU output."""
    inp = _make_inputs(2, 12, 6, 6, 10, 1, bias=False, residual=False)
    x = inp["x"].requires_grad_()
    w = inp["w"].requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        Fp.bn_relu_conv1x1(x, w, inp["gamma"].requires_grad_(), inp["beta"].requires_grad_(), inp["rm"],
                           inp["rv"], training=True)
    assert sum(t.numel() for t in saved) == x.numel() + w.numel() + 4 * 12
    assert any(t is x for t in saved)


def test_momentum_none_cumulative_average_and_nbt():
    bn = nn.BatchNorm2d(6, momentum=None)
    bn.num_batches_tracked.fill_(3)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    fused = fastpreact.BNReLUConv1x1.from_modules(
        nn.BatchNorm2d(6, momentum=None), nn.Conv2d(6, 4, 1, bias=False))
    fused.bn.load_state_dict(bn.state_dict())
    g = torch.Generator().manual_seed(5)
    for _ in range(2):
        x = torch.randn(3, 6, 4, 5, generator=g) * 2 + 1
        bn(x)
        fused(x.contiguous(memory_format=torch.channels_last))
    assert fused.bn.num_batches_tracked.item() == bn.num_batches_tracked.item() == 5
    torch.testing.assert_close(fused.bn.running_mean, bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.bn.running_var, bn.running_var, rtol=1e-5, atol=1e-6)


def test_running_stats_no_tracking_and_affine_false():
    """track_running_stats=False: batch statistics in eval too; affine=False: gamma 1, beta 0."""
    bn = nn.BatchNorm2d(5, affine=False, track_running_stats=False)
    conv = nn.Conv2d(5, 7, 1, bias=False)
    fused = fastpreact.BNReLUConv1x1.from_modules(bn, conv).eval()
    x = torch.randn(2, 5, 4, 4).contiguous(memory_format=torch.channels_last)
    ref = conv(torch.relu(bn(x.double().float())))
    torch.testing.assert_close(fused(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [
    lambda x: x.contiguous(),                         # NCHW-contiguous: converted once
    lambda x: x.contiguous()[:, :, :, ::2],           # strided view
    lambda x: torch.cat([x, x], 1)[:, 3:3 + x.shape[1]],  # channel slice of a channels-last tensor
    lambda x: x.contiguous().transpose(2, 3).contiguous().transpose(2, 3),  # odd strides, same values
], ids=["nchw", "strided", "channel-slice", "transposed"])
def test_non_channels_last_inputs_are_exact(make):
    inp = _make_inputs(2, 9, 6, 6, 11, 1, bias=False, residual=False)
    x = make(inp["x"].contiguous(memory_format=torch.channels_last))
    y = Fp.bn_relu_conv1x1(x, inp["w"], inp["gamma"], inp["beta"], training=True)
    ref = reference.bn_relu_conv1x1(x.double(), inp["w"].double(), inp["gamma"].double(), inp["beta"].double(),
                                    training=True)
    assert y.is_contiguous(memory_format=torch.channels_last)
    _assert_oracle("y", y, ref)


def test_input_stats_skip_the_statistics_pass(monkeypatch):
    from fastpreact.kernels import batch_stats as ks
    inp = _make_inputs(2, 8, 5, 5, 6, 1, bias=False, residual=False)
    stats = Fp.batch_stats(inp["x"])
    monkeypatch.setattr(ks, "batch_stats_rows", lambda *a, **k: pytest.fail("statistics recomputed"))
    rm, rv = inp["rm"].clone(), inp["rv"].clone()
    y = Fp.bn_relu_conv1x1(inp["x"], inp["w"], inp["gamma"], inp["beta"], rm, rv, training=True,
                           input_stats=stats)
    rm64, rv64 = inp["rm"].double(), inp["rv"].double()
    ref = reference.bn_relu_conv1x1(inp["x"].double(), inp["w"].double(), inp["gamma"].double(),
                                    inp["beta"].double(), rm64, rv64, training=True)
    _assert_oracle("y", y, ref)
    torch.testing.assert_close(rv.double(), rv64, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["default", "torch"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_input_with_large_mean_is_accurate(training, backend, monkeypatch):
    """x with mean 1e3 and std 1.5. fp32 holds that mean only to 3e-5, so y is off by ~6e-6 of its
    scale at best; the batch mean must be summed in shifted coordinates to get there (summed naively it
    was off by ~1e-4, and y by 2e-5 of its scale). The torch fallback must be as accurate."""
    if backend == "torch":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    _compare(3, 10, 6, 6, 12, 1, training, torch.float32, True, seed=4, x_offset=1e3)


def test_output_stats_accurate_for_large_mean():
    """Epilogue statistics of y with mean ~1e3 and spread ~1 (a residual stream far from zero)."""
    inp = _make_inputs(4, 8, 9, 9, 12, 1, bias=False, residual=True)
    res = inp["res"] + 1e3
    y, (mean, var) = Fp.bn_relu_conv1x1(inp["x"], inp["w"] * 0.3, inp["gamma"], inp["beta"], training=True,
                                        residual=res, output_stats=True)
    ref_mean, ref_var = reference.batch_stats(y)
    assert ref_mean.min() > 900
    assert ((var.double() - ref_var).abs() <= 1e-4 * ref_var).all()
    assert (mean.double() - ref_mean).abs().max() <= 2e-4


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("stride_a, stride_b", [(1, 1), (2, 2), (1, 2)])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_dual(stride_a, stride_b, training, device, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # exact fp32 products on a GPU too
    g = torch.Generator().manual_seed(11)
    c, ca, cb = 13, 9, 21
    x = torch.randn(2, c, 7, 5, generator=g).contiguous(memory_format=torch.channels_last)
    wa, wb = torch.randn(ca, c, 1, 1, generator=g), torch.randn(cb, c, 1, 1, generator=g)
    gamma, beta = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    rm, rv = torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5
    dya = torch.randn(2, ca, (7 - 1) // stride_a + 1, (5 - 1) // stride_a + 1, generator=g)
    dyb = torch.randn(2, cb, (7 - 1) // stride_b + 1, (5 - 1) // stride_b + 1, generator=g)
    x, wa, wb, gamma, beta, rm, rv, dya, dyb = (t.to(device) for t in (x, wa, wb, gamma, beta, rm, rv, dya, dyb))

    leaves = [t.clone().requires_grad_() for t in (x, wa, wb, gamma, beta)]
    rm1, rv1, nbt = rm.clone(), rv.clone(), torch.tensor(0, device=device)
    (ya, (mean_a, var_a)), yb = Fp.bn_relu_conv1x1_dual(
        *leaves, rm1, rv1, num_batches_tracked=nbt, training=training, stride_a=stride_a, stride_b=stride_b,
        output_stats_a=True)
    (ya * dya).sum().add((yb * dyb).sum()).backward()

    leaves64 = [t.double().requires_grad_() for t in (x, wa, wb, gamma, beta)]
    rm64, rv64 = rm.double(), rv.double()
    x6, wa6, wb6, g6, b6 = leaves64
    ya6 = reference.bn_relu_conv1x1(x6, wa6, g6, b6, rm64, rv64, training=training, stride=stride_a)
    yb6 = reference.bn_relu_conv1x1(x6, wb6, g6, b6, None, None, training=training, stride=stride_b) \
        if training else reference.bn_relu_conv1x1(x6, wb6, g6, b6, rm64, rv64, training=False, stride=stride_b)
    (ya6 * dya).sum().add((yb6 * dyb).sum()).backward()

    assert ya.is_contiguous(memory_format=torch.channels_last) and yb.is_contiguous(memory_format=torch.channels_last)
    _assert_oracle("y_a", ya, ya6)
    _assert_oracle("y_b", yb, yb6)
    for name, ours, ref in zip(("dx", "dw_a", "dw_b", "dgamma", "dbeta"), leaves, leaves64):
        _assert_oracle(name, ours.grad, ref.grad, rtol=5e-5)
    assert nbt.item() == int(training)  # updated ONCE
    torch.testing.assert_close(rm1.double(), rm64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rv1.double(), rv64, rtol=1e-5, atol=1e-6)
    ref_mean, ref_var = reference.batch_stats(ya.detach())
    torch.testing.assert_close(mean_a.double(), ref_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var_a.double(), ref_var, rtol=1e-5, atol=1e-6)


def test_dual_module_state_dict_and_from_modules():
    bn, ca, cb = nn.BatchNorm2d(6), nn.Conv2d(6, 4, 1, bias=False), nn.Conv2d(6, 8, 1, stride=2, bias=False)
    dual = fastpreact.BNReLUConv1x1Dual.from_modules(bn, ca, cb)
    fresh = fastpreact.BNReLUConv1x1Dual(6, 4, 8, stride_b=2)
    assert list(dual.state_dict()) == list(fresh.state_dict())
    assert dual.conv_a is ca and dual.conv_b is cb and dual.bn is bn
    x = torch.randn(2, 6, 5, 5).contiguous(memory_format=torch.channels_last)
    ya, yb = dual.eval()(x)
    a = torch.relu(bn(x))
    torch.testing.assert_close(ya, ca(a), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(yb, cb(a), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="bias"):
        fastpreact.BNReLUConv1x1Dual.from_modules(bn, nn.Conv2d(6, 4, 1), cb)


def test_module_matches_stock_sequential():
    stock = nn.Sequential(nn.BatchNorm2d(10), nn.ReLU(), nn.Conv2d(10, 7, 1, stride=2, bias=True))
    fused = fastpreact.BNReLUConv1x1.from_modules(stock[0], stock[2])
    assert list(fused.state_dict()) == list(fastpreact.BNReLUConv1x1(10, 7, 2, bias=True).state_dict())
    x = torch.randn(3, 10, 5, 6).contiguous(memory_format=torch.channels_last)
    ref = nn.Sequential(nn.BatchNorm2d(10), nn.ReLU(), nn.Conv2d(10, 7, 1, stride=2, bias=True))
    ref.load_state_dict(stock.state_dict())
    y = fused(x)
    torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stock[0].running_var, ref[0].running_var, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="1x1"):
        fastpreact.BNReLUConv1x1.from_modules(nn.BatchNorm2d(10), nn.Conv2d(10, 7, 3))
    with pytest.raises(ValueError, match="channels"):
        fastpreact.BNReLUConv1x1.from_modules(nn.BatchNorm2d(9), nn.Conv2d(10, 7, 1))


# ---------------------------------------------------------------------------------------------------
# Errors: one clear line each
# ---------------------------------------------------------------------------------------------------
def _args(**over):
    base = dict(x=torch.randn(2, 4, 3, 3), w=torch.randn(5, 4, 1, 1), g=torch.ones(4), b=torch.zeros(4))
    base.update(over)
    return base


@pytest.mark.parametrize("over, kw, err, match", [
    (dict(x=torch.randn(4, 3, 3)), {}, ValueError, r"\[N, C, H, W\]"),
    (dict(x=torch.ones(2, 4, 3, 3, dtype=torch.int32)), {}, TypeError, "floating point"),
    (dict(w=torch.randn(5, 3, 1, 1)), {}, ValueError, "input channels"),
    (dict(w=torch.randn(5, 4, 3, 3)), {}, ValueError, "1x1"),
    (dict(g=torch.ones(3)), {}, ValueError, "bn_weight"),
    ({}, dict(stride=3), ValueError, "stride"),
    ({}, dict(stride=(1, 2)), ValueError, "stride"),
    ({}, dict(residual=torch.randn(2, 5, 2, 2)), ValueError, "residual"),
    ({}, dict(residual=torch.randn(2, 5, 3, 3, dtype=torch.float16)), TypeError, "residual"),
    ({}, dict(conv_bias=torch.randn(4)), ValueError, "conv_bias"),
    ({}, dict(input_stats=(torch.zeros(4),)), TypeError, "input_stats"),
    ({}, dict(running_mean=torch.zeros(4)), ValueError, "both"),
    ({}, dict(running_mean=torch.zeros(8)[::2], running_var=torch.ones(4)), ValueError, "contiguous"),
    (dict(x=torch.randn(1, 4, 1, 1)), {}, ValueError, "more than 1 value"),
    (dict(w=torch.randn(5, 4, 1, 1, device="meta")), {}, ValueError, "device"),
])
def test_errors(over, kw, err, match):
    a = _args(**over)
    with pytest.raises(err, match=match):
        Fp.bn_relu_conv1x1(a["x"], a["w"], a["g"], a["b"], **kw)


def test_dual_errors():
    a = _args()
    with pytest.raises(ValueError, match="w_b"):
        Fp.bn_relu_conv1x1_dual(a["x"], a["w"], torch.randn(3, 5, 1, 1), a["g"], a["b"])
    with pytest.raises(ValueError, match="stride_b"):
        Fp.bn_relu_conv1x1_dual(a["x"], a["w"], a["w"], a["g"], a["b"], stride_b=4)


# ---------------------------------------------------------------------------------------------------
# GPU: bf16/fp16 grid and the real ResNet-200 1x1 shapes (batch 64)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("extras", [False, True], ids=["plain", "bias+residual+stats"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bn_relu_conv1x1_grid_cuda(shape, stride, training, dtype, extras):
    _compare(*shape, stride, training, dtype, extras, seed=sum(shape) + stride, device="cuda")


RESNET200_1X1 = [  # (N, C, H, W, Cout, stride)
    (64, 256, 56, 56, 64, 1), (64, 64, 56, 56, 256, 1),
    (64, 512, 28, 28, 128, 1), (64, 128, 28, 28, 512, 1),
    (64, 1024, 14, 14, 256, 1), (64, 256, 14, 14, 1024, 1),
    (64, 2048, 7, 7, 512, 1), (64, 512, 7, 7, 2048, 1),
    (64, 256, 56, 56, 512, 2), (64, 512, 28, 28, 1024, 2), (64, 1024, 14, 14, 2048, 2),  # projections
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=["bf16"])  # fp16: the grid above (time budget)
@pytest.mark.parametrize("case", RESNET200_1X1, ids=lambda s: "-".join(map(str, s)))
def test_resnet200_shapes_cuda(case, dtype):
    n, c, h, w, cout, stride = case
    _compare(n, c, h, w, cout, stride, True, dtype, stride == 1, seed=c + cout, device="cuda")


@pytest.mark.gpu
def test_cuda_graph_capture_of_training_step():
    """No host synchronisation: forward + backward + running-stat update capture in a CUDA graph."""
    mod = fastpreact.BNReLUConv1x1(64, 128).cuda()
    x = torch.randn(8, 64, 14, 14, device="cuda").contiguous(memory_format=torch.channels_last).requires_grad_()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(3):  # warm-up: autotuning and compilation happen here
            mod(x).float().sum().backward()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    nbt0 = mod.bn.num_batches_tracked.clone()
    with torch.cuda.graph(graph), torch.autocast("cuda", dtype=torch.bfloat16):
        mod(x).float().sum().backward()
    graph.replay()
    torch.cuda.synchronize()
    # Capture records kernels without running them: only the replay increments the counter.
    assert mod.bn.num_batches_tracked.item() == nbt0.item() + 1


@requires_interpreter
@pytest.mark.parametrize("stride", [1, 2])
def test_dx_launcher_accumulates_into_shortcut_gradient(stride):
    """bn_relu_conv1x1_bwd_dx(accumulate_into=g) adds dx into g in place (the identity shortcut's gradient)."""
    from fastpreact.kernels import bn_relu_conv1x1 as kc
    inp = _make_inputs(2, 11, 7, 5, 6, stride, bias=False, residual=False, seed=stride)
    x = inp["x"].detach().requires_grad_()
    y = Fp.bn_relu_conv1x1(x, inp["w"], inp["gamma"], inp["beta"], training=True, stride=stride)
    y.backward(inp["dy"])
    mean, var = Fp.batch_stats(x.detach())
    rstd = torch.rsqrt(var + 1e-5)
    w2d = inp["w"].reshape(6, 11).contiguous()
    dy = inp["dy"].contiguous(memory_format=torch.channels_last)
    dz, dbeta, dgamma = kc.bn_relu_conv1x1_bwd_dz(dy, w2d, x.detach(), mean, rstd, inp["gamma"], inp["beta"],
                                                  stride=stride, poison=True)
    shortcut = torch.randn(x.shape).contiguous(memory_format=torch.channels_last)
    expected = shortcut + x.grad
    out = kc.bn_relu_conv1x1_bwd_dx(x.detach(), dz, mean, rstd, inp["gamma"], dbeta, dgamma, stride=stride,
                                    accumulate_into=shortcut)
    assert out is shortcut
    torch.testing.assert_close(shortcut, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="accumulate_into"):
        kc.bn_relu_conv1x1_bwd_dx(x.detach(), dz, mean, rstd, inp["gamma"], dbeta, dgamma, stride=stride,
                                  accumulate_into=torch.zeros(x.shape))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_production_path_without_poison(training, monkeypatch):
    """Without poisoning, stride-1 dx is written over dz in place (the path training runs): same answers."""
    monkeypatch.delenv("FASTPREACT_POISON", raising=False)
    _compare(2, 17, 5, 7, 20, 1, training, torch.float32, True, seed=9)
    _compare(2, 17, 5, 7, 20, 1, training, torch.float16, False, seed=9)


@requires_interpreter
def test_shortcut_grad_is_added_in_the_dx_pass():
    """An identity unit's two fused 1x1 calls linked by a ShortcutGrad: the residual's gradient reaches x
    through the first call's dx pass (no gradient add launched), equal to the unlinked computation."""
    g = torch.Generator().manual_seed(7)
    x0 = (torch.randn(2, 8, 5, 6, generator=g) + 0.3).contiguous(memory_format=torch.channels_last)
    w1, w2 = torch.randn(4, 8, 1, 1, generator=g) / 3, torch.randn(8, 4, 1, 1, generator=g) / 2
    bn1 = (torch.rand(8, generator=g) + 0.5, torch.randn(8, generator=g))
    bn2 = (torch.rand(4, generator=g) + 0.5, torch.randn(4, generator=g))
    dy = torch.randn(2, 8, 5, 6, generator=g)
    grads, adds = {}, {}
    for linked in (False, True):
        x = x0.clone().requires_grad_()
        params = [t.clone().requires_grad_() for t in (w1, w2, *bn1, *bn2)]
        link = Fp.ShortcutGrad() if linked else None
        h = Fp.bn_relu_conv1x1(x, params[0], params[2], params[3], shortcut_grad=link)
        y = Fp.bn_relu_conv1x1(h, params[1], params[4], params[5], residual=x, shortcut_grad=link)
        seen = []
        with _AtenOps(seen):
            y.backward(dy)
        adds[linked] = seen.count("add")
        grads[linked] = [x.grad] + [p.grad for p in params]
        if linked:
            assert link.grad is None  # handed over and released
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert adds[True] == adds[False] - 1
    with pytest.raises(TypeError, match="shortcut_grad must be a ShortcutGrad"):
        Fp.bn_relu_conv1x1(x0, w1, *bn1, shortcut_grad=object())


class _AtenOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the names of the aten ops that run."""

    def __init__(self, seen):
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(func._overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dual", [False, True])
def test_output_bn_is_finished_like_bn_statistics(momentum, dual):
    """output_bn: the consuming BatchNorm finished from y's statistics in the producer's launch equals
    bn_statistics(bn, y, input_stats=stats) run afterwards: (mean, var, rstd, True), running buffers and
    num_batches_tracked."""
    inp = _make_inputs(2, 6, 5, 4, 5, 1, bias=False, residual=False, seed=11)
    w_b = torch.randn(3, 6, 1, 1, generator=torch.Generator().manual_seed(12))
    bns = []
    for _ in range(2):
        bn = nn.BatchNorm2d(5, momentum=momentum)
        with torch.no_grad():
            bn.running_mean.normal_(generator=torch.Generator().manual_seed(13))
            bn.num_batches_tracked += 3
        bns.append(bn)

    def run(**kw):
        if dual:
            (y, stats), _ = Fp.bn_relu_conv1x1_dual(inp["x"], inp["w"], w_b, inp["gamma"], inp["beta"],
                                                    output_stats_a=True, **{k + "_a": v for k, v in kw.items()})
            return y, stats
        return Fp.bn_relu_conv1x1(inp["x"], inp["w"], inp["gamma"], inp["beta"], output_stats=True, **kw)

    y, taken = run(output_bn=bns[0])
    y_ref, stats = run()
    expected = Fp.bn_statistics(bns[1], y_ref, input_stats=stats)
    assert taken[3] is True and expected[3] is True
    for got, ref in zip(taken[:3], expected[:3]):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(bns[0], name), getattr(bns[1], name), rtol=1e-6, atol=1e-7)
    # The consumer takes the finished statistics as they are: bn's buffers are not updated a second time.
    before = [t.clone() for t in (bns[0].running_mean, bns[0].running_var, bns[0].num_batches_tracked)]
    Fp.bn_relu_conv1x1(y, torch.randn(2, 5, 1, 1), input_stats=taken, **Fp.bn_args(bns[0]))
    for got, ref in zip((bns[0].running_mean, bns[0].running_var, bns[0].num_batches_tracked), before):
        assert torch.equal(got, ref)
    with pytest.raises(ValueError, match="needs output_stats=True"):
        Fp.bn_relu_conv1x1(inp["x"], inp["w"], inp["gamma"], inp["beta"], output_bn=bns[0])
    with pytest.raises(ValueError, match=r"must be the BatchNorm2d\(5\)"):
        Fp.bn_relu_conv1x1(inp["x"], inp["w"], inp["gamma"], inp["beta"], output_stats=True,
                           output_bn=nn.BatchNorm2d(4))
