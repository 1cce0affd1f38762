"""Run files of the trainer: atomic writes, rotating checkpoints, RNG state, resume search.

A checkpoint is one `torch.save` dict written as `<name>.tmp`, fsync'ed, then renamed over its final
name, so a crash leaves either the old file set or the new one, never a half-written checkpoint under a
real name. Everything in it loads with `torch.load(weights_only=True)`: tensors, numbers, strings and
containers only (numpy's RNG state is stored as a tensor for that reason).
"""
import json
import os
import random
import re
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_FORMAT = "fastpreact-checkpoint-1"
CHECKPOINT_RE = re.compile(r"^ckpt-(\d+)\.pt$")
KEEP_CHECKPOINTS = 3  # the newest 3: one may be damaged by a crash of the disk, one more to spare


def fsync_dir(path):
    """Make a rename inside `path` durable (POSIX needs the directory entry flushed too)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write):
    """Call write(file) on `path`.tmp, fsync it, then rename it to `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_torch_save(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path, text):
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def rng_state():
    """Every RNG the run may touch: python, numpy, torch CPU and the current CUDA device."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        # numpy's state holds an ndarray, which weights_only loading refuses: keep it as a tensor.
        "numpy": {"kind": np_state[0], "key": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def list_checkpoints(ckpt_dir):
    """[(step, path)] of the checkpoints in ckpt_dir, newest first (temporary files ignored)."""
    found = []
    if Path(ckpt_dir).is_dir():
        for p in Path(ckpt_dir).iterdir():
            m = CHECKPOINT_RE.match(p.name)
            if m and p.is_file():
                found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def save_checkpoint(state, ckpt_dir, step, keep=KEEP_CHECKPOINTS):
    """Write ckpt-<step>.pt atomically, then delete all but the newest `keep` checkpoints."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"ckpt-{step}.pt"
    atomic_torch_save(state, path)
    for _, old in list_checkpoints(ckpt_dir)[keep:]:
        old.unlink(missing_ok=True)
    return path


def remove_stale_tmp(ckpt_dir):
    """Temporary files left by a run killed while writing: never valid, safe to drop."""
    if Path(ckpt_dir).is_dir():
        for p in Path(ckpt_dir).glob("*.tmp"):
            p.unlink(missing_ok=True)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or is not a fastpreact training checkpoint."""


def load_checkpoint(path):
    """Load and sanity-check one training checkpoint; CheckpointError names the file and the problem."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, I/O error: all mean "unreadable"
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}: {first_line})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a fastpreact training checkpoint (no '{CHECKPOINT_FORMAT}' "
                              "format tag); pass a ckpt-<step>.pt from a run's checkpoints/ folder")
    return ckpt


def newest_valid_checkpoint(ckpt_dir, warn=print):
    """(path, checkpoint) of the newest readable checkpoint in ckpt_dir, or (None, None).

    A truncated or unreadable checkpoint is reported through warn() by name and the next older one is
    tried: a crash can damage at most the newest file, and the older ones are still exact states.
    """
    for _, path in list_checkpoints(ckpt_dir):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as e:
            warn(f"warning: {e}; trying the next older checkpoint")
    return None, None
