"""The nn.Sequential path of fastpreact.fuse: chains of consecutive children, found without tracing.

A Sequential holding a window [BN, ReLU, conv1x1] or [BN+ReLU module, conv1x1] becomes a
FusedSequential: the same object, children and state_dict, with a forward that runs each window on the
fused op.
"""
from __future__ import annotations

from torch import nn

from .patterns import bn_kind, bn_relu_conv1x1_call, conv1x1_ok, pattern_name

__all__ = ["FusedSequential", "sequential_windows"]


def sequential_windows(mods):
    """{start index: (window length, bn, conv)} for [BN, ReLU, conv1x1] and [BN+ReLU, conv1x1] runs."""
    windows, i = {}, 0
    while i < len(mods):
        kind = bn_kind(mods[i])
        if kind == "bn" and i + 2 < len(mods) and type(mods[i + 1]) is nn.ReLU and conv1x1_ok(mods[i + 2]):
            windows[i] = (3, mods[i], mods[i + 2])
            i += 3
        elif kind == "bnact" and i + 1 < len(mods) and conv1x1_ok(mods[i + 1]):
            windows[i] = (2, mods[i], mods[i + 1])
            i += 2
        else:
            i += 1
    return windows


class FusedSequential(nn.Sequential):
    """nn.Sequential whose [BN, ReLU, conv1x1] and [BN+ReLU, conv1x1] runs execute on the fused op.

    Same children under the same names as the Sequential it replaces (so the same state_dict); indexing,
    len() and iteration behave as nn.Sequential's. The windows are found again whenever the children
    change.
    """

    def _windows(self):
        mods = list(self._modules.values())
        key = tuple(map(id, mods))
        cached = self.__dict__.get("_fastpreact_windows")
        if cached is None or cached[0] != key:
            cached = (key, sequential_windows(mods))
            self.__dict__["_fastpreact_windows"] = cached
        return mods, cached[1]

    def forward(self, input):
        mods, windows = self._windows()
        i = 0
        while i < len(mods):
            if i in windows:
                length, bn, conv = windows[i]
                input = bn_relu_conv1x1_call(input, bn, conv)
                i += length
            else:
                input = mods[i](input)
                i += 1
        return input

    def chain_descriptions(self, prefix=""):
        """[(pattern, bn path, (conv path,))] of the windows it runs fused, paths under `prefix`."""
        index = {id(m): name for name, m in self._modules.items()}
        return [(pattern_name(bn, 1), prefix + index[id(bn)], (prefix + index[id(conv)],))
                for _, bn, conv in self._windows()[1].values()]
