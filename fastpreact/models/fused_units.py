"""Fused residual units: the stock units of models/blocks.py with a forward on the fused kernels.

Each class subclasses its stock unit and keeps its submodules (norm1, conv1, ..., downsample), so the
state_dict keys and shapes are the stock ones and a checkpoint moves freely between kernels="stock" and
kernels="fused". Only forward changes.

Pre-act bottleneck, training (the hot path of ResNet-164/1001/200):

    (h1, stats2), shortcut = bn_relu_conv1x1_dual(x; norm1; conv1, downsample; input_stats=stats1)
                             [or bn_relu_conv1x1 when the shortcut is the identity]; the same launch
                             finishes norm2 from stats2 (rstd, running statistics: next_bn)
    h2 = conv2(relu(norm2(h1)))   one Triton BN-ReLU pass feeding cuDNN's 3x3, recomputed in backward
    y, stats_out = bn_relu_conv1x1(h2; norm3; conv3; residual=shortcut), BN3's statistics from one
                   batch_stats launch (cuDNN's 3x3 cannot emit them)

With the identity shortcut, conv3's backward hands the shortcut's gradient to conv1's dx pass
(functional.ShortcutGrad), which adds it: autograd launches no separate gradient add.

stats1 are the statistics of x emitted by the previous unit's last epilogue, whose launch also finished
norm1 (None for the first unit: measured here), stats2 come from conv1's epilogue, and stats_out (of
y = conv3(...) + shortcut, as stored) become the next unit's stats1. Saved for backward: x, h1, h2 (and
per-channel vectors), against x, relu(bn1(x)), h1, relu(bn2(h1)), h2, relu(bn3(h2)) for the stock unit.
"""
from __future__ import annotations

import torch.nn.functional as F

from .. import functional as Fp
from ..nn import FusedBatchNormReLU2d, FusedStem
from .blocks import Basic, Bottleneck, PreActBasic, PreActBottleneck

__all__ = ["FusedPreActBottleneck", "FusedPreActBasic", "FusedBottleneck", "FusedBasic",
           "fused_components"]


class FusedPreActBottleneck(PreActBottleneck):
    """PreActBottleneck on the fused kernels; see the module docstring."""

    def forward(self, x):
        return self.forward_with_stats(x, None)[0]

    def forward_with_stats(self, x, stats=None, next_bn=None):
        """(unit output, its batch statistics or None); `stats`: x's batch statistics, or None; next_bn:
        the BatchNorm consuming the output, finished in conv3's launch (then the statistics returned are
        the BNStats it normalises with)."""
        if Fp.bottleneck_eligible(x, self, stats, next_bn):  # the whole unit as one autograd node
            return Fp.preact_bottleneck(x, self, stats, next_bn)
        emit = self.training  # statistics are only worth emitting for a consumer in training mode
        link, norm2 = None, self.norm2 if self.training else None  # norm2 is finished by conv1's launch
        if self.norm1 is not None:
            n1 = self.norm1
            if self.downsample is not None:
                out = Fp.bn_relu_conv1x1_dual(
                    x, self.conv1.weight, self.downsample.weight, stride_a=self.conv1.stride[0],
                    stride_b=self.downsample.stride[0], input_stats=stats, output_stats_a=emit,
                    next_bn_a=norm2, **Fp.bn_args(n1))
                (h1, taken2), shortcut = out if emit else ((out[0], None), out[1])
            else:  # identity shortcut: conv1's dx pass adds its gradient (sent by conv3's backward)
                link = Fp.ShortcutGrad()
                out = Fp.bn_relu_conv1x1(x, self.conv1.weight, stride=self.conv1.stride[0], input_stats=stats,
                                         output_stats=emit, next_bn=norm2, shortcut_grad=link,
                                         **Fp.bn_args(n1))
                h1, taken2 = out if emit else (out, None)
                shortcut = x
        else:  # the first ImageNet unit: the stem already applied BN-ReLU
            h1, taken2 = self.conv1(x), None
            shortcut = self.downsample(x) if self.downsample is not None else x
        h2 = Fp.bn_relu_conv2d(h1, self.norm2, self.conv2, input_stats=taken2)
        out = Fp.bn_relu_conv1x1(h2, self.conv3.weight, residual=shortcut, output_stats=emit,
                                 next_bn=next_bn if emit else None, shortcut_grad=link if shortcut is x else None,
                                 **Fp.bn_args(self.norm3))
        return out if emit else (out, None)


class FusedPreActBasic(PreActBasic):
    """PreActBasic with both BN-ReLU-conv3x3 pairs on bn_relu_conv2d (pre-activations recomputed in
    backward) and the projection shortcut on the fused 1x1 op sharing norm1's statistics."""

    def forward(self, x):
        return self.forward_with_stats(x, None)[0]

    def forward_with_stats(self, x, stats=None, next_bn=None):  # emits no statistics: next_bn unused
        if self.norm1 is not None:
            taken = Fp.bn_stats(self.norm1, x, stats)
            h1 = Fp.bn_relu_conv2d(x, self.norm1, self.conv1, stats=taken)
            if self.downsample is not None:
                shortcut = Fp.bn_relu_conv1x1(x, self.downsample.weight, stride=self.downsample.stride[0],
                                              **Fp.bn_args(self.norm1, shared_stats=taken))
            else:
                shortcut = x
        else:
            h1 = self.conv1(x)
            shortcut = self.downsample(x) if self.downsample is not None else x
        # cuDNN's 3x3 cannot emit statistics: the next unit measures its input itself.
        return Fp.bn_relu_conv2d(h1, self.norm2, self.conv2) + shortcut, None


class FusedBottleneck(Bottleneck):
    """Original bottleneck: BN1-ReLU before the 3x3 on bn_relu_conv2d, BN2-ReLU-conv3 on the fused 1x1
    op; conv1, BN3 and the projection stay stock."""

    def forward(self, x):
        shortcut = self.downsample(x) if self.downsample is not None else x
        h2 = Fp.bn_relu_conv2d(self.conv1(x), self.norm1, self.conv2)
        h3 = Fp.bn_relu_conv1x1(h2, self.conv3.weight, **Fp.bn_args(self.norm2))
        return F.relu(self.norm3(h3) + shortcut)


class FusedBasic(Basic):
    """Original basic unit: BN1-ReLU before the second 3x3 on bn_relu_conv2d; the rest stays stock."""

    def forward(self, x):
        shortcut = self.downsample(x) if self.downsample is not None else x
        h2 = Fp.bn_relu_conv2d(self.conv1(x), self.norm1, self.conv2)
        return F.relu(self.norm2(h2) + shortcut)


_FUSED = {PreActBottleneck: FusedPreActBottleneck, PreActBasic: FusedPreActBasic,
          Bottleneck: FusedBottleneck, Basic: FusedBasic}


def fused_components(unit_cls):
    """The ResNet constructor arguments that swap a stock net for the fused one built of `unit_cls`'s
    fused version: unit_cls, norm_layer, stem_cls and chain_stats (what create_model(kernels="fused")
    passes; the model definition is the same)."""
    if unit_cls not in _FUSED:
        raise ValueError(f"fused_components: no fused version of {unit_cls.__name__}; "
                         f"known: {', '.join(c.__name__ for c in _FUSED)}")
    return dict(unit_cls=_FUSED[unit_cls], norm_layer=FusedBatchNormReLU2d, stem_cls=FusedStem,
                chain_stats=unit_cls in (PreActBottleneck, PreActBasic))
