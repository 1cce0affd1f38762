"""Process groups and local worker launch for the trainer.

The trainer reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); `--gpus N` starts N workers on
this machine through torch.distributed's elastic launcher, the way `torchrun --standalone` does.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist


def dist_env():
    """(rank, world_size, local_rank) from the torchrun/launcher environment, else one process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    return 0, 1, 0


def init_process_group(device: torch.device):
    """Join the job's process group: NCCL on CUDA devices, gloo on the CPU."""
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def destroy_process_group(barrier: bool = False):
    if barrier:
        dist.barrier()
    dist.destroy_process_group()


def launch_local_workers(nproc, argv, entry):
    """Start nproc workers on this machine, each running sys.exit(entry(argv)), through torch.distributed's
    launcher (what torchrun --standalone does); return the first failing worker's exit code, else 0."""
    import logging
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch
    for name in ("torch.distributed.elastic", "torch.multiprocessing"):  # the workers report their errors
        logging.getLogger(name).setLevel(logging.CRITICAL)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"fastpreact-{os.getpid()}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          start_method="spawn")
    try:
        elastic_launch(config, _run_worker)(entry, argv)
    except ChildFailedError as e:
        codes = [f.exitcode for _, f in sorted(e.failures.items())]
        return next((c for c in codes if c > 0), 1)
    except SignalException as e:  # Ctrl-C/SIGTERM: the workers got it too, checkpointed and stopped
        return 128 + int(e.sigval)
    return 0


def _run_worker(entry, argv):
    sys.exit(entry(argv))
