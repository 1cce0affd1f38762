"""What each launch of a training step costs: op classes, the per-kernel cost formulas of the Triton
kernels, the cost of aten ops, and the StepCost record. Used by fastpreact.cost.count (which counts a step
and predicts its time); see that module for the op classes and what counts as a launch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils._pytree import tree_leaves

__all__ = ["CLASSES", "MATMUL_CLASSES", "NO_LAUNCH", "TRITON_COSTS", "Launch", "StepCost", "aten_class",
           "aten_cost"]

CLASSES = ("fused 1x1", "3x3 conv", "BN-ReLU passes", "statistics", "glue", "loss and optimizer")
MATMUL_CLASSES = ("fused 1x1", "3x3 conv")  # at the card's bf16 matmul rate; the rest at its bandwidth

# aten ops that launch no kernel: allocations, metadata and aliasing ops and the profiler's record-function
# markers (every view op, found by its schema, is excluded as well, and so are ops outside the aten
# namespace, e.g. prim.device).
NO_LAUNCH = frozenset({
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_unsafe_view", "detach",
    "alias", "lift_fresh", "set_", "resize_", "_reshape_alias", "as_strided", "view", "_to_dense",
    "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size",
    "_has_compatible_shallow_copy_type",
    "_record_function_enter_new", "_record_function_exit",
})


def _nb(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


# ---------------------------------------------------------------------------------------------------
# Triton kernels: op class and per-call cost from the launch arguments `a` (the kernel's named arguments,
# its constexprs and config, and "grid"). Bytes are the compulsory traffic, each tensor once (the kernel
# headers' formulas); fp32 partials are counted at this run's tile sizes. Returns (bytes, FLOPs).
# ---------------------------------------------------------------------------------------------------
# In-kernel reductions (statistics merged, partials summed by the last program to finish) write their
# fp32 partials and read them back once: 2 x the partials' bytes, plus the reduced result.
def _conv1x1_fwd(a):
    M, K, N, ex, e = a["M"], a["K"], a["N"], a["x_ptr"].element_size(), a["y_ptr"].element_size()
    extra = e * M * N if a["HAS_RESIDUAL"] else 0
    parts = 2 * 2 * 4 * -(-M // a["BLOCK_M"]) * N + 2 * 4 * N if a["OUTPUT_STATS"] else 0
    if a["NEXT_FINISH"]:  # the next BatchNorm's rstd, and its running statistics read and written
        parts += 4 * a["next_channels"] + (4 * 4 * a["next_channels"] if a["NEXT_UPDATE_RUNNING"] else 0)
    return ex * M * K + _nb(a["w_ptr"]) + e * M * N + extra + parts + 16 * K, 2 * M * K * N


def _conv1x1_reduce(a):
    """Backward pass 1 (dW and / or the BN sums): reads x at the sampled rows, dy (and W for the sums);
    writes dW; fp32 partials of dW (several splits) and of the sums, written and read back once."""
    M, K, N, ex, e = a["M"], a["K"], a["N"], a["x_ptr"].element_size(), a["dy_ptr"].element_size()
    splits, dw, sums = a["grid"][1], a["COMPUTE_DW"], a["COMPUTE_SUMS"]
    nbytes = ex * M * K + e * M * N + 16 * K
    if dw:
        nbytes += _nb(a["dw_ptr"]) + (2 * 4 * splits * N * K if splits > 1 else 0)
    if sums:
        nbytes += _nb(a["w_ptr"]) + 2 * 2 * 4 * splits * -(-N // a["BLOCK_N"]) * K + 2 * 4 * K
    return nbytes, 2 * M * K * N * (int(dw) + int(sums))


def _conv1x1_dgrad(a):
    """Backward pass 2: reads dy, W, x (every input row with batch statistics, else the sampled ones) and
    the addend; writes dx over every input row."""
    M, K, N, ex, e = a["M"], a["K"], a["N"], a["x_ptr"].element_size(), a["dy_ptr"].element_size()
    Mi = M * a["H"] * a["W"] // (a["Ho"] * a["Wo"])
    x_rows = Mi if a["BATCH_STATS"] else M
    nbytes = e * M * N + _nb(a["w_ptr"]) + ex * (x_rows + Mi + (Mi if a["ACCUMULATE"] else 0)) * K + 24 * K
    return nbytes, 2 * M * K * N


def _conv1x1_dz(a):
    M, K, N, ex, e = a["M"], a["K"], a["N"], a["x_ptr"].element_size(), a["dy_ptr"].element_size()
    return (e * (M * N + M * K) + _nb(a["w_ptr"]) + ex * M * K + 2 * 2 * 4 * -(-M // a["BLOCK_M"]) * K + 2 * 4 * K
            + 16 * K, 2 * M * K * N)


def _conv1x1_dx(a):
    Mi, K, ex, e = a["M_in"], a["K"], a["x_ptr"].element_size(), a["dz_ptr"].element_size()
    M = Mi * a["Ho"] * a["Wo"] // (a["H"] * a["W"])
    return ex * (2 * Mi * K + (Mi * K if a["ACCUMULATE"] else 0)) + e * M * K + 24 * K, 0


def _stats_fused(a):
    M, C = a["M"], a["C"]
    x = _nb(a["x_ptr"]) * M // max(a["x_ptr"].shape[0], 1)
    return x + 2 * 2 * 4 * -(-M // a["BLOCK_M"]) * C + 3 * 4 * C + (4 * 4 * C if a["UPDATE_RUNNING"] else 0), 0


def _bn_finalize(a):
    return 3 * 4 * a["C"] + (4 * 4 * a["C"] if a["UPDATE_RUNNING"] else 0), 0


def _bn_relu_fwd(a):
    return _nb(a["x_ptr"]) + _nb(a["a_ptr"]) + 16 * a["C"], 0


def _bn_relu_reduce(a):
    return _nb(a["da_ptr"]) + _nb(a["x_ptr"]) + _nb(a["part_ptr"]) + 16 * a["C"], 0


def _bn_relu_dx(a):
    return _nb(a["da_ptr"]) + _nb(a["x_ptr"]) + _nb(a["dx_ptr"]) + 24 * a["C"], 0


TRITON_COSTS = {
    "_bn_relu_conv1x1_fwd_kernel": ("fused 1x1", _conv1x1_fwd),
    "_bn_relu_conv1x1_bwd_reduce_kernel": ("fused 1x1", _conv1x1_reduce),
    "_bn_relu_conv1x1_bwd_dgrad_kernel": ("fused 1x1", _conv1x1_dgrad),
    "_bn_relu_conv1x1_bwd_dz_kernel": ("fused 1x1", _conv1x1_dz),
    "_bn_relu_conv1x1_bwd_dx_kernel": ("fused 1x1", _conv1x1_dx),
    "_batch_stats_kernel": ("statistics", _stats_fused),
    "_bn_finalize_kernel": ("statistics", _bn_finalize),
    "_bn_relu_fwd_kernel": ("BN-ReLU passes", _bn_relu_fwd),
    "_bn_relu_bwd_reduce_kernel": ("BN-ReLU passes", _bn_relu_reduce),
    "_bn_relu_bwd_dx_kernel": ("BN-ReLU passes", _bn_relu_dx),
}


# ---------------------------------------------------------------------------------------------------
# aten ops: op class and cost
# ---------------------------------------------------------------------------------------------------
_BN_RELU_OPS = frozenset({
    "native_batch_norm", "native_batch_norm_backward", "cudnn_batch_norm", "cudnn_batch_norm_backward",
    "_native_batch_norm_legit", "_native_batch_norm_legit_no_training", "batch_norm_backward", "relu", "relu_",
    "threshold_backward", "max_pool2d_with_indices", "max_pool2d_with_indices_backward",
})
_WRITE_ONLY_FIRST = frozenset({"copy_", "fill_", "zero_", "_foreach_zero_", "_foreach_copy_"})


def aten_class(name, args):
    if name in ("convolution", "convolution_backward"):
        w = args[1] if name == "convolution" else args[2]
        return "fused 1x1" if tuple(w.shape[2:]) == (1, 1) else "3x3 conv"
    if name in _BN_RELU_OPS:
        return "BN-ReLU passes"
    return "glue"


def aten_cost(name, args, kwargs, out):
    """(bytes read + written, FLOPs) of one aten op; FLOPs only for convolutions and matrix products."""
    outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    if name.endswith("_") and not outs and args:
        outs = [t for t in tree_leaves(args[0]) if isinstance(t, torch.Tensor)]  # in-place foreach ops
    skip = args[0] if name in _WRITE_ONLY_FIRST else None
    skip_ids = {id(t) for t in tree_leaves(skip)} if skip is not None else set()
    seen, ins = set(), []
    for t in tree_leaves((args, kwargs)):
        if isinstance(t, torch.Tensor) and id(t) not in seen and id(t) not in skip_ids:
            seen.add(id(t))
            ins.append(t)
    nbytes = sum(map(_nb, ins)) + sum(map(_nb, outs))
    flops = 0
    if name == "convolution":
        flops = 2 * outs[0].numel() * args[1][0].numel()
    elif name == "convolution_backward":
        mask = args[10]
        flops = 2 * args[0].numel() * args[2][0].numel() * (int(mask[0]) + int(mask[1]))
    elif name in ("mm", "addmm"):
        a, b = (args[0], args[1]) if name == "mm" else (args[1], args[2])
        flops = 2 * a.shape[0] * a.shape[1] * b.shape[1]
    elif name in ("native_batch_norm", "cudnn_batch_norm") and bool(args[5]):
        nbytes += _nb(args[0])  # training: a statistics pass over x, then the normalising pass
    elif name in ("native_batch_norm_backward", "cudnn_batch_norm_backward"):
        nbytes += _nb(args[0]) + _nb(args[1])  # a reduction pass over (dy, x), then the dx pass
    return nbytes, flops


@dataclass
class Launch:
    kind: str          # "aten" or "triton"
    name: str          # aten op (e.g. "add_") or Triton kernel name
    cls: str           # one of CLASSES
    bytes: int
    flops: int
    grid: tuple | None = None


@dataclass
class StepCost:
    """The launches of one training step, and per-class totals."""
    launches: list = field(default_factory=list)
    excluded: dict = field(default_factory=dict)  # aten ops seen that launch no kernel: {name: count}

    def by_class(self):
        """{class: {"aten", "triton", "launches", "bytes", "flops"}} over CLASSES, in order."""
        out = {c: dict(aten=0, triton=0, launches=0, bytes=0, flops=0) for c in CLASSES}
        for r in self.launches:
            d = out[r.cls]
            d[r.kind] += 1
            d["launches"] += 1
            d["bytes"] += r.bytes
            d["flops"] += r.flops
        return out

    def totals(self):
        t = dict(aten=0, triton=0, launches=0, bytes=0, flops=0)
        for d in self.by_class().values():
            for k in t:
                t[k] += d[k]
        return t

    def op_counts(self, cls=None, kind=None):
        """{op or kernel name: launches}, most frequent first (optionally of one class / kind)."""
        counts = {}
        for r in self.launches:
            if (cls is None or r.cls == cls) and (kind is None or r.kind == kind):
                counts[r.name] = counts.get(r.name, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
