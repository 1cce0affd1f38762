"""fastpreact.models: the paper's architectures (parameter counts, depth, layout), init, forward/backward.

Large nets are built on the meta device (no memory, no init cost): counting parameters and walking the
module tree needs only shapes.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastpreact.models import (Basic, Bottleneck, PreActBasic, PreActBottleneck, create_model,
                               list_archs)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def meta_model(*args, **kw):
    with torch.device("meta"):
        return create_model(*args, **kw)


# ---------------------------------------------------------------------------------------------- counts
@pytest.mark.parametrize("arch,paper_millions",
                         [("resnet110", 1.7), ("resnet164", 1.7), ("resnet1001", 10.2)])
def test_cifar_param_counts_match_paper(arch, paper_millions):
    count = n_params(meta_model(arch, 10))
    assert abs(count / (paper_millions * 1e6) - 1) <= 0.02, f"{arch}: {count} parameters"


@pytest.mark.parametrize("depth,layers", [(50, [3, 4, 6, 3]), (101, [3, 4, 23, 3]), (152, [3, 8, 36, 3]),
                                          (200, [3, 24, 36, 3])])
def test_imagenet_preact_param_counts_equal_timm_resnetv2(depth, layers):
    timm_resnetv2 = pytest.importorskip("timm.models.resnetv2")
    from timm.layers import BatchNormAct2d, create_conv2d
    with torch.device("meta"):
        ref = timm_resnetv2.ResNetV2(layers=layers, conv_layer=create_conv2d, norm_layer=BatchNormAct2d)
    assert n_params(meta_model(f"resnet{depth}", 1000)) == n_params(ref)


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
def test_imagenet_original_param_counts_equal_torchvision(depth):
    import torchvision
    with torch.device("meta"):
        ref = getattr(torchvision.models, f"resnet{depth}")()
    assert n_params(meta_model(f"resnet{depth}", 1000, unit="original")) == n_params(ref)


# ------------------------------------------------------------------------------------ depth and layout
@pytest.mark.parametrize("arch,block", [
    ("resnet8", "basic"), ("resnet11", "bottleneck"), ("resnet20", "basic"), ("resnet56", "basic"),
    ("resnet110", "basic"), ("resnet164", "bottleneck"), ("resnet1001", "bottleneck"),
    ("resnet1202", "basic"), ("resnet18", "basic"), ("resnet34", "basic"), ("resnet50", "bottleneck"),
    ("resnet101", "bottleneck"), ("resnet152", "bottleneck"), ("resnet200", "bottleneck"),
])
@pytest.mark.parametrize("unit", ["preact", "original"])
def test_depth_counts_main_path_convs_and_fc(arch, block, unit):
    model = meta_model(arch, 10, unit=unit)
    depth = int(arch[len("resnet"):])
    main_path = [m for name, m in model.named_modules()
                 if isinstance(m, (nn.Conv2d, nn.Linear)) and "downsample" not in name]
    assert len(main_path) == depth == model.depth()
    expected = {("preact", "basic"): PreActBasic, ("preact", "bottleneck"): PreActBottleneck,
                ("original", "basic"): Basic, ("original", "bottleneck"): Bottleneck}[(unit, block)]
    assert all(type(u) is expected for u in model.units())


def test_cifar_bottleneck_layout_follows_resnet_pre_act_lua():
    model = meta_model("resnet164", 10)
    assert [len(s) for s in model.stages] == [18, 18, 18]
    assert list(model.stem) == [model.stem.conv] and model.stem.conv.out_channels == 16
    first = [stage[0] for stage in model.stages]
    assert [u.conv3.out_channels for u in first] == [64, 128, 256]
    assert [u.conv1.out_channels for u in first] == [16, 32, 64]
    # stride 2 on the first 1x1 of stages 2 and 3, and on their projection shortcut
    assert [u.conv1.stride for u in first] == [(1, 1), (2, 2), (2, 2)]
    assert all(u.conv2.stride == (1, 1) for u in model.units())
    assert [u.downsample.stride for u in first] == [(1, 1), (2, 2), (2, 2)]
    # every unit has its own pre-activation; projections only where the shape changes
    assert all(u.norm1 is not None for u in model.units())
    assert sum(u.downsample is not None for u in model.units()) == 3
    assert model.norm.num_features == 256  # the extra BN-ReLU after the last unit


def test_imagenet_layout_follows_preresnet_lua():
    model = meta_model("resnet200", 1000)
    assert [len(s) for s in model.stages] == [3, 24, 36, 3]
    assert model.stem.conv.kernel_size == (7, 7) and model.stem.conv.stride == (2, 2)
    assert isinstance(model.stem.norm, nn.BatchNorm2d) and isinstance(model.stem.pool, nn.MaxPool2d)
    first = [stage[0] for stage in model.stages]
    assert first[0].norm1 is None  # the stem's BN-ReLU is the first unit's pre-activation
    assert all(u.norm1 is not None for u in model.units()[1:])
    assert [u.conv2.stride for u in first] == [(1, 1), (2, 2), (2, 2), (2, 2)]
    assert all(u.conv1.stride == (1, 1) for u in model.units())
    assert [u.conv3.out_channels for u in first] == [256, 512, 1024, 2048]
    assert sum(u.downsample is not None for u in model.units()) == 4
    assert model.fc.in_features == 2048 and model.fc.out_features == 1000


def test_block_and_family_overrides():
    assert type(meta_model("resnet164", 10, block="basic").units()[0]) is PreActBasic  # 162 = 6*27
    assert type(meta_model("resnet20", 10, block="bottleneck").units()[0]) is PreActBottleneck  # 18 = 9*2
    m = meta_model("resnet50", 10, family="cifar")  # 48 = 6*8, not 9n: basic CIFAR net
    assert m.family == "cifar" and len(m.stages) == 3 and type(m.units()[0]) is PreActBasic
    m = meta_model("resnet14", 10, family="imagenet", layers=(1, 1, 1, 1), widths=(8, 8, 16, 16))
    assert m.family == "imagenet" and type(m.units()[0]) is PreActBottleneck and m.depth() == 14
    assert m.fc.in_features == 64


def test_preact_bottleneck_math_shares_one_preactivation():
    """y = conv3(relu(bn3(conv2(relu(bn2(conv1(a))))))) + proj(a), a = relu(bn1(x)) (float64)."""
    torch.manual_seed(0)
    unit = PreActBottleneck(8, 16, stride=2, stride_on_first=True).double()
    x = torch.randn(4, 8, 6, 6, dtype=torch.float64)

    def bn_relu(bn, t):
        return F.relu(F.batch_norm(t, None, None, bn.weight, bn.bias, True, 0.0, bn.eps))
    a = bn_relu(unit.norm1, x)
    h = F.conv2d(a, unit.conv1.weight, stride=2)
    h = F.conv2d(bn_relu(unit.norm2, h), unit.conv2.weight, padding=1)
    h = F.conv2d(bn_relu(unit.norm3, h), unit.conv3.weight)
    expected = h + F.conv2d(a, unit.downsample.weight, stride=2)
    torch.testing.assert_close(unit(x), expected)


def test_original_bottleneck_math():
    torch.manual_seed(0)
    unit = Bottleneck(8, 16, stride=2).double()
    x = torch.randn(4, 8, 6, 6, dtype=torch.float64)

    def bn(m, t):
        return F.batch_norm(t, None, None, m.weight, m.bias, True, 0.0, m.eps)
    h = F.relu(bn(unit.norm1, F.conv2d(x, unit.conv1.weight)))
    h = F.relu(bn(unit.norm2, F.conv2d(h, unit.conv2.weight, stride=2, padding=1)))
    h = bn(unit.norm3, F.conv2d(h, unit.conv3.weight))
    shortcut = bn(unit.downsample.norm, F.conv2d(x, unit.downsample.conv.weight, stride=2))
    torch.testing.assert_close(unit(x), F.relu(h + shortcut))


# ------------------------------------------------------------------------------------ forward/backward
SMALL_NETS = [
    ("resnet8", {}),
    ("resnet11", {}),
    ("resnet10", dict(family="imagenet", layers=(1, 1, 1, 1), widths=(8, 8, 16, 16))),  # basic
    ("resnet14", dict(family="imagenet", layers=(1, 1, 1, 1), widths=(4, 8, 8, 16))),   # bottleneck
]


@pytest.mark.parametrize("arch,kw", SMALL_NETS, ids=[a for a, _ in SMALL_NETS])
@pytest.mark.parametrize("unit", ["preact", "original"])
@pytest.mark.parametrize("size", [32, 13])
def test_forward_backward_channels_last(arch, kw, unit, size):
    torch.manual_seed(0)
    model = create_model(arch, 7, unit=unit, **kw).to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, size, size).to(memory_format=torch.channels_last)
    out = model(x)
    assert out.shape == (4, 7) and torch.isfinite(out).all()
    F.cross_entropy(out, torch.arange(4)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.fc.weight.grad.abs().sum() > 0 and model.stem.conv.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (4, 7)


# ------------------------------------------------------------------------------------------------ init
def test_init_statistics():
    torch.manual_seed(0)
    model = create_model("resnet56", 10)
    checked = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.weight.numel() >= 4096:
            k = m.kernel_size[0]
            expected = math.sqrt(2.0 / (k * k * m.out_channels))
            assert abs(m.weight.std().item() / expected - 1) < 0.1, name
            assert abs(m.weight.mean().item()) < 0.1 * expected, name
            checked += 1
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight)), name
            assert torch.equal(m.bias, torch.zeros_like(m.bias)), name
    assert checked >= 10
    assert torch.equal(model.fc.bias, torch.zeros_like(model.fc.bias))
    # off by default: no residual branch starts at zero
    assert all(u.last_layer().weight.abs().sum() > 0 for u in model.units())


@pytest.mark.parametrize("unit,last", [("preact", nn.Conv2d), ("original", nn.BatchNorm2d)])
def test_zero_init_last_bn(unit, last):
    model = create_model("resnet11", 10, unit=unit, zero_init_last_bn=True)
    for u in model.units():
        assert isinstance(u.last_layer(), last)
        assert torch.count_nonzero(u.last_layer().weight) == 0
    # the branch is zero at init, so an identity-shortcut unit passes its input through
    # (an original unit then applies its final ReLU)
    identity_unit = create_model("resnet20", 10, unit=unit, zero_init_last_bn=True).stages[0][1]
    x = torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(identity_unit(x), x if unit == "preact" else F.relu(x))


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("arch,kw,needle", [
    ("vgg16", {}, "unknown architecture"),
    ("resnet", {}, "unknown architecture"),
    ("resnet7", {}, "neither 6n+2"),
    ("resnet2", {}, "neither 6n+2"),
    ("resnet21", dict(block="basic"), "6n+2"),
    ("resnet50", dict(block="basic"), "bottleneck units"),
    ("resnet14", dict(family="imagenet"), "layers="),
    ("resnet14", dict(family="imagenet", layers=(1, 1, 1)), "4 positive ints"),
    ("resnet15", dict(family="imagenet", layers=(1, 1, 1, 1)), "not 15"),
])
def test_invalid_arch_lists_valid_choices(arch, kw, needle):
    with pytest.raises(ValueError, match="create_model") as info:
        meta_model(arch, 10, **kw)
    msg = str(info.value)
    assert needle in msg and "\n" not in msg
    if needle in ("unknown architecture", "neither 6n+2"):
        assert all(name in msg for name in list_archs())


@pytest.mark.parametrize("kw,exc,needle", [
    (dict(unit="postact"), ValueError, "'preact' or 'original'"),
    (dict(kernels="cuda"), ValueError, "'stock' or 'fused'"),
    (dict(block="wide"), ValueError, "'basic' or 'bottleneck'"),
    (dict(family="svhn"), ValueError, "'cifar' or 'imagenet'"),
    (dict(widths=(16, 32)), ValueError, "widths must be 3"),
    (dict(depth=3), TypeError, "unknown keyword"),
])
def test_invalid_options(kw, exc, needle):
    with pytest.raises(exc, match=needle):
        meta_model("resnet20", 10, **kw)


@pytest.mark.parametrize("num_classes", [0, -1, 2.5, True])
def test_invalid_num_classes(num_classes):
    with pytest.raises(ValueError, match="num_classes"):
        meta_model("resnet20", num_classes)


def test_list_archs():
    names = list_archs()
    assert names[:6] == ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet200"]
    assert {"resnet8", "resnet11", "resnet110", "resnet164", "resnet1001"} <= set(names)
    for name in names:
        assert isinstance(meta_model(name, 10), nn.Module)
