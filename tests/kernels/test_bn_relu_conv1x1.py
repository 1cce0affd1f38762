"""The fused BN -> ReLU -> 1x1 conv (fastpreact.functional / kernels/bn_relu_conv1x1.py) against
fastpreact.reference (BatchNorm2d -> ReLU -> Conv2d) computed in float64.

On a CPU the Triton kernels run through TRITON_INTERPRET=1 (tests/conftest.py). Every kernel output
starts as NaN (FASTPREACT_POISON=1), so an element a kernel never writes fails. fp32 results must match
float64 closely; low precision uses flash-attention's oracle, relative to PyTorch's own error at that
precision: |ours - ref64| <= 2 * |torch_lowp - ref64| + atol.
"""

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import fastpreact
from fastpreact import functional as Fp
from fastpreact import reference
from oracle import assert_close64, assert_oracle
from conftest import channels_last, requires_interpreter, use_torch_backend

CUDA = torch.cuda.is_available()


# Tests that call the kernels on CPU tensors need the interpreter (on a GPU machine the gpu tests run them).


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
    for mod, name in [(ks, "batch_stats"), (kc, "bn_relu_conv1x1_fwd"), (kc, "bn_relu_conv1x1_bwd")]:
        def counted(*a, _orig=getattr(mod, name), _name=name, **k):
            calls[_name] = calls.get(_name, 0) + 1
            return _orig(*a, **k)
        monkeypatch.setattr(mod, name, counted)
    from fastpreact.functional import conv1x1
    monkeypatch.setattr(conv1x1._BNReLUConv1x1Torch, "apply", lambda *a: pytest.fail("torch fallback ran"))
    _compare(2, 5, 4, 3, 6, 1, True, torch.float32, False)
    assert calls == {"batch_stats": 1, "bn_relu_conv1x1_fwd": 1, "bn_relu_conv1x1_bwd": 1}


def test_torch_fallback_matches_reference(monkeypatch):
    use_torch_backend(monkeypatch)
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
    monkeypatch.setattr(ks, "batch_stats", lambda *a, **k: pytest.fail("statistics recomputed"))
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
        use_torch_backend(monkeypatch)
    _compare(3, 10, 6, 6, 12, 1, training, torch.float32, True, seed=4, x_offset=1e3)


def test_output_stats_accurate_for_large_mean():
    """Epilogue statistics of y with mean ~1e3 and spread ~1 (a residual stream far from zero)."""
    inp = _make_inputs(4, 8, 9, 9, 12, 1, bias=False, residual=True)
    res = inp["res"] + 1e3
    y, (mean, var, _, _) = Fp.bn_relu_conv1x1(inp["x"], inp["w"] * 0.3, inp["gamma"], inp["beta"], training=True,
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
    (ya, (mean_a, var_a, _, _)), yb = Fp.bn_relu_conv1x1_dual(
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
    mean, var, _, _ = Fp.batch_stats(x.detach())
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
    """Without poisoning (the path training runs: no NaN fill; the three-pass path writes stride-1 dx over
    dz in place): same answers."""
    from fastpreact.functional import backends
    monkeypatch.delenv("FASTPREACT_POISON", raising=False)
    monkeypatch.setattr(backends, "POISON", False)
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
def test_next_bn_is_finished_like_bn_stats(momentum, dual):
    """next_bn: the next BatchNorm finished from y's stats in the producer's launch equals
    bn_stats(bn, y, input_stats=stats) run afterwards: BNStats(mean, var, rstd, True), running buffers and
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

    y, taken = run(next_bn=bns[0])
    y_ref, stats = run()
    assert isinstance(taken, Fp.BNStats) and taken.finished and not stats.finished
    expected = Fp.bn_stats(bns[1], y_ref, input_stats=stats)
    assert taken.batch is True and expected.batch is True
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
        Fp.bn_relu_conv1x1(inp["x"], inp["w"], inp["gamma"], inp["beta"], next_bn=bns[0])
    with pytest.raises(ValueError, match=r"must be the BatchNorm2d\(5\)"):
        Fp.bn_relu_conv1x1(inp["x"], inp["w"], inp["gamma"], inp["beta"], output_stats=True,
                           next_bn=nn.BatchNorm2d(4))


# ---------------------------------------------------------------------------------------------------
# The backward launcher itself (kernels.bn_relu_conv1x1_bwd): both paths (two passes, three passes),
# every call shape, on given statistics, against float64 and, in low precision, stock autocast
# ---------------------------------------------------------------------------------------------------

def _bwd_inputs(n, c, h, w, cout, stride, dtype, x_dtype, batch_stats, seed):
    """Inputs in fp32 holding the values each dtype can hold: x on x_dtype's grid, dy on the compute
    dtype's (ReLU crossings centred when x is low precision, see _center_relu_crossings)."""
    g = torch.Generator().manual_seed(seed)
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    inp = dict(x=(torch.randn(n, c, h, w, generator=g) * 1.5 + 0.3).to(x_dtype).float(),
               w=torch.randn(cout, c, generator=g) * c ** -0.5, gamma=torch.randn(c, generator=g) * 0.3 + 1.0,
               beta=torch.randn(c, generator=g) * 0.5, rm=torch.randn(c, generator=g) * 0.2,
               rv=torch.rand(c, generator=g) + 0.5, dy=torch.randn(n, cout, ho, wo, generator=g).to(dtype).float(),
               add=torch.randn(n, c, h, w, generator=g).to(x_dtype).float())
    if x_dtype != torch.float32:
        _center_relu_crossings(inp, batch_stats)
    return inp


def _bwd_reference(inp, stride, batch_stats, dtype, impl, eps=1e-5):
    """(dx, dW, dbeta, dgamma) of BatchNorm -> ReLU -> 1x1 conv: impl 'ref64' in float64, 'stock' in fp32
    under CPU autocast in dtype (BatchNorm on x's own values, the conv in dtype: stock PyTorch's AMP)."""
    cast = torch.float64 if impl == "ref64" else torch.float32
    x, w, gamma, beta = (inp[k].to(cast).requires_grad_() for k in ("x", "w", "gamma", "beta"))
    with torch.autocast("cpu", dtype=dtype, enabled=impl == "stock" and dtype != torch.float32):
        if batch_stats:
            z = torch.nn.functional.batch_norm(x, None, None, gamma, beta, training=True, eps=eps)
        else:
            z = torch.nn.functional.batch_norm(x, inp["rm"].to(cast), inp["rv"].to(cast), gamma, beta,
                                               training=False, eps=eps)
        y = torch.nn.functional.conv2d(torch.relu(z), w[:, :, None, None], stride=stride)
    y.backward(inp["dy"].to(y.dtype))
    return x.grad, w.grad, beta.grad, gamma.grad


def _bwd_case(n, c, h, w, cout, stride, *, dtype=torch.float32, x_dtype=None, batch_stats=True, split=0,
              need=(True, True, True), add=None, passes=None, seed=0, eps=1e-5, poison=True):
    """kernels' bn_relu_conv1x1_bwd (outputs NaN-poisoned first unless poison=False) vs float64: fp32
    closely, low precision relative to stock autocast's own error. add: None, 'add_grad' or
    'accumulate_into'."""
    from fastpreact.kernels import bn_relu_conv1x1 as kc
    x_dtype = x_dtype or dtype
    inp = _bwd_inputs(n, c, h, w, cout, stride, dtype, x_dtype, batch_stats, seed)
    x = channels_last(inp["x"].to(x_dtype))
    if batch_stats:
        x64 = inp["x"].double()
        mean, var = x64.mean(dim=(0, 2, 3)), x64.var(dim=(0, 2, 3), unbiased=False)
    else:
        mean, var = inp["rm"].double(), inp["rv"].double()
    rstd = (var + eps).rsqrt().float()
    dy_all = channels_last(inp["dy"].to(dtype))
    dy, dy2 = (channels_last(dy_all[:, :split]), channels_last(dy_all[:, split:])) if split else (dy_all, None)
    addend = channels_last(inp["add"].to(x_dtype)) if add else None
    kw = {add: addend.clone()} if add else {}
    out = kc.bn_relu_conv1x1_bwd(x, dy, inp["w"], mean.float(), rstd, inp["gamma"], inp["beta"], stride=stride,
                                 dy2=dy2, batch_stats=batch_stats, need_x=need[0], need_w=need[1], need_bn=need[2],
                                 passes=passes, poison=poison, **kw)
    ref = _bwd_reference(inp, stride, batch_stats, dtype, "ref64")
    stock = _bwd_reference(inp, stride, batch_stats, dtype, "stock") if dtype != torch.float32 else (None,) * 4
    wanted = (need[0], need[1], need[2], need[2])
    for name, ours, r64, lowp, want in zip(("dx", "dW", "dbeta", "dgamma"), out, ref, stock, wanted):
        if not want:
            assert ours is None, f"{name} computed though not needed"
            continue
        if name == "dx":
            assert ours.dtype == x_dtype and ours.is_contiguous(memory_format=torch.channels_last)
            if add:
                r64 = r64 + inp["add"].double()
                lowp = None if lowp is None else lowp + inp["add"]
                if add == "accumulate_into":
                    assert ours is kw[add]
        _assert_oracle(name, ours, r64, lowp, rtol=5e-5, dtype=dtype)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch", "running"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("passes", [2, 3])
def test_backward_paths(passes, stride, batch_stats, dtype):
    _bwd_case(2, 17, 5, 7, 20, stride, dtype=dtype, batch_stats=batch_stats, passes=passes,
              seed=passes + 2 * stride + 4 * batch_stats)


@pytest.mark.parametrize("passes", [2, 3])
@pytest.mark.parametrize("stride", [1, 2])
def test_backward_dual_and_odd_shapes(passes, stride):
    """Two gradients (a dual op's), odd sizes and channel counts across tile edges."""
    _bwd_case(3, 40, 6, 5, 33, stride, split=13, passes=passes, seed=stride)
    _bwd_case(1, 3, 3, 1, 70, stride, split=64, passes=passes, seed=5, dtype=torch.float16)


@pytest.mark.parametrize("need", [(True, False, True), (False, True, False), (False, False, True),
                                  (True, True, False), (True, False, False)],
                         ids=["frozen-weight", "weight-only", "bn-only", "no-bn", "x-only"])
@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch", "running"])
def test_backward_subsets(need, batch_stats):
    """Whatever subset is needed is computed, and nothing else (None)."""
    _bwd_case(2, 17, 5, 7, 20, 2, need=need, batch_stats=batch_stats, seed=7)


@pytest.mark.parametrize("add", ["add_grad", "accumulate_into"])
@pytest.mark.parametrize("passes", [2, 3])
@pytest.mark.parametrize("stride", [1, 2])
def test_backward_adds_the_incoming_gradient(add, passes, stride):
    """The identity shortcut's gradient: added read-only (add_grad) or into its tensor in place."""
    _bwd_case(2, 11, 7, 5, 6, stride, add=add, passes=passes, seed=stride)
    _bwd_case(2, 11, 7, 5, 6, stride, add=add, passes=passes, seed=stride, batch_stats=False, dtype=torch.float16)


@pytest.mark.parametrize("stride", [1, 2])
def test_backward_bf16(stride):
    """bf16 products (widened in the interpreter) within 2x stock bf16's error, both paths."""
    for passes in (2, 3):
        _bwd_case(2, 24, 6, 7, 40, stride, dtype=torch.bfloat16, passes=passes, split=8, seed=3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("stride", [1, 2])
def test_fp32_input_with_a_16bit_compute_dtype(stride, dtype):
    """Autocast with an fp32 input: x is read as fp32 (z, the ReLU mask and the BN sums from x itself)
    and only the GEMM operands are rounded to the compute dtype, as stock autocast does; forward and
    backward within 2x stock autocast's error against float64 (rounding x itself first flips ReLU masks:
    18e-3 vs stock's 0.4e-3 in fp16)."""
    from fastpreact.kernels import bn_relu_conv1x1 as kc
    for passes in (2, 3):
        _bwd_case(3, 40, 6, 5, 33, stride, dtype=dtype, x_dtype=torch.float32, passes=passes, seed=21)
    inp = _bwd_inputs(3, 40, 6, 5, 33, stride, dtype, torch.float32, True, 22)
    x64 = inp["x"].double()
    mean, var = x64.mean(dim=(0, 2, 3)), x64.var(dim=(0, 2, 3), unbiased=False)
    y = kc.bn_relu_conv1x1_fwd(channels_last(inp["x"]), inp["w"], mean.float(), (var + 1e-5).rsqrt().float(), inp["gamma"],
                               inp["beta"], stride=stride, out_dtype=dtype, poison=True)[0]
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    ys = {}
    for impl in ("ref64", "stock"):
        cast = torch.float64 if impl == "ref64" else torch.float32
        with torch.autocast("cpu", dtype=dtype, enabled=impl == "stock"):
            z = torch.nn.functional.batch_norm(inp["x"].to(cast), None, None, inp["gamma"].to(cast),
                                               inp["beta"].to(cast), training=True)
            ys[impl] = torch.nn.functional.conv2d(torch.relu(z), inp["w"].to(cast)[:, :, None, None], stride=stride)
    _assert_oracle("y", y, ys["ref64"], ys["stock"], dtype=dtype)


@pytest.mark.parametrize("passes", [2, 3])
def test_backward_without_poison(passes):
    """The production buffers (no NaN fill; three passes write stride-1 dx over dz in place)."""
    _bwd_case(2, 17, 5, 7, 20, 1, passes=passes, poison=False, seed=12)
    _bwd_case(2, 17, 5, 7, 20, 1, passes=passes, poison=False, seed=12, dtype=torch.float16, add="add_grad")


def test_backward_is_deterministic_and_the_paths_agree():
    """Same call, same bits; the two paths agree to fp32 rounding."""
    runs = [_bwd_case(3, 40, 6, 5, 33, 2, split=13, passes=p, seed=9) for p in (2, 2, 3)]
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)
    for a, b in zip(runs[0], runs[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_backward_passes_rule():
    """Three passes only where recomputing dz costs more than storing it on the card (H100: the last
    ImageNet stage); two wherever dx and the sums are not both needed; the interpreter decides as an H100."""
    from fastpreact.kernels import bn_relu_conv1x1 as kc
    from fastpreact.kernels.cards import CARDS, INTERPRETER

    def passes(k, n, hw, stride=1, card=CARDS["sm_90"], accumulate=False, dtype=torch.bfloat16):
        ho = (hw - 1) // stride + 1
        return kc.backward_passes(64 * ho * ho, 64 * hw * hw, k, n, x_bytes=dtype.itemsize, e=dtype.itemsize,
                                  w_bytes=4, card=card, dtype=dtype, accumulate=accumulate)
    assert passes(512, 2048, 7) == 3 and passes(1024, 2048, 14, stride=2) == 3
    assert passes(256, 64, 56, accumulate=True) == passes(64, 256, 56) == passes(2048, 512, 7, accumulate=True) == 2
    assert passes(64, 256, 32) == passes(256, 64, 32) == 2  # CIFAR widths: always two
    assert passes(512, 2048, 7, card=INTERPRETER) == 3
    assert passes(256, 1024, 14, dtype=torch.float32) == 2  # TF32: half the 16-bit rate, twice the bytes


def test_backward_passes_rule_without_tensor_cores(monkeypatch):
    """IEEE fp32 (TF32 off) multiplies on CUDA cores: recomputing dz costs more than it saves."""
    from fastpreact.kernels import bn_relu_conv1x1 as kc
    from fastpreact.kernels.cards import CARDS
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert kc.backward_passes(64 * 14 * 14, 64 * 14 * 14, 256, 1024, x_bytes=4, e=4, w_bytes=4, card=CARDS["sm_90"],
                              dtype=torch.float32) == 3


@pytest.mark.parametrize("passes", [2, 3])
def test_fp32_input_keeps_relu_masks_near_the_threshold(passes):
    """A third of x sits within 1e-5..3e-4 of its channel's ReLU threshold (running statistics, so the
    threshold is known): fp16 rounding of x moves ~half of those across it, fp32 does not. Ours (x read
    as fp32) keeps stock autocast's masks and passes its oracle; x rounded to fp16 first would not."""
    from fastpreact.kernels import bn_relu_conv1x1 as kc
    dtype = torch.float16
    inp = _bwd_inputs(3, 40, 6, 5, 33, 1, dtype, torch.float32, False, 31)
    g = torch.Generator().manual_seed(32)
    scale = inp["gamma"] * (inp["rv"] + 1e-5).rsqrt()
    thresh = inp["rm"] - inp["beta"] / scale                      # z = 0 there
    shape = inp["x"].shape
    dist = (torch.rand(shape, generator=g) * 2.9e-4 + 1e-5) * torch.sign(torch.randn(shape, generator=g))
    near = torch.rand(shape, generator=g) < 1 / 3
    inp["x"] = torch.where(near, thresh[None, :, None, None] + dist / scale[None, :, None, None], inp["x"])
    rstd = (inp["rv"] + 1e-5).rsqrt()
    ref = _bwd_reference(inp, 1, False, dtype, "ref64")
    stock = _bwd_reference(inp, 1, False, dtype, "stock")
    dy = channels_last(inp["dy"].to(dtype))
    for x_dtype in (torch.float32, dtype):
        dx = kc.bn_relu_conv1x1_bwd(channels_last(inp["x"].to(x_dtype)), dy, inp["w"], inp["rm"], rstd, inp["gamma"],
                                    inp["beta"], batch_stats=False, passes=passes, poison=True)[0]
        if x_dtype == torch.float32:
            _assert_oracle("dx", dx, ref[0], stock[0], dtype=dtype)
        else:
            with pytest.raises(AssertionError, match="elements off"):
                _assert_oracle("dx", dx.float(), ref[0], stock[0], dtype=dtype)


@pytest.mark.parametrize("forced", ["2", "3"])
def test_backward_passes_forced_by_the_environment(forced, monkeypatch):
    """FASTPREACT_BACKWARD_PASSES (read at import) picks the path for every call: the three-pass path's
    kernels launch (dz, dx) or not."""
    from fastpreact.kernels import bn_relu_conv1x1 as kc
    from fastpreact.kernels.bn_relu_conv1x1 import three_pass
    monkeypatch.setenv("FASTPREACT_BACKWARD_PASSES", forced)
    # read when the kernels are imported (here: as a new process would read it)
    monkeypatch.setattr(kc.backward, "FORCED_PASSES", kc.backward.forced_passes())
    calls = []
    monkeypatch.setattr(three_pass.DZ, "run", lambda *a, **k: calls.append("dz") or three_pass.DZ.__class__.run(
        three_pass.DZ, *a, **k))
    _bwd_case(2, 17, 5, 7, 20, 2, seed=13)
    assert calls == (["dz"] if forced == "3" else [])
    assert kc.backward.forced_passes() == int(forced)


@requires_interpreter
@pytest.mark.parametrize("seed,offset,spread", [(s, 1.0, 3.0) for s in range(8)] + [(8, 512.0, 0.2), (9, -60.0, 0.05)])
def test_autocast_with_an_fp32_input_normalises_it_as_stock_does(seed, offset, spread):
    """Under fp16 autocast with an fp32 x, stock PyTorch runs BatchNorm on x as it comes and rounds only
    the conv's input: the fused op must too (rounding x first flips ReLU masks near the threshold, and at
    mean 512, spread 0.2 leaves fp16 nothing of x's deviations). Output and input gradient against
    float64, within 2x stock autocast's own error."""
    g = torch.Generator().manual_seed(100 + seed)
    n, c, h, w, cout = 2, 3 + 5 * seed % 17, 5, 4 + seed % 3, 6 + seed
    x64 = torch.randn(n, c, h, w, generator=g, dtype=torch.float64) * spread + offset
    w64 = torch.randn(cout, c, 1, 1, generator=g, dtype=torch.float64) * c ** -0.5
    dy = torch.randn(n, cout, h, w, generator=g, dtype=torch.float64)
    out = {}
    for impl in ("fused", "stock", "ref64"):
        dtype = torch.float64 if impl == "ref64" else torch.float32
        x = x64.to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
        bn, conv = nn.BatchNorm2d(c).to(dtype), nn.Conv2d(c, cout, 1, bias=False).to(dtype)
        with torch.no_grad():
            conv.weight.copy_(w64)
        with torch.autocast("cpu", dtype=torch.float16, enabled=impl != "ref64"):
            if impl == "fused":
                y = fastpreact.BNReLUConv1x1.from_modules(bn, conv)(x)
            else:
                y = conv(torch.relu(bn(x)))
        y.backward(dy.to(y.dtype))
        out[impl] = (y.detach().double(), x.grad.double())
    for i, what in enumerate(("y", "dx")):
        assert_oracle(out["fused"][i], out["stock"][i], out["ref64"][i], what, atol_rel=5e-4)
