"""What a training run is, decided before any device is touched: the run folder, the checkpoint it resumes
from, and its options (the checkpoint's under those given now), resolved once.

The launcher of --gpus workers calls prepare_run to find every input error once, before any worker starts;
each worker calls it again, in its own process, to learn its run. A worker's device, and so the backend of
its process group, follow from the options prepare_run returns: a run resumed without --device keeps the
checkpoint's. Rank 0 alone looks for the checkpoint, and the other ranks take its decision through the
job's store (distributed.from_rank0), so every rank resumes from the same file.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .checkpoint import CheckpointError, load_checkpoint, newest_valid_checkpoint
from .options import RUNTIME_OPTIONS, UsageError, default_out, resolve_config

_DECISION_KEY = "fastpreact/resume-decision"


@dataclass
class RunSpec:
    """One worker's run as the options define it: opts (given explicitly: saved in checkpoints, taken over
    on resume), cfg (resolved), the run folder, and the checkpoint resumed from (None: a fresh run)."""
    opts: dict
    cfg: object
    out: Path
    ckpt_path: Optional[Path] = None


def prepare_run(opts, world_size, say, share=None):
    """(RunSpec, checkpoint dict or None) for the options given now; share(key, make) runs make() on rank 0
    and hands its value to every rank (None: this process decides alone, as one worker or the launcher)."""
    ckpt = None

    def decide():  # rank 0: where the run lives and what it resumes from, or the error that stops it
        nonlocal ckpt
        try:
            out, path, ckpt = find_resume(opts, say)
        except (UsageError, CheckpointError) as e:
            return {"error": str(e)}
        return {"out": out and str(out), "checkpoint": path and str(path)}

    decision = decide() if share is None else share(_DECISION_KEY, decide)
    if "error" in decision:
        raise UsageError(decision["error"])
    out, path = decision["out"] and Path(decision["out"]), decision["checkpoint"] and Path(decision["checkpoint"])
    if path is not None:
        if ckpt is None:  # a rank other than 0 reads the file rank 0 chose
            ckpt = load_checkpoint(path)
        if ckpt["config"]["dataset"] != opts["dataset"]:
            raise UsageError(f"{path} is a {ckpt['config']['dataset']} run, not {opts['dataset']}")
        opts = merge_options(ckpt["options"], opts)
    cfg = resolve_config(opts, world_size)
    if path is not None:
        check_world_size(cfg, ckpt, path, say)
        say(f"resuming from {path} (step {ckpt['step']})")
    return RunSpec(opts, cfg, out or Path(default_out(cfg)), path), ckpt


def holds_run(out):
    return out.is_dir() and any((out / n).exists() for n in ("config.json", "metrics.jsonl", "checkpoints",
                                                            "final.pt"))


def find_resume(opts, say):
    """(run folder or None for a new default one, checkpoint path or None, checkpoint or None) for the
    --resume/--out options."""
    resume, out = opts.get("resume"), Path(opts["out"]) if "out" in opts else None
    if resume is None:
        if out is not None and holds_run(out):
            raise UsageError(f"{out} already holds a run; continue it with --resume auto, or choose a new --out")
        return out, None, None
    if resume == "auto":
        if out is None:  # the default folder is named by the time: a new one, with nothing to resume
            say("--resume auto: no --out given, so no run to continue; starting fresh")
            return None, None, None
        path, ckpt = newest_valid_checkpoint(out / "checkpoints", warn=say)
        if path is None:
            say(f"--resume auto: no valid checkpoint in {out / 'checkpoints'}; starting fresh")
        return out, path, ckpt
    path = Path(resume)
    if not path.exists():
        raise UsageError(f"--resume {resume}: no such file or folder; pass a ckpt-<step>.pt, a run folder, or auto")
    if path.is_dir():
        run_dir = path
        path, ckpt = newest_valid_checkpoint(path / "checkpoints", warn=say)
        if path is None:
            raise UsageError(f"--resume {resume}: no valid checkpoint in {run_dir / 'checkpoints'}")
    else:
        ckpt = load_checkpoint(path)
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return (out if out is not None else run_dir), path, ckpt


def merge_options(saved, given):
    """The checkpoint's options, overridden by those given now (e.g. a longer --iters); the options of
    this process (RUNTIME_OPTIONS) come only from the command line."""
    merged = {k: v for k, v in saved.items() if k not in RUNTIME_OPTIONS}
    merged.update({k: v for k, v in given.items() if k not in RUNTIME_OPTIONS})
    merged.update({k: given[k] for k in RUNTIME_OPTIONS if k in given})
    return merged


def check_world_size(cfg, ckpt, path, say):
    """The number of workers is a runtime option, which a resume does not restore. Another number than the
    checkpoint's run had changes each worker's share of the global batch (its memory, and the BN batch
    statistics), so it stops the run unless --allow-new-world-size confirms it."""
    saved, now = ckpt["config"].get("world_size"), cfg.world_size
    if saved is None or saved == now:
        return
    line = (f"{path} is from a run of {_workers(saved)} and this run has {now}: each worker's share of the global "
            f"batch of {cfg.batch_size} images goes from {ckpt['config']['batch_size'] // saved} to "
            f"{cfg.batch_size // now}")
    if not cfg.allow_new_world_size:
        raise UsageError(f"{line}; resume with {_workers(saved)} (--gpus {saved}, or torchrun with {saved} in all), "
                         f"or add --allow-new-world-size to go on with {now}")
    say(f"warning: {line} (--allow-new-world-size)")


def _workers(n):
    return f"{n} worker" + ("s" if n != 1 else "")
