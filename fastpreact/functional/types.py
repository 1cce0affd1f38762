"""The two small types the fused ops pass around (see the glossary in fastpreact/functional/__init__.py).

    BNStats(mean, var, rstd, batch)       what a BatchNorm normalises with
    BNFinish(running_mean, running_var, num_batches_tracked, momentum, eps)
                                          what finishing a BatchNorm needs

They are flattened into plain arguments only where torch.library needs them (the operators).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

from torch import Tensor, nn

__all__ = ["BNStats", "BNFinish", "as_stats"]


class BNStats(NamedTuple):
    """Per-channel fp32 [C] statistics a BatchNorm normalises with."""
    mean: Tensor
    var: Tensor                     # biased: what BatchNorm divides by
    rstd: Optional[Tensor] = None   # 1 / sqrt(var + eps), once the BatchNorm is finished
    batch: bool = True              # statistics of this batch (training), or the running ones (eval)

    @property
    def finished(self) -> bool:
        return self.rstd is not None


class BNFinish(NamedTuple):
    """A BatchNorm in training, as its finish needs it: the buffers it updates in place (None where it
    has none: track_running_stats=False), its momentum (None: cumulative average) and eps."""
    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    num_batches_tracked: Optional[Tensor]
    momentum: Optional[float]
    eps: float

    @classmethod
    def of(cls, bn: nn.modules.batchnorm._BatchNorm) -> "BNFinish":
        tracked = bn.track_running_stats
        return cls(bn.running_mean if tracked else None, bn.running_var if tracked else None,
                   bn.num_batches_tracked if tracked else None, bn.momentum, float(bn.eps))


def as_stats(stats, op: str, channels: int) -> BNStats | None:
    """input_stats as BNStats: a BNStats, a (mean, var) pair from a producer's epilogue, or None."""
    if stats is None or isinstance(stats, BNStats):
        return stats
    if isinstance(stats, (tuple, list)) and len(stats) == 2:
        return BNStats(stats[0], stats[1])
    raise TypeError(f"{op}: input_stats must be a BNStats or a (mean, biased var) pair of [{channels}] tensors, "
                    f"got {type(stats).__name__}" + (f" of {len(stats)}" if isinstance(stats, (tuple, list)) else ""))
