"""The BN-ReLU pass (fastpreact.functional.bn_relu*, kernels/bn_relu.py) against stock PyTorch in float64.

On a CPU the kernels run through TRITON_INTERPRET=1 (tests/conftest.py); every kernel output starts as
NaN (poison_outputs), so an element a kernel never writes fails. BatchNorm here sees >= 32 values per
channel (train-mode BatchNorm over fewer is ill-conditioned).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastpreact import functional as Fp
from fastpreact import reference
from fastpreact.functional import bn_relu_conv2d, bn_relu_max_pool2d
from fastpreact.nn import BatchNormReLU2d, FusedBatchNormReLU2d
from oracle import assert_close64
from conftest import channels_last, use_torch_backend

pytestmark = pytest.mark.usefixtures("poison_outputs")


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("given_stats", [False, True])
def test_bn_relu_conv2d_matches_stock(stride, given_stats):
    torch.manual_seed(0)
    bn, conv = nn.BatchNorm2d(6), nn.Conv2d(6, 5, 3, stride, 1, bias=False)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
    bn_ref, conv_ref = copy.deepcopy(bn).double(), copy.deepcopy(conv).double()
    x = channels_last(torch.randn(4, 6, 7, 7) * 2 + 1).requires_grad_()
    x_ref = x.detach().double().requires_grad_()
    stats = Fp.batch_stats(x.detach()) if given_stats else None
    y = bn_relu_conv2d(x, bn, conv, input_stats=stats)
    y_ref = conv_ref(F.relu(bn_ref(x_ref)))
    dy = torch.randn_like(y_ref)
    (y.double() * dy).sum().backward()
    (y_ref * dy).sum().backward()
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    for got, want, name in [(x.grad, x_ref.grad, "dx"), (conv.weight.grad, conv_ref.weight.grad, "dW"),
                            (bn.weight.grad, bn_ref.weight.grad, "dgamma"),
                            (bn.bias.grad, bn_ref.bias.grad, "dbeta"),
                            (bn.running_mean, bn_ref.running_mean, "running_mean"),
                            (bn.running_var, bn_ref.running_var, "running_var")]:
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5, msg=name)
    assert bn.num_batches_tracked == 1

    # eval mode: running statistics, dx = scale * dz
    bn.eval(), bn_ref.eval()
    x.grad = x_ref.grad = None
    y = bn_relu_conv2d(x, bn, conv)
    y_ref = conv_ref(F.relu(bn_ref(x_ref)))
    (y.double() * dy).sum().backward()
    (y_ref * dy).sum().backward()
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=1e-4, atol=1e-5)
    assert bn.num_batches_tracked == 1


def test_fused_bn_relu_module_matches_stock():
    torch.manual_seed(0)
    stock = BatchNormReLU2d(5, momentum=None)  # cumulative average: the other momentum semantics
    fused = FusedBatchNormReLU2d(5, momentum=None)
    fused.load_state_dict(stock.state_dict())
    for step in range(2):
        x = channels_last(torch.randn(3, 5, 4, 6) + step).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        dy = torch.randn(3, 5, 4, 6)
        (stock(x) * dy).sum().backward()
        (fused(x2) * dy).sum().backward()
        torch.testing.assert_close(x2.grad, x.grad, rtol=1e-4, atol=1e-5)
    for k, v in stock.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)
    torch.testing.assert_close(fused.weight.grad, stock.weight.grad, rtol=1e-4, atol=1e-5)


def test_bn_relu_max_pool2d_matches_stock():
    torch.manual_seed(0)
    bn, pool = nn.BatchNorm2d(4), nn.MaxPool2d(3, 2, 1)
    with torch.no_grad():
        bn.weight.uniform_(-1.5, 1.5), bn.bias.uniform_(-0.5, 0.5)  # negative scales too
    bn_ref = copy.deepcopy(bn).double()
    x = channels_last(torch.randn(2, 4, 9, 9)).requires_grad_()
    x_ref = x.detach().double().requires_grad_()
    y, y_ref = bn_relu_max_pool2d(x, bn, pool), pool(F.relu(bn_ref(x_ref)))
    dy = torch.randn_like(y_ref)
    (y.double() * dy).sum().backward()
    (y_ref * dy).sum().backward()
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.weight.grad.double(), bn_ref.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var.double(), bn_ref.running_var, rtol=1e-5, atol=1e-6)


def test_bn_relu_conv2d_rejects_unsupported_conv():
    with pytest.raises(ValueError, match="bn_relu_conv2d: conv must have no bias"):
        bn_relu_conv2d(torch.randn(2, 4, 4, 4), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1))


def _torch_backend(monkeypatch):
    use_torch_backend(monkeypatch)
    assert Fp.backend("cpu") == "torch"


@pytest.mark.parametrize("backend", ["default", "torch"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_large_mean_is_accurate(backend, training, monkeypatch):
    """x with mean 1e3 and std 1: BN-ReLU forward and backward (the kernel pass, and the torch fallback)
    against the float64 definition. fp32 holds the mean only to ~3e-5, so z = (x - mean) * scale + beta
    is off by ~scale * 3e-5 at best; x * scale + shift would cancel ~1e3 against ~1e3 on top of that."""
    if backend == "torch":
        _torch_backend(monkeypatch)
    torch.manual_seed(0)
    c = 6
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.fill_(1e3), bn.running_var.uniform_(0.5, 2.0)
    bn.train(training)
    bn_ref = copy.deepcopy(bn).double()
    x = channels_last(torch.randn(4, c, 8, 8) + 1e3).requires_grad_()
    x_ref = x.detach().double().requires_grad_()
    y = Fp.bn_relu(x, bn)
    y_ref = reference.bn_relu(x_ref, bn_ref.weight, bn_ref.bias, bn_ref.running_mean, bn_ref.running_var,
                              training=training)
    dy = torch.randn_like(y_ref)
    (y.double() * dy).sum().backward()
    (y_ref * dy).sum().backward()
    # Measured: y ~6e-6, dx ~2e-6, dgamma ~3e-5 of their scale (x * scale + shift: y ~3e-5).
    assert_close64("y", y, y_ref, rtol=1.5e-5)
    assert_close64("dx", x.grad, x_ref.grad, rtol=1e-5)
    assert_close64("dgamma", bn.weight.grad, bn_ref.weight.grad, rtol=1e-4)
    assert_close64("dbeta", bn.bias.grad, bn_ref.bias.grad, rtol=2e-6)
    assert_close64("running_mean", bn.running_mean, bn_ref.running_mean, rtol=1e-6)
    assert_close64("running_var", bn.running_var, bn_ref.running_var, rtol=1e-6)


def test_kernel_pass_runs_under_interpreter(monkeypatch):
    """The Triton pass (not the fallback) is what the default-backend tests above exercise on a CPU."""
    if Fp.backend("cpu") != "triton":
        pytest.skip("needs TRITON_INTERPRET=1 (the kernels on CPU tensors)")
    from fastpreact.kernels import bn_relu as kb
    calls = []
    for name in ("bn_relu_fwd", "bn_relu_bwd_reduce", "bn_relu_bwd_dx"):
        monkeypatch.setattr(kb, name,
                            lambda *a, _f=getattr(kb, name), _n=name, **k: calls.append(_n) or _f(*a, **k))
    x = channels_last(torch.randn(2, 4, 4, 4)).requires_grad_()
    Fp.bn_relu(x, nn.BatchNorm2d(4)).sum().backward()
    assert calls == ["bn_relu_fwd", "bn_relu_bwd_reduce", "bn_relu_bwd_dx"]
