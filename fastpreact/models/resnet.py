"""Pre-activation (and original) ResNets for CIFAR and ImageNet: one model definition, one registry.

He et al., "Identity Mappings in Deep Residual Networks" (ECCV 2016), with the architectures of the
authors' reference code: KaimingHe/resnet-1k-layers `resnet-pre-act.lua` (CIFAR) and
facebook/fb.resnet.torch `models/preresnet.lua` (ImageNet).

CIFAR family (any resnetN other than the ImageNet names): 3x3 conv stem with 16 channels (the pre-act
net has no BN-ReLU after it: the first unit's pre-activation follows), three stages of n units at widths
16/32/64 (bottleneck outputs 64/128/256), stride 2 at the first unit of stages 2 and 3 (on the first 1x1
of a bottleneck), 1x1 projection shortcuts on the shared pre-activation where the shape changes, the
extra BN-ReLU after the last unit, global average pooling, FC. Depth 6n+2 (basic) or 9n+2 (bottleneck).

ImageNet family (resnet18/34/50/101/152/200): 7x7/2 conv, BN-ReLU, 3x3/2 max-pool (so the first unit has
no pre-activation of its own), four stages at widths 64/128/256/512 (bottleneck outputs x4), stride on
the 3x3 conv, projection shortcuts with pre-activation, final BN-ReLU, global average pooling, FC.

unit="original" builds the post-activation baseline (Table 3 of the paper) with the same stems, stages
and projection shortcuts (conv + BN); its layers match torchvision's ResNet-50/101/152 exactly.
"""
from __future__ import annotations

import re
from collections import OrderedDict

import torch
from torch import nn

from ..nn import BatchNormReLU2d
from .blocks import Basic, Bottleneck, PreActBasic, PreActBottleneck, conv2d, count_main_path_layers
from .fused_units import fused_components

__all__ = ["ResNet", "create_model", "list_archs", "IMAGENET_LAYERS"]

# Units per stage of the ImageNet nets (as in fb.resnet.torch); basic units for 18/34, bottlenecks above.
IMAGENET_LAYERS = {
    18: ((2, 2, 2, 2), "basic"),
    34: ((3, 4, 6, 3), "basic"),
    50: ((3, 4, 6, 3), "bottleneck"),
    101: ((3, 4, 23, 3), "bottleneck"),
    152: ((3, 8, 36, 3), "bottleneck"),
    200: ((3, 24, 36, 3), "bottleneck"),
}
IMAGENET_WIDTHS = (64, 128, 256, 512)
CIFAR_WIDTHS = (16, 32, 64)
# The CIFAR nets named for messages and --help; any other 6n+2 / 9n+2 depth works too.
CIFAR_ARCHS = (8, 11, 20, 32, 44, 56, 110, 164, 1001, 1202)

UNITS = {
    ("preact", "basic"): PreActBasic,
    ("preact", "bottleneck"): PreActBottleneck,
    ("original", "basic"): Basic,
    ("original", "bottleneck"): Bottleneck,
}
_BLOCK_LAYERS = {"basic": 2, "bottleneck": 3}  # convs per unit on the main path


class ResNet(nn.Module):
    """A residual network of `unit_cls` units: stem, stages, [final BN-ReLU], global average pool, FC.

    family: "cifar" (3x3 stem) or "imagenet" (7x7/2 stem, BN-ReLU, 3x3/2 max-pool).
    layers: units per stage; widths: per-stage widths (a bottleneck's output is 4x its width); the stem
    has widths[0] channels. conv_layer/norm_layer: the factories every piece is built from; stem_cls:
    the stem's container (an nn.Sequential of conv, norm[, pool]).
    chain_stats: units implement forward_with_stats(x, stats, next_bn) -> (y, stats of y), so that in
    training the batch statistics flow from each unit's last kernel to the next unit's first, which
    finishes next_bn, the BatchNorm consuming y, in the same launch (fused_units.py).
    """

    def __init__(self, unit_cls, layers, widths, num_classes, *, family="cifar", preact=True,
                 conv_layer=conv2d, norm_layer=BatchNormReLU2d, stem_cls=nn.Sequential,
                 zero_init_last_bn=False, chain_stats=False):
        super().__init__()
        self.family, self.preact, self.chain_stats = family, preact, chain_stats
        stem_chs = widths[0]
        stem = [("conv", conv_layer(3, stem_chs, 7 if family == "imagenet" else 3,
                                    2 if family == "imagenet" else 1))]
        # The pre-act CIFAR stem is a bare conv (the first unit's pre-activation follows); every other
        # stem ends in BN-ReLU, after which the ImageNet stem max-pools.
        if family == "imagenet" or not preact:
            stem.append(("norm", norm_layer(stem_chs)))
        if family == "imagenet":
            stem.append(("pool", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)))
        self.stem = stem_cls(OrderedDict(stem))

        stride_on_first = family == "cifar"
        in_chs = stem_chs
        stages = []
        for i, (n, width) in enumerate(zip(layers, widths)):
            out_chs = width * unit_cls.expansion
            units = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                # The first ImageNet unit's input is already BN-ReLU'd by the stem.
                own_preact = not (family == "imagenet" and i == 0 and j == 0)
                units.append(unit_cls(in_chs, out_chs, stride, own_preact=own_preact,
                                      conv_layer=conv_layer, norm_layer=norm_layer,
                                      stride_on_first=stride_on_first))
                in_chs = out_chs
            stages.append(nn.Sequential(*units))
        self.stages = nn.Sequential(*stages)
        self.num_features = in_chs
        # The extra activation after the last pre-act unit's addition (the paper's appendix).
        self.norm = norm_layer(in_chs) if preact else nn.Identity()
        self.fc = nn.Linear(in_chs, num_classes)
        self.reset_parameters(zero_init_last_bn)

    def units(self):
        """The residual units, in order."""
        return [unit for stage in self.stages for unit in stage]

    @torch.no_grad()
    def reset_parameters(self, zero_init_last_bn=False):
        """He normal (fan-out) convolutions, BN gamma 1 / beta 0, FC bias 0 (fb.resnet.torch)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        if zero_init_last_bn:
            for unit in self.units():
                nn.init.zeros_(unit.last_layer().weight)

    def depth(self):
        """Convolutions and FC layers on the main path (projection shortcuts excluded)."""
        return 1 + sum(count_main_path_layers(u) for u in self.units()) + 1

    def forward_features(self, x):
        x = self.stem(x)
        if self.chain_stats and self.training:
            stats = None  # the first unit measures its own input's statistics
            units = list(self.units())
            for unit, consumer in zip(units, [u.norm1 for u in units[1:]] + [self.norm]):
                x, stats = unit.forward_with_stats(x, stats, next_bn=consumer)
            return self.norm(x, input_stats=stats)
        return self.norm(self.stages(x))

    def forward_head(self, x):
        # A mean rather than adaptive_avg_pool2d: same result, and its backward keeps no activation.
        return self.fc(x.mean(dim=(2, 3)))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def list_archs():
    """Registered model names (the ImageNet family, then the CIFAR nets named in the paper and tests).

    Any other resnetN with N = 6n+2 (basic) or 9n+2 (bottleneck) builds a CIFAR-family net too.
    """
    return [f"resnet{d}" for d in IMAGENET_LAYERS] + [f"resnet{d}" for d in CIFAR_ARCHS]


def _arch_error(arch, why):
    return ValueError(
        f"create_model: {why} (got arch={arch!r}); valid: {', '.join(list_archs())}, or any resnetN with "
        "N = 6n+2 (basic) or 9n+2 (bottleneck) for the CIFAR family")


def _cifar_units(depth, block, arch):
    """Units per stage and block type of a CIFAR-family net of `depth` (basic up to 110, bottleneck above)."""
    fits = {b: (depth - 2) % (3 * k) == 0 and depth > 2 for b, k in _BLOCK_LAYERS.items()}
    if block is None:
        if fits["basic"] and fits["bottleneck"]:
            block = "basic" if depth <= 110 else "bottleneck"
        elif fits["basic"] or fits["bottleneck"]:
            block = "basic" if fits["basic"] else "bottleneck"
        else:
            raise _arch_error(arch, f"depth {depth} is neither 6n+2 (basic) nor 9n+2 (bottleneck)")
    elif not fits[block]:
        rule = "6n+2" if block == "basic" else "9n+2"
        raise _arch_error(arch, f"a CIFAR {block} net needs depth {rule}, and {depth} is not")
    n = (depth - 2) // (3 * _BLOCK_LAYERS[block])
    return (n, n, n), block


def create_model(arch, num_classes, unit="preact", kernels="stock", **kw):
    """Build a ResNet of the paper by name.

    arch: resnet18/34/50/101/152/200 (ImageNet family) or any other resnetN (CIFAR family).
    num_classes: size of the FC output.
    unit: "preact" (the paper's full pre-activation) or "original" (post-activation baseline).
    kernels: "stock" (plain PyTorch modules) or "fused" (the Triton path of fused_units.py); both have
        the same state_dict keys and shapes.
    Keywords:
        block: "basic" | "bottleneck" (overrides the depth rule).
        family: "cifar" | "imagenet" (overrides the family the name implies).
        zero_init_last_bn: zero the last layer of every residual branch at init (default False): the last
            BN of an original unit, the last conv of a pre-act unit (zeroing its last BN's gamma would
            also zero its ReLU's gradient).
        layers: units per stage (3 for CIFAR, 4 for ImageNet); must agree with the depth in the name.
        widths: per-stage widths (bottleneck outputs are 4x), e.g. small ones for tests.
    """
    allowed = {"block", "family", "zero_init_last_bn", "layers", "widths"}
    unknown = sorted(set(kw) - allowed)
    if unknown:
        raise TypeError(f"create_model: unknown keyword(s) {', '.join(unknown)}; "
                        f"valid: {', '.join(sorted(allowed))}")
    if not isinstance(arch, str):
        raise TypeError(f"create_model: arch must be a string such as 'resnet164', got {type(arch).__name__}")
    match = re.fullmatch(r"resnet(\d+)", arch.strip().lower())
    if match is None:
        raise _arch_error(arch, "unknown architecture name")
    depth = int(match.group(1))
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"create_model: num_classes must be a positive int, got {num_classes!r}")
    if unit not in ("preact", "original"):
        raise ValueError(f"create_model: unit must be 'preact' or 'original', got {unit!r}")
    if kernels not in ("stock", "fused"):
        raise ValueError(f"create_model: kernels must be 'stock' or 'fused', got {kernels!r}")
    block = kw.get("block")
    if block is not None and block not in _BLOCK_LAYERS:
        raise ValueError(f"create_model: block must be 'basic' or 'bottleneck', got {block!r}")
    family = kw.get("family") or ("imagenet" if depth in IMAGENET_LAYERS else "cifar")
    if family not in ("cifar", "imagenet"):
        raise ValueError(f"create_model: family must be 'cifar' or 'imagenet', got {family!r}")
    num_stages = 4 if family == "imagenet" else 3

    layers = kw.get("layers")
    if layers is not None:
        layers = tuple(layers)
        if len(layers) != num_stages or not all(isinstance(n, int) and n >= 1 for n in layers):
            raise ValueError(f"create_model: layers must be {num_stages} positive ints for the {family} "
                             f"family, got {kw['layers']!r}")
        fitting = [b for b, k in _BLOCK_LAYERS.items() if 2 + k * sum(layers) == depth]
        if block is not None and block not in fitting:
            fitting = []
        if not fitting:
            raise _arch_error(arch, f"layers={layers} give depth {2 + 2 * sum(layers)} (basic) or "
                                    f"{2 + 3 * sum(layers)} (bottleneck), not {depth}")
        block = block or fitting[0]
    elif family == "imagenet":
        if depth not in IMAGENET_LAYERS:
            raise _arch_error(arch, f"the ImageNet family has depths {sorted(IMAGENET_LAYERS)} "
                                    "(or pass layers=(a, b, c, d))")
        layers, default_block = IMAGENET_LAYERS[depth]
        if block is not None and block != default_block:
            raise _arch_error(arch, f"ImageNet resnet{depth} is built of {default_block} units")
        block = default_block
    else:
        layers, block = _cifar_units(depth, block, arch)

    widths = kw.get("widths")
    if widths is None:
        widths = IMAGENET_WIDTHS if family == "imagenet" else CIFAR_WIDTHS
    widths = tuple(widths)
    if len(widths) != num_stages or not all(isinstance(w, int) and w >= 1 for w in widths):
        raise ValueError(f"create_model: widths must be {num_stages} positive ints for the {family} "
                         f"family, got {kw['widths']!r}")

    components = dict(unit_cls=UNITS[(unit, block)])
    if kernels == "fused":
        components = fused_components(components["unit_cls"])
    return ResNet(layers=layers, widths=widths, num_classes=num_classes, family=family,
                  preact=unit == "preact", zero_init_last_bn=bool(kw.get("zero_init_last_bn", False)),
                  **components)
