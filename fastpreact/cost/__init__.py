"""The cost model of one training step: launches, bytes and FLOPs counted on fake tensors, and a
roofline prediction of the step time on a card. A MODEL, not a measurement.

  count.py      count_step / count_model: one step under FakeTensorMode, every aten op and Triton launch
                recorded with its bytes and FLOPs
  launches.py   the op classes, the aten ops that launch nothing, the per-kernel byte and FLOP formulas
  roofline.py   the cards' constants, the host's per-launch cost, predict()
"""
from .count import count_model, count_step  # noqa: F401
from .launches import CLASSES, NO_LAUNCH, TRITON_COSTS, Launch, StepCost  # noqa: F401
from .roofline import CARD_PEAKS, CARDS, HOST_US, predict  # noqa: F401

__all__ = ["CLASSES", "CARDS", "CARD_PEAKS", "HOST_US", "TRITON_COSTS", "NO_LAUNCH", "Launch", "StepCost",
           "count_step", "count_model", "predict"]
