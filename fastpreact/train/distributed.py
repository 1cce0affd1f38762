"""Process groups and local worker launch for the trainer.

The trainer reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT);
`--gpus N` starts N workers on this machine through torch.distributed's elastic launcher, the way
`torchrun --standalone` does, and `--max-restarts K` lets it restart them.

Restarts. torchrun's agent keeps one key-value store (at MASTER_ADDR:MASTER_PORT) for the whole job, and
a restarted worker group meets the keys the previous, dead group left there: gloo would read the dead
workers' addresses and fail or hang. Each attempt therefore builds its process group under a key prefix
of its own, a fresh token that the attempt's rank 0 draws and every other rank of the same attempt
receives by a handshake (hello under the token, answer under the rank's own nonce) that a stale token can
never complete. The restart count alone would not do: it is counted per node, and a node that rejoins
without failing (or a replacement node) counts differently from the others.

Timeouts. Every collective and every store wait gives up after --dist-timeout seconds, so a dead peer
becomes an error that torchrun can restart from instead of a hang; NCCL runs with asynchronous error
handling, whose watchdog ends the process when a collective exceeds the timeout.

Before the process group. A worker joins the attempt's store first (join_job): rank 0 shares what the run
resumes from through it (from_rank0), and the process group's backend follows from the device that the
checkpoint's options choose.

Replicas. Every rank holds the same weights: DDP averages the gradients and broadcasts rank 0's buffers.
replica_mismatches compares an exact checksum of every tensor over the ranks, so a rank that drifted
(a bug, or a hardware fault) is found instead of being saved.
"""
from __future__ import annotations

import json
import os
import sys
import time
import uuid
from datetime import timedelta

import torch
import torch.distributed as dist

# A collective waits for the slowest rank. Between two collectives a rank may run a training step (the
# first one compiles and autotunes), rank 0 may evaluate and write a checkpoint (a ResNet-200 with its
# momentum is ~0.5 GB, tens of seconds to a network file system), and at start-up the ranks build their
# data loaders. 10 minutes covers all of that with a wide margin, and a hung collective still fails 3x
# sooner than torch's 30-minute gloo default (NCCL's is longer still).
DEFAULT_TIMEOUT_S = 600.0
_ATTEMPT_KEY = "fastpreact/attempt"  # the token of the newest attempt, written by its rank 0
_RECHECK_S = 1.0                     # a rank that read a stale token reads the key again after this


def dist_env():
    """(rank, world_size, local_rank) from the torchrun/launcher environment, else one process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    return 0, 1, 0


def join_job(timeout: float | None = None):
    """This attempt's store (see attempt_store), joined once per process; its waits give up after `timeout`
    seconds (default DEFAULT_TIMEOUT_S), as do the collectives of the process group built on it."""
    if "store" not in _JOB:
        seconds = DEFAULT_TIMEOUT_S if timeout is None else timeout
        rank, world_size, _ = dist_env()
        _JOB.update(store=attempt_store(rank, world_size, seconds), timeout_s=seconds)
    return _JOB["store"]


def from_rank0(key, make):
    """make() called on rank 0 only; its value (JSON) on every rank of the attempt, through the attempt's
    store, so that it works before the process group exists."""
    rank, _, _ = dist_env()
    store = join_job()
    if rank == 0:
        value = make()
        store.set(key, json.dumps(value))
        return value
    return json.loads(store.get(key))  # waits for rank 0, up to the store's timeout


def init_process_group(device: torch.device, timeout: float | None = None):
    """Join the job's process group: NCCL on CUDA devices, gloo on the CPU, on this attempt's store (joined
    now unless join_job came first), with collectives that fail after `timeout` seconds."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":  # torchrun sets it too; a user's own value wins
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    rank, world_size, _ = dist_env()
    store = join_job(timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=_JOB["timeout_s"]))


_JOB: dict = {}  # store, timeout_s of this process's attempt (join_job)


def job_store():
    """(the store this attempt's ranks share, its timeout in seconds), or (None, None) without a group."""
    if not dist.is_initialized():
        return None, None
    return _JOB.get("store"), _JOB.get("timeout_s")


def attempt_store(rank, world_size, timeout_s):
    """The job's store (torchrun's agent store at MASTER_ADDR:MASTER_PORT, else one that rank 0 hosts
    there), prefixed with a token that only this attempt's ranks share."""
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise RuntimeError(f"RANK and WORLD_SIZE are set but {' and '.join(missing)} not; start the workers "
                           "with torchrun (or set MASTER_ADDR and MASTER_PORT to rank 0's address)")
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                         is_master=not agent_store and rank == 0, timeout=timedelta(seconds=timeout_s),
                         multi_tenant=True)
    return dist.PrefixStore(f"{_agree_on_attempt(base, rank, world_size, timeout_s)}/pg", base)


def _agree_on_attempt(store, rank, world_size, timeout_s):
    """A token that every rank of this attempt returns and no earlier attempt used.

    Rank 0 draws the token, publishes it, waits for each rank's nonce under it and answers each nonce.
    Another rank may first read the previous attempt's token (its rank 0 has not published yet): nobody
    answers its fresh nonce there, so it reads the key again until the answer comes.
    """
    if rank == 0:
        token = f"fastpreact/{uuid.uuid4().hex}"
        store.set(_ATTEMPT_KEY, token)
        hellos = [f"{token}/hello/{r}" for r in range(1, world_size)]
        if hellos:
            store.wait(hellos)  # gives up after the store's timeout
        for key in hellos:
            store.set(f"{token}/go/{store.get(key).decode()}", "1")
        return token
    nonce = uuid.uuid4().hex
    deadline = time.monotonic() + timeout_s
    while True:
        token = store.get(_ATTEMPT_KEY).decode()  # waits for the first attempt's rank 0
        store.set(f"{token}/hello/{rank}", nonce)
        answer = [f"{token}/go/{nonce}"]
        recheck = min(deadline, time.monotonic() + _RECHECK_S)
        while time.monotonic() < recheck:
            if store.check(answer):
                return token
            time.sleep(0.01)
        if time.monotonic() >= deadline:
            raise TimeoutError(f"rank {rank}: rank 0 did not join the process group within {timeout_s:g} s "
                               "(--dist-timeout)")


def destroy_process_group(barrier: bool = False):
    if barrier:
        dist.barrier()
    dist.destroy_process_group()
    _JOB.clear()


# ------------------------------------------------------------------------------------------ replicas
def tensor_checksum(t: torch.Tensor) -> torch.Tensor:
    """An exact checksum of a tensor's bits: the sum of its elements read as integers of their own width.
    Integer sums do not depend on the order of reduction, so equal tensors give equal checksums on any
    device, and a flipped bit changes it."""
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.view(ints).to(torch.int64).sum()  # int64 wraps alike everywhere


def replica_mismatches(named_tensors: dict) -> list:
    """[(name, [ranks])] of the tensors whose checksum on some rank differs from rank 0's (all ranks get
    the same answer). One all_gather of one int64 per tensor."""
    names = list(named_tensors)
    if not names:
        return []
    mine = torch.stack([tensor_checksum(named_tensors[n]) for n in names])
    table = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(table, mine)
    return compare_checksums(names, torch.stack(table).cpu())


def compare_checksums(names, table):
    """[(name, [ranks])] where row r of `table` ([world, tensors]) differs from row 0."""
    differs = table != table[0]
    return [(n, differs[:, i].nonzero().flatten().tolist()) for i, n in enumerate(names) if differs[:, i].any()]


def launch_local_workers(nproc, argv, entry, max_restarts=None):
    """Start nproc workers on this machine, each running sys.exit(entry(argv)), through torch.distributed's
    launcher (what torchrun --standalone does); return the first failing worker's exit code, else 0.

    With max_restarts K, a failed worker group is started again up to K times, and the restarted workers
    continue from the newest checkpoint (--resume auto unless --resume was given)."""
    import logging
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch
    for name in ("torch.distributed.elastic", "torch.multiprocessing"):  # the workers report their errors
        logging.getLogger(name).setLevel(logging.CRITICAL)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"fastpreact-{os.getpid()}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=max_restarts or 0,
                          start_method="spawn")
    try:
        elastic_launch(config, _run_worker)(entry, argv)
    except ChildFailedError as e:
        codes = [f.exitcode for _, f in sorted(e.failures.items())]
        return next((c for c in codes if c > 0), 1)
    except SignalException as e:  # Ctrl-C/SIGTERM: the workers got it too, checkpointed and stopped
        return 128 + int(e.sigval)
    return 0


def restart_argv(argv, restart_count):
    """The worker's argv on attempt `restart_count`: a restart resumes (--resume auto) unless the
    command names what to resume from."""
    if restart_count == 0 or any(a == "--resume" or a.startswith("--resume=") for a in argv):
        return list(argv)
    return list(argv) + ["--resume", "auto"]


def _run_worker(entry, argv):
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restart and os.environ.get("RANK") == "0":
        print(f"fastpreact.train: worker restart {restart} of {os.environ.get('TORCHELASTIC_MAX_RESTARTS')} "
              "after a failed worker", file=sys.stderr, flush=True)
    sys.exit(entry(restart_argv(argv, restart)))
