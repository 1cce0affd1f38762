"""fuse(model): run every BatchNorm2d -> ReLU -> 1x1 Conv2d chain of any nn.Module on the fused op.

    model = fastpreact.fuse(torchvision.models.resnet50())     # or timm.create_model("resnetv2_50")
    from fastpreact.fuse import fused_chains
    fused_chains(model)                                        # Counter: what was fused, per pattern

What is a chain: a BatchNorm2d whose output goes only to a ReLU whose output goes only to one or two
1x1 Conv2d (groups 1, no dilation, no padding, stride 1 or 2, with or without bias), or a BN+ReLU module
(timm's BatchNormAct2d, fastpreact's BatchNormReLU2d) whose output goes only to such convs. Two convs
on one pre-activation (a pre-activation unit's first conv and its projection shortcut) run on
bn_relu_conv1x1_dual: the BN statistics and running-stat update happen once.

How the chains are found, bottom-up over the module tree, each module once:
  - nn.Sequential: windows [BN, ReLU, conv1x1] and [BN+ReLU module, conv1x1] of consecutive children,
    no tracing. The Sequential becomes a FusedSequential (an nn.Sequential subclass, same children).
  - any other module whose subtree holds a BN and a 1x1 conv not yet fused: its forward is traced with
    torch.fx (children that hold no candidate stay opaque calls, so their own forward is never traced),
    the chains are found in the graph by data flow (so torchvision's Bottleneck, which calls one ReLU
    module three times, is handled per call), and the rewritten graph becomes the module's forward. The
    module keeps its object, class (a subclass is swapped in), children, attributes and methods: the
    state_dict is untouched by construction. The forward is traced in train and in eval mode; when the
    two differ (code branching on self.training) each mode gets its own rewritten forward. Calls the
    trace did not cover (non-tensor or missing arguments) run the original forward.
  - a module whose forward cannot be traced (data-dependent control flow, ...) keeps its forward, with a
    warning naming it and the reason; its children are still fused where they can be.
The fused op is fastpreact.functional.bn_relu_conv1x1 (Triton on a GPU or under TRITON_INTERPRET=1, the
PyTorch fallback elsewhere); it reads the BN's training flag, buffers and momentum at every call, so
train/eval, running statistics (num_batches_tracked, momentum=None, track_running_stats=False) and
autocast behave as nn.BatchNorm2d -> ReLU -> Conv2d.

float64 activations (no kernel; the op keeps BN statistics in float32) run the original modules, so a
float64 model keeps float64 accuracy.

Limits: SyncBatchNorm, lazy modules, padded/grouped/dilated convs, and chains whose intermediate tensors
have another user are left alone. A chain that crosses into a module already rewritten is not seen.
Pickling a fused model re-traces the rewritten modules on load; TorchScript is not supported (fuse the
model, then torch.compile it if you like).
"""
from __future__ import annotations

import collections
import copy
import itertools
import linecache
import logging
import operator
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import functional as Fp

__all__ = ["fuse", "fused_chains", "FusedSequential"]

logger = logging.getLogger("fastpreact.fuse")

_PLAN_ATTR = "_fastpreact_plan"  # in a traced-and-rewritten module's __dict__ (never in its state_dict)


# ----------------------------------------------------------------------------------------------------
# What may be fused
# ----------------------------------------------------------------------------------------------------
def _bn_act_classes():
    """BN+ReLU modules (BatchNorm2d subclasses whose forward is BN then ReLU), from imported packages."""
    classes = []
    timm_norm_act = sys.modules.get("timm.layers.norm_act")
    if timm_norm_act is not None and hasattr(timm_norm_act, "BatchNormAct2d"):
        classes.append(("timm", timm_norm_act.BatchNormAct2d))
    blocks = sys.modules.get("fastpreact.models.blocks")
    if blocks is not None and hasattr(blocks, "BatchNormReLU2d"):
        classes.append(("fastpreact", blocks.BatchNormReLU2d))
    return classes


def _bn_kind(m) -> str | None:
    """'bn' for a plain BatchNorm2d, 'bnact' for a BN+ReLU module, None for anything else."""
    if not isinstance(m, nn.BatchNorm2d) or isinstance(m, (nn.SyncBatchNorm, nn.modules.lazy.LazyModuleMixin)):
        return None
    if type(m).forward is nn.BatchNorm2d.forward:
        return "bn"
    for origin, cls in _bn_act_classes():
        if type(m) is not cls:
            continue
        if origin == "timm":
            # BatchNormAct2d: batch_norm -> drop -> act; fusible with no drop and a plain ReLU.
            if type(getattr(m, "drop", None)) is nn.Identity and type(getattr(m, "act", None)) is nn.ReLU:
                return "bnact"
        elif origin == "fastpreact" and getattr(m, "apply_act", False):
            return "bnact"
    return None


def _conv1x1_ok(m) -> bool:
    """A Conv2d the fused op computes exactly: 1x1, groups 1, no dilation, no padding, stride 1 or 2."""
    if type(m) is not nn.Conv2d or isinstance(m.weight, nn.parameter.UninitializedParameter):
        return False
    no_padding = m.padding in ((0, 0), "valid") or (m.padding == "same" and m.kernel_size == (1, 1))
    return (m.kernel_size == (1, 1) and m.groups == 1 and m.dilation == (1, 1) and no_padding
            and m.stride in ((1, 1), (2, 2)) and m.weight.dtype.is_floating_point)


def _is_fastpreact_fused(m) -> bool:
    """Modules that already run the fused op (fastpreact's own fused modules, or fused by us)."""
    if _PLAN_ATTR in m.__dict__ or isinstance(m, FusedSequential):
        return True
    return type(m).__module__.startswith(("fastpreact.nn", "fastpreact.models.fused_units"))


def _pattern_name(bn, n_convs: int) -> str:
    head = "BatchNorm2d -> ReLU" if _bn_kind(bn) == "bn" else type(bn).__name__ + "(ReLU)"
    return f"{head} -> {'2x ' if n_convs == 2 else ''}Conv1x1" + (" (shared pre-activation)" if n_convs == 2 else "")


# ----------------------------------------------------------------------------------------------------
# The calls that replace a chain (module-level functions: the rewritten fx code calls them by name)
# ----------------------------------------------------------------------------------------------------
def _bn_state(bn, x):
    """The BN's parameters and the buffers nn.BatchNorm2d.forward would pass to F.batch_norm."""
    use_buffers = (not bn.training) or bn.track_running_stats
    weight, bias = bn.weight, bn.bias
    if weight is None:  # affine=False: gamma 1, beta 0 (constants, no gradient)
        weight = torch.ones(bn.num_features, device=x.device, dtype=torch.float32)
        bias = torch.zeros(bn.num_features, device=x.device, dtype=torch.float32)
    return weight, bias, dict(
        running_mean=bn.running_mean if use_buffers else None,
        running_var=bn.running_var if use_buffers else None,
        num_batches_tracked=bn.num_batches_tracked if bn.training and bn.track_running_stats else None,
        training=bn.training, momentum=bn.momentum, eps=bn.eps)


def _pre_activation(x, bn):
    """relu(bn(x)) with the modules themselves (float64: the fused op computes BN in float32)."""
    return bn(x) if _bn_kind(bn) == "bnact" else F.relu(bn(x))


def bn_relu_conv1x1_call(x, bn, conv):
    """conv(relu(bn(x))) on the fused op, with the modules' own parameters and buffers."""
    if x.dtype == torch.float64:
        return conv(_pre_activation(x, bn))
    weight, bias, state = _bn_state(bn, x)
    return Fp.bn_relu_conv1x1(x, conv.weight, weight, bias, **state, stride=conv.stride[0],
                              conv_bias=conv.bias)


def bn_relu_conv1x1_dual_call(x, bn, conv_a, conv_b):
    """(conv_a(a), conv_b(a)) with a = relu(bn(x)): one BN (statistics and running update once)."""
    if x.dtype == torch.float64:
        a = _pre_activation(x, bn)
        return conv_a(a), conv_b(a)
    weight, bias, state = _bn_state(bn, x)
    dual = getattr(Fp, "bn_relu_conv1x1_dual", None)
    if dual is not None and conv_a.bias is None and conv_b.bias is None:
        return dual(x, conv_a.weight, conv_b.weight, weight, bias, state["running_mean"],
                    state["running_var"], num_batches_tracked=state["num_batches_tracked"],
                    training=state["training"], momentum=state["momentum"], eps=state["eps"],
                    stride_a=conv_a.stride[0], stride_b=conv_b.stride[0])
    # No dual op (or conv biases, which it does not take): statistics once, running update once, then
    # two single calls on those statistics. Each call's backward is the full BN backward of its own dz,
    # and BN's backward is linear in dz, so the two dx sum to the exact gradient.
    use_batch = state["training"] or state["running_mean"] is None
    if not use_batch:
        return (bn_relu_conv1x1_call(x, bn, conv_a), bn_relu_conv1x1_call(x, bn, conv_b))
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))  # statistics of x as the op will see it
    batch_stats = getattr(Fp, "batch_stats", None) or Fp._batch_stats_torch
    with torch.no_grad():
        mean, var = batch_stats(x)
    if state["training"]:
        Fp.update_running_stats(state["running_mean"], state["running_var"], state["num_batches_tracked"],
                                mean, var, x.numel() // x.shape[1], state["momentum"])
    common = dict(running_mean=None, running_var=None, num_batches_tracked=None,
                  training=state["training"], momentum=state["momentum"], eps=state["eps"],
                  input_stats=(mean, var))
    y_a = Fp.bn_relu_conv1x1(x, conv_a.weight, weight, bias, **common, stride=conv_a.stride[0],
                             conv_bias=conv_a.bias)
    y_b = Fp.bn_relu_conv1x1(x, conv_b.weight, weight, bias, **common, stride=conv_b.stride[0],
                             conv_bias=conv_b.bias)
    return y_a, y_b


# ----------------------------------------------------------------------------------------------------
# Module level: nn.Sequential
# ----------------------------------------------------------------------------------------------------
def _sequential_windows(mods):
    """{start index: (window length, bn, conv)} for [BN, ReLU, conv1x1] and [BN+ReLU, conv1x1] runs."""
    windows, i = {}, 0
    while i < len(mods):
        kind = _bn_kind(mods[i])
        if kind == "bn" and i + 2 < len(mods) and type(mods[i + 1]) is nn.ReLU and _conv1x1_ok(mods[i + 2]):
            windows[i] = (3, mods[i], mods[i + 2])
            i += 3
        elif kind == "bnact" and i + 1 < len(mods) and _conv1x1_ok(mods[i + 1]):
            windows[i] = (2, mods[i], mods[i + 1])
            i += 2
        else:
            i += 1
    return windows


class FusedSequential(nn.Sequential):
    """nn.Sequential whose [BN, ReLU, conv1x1] and [BN+ReLU, conv1x1] runs execute on the fused op.

    Same children under the same names as the Sequential it replaces (so the same state_dict); indexing,
    len() and iteration behave as nn.Sequential's.
    """

    def _windows(self):
        mods = list(self._modules.values())
        key = tuple(map(id, mods))
        cached = self.__dict__.get("_fastpreact_windows")
        if cached is None or cached[0] != key:
            cached = (key, _sequential_windows(mods))
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

    def _fastpreact_chains(self, prefix=""):
        mods = list(self._modules.items())
        index = {id(m): name for name, m in mods}
        return [(_pattern_name(bn, 1), prefix + index[id(bn)], (prefix + index[id(conv)],))
                for _, bn, conv in self._windows()[1].values()]


# ----------------------------------------------------------------------------------------------------
# Traced: torch.fx over one module's forward
# ----------------------------------------------------------------------------------------------------
class _Tracer(torch.fx.Tracer):
    """Inlines only the modules named in `inline` (those on a path to a candidate BN or conv)."""

    def __init__(self, inline_ids):
        wrap = ()
        timm_fx = sys.modules.get("timm.layers._fx")
        if timm_fx is not None:  # functions timm marks as not traceable (shape asserts, ...)
            wrap = tuple(f for f in getattr(timm_fx, "_autowrap_functions", ()) if callable(f))
        super().__init__(autowrap_functions=wrap)
        self._inline = inline_ids

    def is_leaf_module(self, m, module_qualified_name):
        return id(m) not in self._inline


_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}


def _is_relu_of(node, src, root) -> bool:
    if node.op == "call_module":
        return type(root.get_submodule(node.target)) is nn.ReLU and node.args == (src,) and not node.kwargs
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        return (node.args[:1] == (src,) and len(node.args) <= 2 and set(node.kwargs) <= {"inplace"}
                and all(isinstance(a, bool) for a in (*node.args[1:], *node.kwargs.values())))
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return node.args == (src,) and not node.kwargs
    return False


def _conv_call_of(node, src, root):
    """The conv module when `node` is a plain call of an eligible 1x1 Conv2d on `src`, else None."""
    if node.op != "call_module" or node.args != (src,) or node.kwargs:
        return None
    conv = root.get_submodule(node.target)
    return conv if _conv1x1_ok(conv) else None


def _find_chains(graph, root):
    """[(bn_node, act_node or None, [conv nodes])] for chains whose intermediates have no other user."""
    chains = []
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        bn = root.get_submodule(node.target)
        kind = _bn_kind(bn)
        if kind is None:
            continue
        act = None
        if kind == "bn":
            users = list(node.users)
            if len(users) != 1 or not _is_relu_of(users[0], node, root):
                continue
            act = users[0]
        out = act if act is not None else node
        convs = list(out.users)
        if 1 <= len(convs) <= 2 and all(_conv_call_of(c, out, root) is not None for c in convs):
            chains.append((node, act, sorted(convs, key=order.__getitem__)))
    return chains


def _rewrite(graph, chains):
    """Replace each chain by one call of the fused op (the original modules are its arguments)."""
    for bn_node, act_node, conv_nodes in chains:
        with graph.inserting_before(conv_nodes[0]):
            refs = [graph.get_attr(n.target) for n in (bn_node, *conv_nodes)]
            if len(conv_nodes) == 1:
                fused = graph.call_function(bn_relu_conv1x1_call, (bn_node.args[0], *refs))
                conv_nodes[0].replace_all_uses_with(fused)
            else:
                fused = graph.call_function(bn_relu_conv1x1_dual_call, (bn_node.args[0], *refs))
                for i, conv_node in enumerate(conv_nodes):
                    conv_node.replace_all_uses_with(graph.call_function(operator.getitem, (fused, i)))
        for n in (*conv_nodes, *([act_node] if act_node is not None else []), bn_node):
            graph.erase_node(n)
    graph.lint()


_compiled_count = itertools.count()


def _compile(graph, cls_name):
    """The graph as a Python function forward(self, *inputs), `self` being the module it was traced on."""
    code = graph.python_code(root_module="self")
    namespace = dict(code.globals)
    filename = f"<fastpreact.fuse: {cls_name}.forward #{next(_compiled_count)}>"
    # Registered with linecache so that tracebacks through the rewritten forward show its source.
    linecache.cache[filename] = (len(code.src), None, code.src.splitlines(True), filename)
    exec(compile(code.src, filename, "exec"), namespace)
    return namespace["forward"]


class _Plan:
    """A rewritten module's traced forwards (per mode), their arity and the chains they fuse."""

    def __init__(self, train_forward, eval_forward, input_names, chains):
        self.train_forward, self.eval_forward = train_forward, eval_forward
        self.input_names, self.chains = input_names, chains

    def bind(self, args, kwargs):
        """The call's inputs in traced order when they are exactly the traced tensors, else None."""
        names = self.input_names
        if kwargs:
            if len(args) + len(kwargs) != len(names) or any(n not in kwargs for n in names[len(args):]):
                return None
            args = (*args, *(kwargs[n] for n in names[len(args):]))
        if len(args) != len(names) or not all(isinstance(a, torch.Tensor) for a in args):
            return None
        return args

    def __deepcopy__(self, memo):
        return self  # immutable: functions of `self`, and plain strings


_FUSED_CLASSES: dict = {}


def _fused_class(base):
    """A subclass of `base` whose forward runs the module's rewritten graph (one class per base)."""
    cls = _FUSED_CLASSES.get(base)
    if cls is not None:
        return cls

    def forward(self, *args, **kwargs):
        plan = self.__dict__.get(_PLAN_ATTR)
        inputs = plan.bind(args, kwargs) if plan is not None else None
        if inputs is not None:
            return (plan.train_forward if self.training else plan.eval_forward)(self, *inputs)
        return base.forward(self, *args, **kwargs)  # a call the trace did not cover

    def __deepcopy__(self, memo):
        new = object.__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def __reduce_ex__(self, protocol):
        # Pickle the original module; loading re-traces it (generated code is not picklable).
        plain = object.__new__(base)
        plain.__dict__.update({k: v for k, v in self.__dict__.items() if k != _PLAN_ATTR})
        return (_refuse_unpickled, (plain,))

    def _get_name(self):  # the name nn.Module.__repr__ prints: says the forward was rewritten
        return base._get_name(self) + "[fused]"

    cls = type(base.__name__, (base,), {
        "forward": forward, "__deepcopy__": __deepcopy__, "__reduce_ex__": __reduce_ex__,
        "_get_name": _get_name,
        "__module__": base.__module__, "__qualname__": base.__qualname__,
        "_fastpreact_base": base})
    cls.__doc__ = (base.__doc__ or "") + "\n\n(fastpreact.fuse: BN -> ReLU -> 1x1 conv chains fused)"
    _FUSED_CLASSES[base] = cls
    return cls


def _refuse_unpickled(module):
    fuser = _Fuser()
    fuser.visit(module, "")
    fuser.report(log=False)
    return module


# ----------------------------------------------------------------------------------------------------
# The walk
# ----------------------------------------------------------------------------------------------------
def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


class _Fuser:
    def __init__(self):
        self.done = {}          # id(module) -> True once visited
        self.opaque = set()     # ids of modules parents must not look into (rewritten, untraceable)
        self.untraceable = []   # (path, class name, reason)
        self.counts = collections.Counter()

    # -- candidates --------------------------------------------------------------------------------
    def _visible(self, root):
        """(paths of candidate BNs, paths of candidate convs, ids of their ancestors) below `root`,
        not looking into opaque modules."""
        bns, convs, ancestors = [], [], set()

        def walk(m, path, chain):
            for name, child in m._modules.items():
                if child is None:
                    continue
                p = f"{path}.{name}" if path else name
                if _bn_kind(child) is not None:
                    bns.append(p)
                    ancestors.update(chain)
                elif _conv1x1_ok(child):
                    convs.append(p)
                    ancestors.update(chain)
                elif id(child) not in self.opaque and not _is_fastpreact_fused(child):
                    walk(child, p, chain + [id(child)])

        walk(root, "", [])
        return bns, convs, ancestors

    def visit(self, m, path):
        if id(m) in self.done:
            return
        self.done[id(m)] = True
        if _is_fastpreact_fused(m):
            self.opaque.add(id(m))
            return
        for name, child in m._modules.items():
            if child is not None:
                self.visit(child, f"{path}.{name}" if path else name)
        if _bn_kind(m) is not None or _conv1x1_ok(m):
            return
        bns, convs, inline = self._visible(m)
        if not bns or not convs:
            return
        if type(m) is nn.Sequential and _sequential_windows(list(m._modules.values())):
            m.__class__ = FusedSequential
            for pattern, _, _ in m._fastpreact_chains():
                self.counts[pattern + "  [nn.Sequential]"] += 1
            self.opaque.add(id(m))
            return
        if isinstance(m, torch.fx.GraphModule):
            self._fuse_graph_module(m)
            return
        self._fuse_traced(m, path, inline)

    def _trace(self, m, inline, training):
        flags = {id(x): x.training for x in m.modules()}
        try:
            m.train(training)
            return _Tracer(inline).trace(m)
        finally:
            for x in m.modules():
                x.training = flags[id(x)]

    def _fuse_traced(self, m, path, inline):
        try:
            graph = self._trace(m, inline, m.training)
        except Exception as e:  # noqa: BLE001 - any failure to trace means: leave this forward alone
            self._leave(m, path, f"torch.fx cannot trace its forward ({_first_line(e)})")
            return
        chains = _find_chains(graph, m)
        if not chains:
            return
        # Retrace inlining only the children the chains run through: everything else stays an opaque
        # call of the original child, so its forward (and whatever it branches on) is never baked in.
        used = set()
        for bn_node, _, conv_nodes in chains:
            for n in (bn_node, *conv_nodes):
                parts = n.target.split(".")
                sub = m
                for part in parts[:-1]:
                    sub = getattr(sub, part)
                    used.add(id(sub))
        graphs, found = {}, None
        try:
            for mode in (True, False):
                g = self._trace(m, used, mode)
                ch = _find_chains(g, m)
                key = [(b.target, tuple(c.target for c in cs)) for b, _, cs in ch]
                found = key if found is None else found
                if key != found:
                    self._leave(m, path, "its forward, traced in train and in eval mode, wires the BN -> "
                                "ReLU -> 1x1 conv chains differently")
                    return
                _rewrite(g, ch)
                graphs[mode] = g
        except Exception as e:  # noqa: BLE001
            self._leave(m, path, f"torch.fx cannot trace its forward ({_first_line(e)})")
            return
        if not found:
            return
        train_fn = _compile(graphs[True], type(m).__name__)
        same = graphs[True].python_code("self").src == graphs[False].python_code("self").src
        eval_fn = train_fn if same else _compile(graphs[False], type(m).__name__)
        input_names = [n.target for n in graphs[True].nodes if n.op == "placeholder"]
        described = [(_pattern_name(m.get_submodule(b), len(cs)), b, cs) for b, cs in found]
        try:
            fused_cls = _fused_class(type(m))
        except Exception as e:  # noqa: BLE001 - e.g. a metaclass or __init_subclass__ that refuses
            self._leave(m, path, f"its class cannot be subclassed ({_first_line(e)})")
            return
        m.__class__ = fused_cls
        m.__dict__[_PLAN_ATTR] = _Plan(train_fn, eval_fn, input_names, described)
        for pattern, _, _ in described:
            self.counts[pattern + "  [traced]"] += 1
        self.opaque.add(id(m))

    def _fuse_graph_module(self, gm):
        """A GraphModule is already a graph: rewrite it in place."""
        chains = _find_chains(gm.graph, gm)
        if not chains:
            return
        described = [(_pattern_name(gm.get_submodule(b.target), len(cs)), b.target,
                      tuple(c.target for c in cs)) for b, _, cs in chains]
        _rewrite(gm.graph, chains)
        gm.recompile()
        gm.__dict__["_fastpreact_chains_in_graph"] = described
        for pattern, _, _ in described:
            self.counts[pattern + "  [fx.GraphModule]"] += 1
        self.opaque.add(id(gm))

    def _leave(self, m, path, why):
        """Keep `m`'s own forward (and hide its insides from its parents); warned about in report()."""
        self.untraceable.append((path or "<model>", type(m).__name__, why))
        self.opaque.add(id(m))

    def report(self, log=True):
        for path, cls, why in self.untraceable:
            warnings.warn(f"fastpreact.fuse: left {path} ({cls}) unfused: {why}; the BN -> ReLU -> 1x1 "
                          "conv chains of its forward, if any, run unfused (its submodules are still fused)",
                          stacklevel=3)
        if log:
            if self.counts:
                logger.info("fastpreact.fuse: fused %d chain(s): %s", sum(self.counts.values()),
                            ", ".join(f"{n} x {p}" for p, n in sorted(self.counts.items())))
            else:
                logger.info("fastpreact.fuse: found no BatchNorm2d -> ReLU -> 1x1 Conv2d chain to fuse")


# ----------------------------------------------------------------------------------------------------
# Public
# ----------------------------------------------------------------------------------------------------
def fuse(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Run every BatchNorm2d -> ReLU -> 1x1 Conv2d chain of `model` on fastpreact's fused op.

    Returns the fused model (a deep copy unless inplace=True). Parameters, buffers and state_dict keys
    are those of `model`; train/eval, running statistics and autocast behave as in `model`. Logs a
    count per pattern (logger "fastpreact.fuse"); warns about modules whose forward cannot be traced.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastpreact.fuse: expected an nn.Module, got {type(model).__name__}; pass the "
                        "model object (not its state_dict)")
    if not inplace:
        model = copy.deepcopy(model)
    fuser = _Fuser()
    fuser.visit(model, "")
    fuser.report()
    return model


def fused_chains(model: nn.Module) -> collections.Counter:
    """Counter {pattern: number of chains} of what runs on the fused op in a fused `model`."""
    counts = collections.Counter()
    for path, m in model.named_modules():
        prefix = f"{path}." if path else ""
        if isinstance(m, FusedSequential):
            chains = m._fastpreact_chains(prefix)
        elif _PLAN_ATTR in m.__dict__:
            chains = m.__dict__[_PLAN_ATTR].chains
        else:
            chains = m.__dict__.get("_fastpreact_chains_in_graph", ())
        for pattern, _, _ in chains:
            counts[pattern] += 1
    return counts


class _CallableModule(type(sys)):
    """`fastpreact.fuse(model)` works whether `fastpreact.fuse` resolves to this function or, once the
    submodule is imported (import binds the package attribute to the module), to this module."""

    def __call__(self, model, inplace=False):
        return fuse(model, inplace=inplace)


sys.modules[__name__].__class__ = _CallableModule
