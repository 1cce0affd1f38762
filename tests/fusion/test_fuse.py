"""fastpreact.fuse (fastpreact/fusion): BN -> ReLU -> 1x1 conv chains of torchvision, timm and user models on the fused op.

Which backend runs (stated per test):
  - "interpreter": the Triton kernels through TRITON_INTERPRET=1 (set by conftest.py on a CPU machine).
    Used for the small nets (the same block classes as the big ones: timm's PreActBottleneck and
    torchvision's Bottleneck) and the toy models, judged in float32 with a relative oracle (the fused
    error may be at most twice PyTorch's own fp32 error, plus a small atol):
    |fused - ref64| <= 2 |unfused32 - ref64| + atol, ref64 being a float64 copy of the unfused model.
  - "torch": the op's PyTorch fallback (TRITON_INTERPRET=0 for the test; the interpreter would take
    minutes on resnet50). Used for torchvision resnet50 and timm resnetv2_50.
Big nets, why two checks: in train mode a deep net's BN over few values amplifies rounding (unfused
fp32 is ~1e-2 off float64 at random init), and with millions of ReLU inputs a handful sit within
rounding of zero, so fused and unfused fp32 legitimately take the other side of a few ReLU kinks; each
such flip moves a gradient by a whole element's contribution, which no elementwise fp32 tolerance
survives. So (1) float64 end to end: the fused model must reproduce the float64 unfused model (outputs,
ALL gradients, running statistics, train and eval) to 1e-9, which checks every rewiring exactly; and
(2) float32 on the fused op: outputs and running statistics against ref64 with the relative oracle.
"""
import copy
import io
import logging
import os
import subprocess
import sys
import warnings
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastpreact
from fastpreact import functional as Fp
from fastpreact import fuse, fused_chains
from fastpreact.fusion.sequential import FusedSequential
from oracle import assert_oracle as assert_relative

BN_RELU = "BatchNorm2d -> ReLU -> Conv1x1"
BN_RELU_DUAL = "BatchNorm2d -> ReLU -> 2x Conv1x1 (shared pre-activation)"
BNACT = "BatchNormAct2d(ReLU) -> Conv1x1"
BNACT_DUAL = "BatchNormAct2d(ReLU) -> 2x Conv1x1 (shared pre-activation)"


def interpreter_backend():
    """The backend the 'interpreter' tests run: Triton's interpreter on a CPU machine."""
    return Fp.backend("cpu")


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------
def step(model, x, head_weight, train):
    """One forward/backward in the given mode: (output, {name: grad incl. 'input'}, {name: buffer})."""
    model.train(train)
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = model(x)
    (y * head_weight.to(y.dtype)).sum().backward()
    grads = {"input": x.grad}
    grads.update({n: p.grad for n, p in model.named_parameters()})
    return y.detach(), grads, {n: b.detach().clone() for n, b in model.named_buffers()}


def compare_three(model, x, head_weight, modes=(True, False), grads=True, atol_rel=1e-5, elementwise=True):
    """fuse(model) vs model (fp32) vs float64 copy: outputs, gradients, buffers, per mode in order."""
    unfused = copy.deepcopy(model)
    fused = fuse(model)
    ref64 = copy.deepcopy(model).double()
    assert list(fused.state_dict()) == list(unfused.state_dict())
    for train in modes:
        if grads:
            out_f, g_f, b_f = step(fused, x, head_weight, train)
            out_u, g_u, b_u = step(unfused, x, head_weight, train)
            out_r, g_r, b_r = step(ref64, x.double(), head_weight, train)
        else:
            with torch.no_grad():
                results = []
                for m, inp in ((fused, x), (unfused, x), (ref64, x.double())):
                    m.train(train)
                    results.append((m(inp), {}, {n: b.clone() for n, b in m.named_buffers()}))
            (out_f, g_f, b_f), (out_u, g_u, b_u), (out_r, g_r, b_r) = results
        mode = "train" if train else "eval"
        assert_relative(out_f, out_u, out_r, f"{mode} output", atol_rel, elementwise)
        for name in g_r:
            assert g_f[name] is not None, f"{mode}: no gradient for {name} in the fused model"
            assert_relative(g_f[name], g_u[name], g_r[name], f"{mode} grad {name}", atol_rel, elementwise)
        for name in b_r:
            if name.endswith("num_batches_tracked"):
                assert torch.equal(b_f[name], b_u[name]), f"{mode}: {name}"
            else:
                assert_relative(b_f[name], b_u[name], b_r[name], f"{mode} buffer {name}", atol_rel, elementwise)
    return fused


def assert_float64_exact(model, x, head_weight):
    """fuse(model).double() reproduces model.double(): outputs, every gradient, every buffer, train+eval."""
    ref = copy.deepcopy(model).double()
    fused = fuse(model).double()
    assert sum(fused_chains(fused).values()) > 0
    for train in (True, False):  # train first: eval then uses the running statistics it updated
        out_f, g_f, b_f = step(fused, x.double(), head_weight, train)
        out_r, g_r, b_r = step(ref, x.double(), head_weight, train)
        torch.testing.assert_close(out_f, out_r, rtol=1e-9, atol=1e-12)
        assert g_f.keys() == g_r.keys() and b_f.keys() == b_r.keys()
        for name in g_r:
            torch.testing.assert_close(g_f[name], g_r[name], rtol=1e-9, atol=1e-12, msg=name)
        for name in b_r:
            torch.testing.assert_close(b_f[name], b_r[name], rtol=1e-9, atol=1e-12, msg=name)


def small_timm_resnetv2():
    """resnetv2_50's classes (ResNetV2, PreActBottleneck, BatchNormAct2d): 3 stages of one unit, narrow.
    At 32x32 the last stage is 2x2."""
    pytest.importorskip("timm")
    from timm.layers import BatchNormAct2d, create_conv2d
    from timm.models.resnetv2 import ResNetV2
    return ResNetV2(layers=(1, 1, 1), channels=(32, 64, 96), stem_chs=16, num_classes=10,
                    conv_layer=create_conv2d, norm_layer=BatchNormAct2d)


def small_torchvision_resnet():
    """resnet50's block (torchvision's Bottleneck: one ReLU module called three times), two units, the
    second strided with a projection. At 32x32 the last unit is 8x8."""
    tvr = pytest.importorskip("torchvision.models.resnet")
    projection = nn.Sequential(nn.Conv2d(32, 64, 1, stride=2, bias=False), nn.BatchNorm2d(64))
    return nn.Sequential(nn.Conv2d(3, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                         tvr.Bottleneck(32, 8), tvr.Bottleneck(32, 16, stride=2, downsample=projection),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


# ----------------------------------------------------------------------------------------------------
# What fuse() finds in the stock ResNets (the README table), state_dict, logging
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,expected", [
    ("torchvision.resnet50", {BN_RELU: 16}),
    ("timm.resnetv2_50", {BNACT: 28, BNACT_DUAL: 4}),
])
def test_counts_state_dict_and_log(name, expected, caplog):
    lib, arch = name.split(".")
    if lib == "timm":
        model = pytest.importorskip("timm").create_model(arch, num_classes=10)
    else:
        model = getattr(pytest.importorskip("torchvision.models"), arch)(num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="fastpreact.fusion"), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fused = fuse(model)
    assert not [str(w.message) for w in seen if "fastpreact" in str(w.message)]  # all traced cleanly
    assert dict(fused_chains(fused)) == expected
    assert sum(expected.values()) == int(caplog.records[-1].getMessage().split("fused ")[1].split()[0])
    assert list(fused.state_dict()) == list(before)
    for k, v in fused.state_dict().items():
        assert torch.equal(v, before[k]), k
    # inplace=False: the original is untouched (same classes, nothing fused).
    assert not fused_chains(model) and type(model).__name__ == type(fused).__name__
    assert fused_chains(fuse(model, inplace=True)) == fused_chains(fused)


# ----------------------------------------------------------------------------------------------------
# Big nets (backend: torch fallback, see the module docstring)
# ----------------------------------------------------------------------------------------------------
def big_model(name):
    torch.manual_seed(0)
    if name == "timm.resnetv2_50":
        return pytest.importorskip("timm").create_model("resnetv2_50", num_classes=10)
    return pytest.importorskip("torchvision.models").resnet50(num_classes=10)


@pytest.mark.parametrize("name", ["torchvision.resnet50", "timm.resnetv2_50"])
def test_big_net_float64_matches_exactly(name):
    # 2 x 40x40: the last stage is 2x2, so every BN sees >= 8 values per channel.
    model = big_model(name)
    x, w = torch.randn(2, 3, 40, 40), torch.randn(2, 10)
    assert_float64_exact(model, x, w)


@pytest.mark.parametrize("name,calls", [
    ("torchvision.resnet50", {"bn_relu_conv1x1": 16}),
    ("timm.resnetv2_50", {"bn_relu_conv1x1": 28, "bn_relu_conv1x1_dual": 4}),
])
def test_big_net_float32_outputs_and_running_stats(name, calls, torch_backend):
    model = big_model(name)
    x, w = torch.randn(4, 3, 40, 40), torch.randn(4, 10)
    # Per-tensor max-norm oracle: train-mode errors of a deep random net are chaotic (both fp32 models
    # ~1e-5 off ref64 at unrelated elements), so the elementwise form would compare noise with noise.
    fused = compare_three(model, x, w, modes=(True, False), grads=False, elementwise=False)
    with torch.no_grad():
        assert op_calls(fused.eval(), x)[1] == calls


# ----------------------------------------------------------------------------------------------------
# Small nets with the same blocks, float32 on the fused op (backend: interpreter on a CPU machine)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,expected", [
    (small_timm_resnetv2, {BNACT: 3, BNACT_DUAL: 3}),
    (small_torchvision_resnet, {BN_RELU: 2}),
])
def test_small_net_float32_outputs_all_gradients_running_stats(make, expected):
    torch.manual_seed(0)
    model = make()
    # 4 x 32x32: every BN sees >= 16 values per channel.
    x, w = torch.randn(4, 3, 32, 32), torch.randn(4, 10)
    fused = compare_three(model, x, w)
    assert dict(fused_chains(fused)) == expected, interpreter_backend()


# ----------------------------------------------------------------------------------------------------
# User models: traced forward, Sequential, shared pre-activation, what must not be fused
# ----------------------------------------------------------------------------------------------------
class ToyModel(nn.Module):
    """The pattern written in a user's own forward, three ways of writing the ReLU, bias and stride."""

    def __init__(self):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 16, 1, stride=2, bias=True)
        self.bn2 = nn.BatchNorm2d(16)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(16, 16, 1)
        self.bn3 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 12, 1, bias=False)
        self.proj = nn.Conv2d(16, 12, 1, stride=2, bias=False)

    def forward(self, x):
        y = self.conv1(F.relu(self.bn1(x)))
        y = self.conv2(self.act(self.bn2(y))) + y
        pre = torch.relu(self.bn3(y))          # shared by a 1x1 conv and a strided 1x1 projection
        # (+ y itself, so that the conv biases have a gradient: through BNs alone it is exactly zero)
        return self.conv3(pre)[:, :, ::2, ::2] + self.proj(pre) + y[:, :12, ::2, ::2]


def op_calls(model, *args, **kwargs):
    """(output, {op name: number of calls}) of one forward: proves the fused op really runs."""
    counts = {}
    patches = []
    for name in ("bn_relu_conv1x1", "bn_relu_conv1x1_dual"):
        original = getattr(Fp, name)

        def counting(*a, _name=name, _original=original, **k):
            counts[_name] = counts.get(_name, 0) + 1
            return _original(*a, **k)
        patches.append(mock.patch.object(Fp, name, counting))
    with patches[0], patches[1]:
        out = model(*args, **kwargs)
    return out, counts


def test_toy_model_fused_through_tracing():
    torch.manual_seed(0)
    model = ToyModel()
    x, w = torch.randn(4, 8, 12, 12), torch.randn(4, 12, 3, 3)
    fused = compare_three(model, x, w)
    assert dict(fused_chains(fused)) == {BN_RELU: 2, BN_RELU_DUAL: 1}, interpreter_backend()
    assert isinstance(fused, ToyModel) and repr(fused).startswith("ToyModel[fused]")
    for train in (True, False):
        fused.train(train)
        assert op_calls(fused, x)[1] == {"bn_relu_conv1x1": 2, "bn_relu_conv1x1_dual": 1}


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1)

    def forward(self, x, skip):
        return self.conv(F.relu(self.bn(x))) + skip


def test_keyword_arguments_run_fused_and_other_calls_fall_back():
    model = TwoInputs()
    fused = fuse(model)
    x = torch.randn(2, 8, 4, 4)
    for args, kwargs in (((x, x), {}), ((x,), {"skip": x}), ((), {"skip": x, "x": x})):
        out, calls = op_calls(fused, *args, **kwargs)
        assert calls == {"bn_relu_conv1x1": 1}
        torch.testing.assert_close(out, model(x, x), rtol=1e-5, atol=1e-5)
    out, calls = op_calls(fused, x, 1.0)           # a call the trace did not cover: original forward
    assert calls == {} and torch.allclose(out, model(x, 1.0), rtol=1e-5, atol=1e-5)


def test_sequential_fused_without_tracing():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    # (a conv bias right before a train-mode BN has an exactly-zero gradient: no bias there)
    seq = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 1, stride=2, bias=False),
                        nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, bias=False),
                        timm.layers.BatchNormAct2d(16), nn.Conv2d(16, 8, 1, bias=True))
    x, w = torch.randn(4, 8, 10, 10), torch.randn(4, 8, 5, 5)
    fused = compare_three(seq, x, w)
    assert type(fused) is FusedSequential and isinstance(fused, nn.Sequential)
    assert dict(fused_chains(fused)) == {BN_RELU: 1, BNACT: 1}
    assert isinstance(fused[2], nn.Conv2d) and len(fused) == 8


class TwoUsers(nn.Module):
    """Chains whose intermediate results have another user: none may be fused."""

    def __init__(self):
        super().__init__()
        self.bn_a, self.conv_a = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1)
        self.bn_b, self.conv_b = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1)
        self.bn_c, self.convs_c = nn.BatchNorm2d(8), nn.ModuleList(nn.Conv2d(8, 8, 1) for _ in range(3))
        self.bn_d, self.conv_d1, self.conv_d3 = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1)
        self.bn_e, self.conv_e = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        z = self.bn_a(x)                                   # BN output also feeds the sum
        x = self.conv_a(F.relu(z)) + z
        a = F.relu(self.bn_b(x))                           # ReLU output also feeds the sum
        x = self.conv_b(a) + a
        a = F.relu(self.bn_c(x))                           # three convs on one pre-activation
        x = sum(conv(a) for conv in self.convs_c)
        a = F.relu(self.bn_d(x))                           # a 1x1 and a 3x3 conv on one pre-activation
        x = self.conv_d1(a) + self.conv_d3(a)
        z = self.bn_e(x)                                   # in-place ReLU, but BN output used after it
        return self.conv_e(self.relu(z)) * z


def test_bn_with_other_users_is_not_fused():
    torch.manual_seed(0)
    model = TwoUsers()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fused = fuse(model)
    assert not [str(w.message) for w in seen if "fastpreact" in str(w.message)]
    assert not fused_chains(fused) and type(fused) is TwoUsers
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)


class UntraceableModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        if x.sum() > 0:                                    # data-dependent control flow
            x = -x
        return self.conv(F.relu(self.bn(x)))


def test_untraceable_model_returned_unchanged_with_warning():
    model = UntraceableModel()
    with pytest.warns(UserWarning, match=r"left <model> \(UntraceableModel\) unfused: torch.fx cannot trace"):
        fused = fuse(model)
    assert type(fused) is UntraceableModel and not fused_chains(fused)
    x = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)


class ModeDependent(nn.Module):
    """A forward that branches on self.training: each mode gets its own rewritten forward."""

    def __init__(self):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = self.conv(F.relu(self.bn(x)))
        return y * 2 if self.training else y - 1


def test_forward_branching_on_training():
    torch.manual_seed(0)
    fused = compare_three(ModeDependent(), torch.randn(4, 8, 6, 6), torch.randn(4, 8, 6, 6))
    assert dict(fused_chains(fused)) == {BN_RELU: 1}


def test_batchnorm_variants_momentum_none_untracked_not_affine():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(8, momentum=None), nn.ReLU(), nn.Conv2d(8, 8, 1, bias=False),
                          nn.BatchNorm2d(8, track_running_stats=False), nn.ReLU(), nn.Conv2d(8, 8, 1, bias=False),
                          nn.BatchNorm2d(8, affine=False), nn.ReLU(), nn.Conv2d(8, 4, 1))
    fused = compare_three(model, torch.randn(4, 8, 5, 5), torch.randn(4, 4, 5, 5),
                          modes=(True, True, False, True))
    assert fused_chains(fused)[BN_RELU] == 3
    assert int(fused[0].num_batches_tracked) == 3


class SamePadding(nn.Module):
    """1x1 convs with padding="same" (which is no padding on a 1x1 kernel), in a traced forward."""

    def __init__(self):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1, padding="same", bias=False)
        self.conv3x3 = nn.Conv2d(8, 8, 3, padding="same", bias=False)  # not 1x1: not fused

    def forward(self, x):
        return self.conv3x3(self.conv(F.relu(self.bn(x)))) + x


def test_padding_same_1x1_is_fused():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1, padding="same", bias=False),
                        nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3, padding="same", bias=False))
    fused = compare_three(seq, torch.randn(4, 8, 5, 5), torch.randn(4, 4, 5, 5))
    assert type(fused) is FusedSequential and dict(fused_chains(fused)) == {BN_RELU: 1}
    fused = compare_three(SamePadding(), torch.randn(4, 8, 5, 5), torch.randn(4, 8, 5, 5))
    assert dict(fused_chains(fused)) == {BN_RELU: 1}
    assert op_calls(fused, torch.randn(2, 8, 5, 5))[1] == {"bn_relu_conv1x1": 1}


def test_autocast_like_the_original(torch_backend):
    torch.manual_seed(0)
    model = ToyModel()
    fused, ref64 = fuse(model), copy.deepcopy(model).double()
    x = torch.randn(4, 8, 12, 12)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_u, out_f = model(x), fused(x)
        out_r = ref64(x.double())
    assert out_f.dtype == out_u.dtype == torch.bfloat16
    assert_relative(out_f, out_u, out_r, "autocast output", atol_rel=1e-2)


def test_graph_module_deepcopy_pickle():
    torch.manual_seed(0)
    model = ToyModel()
    fused_gm = fuse(torch.fx.symbolic_trace(model))         # a GraphModule: rewritten in place
    assert dict(fused_chains(fused_gm)) == {BN_RELU: 2, BN_RELU_DUAL: 1}
    fused = fuse(model)
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)          # re-traced on load
    copied = copy.deepcopy(fused)
    x = torch.randn(2, 8, 6, 6)
    for m in (fused_gm, loaded, copied, fused, model):
        m.eval()
    expected = model(x)
    for m in (fused_gm, loaded, copied, fused):
        assert fused_chains(m) == fused_chains(fused)
        torch.testing.assert_close(m(x), expected, rtol=1e-4, atol=1e-5)


def test_pickle_loaded_unfused_with_warning_when_it_cannot_be_traced_again():
    from fastpreact.fusion import traced as fuse_fx
    model = ToyModel()
    buffer = io.BytesIO()
    torch.save(fuse(model), buffer)
    buffer.seek(0)
    with mock.patch.object(fuse_fx, "_trace", side_effect=RuntimeError("no tracing here")), \
            pytest.warns(UserWarning, match=r"loaded ToyModel unfused: torch.fx cannot trace its forward"):
        loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is ToyModel and not fused_chains(loaded)
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x), rtol=0, atol=0)


def test_fastpreact_stock_model_fused():
    from fastpreact.models import create_model
    model = create_model("resnet11", 10)
    fused = fuse(model)
    chains = fused_chains(fused)
    assert chains["BatchNormReLU2d(ReLU) -> 2x Conv1x1 (shared pre-activation)"] == 3
    assert list(fused.state_dict()) == list(model.state_dict())


def test_bad_input():
    with pytest.raises(TypeError, match="expected an nn.Module"):
        fuse(nn.Linear(2, 2).state_dict())
    assert callable(fastpreact.fuse) and fused_chains(fastpreact.fuse(nn.Linear(2, 2))) == {}


# ----------------------------------------------------------------------------------------------------
# fastpreact's own classes, and how fastpreact.fuse is imported
# ----------------------------------------------------------------------------------------------------
def test_fastpreact_classes_fuse_knows_are_the_exported_ones():
    # fuse imports the classes it recognises: each is the class its package exports under its name, and
    # every fused module the packages export (the drop-in modules, fastpreact.nn, models' Fused* units)
    # is one fuse leaves alone.
    import fastpreact.models
    import fastpreact.nn
    from fastpreact.fusion.patterns import RUNS_FUSED_OP, bn_kind
    packages = (fastpreact, fastpreact.nn, fastpreact.models)
    for cls in RUNS_FUSED_OP:
        assert any(getattr(p, cls.__name__, None) is cls for p in packages), cls
    exported = {fastpreact.BNReLUConv1x1, fastpreact.BNReLUConv1x1Dual}
    exported |= {c for c in vars(fastpreact.nn).values() if isinstance(c, type) and issubclass(c, nn.Module)}
    exported.remove(fastpreact.nn.BatchNormReLU2d)  # the stock BN+ReLU module: fuse fuses it (bn_kind)
    exported |= {c for name, c in vars(fastpreact.models).items()
                 if name.startswith("Fused") and isinstance(c, type) and issubclass(c, nn.Module)}
    assert exported == set(RUNS_FUSED_OP)
    assert bn_kind(fastpreact.models.BatchNormReLU2d(4)) == "bnact"
    assert bn_kind(fastpreact.models.BatchNormReLU2d(4, apply_act=False)) is None
    timm = pytest.importorskip("timm")
    assert bn_kind(timm.layers.BatchNormAct2d(4)) == "bnact"
    assert bn_kind(timm.layers.BatchNormAct2d(4, act_layer=nn.GELU)) is None


def test_fastpreact_fused_model_left_alone():
    from fastpreact.models import create_model
    model = create_model("resnet11", 10, kernels="fused")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fused = fuse(model)
    assert not [str(w.message) for w in seen if "fastpreact" in str(w.message)]
    assert not fused_chains(fused)
    assert [type(m) for m in fused.modules()] == [type(m) for m in model.modules()]


@pytest.mark.parametrize("first", ["import fastpreact", "from fastpreact import fused_chains"])
def test_fastpreact_fuse_is_the_function_whatever_is_imported_first(first):
    # A fresh interpreter: fastpreact.fuse(model) works after either import, and `import fastpreact`
    # loads neither the fusion machinery nor the optional packages.
    code = f"""
import sys
{first}
import fastpreact
heavy = [m for m in sys.modules if m.split(".")[0] in ("timm", "torchvision", "triton")
         or m in ("fastpreact.fusion.walk", "fastpreact.fusion.traced", "fastpreact.fusion.patterns")]
assert not heavy, heavy
from fastpreact import fused_chains
from torch import nn
model = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1))
assert fused_chains(fastpreact.fuse(model)) == fastpreact.fused_chains(fastpreact.fuse(model, inplace=True))
assert sum(fused_chains(model).values()) == 1
import fastpreact.fusion
assert callable(fastpreact.fuse) and fastpreact.fuse is fastpreact.fusion.fuse
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_interpreter_backend_in_use():
    # The float32 tests above run the Triton path on a CPU machine (conftest sets TRITON_INTERPRET=1).
    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1" and interpreter_backend() == "triton"


# ----------------------------------------------------------------------------------------------------
# On a GPU: the real Triton kernels under the big nets (skipped on a CPU machine)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["torchvision.resnet50", "timm.resnetv2_50"])
def test_gpu_big_net_on_triton(name, monkeypatch):
    # Full fp32 products on both sides (the kernels use TF32 exactly when cuDNN may).
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model = big_model(name).cuda()
    x, w = torch.randn(8, 3, 64, 64, device="cuda"), torch.randn(8, 10, device="cuda")
    assert Fp.backend(x.device) == "triton"
    fused = compare_three(model, x, w, modes=(True, False), grads=False, elementwise=False)
    # bf16 autocast, eval mode (running statistics from the train step above): like the original.
    ref64 = copy.deepcopy(model).double().eval()
    fused.eval()
    model.eval()
    with torch.no_grad():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out_f, out_u = fused(x), model(x)
        out_r = ref64(x.double())
    assert out_f.dtype == out_u.dtype == torch.bfloat16
    assert_relative(out_f, out_u, out_r, "bf16 autocast output", atol_rel=1e-2, elementwise=False)
