"""The torch.fx path of fastpreact.fuse: find chains in one module's traced forward and rewrite it.

fuse_traced(module, inline) traces the module's forward with torch.fx, inlining only the children in
`inline` (those on a path to a candidate BN or conv; every other child stays an opaque call, so its own
forward is never traced). Chains are found in the graph by data flow (find_chains), so a ReLU module
called several times is handled per call, and each chain becomes one call of the fused op (rewrite).
The rewritten graph is compiled to a plain function and becomes the module's forward through a
subclass of its class (fused_class): the module keeps its object, children, attributes and methods,
so its state_dict is untouched by construction.

The forward is traced in train and in eval mode; when the two differ (code branching on
self.training) each mode gets its own rewritten forward. Calls the trace did not cover (non-tensor or
missing arguments) run the original forward. A GraphModule is already a graph: fuse_graph_module
rewrites it in place. Generated code cannot be pickled: a rewritten module pickles as its original
class and is traced again on load.
"""
from __future__ import annotations

import copy
import itertools
import linecache
import operator
import warnings

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .patterns import (bn_kind, bn_relu_conv1x1_call, bn_relu_conv1x1_dual_call, conv1x1_ok, pattern_name,
                         timm_attr)

__all__ = ["PLAN_ATTR", "GRAPH_CHAINS_ATTR", "NotFusable", "find_chains", "rewrite", "fuse_traced",
           "fuse_graph_module"]

PLAN_ATTR = "_fastpreact_plan"  # in a traced-and-rewritten module's __dict__ (never in its state_dict)
GRAPH_CHAINS_ATTR = "_fastpreact_chains_in_graph"  # in a rewritten GraphModule's __dict__


class NotFusable(Exception):
    """Why a module's forward is kept as it is (one line, for the warning that names the module)."""


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


# ----------------------------------------------------------------------------------------------------
# Matching: chains in a traced graph
# ----------------------------------------------------------------------------------------------------
class _Tracer(torch.fx.Tracer):
    """Inlines only the modules whose ids are in `inline_ids`; every other module is one opaque call."""

    def __init__(self, inline_ids):
        # Functions timm marks as not traceable (shape asserts, ...) stay calls in the graph.
        autowrap = timm_attr("timm.layers._fx", "_autowrap_functions") or ()
        super().__init__(autowrap_functions=tuple(f for f in autowrap if callable(f)))
        self._inline = inline_ids

    def is_leaf_module(self, m, module_qualified_name):
        return id(m) not in self._inline


_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}


def _is_relu_of(node, src, root) -> bool:
    """`node` is relu(src): an nn.ReLU module call, F.relu/torch.relu (in place or not), or .relu()."""
    if node.op == "call_module":
        return type(root.get_submodule(node.target)) is nn.ReLU and node.args == (src,) and not node.kwargs
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        return (node.args[:1] == (src,) and len(node.args) <= 2 and set(node.kwargs) <= {"inplace"}
                and all(isinstance(a, bool) for a in (*node.args[1:], *node.kwargs.values())))
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return node.args == (src,) and not node.kwargs
    return False


def _is_conv_call_of(node, src, root) -> bool:
    """`node` is a plain call of an eligible 1x1 Conv2d on `src`."""
    if node.op != "call_module" or node.args != (src,) or node.kwargs:
        return False
    return conv1x1_ok(root.get_submodule(node.target))


def find_chains(graph, root):
    """[(bn_node, act_node or None, [conv nodes])] for chains whose intermediates have no other user."""
    chains = []
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        kind = bn_kind(root.get_submodule(node.target))
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
        if 1 <= len(convs) <= 2 and all(_is_conv_call_of(c, out, root) for c in convs):
            chains.append((node, act, sorted(convs, key=order.__getitem__)))
    return chains


def _chain_key(chains):
    """The chains by module path: [(bn path, (conv paths))]."""
    return [(bn.target, tuple(c.target for c in convs)) for bn, _, convs in chains]


def _describe(root, key):
    """[(pattern, bn path, conv paths)]: what fused_chains() counts."""
    return [(pattern_name(root.get_submodule(bn), len(convs)), bn, convs) for bn, convs in key]


# ----------------------------------------------------------------------------------------------------
# Rewriting: each chain becomes one call of the fused op
# ----------------------------------------------------------------------------------------------------
def rewrite(graph, chains):
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


def fuse_graph_module(gm):
    """Rewrite a GraphModule's own graph in place; returns [(pattern, bn path, conv paths)] fused."""
    chains = find_chains(gm.graph, gm)
    if not chains:
        return []
    described = _describe(gm, _chain_key(chains))
    rewrite(gm.graph, chains)
    gm.recompile()
    gm.__dict__[GRAPH_CHAINS_ATTR] = described
    return described


# ----------------------------------------------------------------------------------------------------
# Tracing a module, and installing its rewritten forward
# ----------------------------------------------------------------------------------------------------
def _trace(m, inline_ids, training):
    """m's forward as a graph, traced with every module of m in the given mode (restored after)."""
    flags = {id(x): x.training for x in m.modules()}
    try:
        m.train(training)
        return _Tracer(inline_ids).trace(m)
    finally:
        for x in m.modules():
            x.training = flags[id(x)]


def _chain_parents(chains):
    """Paths of the modules a chain's BN and convs sit in (below the root): the ones to inline."""
    paths = set()
    for bn_node, _, conv_nodes in chains:
        for n in (bn_node, *conv_nodes):
            parts = n.target.split(".")
            paths.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return tuple(sorted(paths))


def fuse_traced(m, inline_ids):
    """Rewrite m's forward so its chains run on the fused op; returns [(pattern, bn path, conv paths)]
    fused ([] when there are none). Raises NotFusable, saying why, when m's forward must be kept."""
    try:
        chains = find_chains(_trace(m, inline_ids, m.training), m)
    except Exception as e:  # noqa: BLE001 - any failure to trace means: leave this forward alone
        raise NotFusable(f"torch.fx cannot trace its forward ({_first_line(e)})") from e
    if not chains:
        return []
    # Retrace inlining only the children the chains run through: everything else stays an opaque
    # call of the original child, so its forward (and whatever it branches on) is never baked in.
    return _install(m, _chain_parents(chains))


def _rewritten_graphs(m, inline_paths):
    """({True: train graph, False: eval graph}, chain key), each graph rewritten; raises NotFusable."""
    inline_ids = {id(m.get_submodule(p)) for p in inline_paths}
    graphs, found = {}, None
    try:
        for mode in (True, False):
            graph = _trace(m, inline_ids, mode)
            chains = find_chains(graph, m)
            key = _chain_key(chains)
            found = key if found is None else found
            if key != found:
                raise NotFusable("its forward, traced in train and in eval mode, wires the BN -> ReLU -> "
                                 "1x1 conv chains differently")
            rewrite(graph, chains)
            graphs[mode] = graph
    except NotFusable:
        raise
    except Exception as e:  # noqa: BLE001
        raise NotFusable(f"torch.fx cannot trace its forward ({_first_line(e)})") from e
    return graphs, found


def _install(m, inline_paths):
    """Trace m in both modes inlining `inline_paths`, rewrite, compile, and swap in the fused class."""
    graphs, key = _rewritten_graphs(m, inline_paths)
    if not key:
        return []
    train_fn = _compile(graphs[True], type(m).__name__)
    same = graphs[True].python_code("self").src == graphs[False].python_code("self").src
    eval_fn = train_fn if same else _compile(graphs[False], type(m).__name__)
    input_names = [n.target for n in graphs[True].nodes if n.op == "placeholder"]
    described = _describe(m, key)
    try:
        fused_cls = fused_class(type(m))
    except Exception as e:  # noqa: BLE001 - e.g. a metaclass or __init_subclass__ that refuses
        raise NotFusable(f"its class cannot be subclassed ({_first_line(e)})") from e
    m.__class__ = fused_cls
    m.__dict__[PLAN_ATTR] = _Plan(train_fn, eval_fn, input_names, described, inline_paths)
    return described


# ----------------------------------------------------------------------------------------------------
# Code generation, the fused class, pickling
# ----------------------------------------------------------------------------------------------------
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
    """A rewritten module's traced forwards (per mode), their arity, the chains they fuse and the
    children inlined to find them (what loading a pickle traces again)."""

    def __init__(self, train_forward, eval_forward, input_names, chains, inline_paths):
        self.train_forward, self.eval_forward = train_forward, eval_forward
        self.input_names, self.chains, self.inline_paths = input_names, chains, inline_paths

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


def _fused_forward(self, *args, **kwargs):
    plan = self.__dict__.get(PLAN_ATTR)
    inputs = plan.bind(args, kwargs) if plan is not None else None
    if inputs is not None:
        return (plan.train_forward if self.training else plan.eval_forward)(self, *inputs)
    return self._fastpreact_base.forward(self, *args, **kwargs)  # a call the trace did not cover


def _fused_deepcopy(self, memo):
    new = object.__new__(type(self))
    memo[id(self)] = new
    new.__dict__.update(copy.deepcopy(self.__dict__, memo))
    return new


def _fused_reduce_ex(self, protocol):
    # Pickle the original module; loading traces it again (generated code is not picklable).
    plain = object.__new__(self._fastpreact_base)
    plain.__dict__.update({k: v for k, v in self.__dict__.items() if k != PLAN_ATTR})
    return (_fuse_unpickled, (plain, self.__dict__[PLAN_ATTR].inline_paths))


def _fused_get_name(self):  # the name nn.Module.__repr__ prints: says the forward was rewritten
    return self._fastpreact_base._get_name(self) + "[fused]"


_FUSED_CLASSES: dict = {}


def fused_class(base):
    """A subclass of `base` whose forward runs the module's rewritten graph (one class per base)."""
    cls = _FUSED_CLASSES.get(base)
    if cls is None:
        cls = type(base.__name__, (base,), {
            "forward": _fused_forward, "__deepcopy__": _fused_deepcopy, "__reduce_ex__": _fused_reduce_ex,
            "_get_name": _fused_get_name, "__module__": base.__module__, "__qualname__": base.__qualname__,
            "_fastpreact_base": base})
        cls.__doc__ = (base.__doc__ or "") + "\n\n(fastpreact.fuse: BN -> ReLU -> 1x1 conv chains fused)"
        _FUSED_CLASSES[base] = cls
    return cls


def _fuse_unpickled(module, inline_paths):
    """Loading a pickled rewritten module: rewrite its forward again, as it was when pickled."""
    try:
        _install(module, inline_paths)
    except NotFusable as e:
        warnings.warn(f"fastpreact.fuse: loaded {type(module).__name__} unfused: {e}; its BN -> ReLU -> "
                      "1x1 conv chains run unfused", stacklevel=2)
    return module
