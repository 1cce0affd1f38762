"""Train a pre-activation ResNet with the paper's recipes (He et al. 2016, "Identity Mappings").

    # Quick start: the embedded toy set, a few minutes on any CPU
    python -m fastpreact.train shapes10 --arch resnet8 --iters 300 --eval-every 100
    # CIFAR-10, ResNet-164, the paper's recipe (batch 128, 64k iterations) on one GPU
    python -m fastpreact.train cifar10 --data-dir data --arch resnet164
    # ResNet-1001 at the paper's best batch of 64 (on one GPU the whole step replays from a CUDA graph)
    python -m fastpreact.train cifar10 --data-dir data --arch resnet1001 --batch-size 64
    # ImageNet, ResNet-200 on 8 local GPUs (global batch 256 = 32 per GPU); --cuda-graphs captures the
    # DDP step, all-reduce included
    python -m fastpreact.train imagenet --data-dir /data/imagenet --gpus 8 --out runs/r200
    # several nodes: the same command on every node (c10d rendezvous); elastic restarts resume
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m fastpreact.train imagenet --data-dir /data/imagenet --batch-size 512 --out runs/r200 --resume auto
    # continue a stopped run (its options are taken from the checkpoint; the number of workers is not, so
    # give the same --gpus); evaluate a finished one
    python -m fastpreact.train cifar10 --out runs/c10 --resume auto
    python -m fastpreact.train imagenet --data-dir /data/imagenet --gpus 8 --out runs/r200 --resume auto
    python -m fastpreact.train cifar10 --data-dir data --eval-only runs/c10/final.pt

Run files in --out: config.json, metrics.jsonl, checkpoints/ckpt-<step>.pt (the last 3), final.pt
(the model's state_dict), curves.png, tuning.json. See fastpreact/train/metrics.py for the metrics format.
"""
# This module is the command: it parses the options and runs one worker, or launches --gpus workers after
# checking every input once. The options and the paper's recipes live in options.py, what a run is (its
# folder, its checkpoint, its options resolved once) in prepare.py, one worker's run in worker.py (its
# training step in step.py), --eval-only in evaluation.py, and what they share in components.py.
import os
import sys

from .checkpoint import CheckpointError
from .components import check_data
from .options import RECIPES, UsageError, build_parser, lr_at, parse_options, plan_schedule, resolve_config
from ..data import DataError
from .distributed import dist_env, launch_local_workers
from .evaluation import evaluate_checkpoint, prepare_evaluation
from .prepare import prepare_run
from .worker import train_worker

__all__ = ["main", "launch", "build_parser", "resolve_config", "plan_schedule", "lr_at", "RECIPES", "UsageError"]
USER_ERRORS = (UsageError, CheckpointError, DataError)  # printed as one line, exit code 2


def main(argv=None):
    """CLI entry: returns the exit code (0 done, 2 bad input, 1 training failed, 128+N on signal N)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    rank, world_size, local_rank = dist_env()

    def run():
        opts = parse_options(argv, description=__doc__)
        gpus = opts.get("gpus")
        if gpus is not None and (gpus > 1 or opts.get("max_restarts")) and "RANK" not in os.environ:
            return _launch(gpus, argv, opts.get("max_restarts"), opts)
        if opts.get("eval_only") is not None:
            return evaluate_checkpoint(opts, rank, world_size, local_rank)
        return train_worker(opts, rank, world_size, local_rank)

    return _reporting_errors(run, local_rank)


def launch(nproc, argv, max_restarts=None):
    """Start nproc local workers on argv (what --gpus N [--max-restarts K] does) once every input is checked;
    returns the exit code, as main does."""
    return _reporting_errors(lambda: _launch(nproc, argv, max_restarts, parse_options(argv)), 0)


def _launch(nproc, argv, max_restarts, opts):
    """Find every input error once, here, before any worker starts (a worker would print it again on each
    restart): the options resolved for nproc workers after the checkpoint's are merged in, the run folder,
    the checkpoint, the new world size, and the data (rank 0's, built on the CPU). The workers then decide
    the same again: a restart resumes from whichever checkpoint is newest by then."""
    if opts.get("eval_only") is not None:
        _, _, cfg, sizes = prepare_evaluation(opts, nproc)
        check_data(cfg, nproc, **sizes)
    else:
        spec, ckpt = prepare_run(opts, nproc, say=lambda msg: None)  # the workers' rank 0 says it all
        check_data(spec.cfg, nproc, ckpt["loader"] if ckpt is not None else None)
        del ckpt
        if "out" not in opts:  # one folder for all workers, named once here
            argv = list(argv) + ["--out", str(spec.out)]
    return launch_local_workers(nproc, argv, main, max_restarts)


def _reporting_errors(run, local_rank):
    try:
        return run()
    except KeyboardInterrupt:
        print("fastpreact.train: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if local_rank == 0:  # one line per node, not one per worker
            msg = " ".join(str(e).split())
            print(f"fastpreact.train: error: {msg}", file=sys.stderr)
        return 2
