"""The walk of fastpreact.fuse: bottom-up over the module tree (children first), each module once.

A module whose subtree holds a candidate BN and a candidate 1x1 conv not yet fused is fused
  - as a FusedSequential when it is an nn.Sequential with a window of consecutive children,
  - in place when it is a torch.fx GraphModule,
  - else by tracing its forward (traced.fuse_traced).
A fused module is opaque to its parents (a chain that crosses into it is not seen), and so is one
whose forward cannot be traced: it keeps its forward, with a warning naming it and the reason, and its
children are still fused where they can be. fastpreact's own fused modules are left alone.
"""
from __future__ import annotations

import collections
import logging
import warnings

import torch.fx
from torch import nn

from .patterns import bn_kind, conv1x1_ok, runs_fused_op
from .traced import GRAPH_CHAINS_ATTR, PLAN_ATTR, NotFusable, fuse_graph_module, fuse_traced
from .sequential import FusedSequential, sequential_windows

__all__ = ["ModuleWalk", "chains_of", "is_fused"]

logger = logging.getLogger("fastpreact.fusion")


def is_fused(m) -> bool:
    """Modules that already run the fused op (fastpreact's own fused modules, or fused by the walk)."""
    return PLAN_ATTR in m.__dict__ or isinstance(m, FusedSequential) or runs_fused_op(m)


def chains_of(m, path=""):
    """[(pattern, bn path, conv paths)] that `m` itself runs fused (not its children); paths under
    `path`, m's own path in the model."""
    if isinstance(m, FusedSequential):
        return m.chain_descriptions(f"{path}." if path else "")
    if PLAN_ATTR in m.__dict__:
        return m.__dict__[PLAN_ATTR].chains
    return m.__dict__.get(GRAPH_CHAINS_ATTR, [])


def _child_path(path, name):
    return f"{path}.{name}" if path else name


class ModuleWalk:
    """One fuse() over a model: visit(model, "") fuses it in place, report() logs and warns."""

    def __init__(self):
        self.done = set()       # ids of modules visited
        self.opaque = set()     # ids of modules parents must not look into (fused, untraceable)
        self.untraceable = []   # (path, class name, reason)
        self.counts = collections.Counter()

    def _candidates(self, root):
        """(a candidate BN below `root`?, a candidate conv below it?, ids of the modules on the way to
        them), not looking into opaque or already fused modules."""
        found = {"bn": False, "conv": False}
        ancestors = set()

        def walk(m, chain):
            for child in m._modules.values():
                if child is None:
                    continue
                kind = "bn" if bn_kind(child) is not None else "conv" if conv1x1_ok(child) else None
                if kind is not None:
                    found[kind] = True
                    ancestors.update(chain)
                elif id(child) not in self.opaque and not is_fused(child):
                    walk(child, chain + [id(child)])

        walk(root, [])
        return found["bn"], found["conv"], ancestors

    def visit(self, m, path):
        """Fuse m's children, then m itself where its subtree still holds a BN and a 1x1 conv."""
        if id(m) in self.done:
            return
        self.done.add(id(m))
        if is_fused(m):
            self.opaque.add(id(m))
            return
        for name, child in m._modules.items():
            if child is not None:
                self.visit(child, _child_path(path, name))
        if bn_kind(m) is not None or conv1x1_ok(m):
            return
        has_bn, has_conv, inline = self._candidates(m)
        if not (has_bn and has_conv):
            return
        if type(m) is nn.Sequential and sequential_windows(list(m._modules.values())):
            m.__class__ = FusedSequential
            self._fused(m, m.chain_descriptions(), "nn.Sequential")
        elif isinstance(m, torch.fx.GraphModule):
            self._fused(m, fuse_graph_module(m), "fx.GraphModule")
        else:
            self._fuse_traced(m, path, inline)

    def _fuse_traced(self, m, path, inline):
        try:
            described = fuse_traced(m, inline)
        except NotFusable as e:
            self._leave(m, path, str(e))
            return
        self._fused(m, described, "traced")

    def _fused(self, m, described, how):
        """Count the chains `m` now runs fused; a module with any is opaque to its parents."""
        for pattern, _, _ in described:
            self.counts[f"{pattern}  [{how}]"] += 1
        if described:
            self.opaque.add(id(m))

    def _leave(self, m, path, why):
        """Keep `m`'s own forward (and hide its insides from its parents); warned about in report()."""
        self.untraceable.append((path or "<model>", type(m).__name__, why))
        self.opaque.add(id(m))

    def report(self):
        """Warn about each module left unfused, and log the count of chains fused per pattern."""
        for path, cls, why in self.untraceable:
            warnings.warn(f"fastpreact.fuse: left {path} ({cls}) unfused: {why}; the BN -> ReLU -> 1x1 "
                          "conv chains of its forward, if any, run unfused (its submodules are still fused)",
                          stacklevel=3)
        if self.counts:
            logger.info("fastpreact.fuse: fused %d chain(s): %s", sum(self.counts.values()),
                        ", ".join(f"{n} x {p}" for p, n in sorted(self.counts.items())))
        else:
            logger.info("fastpreact.fuse: found no BatchNorm2d -> ReLU -> 1x1 Conv2d chain to fuse")
