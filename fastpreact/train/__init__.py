"""Training: `python -m fastpreact.train DATASET [options]` (see cli.py for the usage).

  cli.py          the command: options in, one worker's run or --gpus workers out, one-line errors
  options.py      the options (every number checked), the paper's recipes, their resolution, the lr schedule
  prepare.py      what a run is: its folder, the checkpoint it resumes from, its options resolved once
  worker.py       one worker's run: RunState, set-up, the loop, checkpoints, evaluation, the end
  step.py         the training step: eager, torch.compile or one captured CUDA graph
  components.py   what training and evaluation share: device, process group, data, model, autocast
  evaluation.py   evaluation of a model, and --eval-only
  checkpoint.py   atomic, rotating checkpoints, RNG state, resume search
  metrics.py      metrics.jsonl and curves.png of a run
  distributed.py  process groups (a store prefix per attempt, timeouts), replica checksums, the launcher
"""
from .cli import main  # noqa: F401

__all__ = ["main"]
