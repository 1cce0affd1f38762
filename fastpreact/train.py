"""Train a pre-activation ResNet with the paper's recipes (He et al. 2016, "Identity Mappings").

    # Quick start: the embedded toy set, a few minutes on any CPU
    python -m fastpreact.train shapes10 --arch resnet8 --iters 300 --eval-every 100
    # CIFAR-10, ResNet-164, the paper's recipe (batch 128, 64k iterations) on one GPU
    python -m fastpreact.train cifar10 --data-dir data --arch resnet164
    # ResNet-1001 at the paper's best batch of 64, the whole training step in a CUDA graph
    python -m fastpreact.train cifar10 --data-dir data --arch resnet1001 --batch-size 64 --cuda-graphs
    # ImageNet, ResNet-200, the 8 GPUs of this machine (global batch 256 = 32 per GPU)
    python -m fastpreact.train imagenet --data-dir /data/imagenet --gpus 8 --out runs/r200
    # several nodes: the same command on every node (c10d rendezvous); elastic restarts resume
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m fastpreact.train imagenet --data-dir /data/imagenet --batch-size 512 --out runs/r200 --resume auto
    # continue a stopped run (its options are taken from the checkpoint); evaluate a finished one
    python -m fastpreact.train cifar10 --out runs/c10 --resume auto
    python -m fastpreact.train cifar10 --data-dir data --eval-only runs/c10/final.pt

Run files in --out: config.json, metrics.jsonl, checkpoints/ckpt-<step>.pt (the last 3), final.pt
(the model's state_dict), curves.png. See fastpreact/runlog.py for the metrics format.
"""
import argparse
import contextlib
import json
import math
import os
import platform
import signal
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from .distributed import (DEFAULT_TIMEOUT_S, destroy_process_group, dist_env, init_process_group,
                          launch_local_workers, parse_restarts, parse_timeout)
from .checkpoint import (CHECKPOINT_FORMAT, CheckpointError, atomic_torch_save, atomic_write_json,
                         list_checkpoints, load_checkpoint, newest_valid_checkpoint, remove_stale_tmp,
                         rng_state, save_checkpoint, set_rng_state)

DATASETS = ("cifar10", "cifar100", "imagenet", "shapes10")

# The paper's recipes (PAPER.md). The 32x32 sets (CIFAR, shapes10) count in iterations, ImageNet in
# epochs. lr is for the recipe's batch and scales linearly with --batch-size; --iters/--epochs stretch
# the milestones and the warm-up by the same factor as the length.
RECIPES = {
    # resnet-1k-layers: batch 128, lr 0.1 (0.01 for the first 400 iterations, until training error is
    # below 80%), /10 at 32k and 48k, stop at 64k.
    "cifar": dict(arch="resnet164", batch_size=128, lr=0.1, warmup_iters=400, milestones=(32000, 48000),
                  iters=64000, eval_every=4000),
    # fb.resnet.torch: batch 256 (32 per GPU on 8 GPUs), lr 0.1, /10 at epochs 30 and 60, 90 epochs.
    "imagenet": dict(arch="resnet200", batch_size=256, lr=0.1, warmup_epochs=0, milestone_epochs=(30, 60),
                     epochs=90),
}
WARMUP_FACTOR = 0.1     # the warm-up lr is lr/10 (0.01 against 0.1 in the paper)
MOMENTUM = 0.9          # the paper's SGD
WEIGHT_DECAY = 1e-4     # the paper's SGD, applied to every parameter unless --no-bn-wd
CKPT_EVERY = 1000       # iterations; plus every epoch end. A CIFAR epoch at batch 128 is 390 iterations
LOG_EVERY = 20          # iterations between metrics.jsonl records (each costs one device sync)
MAX_NONFINITE = 20      # a loss non-finite this many steps in a row stops the run
GRAPH_WARMUP_STEPS = 3  # eager steps before capturing the CUDA graph (lazy init, autotuning, cudnn)
# Options that describe this process, not the run: never taken over from a checkpoint on resume.
RUNTIME_OPTIONS = ("resume", "out", "eval_only", "gpus", "workers", "dist_timeout", "max_restarts")


class UsageError(Exception):
    """A bad input the user can fix: printed as one line, exit code 2."""


# ---------------------------------------------------------------------------------------------- CLI
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + error
        raise UsageError(f"{message} (see python -m fastpreact.train --help)")


def build_parser():
    # Every option defaults to None: the real default depends on the data set, the device or the
    # recipe (resolve_config), and None also tells which options the user gave (kept on --resume).
    p = _Parser(prog="python -m fastpreact.train", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", metavar="DATASET", help=f"one of {', '.join(DATASETS)}")
    g = p.add_argument_group("model")
    g.add_argument("--arch", help="resnetN (default resnet164 for the 32x32 sets, resnet200 for imagenet)")
    g.add_argument("--unit", choices=("preact", "original"), help="residual unit (default preact)")
    g.add_argument("--kernels", choices=("fused", "stock"), help="default fused on CUDA, stock on a CPU")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    g.add_argument("--cuda-graphs", action="store_true", default=None,
                   help="capture forward+backward in a CUDA graph (one GPU; for the deep CIFAR nets)")
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", help="folder holding cifar-10-batches-py/, cifar-100-python/ or train/ val/")
    g.add_argument("--download", action="store_true", default=None, help="download CIFAR if missing")
    g.add_argument("--loader", choices=("auto", "dali", "torchvision"), help="imagenet loader (default auto)")
    g.add_argument("--aug", choices=("inception", "scale"), help="imagenet augmentation (default inception)")
    g.add_argument("--val-crop", type=int, choices=(224, 320), help="imagenet validation crop (default 224)")
    g.add_argument("--workers", type=int, help="loader worker threads per rank (default 4)")
    g.add_argument("--synthetic", action="store_true", default=None, help="random batches on the device")
    g.add_argument("--train-size", type=int, help="use this many training images (subset; quick runs)")
    g.add_argument("--val-size", type=int, help="use this many validation images")
    g = p.add_argument_group("recipe (defaults: the paper's)")
    g.add_argument("--batch-size", type=int, help="GLOBAL batch (128 CIFAR, 256 imagenet); scales the lr")
    g.add_argument("--iters", type=int, help="training length in iterations (rescales milestones, warm-up)")
    g.add_argument("--epochs", type=float, help="training length in epochs (rescales milestones, warm-up)")
    g.add_argument("--lr", type=float, help="peak lr (default 0.1 x batch / recipe batch)")
    g.add_argument("--warmup-iters", type=int, help="iterations at lr/10 first (default 400 CIFAR, 0 imagenet)")
    g.add_argument("--schedule", choices=("step", "cosine"), help="step: /10 at the milestones (default)")
    g.add_argument("--momentum", type=float, help=f"SGD momentum (default {MOMENTUM})")
    g.add_argument("--wd", type=float, help=f"weight decay (default {WEIGHT_DECAY})")
    g.add_argument("--nesterov", action="store_true", default=None, help="Nesterov momentum")
    g.add_argument("--no-bn-wd", action="store_true", default=None, help="no weight decay on BN and biases")
    g.add_argument("--label-smoothing", type=float, help="cross-entropy label smoothing (default 0)")
    g = p.add_argument_group("device, precision, distribution")
    g.add_argument("--device", choices=("cuda", "cpu"), help="default cuda where available")
    g.add_argument("--seed", type=int, help="every random choice of the run derives from it (default 0)")
    g.add_argument("--amp", choices=("bf16", "fp16", "off"), help="default bf16 on GPUs that have it, off on a CPU")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, help="default on")
    g.add_argument("--gpus", type=int, help="start this many local workers, one per GPU (DDP)")
    g.add_argument("--max-restarts", type=parse_restarts, metavar="K",
                   help="with --gpus: start the workers again up to K times after a failure; they resume")
    g.add_argument("--dist-timeout", type=parse_timeout, metavar="SECONDS",
                   help=f"a collective that waits longer fails (default {DEFAULT_TIMEOUT_S:g})")
    g.add_argument("--sync-bn", action="store_true", default=None, help="BN statistics over all ranks")
    g = p.add_argument_group("run files and evaluation")
    g.add_argument("--out", help="run folder (default runs/DATASET-ARCH-TIMESTAMP)")
    g.add_argument("--resume", metavar="auto|PATH", help="auto: newest valid checkpoint in --out (or start "
                   "fresh); PATH: a checkpoint file or a run folder")
    g.add_argument("--ckpt-every", type=int, help=f"iterations between checkpoints (default {CKPT_EVERY})")
    g.add_argument("--eval-every", type=int, help="iterations between evaluations (default 4000, imagenet: an epoch)")
    g.add_argument("--log-every", type=int, help=f"iterations between metrics records (default {LOG_EVERY})")
    g.add_argument("--eval-only", metavar="PATH", help="evaluate a checkpoint or final.pt and exit")
    return p


def resolve_config(opts, world_size):
    """Fill in every option the user left out (dict of explicit options -> Namespace) from the recipe and
    the device; raises UsageError for every inconsistent combination and for an unknown --arch."""
    o = dict(opts)
    dataset = o["dataset"]
    if dataset not in DATASETS:
        raise UsageError(f"unknown data set {dataset!r}; choose one of {', '.join(DATASETS)}")
    family = "imagenet" if dataset == "imagenet" else "cifar"
    recipe = RECIPES[family]
    cuda = torch.cuda.is_available()
    c = argparse.Namespace(**o)
    for name in vars(build_parser().parse_args([dataset])):
        if not hasattr(c, name):
            setattr(c, name, None)
    c.recipe = family
    c.arch = c.arch or recipe["arch"]
    c.unit = c.unit or "preact"
    c.device = c.device or ("cuda" if cuda else "cpu")
    if c.device == "cuda" and not cuda:
        raise UsageError("--device cuda: no CUDA GPU is visible (torch.cuda.is_available() is False); "
                         "use --device cpu")
    if c.gpus is not None:
        if c.gpus < 1:
            raise UsageError(f"--gpus must be at least 1, got {c.gpus}")
        if c.device != "cuda":
            raise UsageError("--gpus needs CUDA GPUs and none is in use; drop --gpus (for CPU workers use "
                             "torchrun --nproc-per-node N ... --device cpu)")
        if c.gpus > torch.cuda.device_count():
            raise UsageError(f"--gpus {c.gpus}: only {torch.cuda.device_count()} CUDA GPU(s) visible")
    if c.max_restarts is not None and c.gpus is None:
        raise UsageError("--max-restarts restarts the workers of --gpus N; under torchrun give torchrun "
                         "--max-restarts K")
    c.world_size = world_size
    c.batch_size = recipe["batch_size"] if c.batch_size is None else c.batch_size
    if c.batch_size < 1:
        raise UsageError(f"--batch-size must be positive, got {c.batch_size}")
    if c.batch_size % world_size:
        raise UsageError(f"--batch-size {c.batch_size} is not divisible by the world size {world_size} (the "
                         f"batch is global: each worker takes batch/{world_size}); pick a multiple of {world_size}")
    c.lr = c.lr if c.lr is not None else recipe["lr"] * c.batch_size / recipe["batch_size"]
    c.momentum = MOMENTUM if c.momentum is None else c.momentum
    c.wd = WEIGHT_DECAY if c.wd is None else c.wd
    c.label_smoothing = c.label_smoothing or 0.0
    c.schedule = c.schedule or "step"
    c.seed = c.seed or 0
    for flag in ("compile", "cuda_graphs", "download", "synthetic", "nesterov", "no_bn_wd", "sync_bn"):
        setattr(c, flag, bool(getattr(c, flag)))
    c.channels_last = True if c.channels_last is None else c.channels_last
    c.kernels = c.kernels or ("fused" if c.device == "cuda" else "stock")
    if c.amp is None:
        c.amp = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if c.device == "cuda" else "off"
    if c.amp == "fp16" and c.device != "cuda":
        raise UsageError("--amp fp16 needs a CUDA GPU; on a CPU use --amp bf16 or --amp off")
    if c.cuda_graphs and c.device != "cuda":
        raise UsageError("--cuda-graphs needs a CUDA GPU; drop it on a CPU")
    if c.cuda_graphs and world_size > 1:
        raise UsageError("--cuda-graphs runs on one GPU; drop it or run without --gpus/torchrun")
    if c.sync_bn and c.device != "cuda":
        raise UsageError("--sync-bn needs CUDA GPUs (torch's SyncBatchNorm runs on GPUs only); drop it on a CPU")
    if c.sync_bn and c.kernels == "fused":
        raise UsageError("--sync-bn needs --kernels stock (the fused kernels compute per-rank statistics)")
    if c.iters is not None and c.epochs is not None:
        raise UsageError("give --iters or --epochs, not both")
    for name in ("iters", "epochs", "ckpt_every", "eval_every", "log_every", "workers"):
        if getattr(c, name) is not None and getattr(c, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(c, name)}")
    if c.warmup_iters is not None and c.warmup_iters < 0:
        raise UsageError(f"--warmup-iters must be >= 0, got {c.warmup_iters}")
    c.ckpt_every = c.ckpt_every or CKPT_EVERY
    c.log_every = c.log_every or LOG_EVERY
    c.workers = 4 if c.workers is None else c.workers
    c.loader, c.aug, c.val_crop = c.loader or "auto", c.aug or "inception", c.val_crop or 224
    try:  # an unknown arch fails here, before any data is loaded (meta tensors: no memory, no init cost)
        from .models import create_model
        with torch.device("meta"):
            create_model(c.arch, 10, unit=c.unit)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    return c


def plan_schedule(recipe, batch_size, iters_per_epoch, iters=None, epochs=None, warmup_iters=None):
    """(total_iters, warmup_iters, milestones) of a recipe at this batch, stretched to --iters/--epochs."""
    r = RECIPES[recipe]
    if recipe == "cifar":
        ref_total, ref_warmup, ref_milestones = r["iters"], r["warmup_iters"], r["milestones"]
    else:
        ref_total = r["epochs"] * iters_per_epoch
        ref_warmup = r["warmup_epochs"] * iters_per_epoch
        ref_milestones = tuple(e * iters_per_epoch for e in r["milestone_epochs"])
    total = iters if iters is not None else (round(epochs * iters_per_epoch) if epochs is not None else ref_total)
    total = max(1, total)
    scale = total / ref_total
    warmup = round(ref_warmup * scale) if warmup_iters is None else warmup_iters
    return total, warmup, tuple(round(m * scale) for m in ref_milestones)


def lr_at(step, *, lr, total_iters, warmup_iters=0, milestones=(), schedule="step"):
    """The lr of optimizer step `step` (0-based): lr/10 during the warm-up, then lr divided by 10 at
    each milestone (step) or a cosine from lr to 0 over the remaining steps (cosine)."""
    if step < warmup_iters:
        return lr * WARMUP_FACTOR
    if schedule == "cosine":
        t = (step - warmup_iters) / max(1, total_iters - warmup_iters)
        return lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
    return lr * 0.1 ** sum(step >= m for m in milestones)


# ------------------------------------------------------------------------------------- entry point
def main(argv=None):
    """CLI entry: returns the exit code (0 done, 2 bad input, 1 training failed, 128+N on signal N)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    rank, world_size, local_rank = dist_env()
    try:
        args = build_parser().parse_args(argv)
        opts = {k: v for k, v in vars(args).items() if v is not None}
        launching = args.gpus is not None and (args.gpus > 1 or args.max_restarts) and "RANK" not in os.environ
        cfg = resolve_config(opts, args.gpus if launching else world_size)  # fail before any side effect
        if launching:
            if args.out is None:  # one folder for all workers, named once here
                argv += ["--out", default_out(cfg)]
            return launch_local_workers(args.gpus, argv, main, args.max_restarts)
        return worker(opts, rank, world_size, local_rank)
    except KeyboardInterrupt:
        print("fastpreact.train: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not isinstance(e, user_errors()):
            raise
        if local_rank == 0:  # one line per node, not one per worker
            msg = " ".join(str(e).split())
            print(f"fastpreact.train: error: {msg}", file=sys.stderr)
        return 2


def user_errors():
    errors = [UsageError, CheckpointError]
    try:
        from .data import DataError
        errors.append(DataError)
    except ImportError:
        pass
    return tuple(errors)


def default_out(cfg):
    return str(Path("runs") / f"{cfg.dataset}-{cfg.arch}-{time.strftime('%Y%m%d-%H%M%S')}")


# ----------------------------------------------------------------------------------------- the run
def holds_run(out):
    return out.is_dir() and any((out / n).exists() for n in ("config.json", "metrics.jsonl", "checkpoints",
                                                            "final.pt"))


def find_resume(opts, out, say):
    """(out, checkpoint path or None, checkpoint or None) for the --resume/--out options (rank 0)."""
    resume = opts.get("resume")
    if resume is None:
        if holds_run(out):
            raise UsageError(f"{out} already holds a run; continue it with --resume auto, or choose a new --out")
        return out, None, None
    if resume == "auto":
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
    return (out if "out" in opts else run_dir), path, ckpt


def worker(opts, rank, world_size, local_rank):
    distributed = world_size > 1
    if opts.get("eval_only") is not None:
        return eval_only(opts, rank, world_size, local_rank)
    cfg = resolve_config(opts, world_size)
    if cfg.device == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UsageError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    if distributed:
        init_process_group(device, cfg.dist_timeout)
    is_main = rank == 0

    def say(msg):
        if is_main:
            from tqdm import tqdm
            tqdm.write(msg, file=sys.stderr)

    # Rank 0 decides where the run lives and what it resumes from; every rank then loads the same file.
    decision = [None]
    if is_main:
        out = Path(opts["out"]) if "out" in opts else Path(default_out(cfg))
        out, ckpt_path, ckpt = find_resume(opts, out, say)
        decision = [(str(out), None if ckpt_path is None else str(ckpt_path))]
    if distributed:
        dist.broadcast_object_list(decision, src=0)
    out, ckpt_path = Path(decision[0][0]), decision[0][1]
    if ckpt_path is not None:
        if not is_main:
            ckpt = load_checkpoint(ckpt_path)
        if ckpt["config"]["dataset"] != cfg.dataset:
            raise UsageError(f"{ckpt_path} is a {ckpt['config']['dataset']} run, not {cfg.dataset}")
        # The checkpoint's options define the run; options given now override them (e.g. a longer --iters).
        given = {k: v for k, v in opts.items() if k not in RUNTIME_OPTIONS}
        merged = {**{k: v for k, v in ckpt["options"].items() if k not in RUNTIME_OPTIONS}, **given}
        merged.update({k: opts[k] for k in RUNTIME_OPTIONS if k in opts})
        opts = merged
        cfg = resolve_config(opts, world_size)
        say(f"resuming from {ckpt_path} (step {ckpt['step']})")

    # ---- data, model, optimizer
    from .data import build_data
    from .models import create_model
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[cfg.amp]
    sizes = {k: getattr(cfg, k) for k in ("train_size", "val_size") if getattr(cfg, k) is not None}
    data = build_data(cfg.dataset, data_dir=cfg.data_dir, batch_size=cfg.batch_size // world_size,
                      device=device, rank=rank, world_size=world_size, seed=cfg.seed, loader=cfg.loader,
                      aug=cfg.aug, val_crop=cfg.val_crop, workers=cfg.workers, synthetic=cfg.synthetic,
                      download=cfg.download, dtype=amp_dtype or torch.float32, **sizes)
    train_loader = data.train
    iters_per_epoch = len(train_loader)
    cfg.total_iters, warmup, milestones = plan_schedule(cfg.recipe, cfg.batch_size, iters_per_epoch,
                                                        cfg.iters, cfg.epochs, cfg.warmup_iters)
    cfg.warmup_iters, cfg.milestones, cfg.iters_per_epoch = warmup, list(milestones), iters_per_epoch
    if cfg.eval_every is None:  # ImageNet: after every epoch; CIFAR: every 4000 iterations
        cfg.eval_every = iters_per_epoch if cfg.recipe == "imagenet" else RECIPES["cifar"]["eval_every"]

    seed_everything(cfg.seed)
    try:
        raw_model = create_model(cfg.arch, data.num_classes, unit=cfg.unit, kernels=cfg.kernels)
    except (ValueError, TypeError, NotImplementedError) as e:
        raise UsageError(str(e)) from None
    raw_model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    if cfg.sync_bn and distributed:
        raw_model = nn.SyncBatchNorm.convert_sync_batchnorm(raw_model)
    train_model = raw_model
    if distributed:
        train_model = nn.parallel.DistributedDataParallel(
            raw_model, device_ids=[local_rank] if device.type == "cuda" else None)
    if cfg.compile:
        train_model = torch.compile(train_model)

    if cfg.no_bn_wd:  # BN's gamma/beta and biases are the 1-d parameters
        params = [{"params": [p for p in raw_model.parameters() if p.ndim > 1]},
                  {"params": [p for p in raw_model.parameters() if p.ndim <= 1], "weight_decay": 0.0}]
    else:
        params = raw_model.parameters()
    # fused=True: one multi-tensor kernel, and it takes the scaler's found_inf on the device (no sync).
    impl = {"fused": True} if device.type == "cuda" else {"foreach": True}
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.wd,
                                nesterov=cfg.nesterov, **impl)
    schedule = dict(lr=cfg.lr, total_iters=cfg.total_iters, warmup_iters=warmup, milestones=milestones,
                    schedule=cfg.schedule)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, **schedule) / cfg.lr)
    # fp16 needs loss scaling. bf16 and fp32 get a scaler held at scale 1 (update(1.0) below): it only
    # skips the steps whose gradients are not finite, as in fp16, without a host sync on CUDA.
    scaler = torch.amp.GradScaler(device.type, init_scale=65536.0 if cfg.amp == "fp16" else 1.0)
    fixed_scale = None if cfg.amp == "fp16" else 1.0
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    step = 0
    if ckpt_path is not None:
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        scheduler.load_state_dict(ckpt["scheduler"])
        train_loader.load_state_dict(ckpt["loader"])
        set_rng_state(ckpt["rng"])
        step = ckpt["step"]
        del ckpt

    # ---- run files (rank 0)
    log = None
    if is_main:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        remove_stale_tmp(out / "checkpoints")
        from .runlog import RunLog
        log = RunLog(out, resume_step=step if ckpt_path is not None else None)
        atomic_write_json(out / "config.json", {**vars(cfg), "out": str(out), "resumed_from": ckpt_path,
                                                "command": sys.argv, **environment(device, world_size)})
        say(f"{cfg.arch} ({cfg.unit}, {cfg.kernels} kernels, amp {cfg.amp}) on {cfg.dataset}: {cfg.total_iters} "
            f"iterations at batch {cfg.batch_size} ({world_size} worker(s)), lr {cfg.lr:g} "
            + (f"/10 at {list(milestones)}" if cfg.schedule == "step" else "cosine")
            + f", warm-up {warmup}; run files in {out}")

    def autocast():
        if amp_dtype is None:
            return contextlib.nullcontext()
        # A CUDA graph must not capture autocast's cache of cast weights (it would replay stale casts).
        return torch.autocast(device.type, dtype=amp_dtype, cache_enabled=not cfg.cuda_graphs)

    def forward_backward(images, labels):
        with autocast():
            loss = criterion(train_model(images), labels)
        scaler.scale(loss).backward()
        return loss.detach()

    def checkpoint():
        """Write ckpt-<step>.pt (rank 0) unless the state is not finite (then the last good one stays)."""
        average_bn_buffers(raw_model, distributed)
        if not state_is_finite(raw_model):
            say(f"warning: step {step}: model state is not finite; checkpoint skipped")
            return None
        if not is_main:
            return None
        state = {"format": CHECKPOINT_FORMAT, "step": step, "epoch": train_loader.epoch,
                 "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict(), "scheduler": scheduler.state_dict(),
                 "loader": train_loader.state_dict(), "rng": rng_state(),
                 "options": {k: v for k, v in opts.items()}, "config": vars(cfg)}
        return save_checkpoint(state, out / "checkpoints", step)

    def run_eval():
        t = time.perf_counter()
        average_bn_buffers(raw_model, distributed)
        result = evaluate(raw_model, data.val, data.num_classes, autocast, distributed, device)
        if is_main:
            log.write({"kind": "eval", "step": step, "epoch": round(step / iters_per_epoch, 4), **result,
                       "time": round(log.elapsed_before + time.perf_counter() - t_start, 3)})
            log.plot()
            say(f"step {step}/{cfg.total_iters} (epoch {step / iters_per_epoch:.2f}): top-1 error "
                f"{result['top1_err']:.2f}%, top-{min(5, data.num_classes)} error {result['top5_err']:.2f}%"
                f" on {result['images']} images ({time.perf_counter() - t:.1f}s)")

    # ---- signals: finish the current step, write a checkpoint, exit
    stop_signal = [0]

    def on_signal(signum, frame):
        if stop_signal[0] and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        stop_signal[0] = signum

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    # ---- the loop
    from tqdm import tqdm
    bar = tqdm(total=cfg.total_iters, initial=step, disable=not is_main, dynamic_ncols=True, unit="it",
               mininterval=0.5, file=sys.stderr)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # since the last log step
    finite_steps, streak, max_streak = (torch.zeros((), dtype=torch.int64, device=device) for _ in range(3))
    t_start = t_last = time.perf_counter()
    last_log_step, last_ckpt_step, steps_here, graph, saved = step, step, 0, None, None
    exit_code, stop_reason = 0, None
    raw_model.train()
    try:
        while step < cfg.total_iters and stop_reason is None:
            for images, labels in train_loader:
                if cfg.cuda_graphs and steps_here >= GRAPH_WARMUP_STEPS:
                    if graph is None:  # capture once; replays overwrite the grads the capture allocated
                        static_images, static_labels = images.clone(), labels.clone()
                        optimizer.zero_grad(set_to_none=True)
                        graph = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(graph):
                            static_loss = forward_backward(static_images, static_labels)
                    static_images.copy_(images)
                    static_labels.copy_(labels)
                    graph.replay()
                    loss = static_loss
                elif cfg.cuda_graphs:  # warm-up before capture: on a side stream, as torch.cuda.graphs asks
                    side = torch.cuda.Stream()
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        loss = forward_backward(images, labels)
                    torch.cuda.current_stream().wait_stream(side)
                else:
                    loss = forward_backward(images, labels)
                scaler.step(optimizer)  # skipped when the gradients are not finite
                scaler.update(fixed_scale)
                if graph is None:
                    optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                steps_here += 1
                bar.update(1)
                # Loss bookkeeping stays on the device: no sync until the next log step.
                finite = torch.isfinite(loss)
                loss_sum += torch.where(finite, loss.double(), 0.0)
                finite_steps += finite
                streak.copy_((streak + 1) * (~finite))
                torch.maximum(max_streak, streak, out=max_streak)

                if step % cfg.log_every == 0 or step == cfg.total_iters:
                    stats = torch.stack([loss_sum, finite_steps.double()])
                    flags = torch.stack([max_streak, torch.tensor(stop_signal[0], device=device)])
                    if distributed:  # every rank must take the same decision to stop
                        dist.all_reduce(stats)
                        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                    (loss_total, n_finite), (worst_streak, signum) = stats.tolist(), flags.tolist()
                    now = time.perf_counter()
                    img_per_s = (step - last_log_step) * cfg.batch_size / max(now - t_last, 1e-9)
                    lr_now = optimizer.param_groups[0]["lr"]
                    if is_main:
                        mean_loss = loss_total / n_finite if n_finite else None
                        log.write({"kind": "train", "step": step, "epoch": round(step / iters_per_epoch, 4),
                                   "loss": mean_loss, "lr": lr_now, "img_per_s": round(img_per_s, 1),
                                   "time": round(log.elapsed_before + now - t_start, 3)})
                        bar.set_postfix(loss="nan" if mean_loss is None else f"{mean_loss:.4f}", lr=f"{lr_now:.4g}",
                                        img_s=f"{img_per_s:.0f}", refresh=False)
                    loss_sum.zero_()
                    finite_steps.zero_()
                    max_streak.copy_(streak)
                    last_log_step, t_last = step, now
                    if worst_streak >= MAX_NONFINITE:
                        stop_reason = "nonfinite"
                    elif signum:
                        stop_signal[0], stop_reason = signum, "signal"
                elif stop_signal[0] and not distributed:
                    stop_reason = "signal"

                if stop_reason == "nonfinite":
                    break
                if step % cfg.eval_every == 0 and step < cfg.total_iters:
                    run_eval()
                if step % cfg.ckpt_every == 0 or step % iters_per_epoch == 0 or stop_reason == "signal":
                    saved = checkpoint()
                    last_ckpt_step = step
                if step % cfg.eval_every == 0 or step % cfg.ckpt_every == 0 or step % iters_per_epoch == 0:
                    t_last = time.perf_counter()  # throughput counts training time only
                if step >= cfg.total_iters or stop_reason is not None:
                    break
    finally:
        bar.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)

    if stop_reason == "nonfinite":
        last = list_checkpoints(out / "checkpoints") if is_main else []
        where = f"the last good checkpoint is {last[0][1]}" if last else "no checkpoint was written"
        say(f"fastpreact.train: stopped: the loss was not finite for {MAX_NONFINITE} steps in a row (by step "
            f"{step}); {where}. Lower --lr" + (", or use --amp bf16 or off." if cfg.amp == "fp16" else "."))
        exit_code = 1
    elif stop_reason == "signal":
        name = signal.Signals(stop_signal[0]).name
        where = f"checkpoint {saved}" if saved else "no checkpoint written (the state was not finite)"
        say(f"stopped by {name} at step {step}; {where}; continue with --out {out} --resume auto")
        exit_code = 128 + stop_signal[0]
    else:
        run_eval()
        if last_ckpt_step != step:
            checkpoint()
        average_bn_buffers(raw_model, distributed)
        if is_main:
            atomic_torch_save(raw_model.state_dict(), out / "final.pt")
            say(f"done: {step} iterations; final weights {out / 'final.pt'}")
    dump_dir = os.environ.get("FASTPREACT_TEST_RANK_DUMP")  # test hook: each rank's final weights
    if dump_dir:
        torch.save(raw_model.state_dict(), Path(dump_dir) / f"rank{rank}.pt")
    if distributed:
        destroy_process_group(barrier=True)
    return exit_code


def seed_everything(seed):
    import random

    import numpy as np
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def average_bn_buffers(model, distributed):
    """Average the BN running statistics over the ranks (each rank's last forward updated them from its
    own shard), so that every rank evaluates and saves the same model. Training is unaffected: train mode
    uses batch statistics, and DDP broadcasts rank 0's buffers before each forward."""
    if not distributed:
        return
    world = dist.get_world_size()
    for buf in model.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf)
            buf.div_(world)


def state_is_finite(model):
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True


def environment(device, world_size):
    import torchvision
    env = {"versions": {"python": platform.python_version(), "torch": torch.__version__,
                        "torchvision": torchvision.__version__, "fastpreact": _version()},
           "host": socket.gethostname(), "world_size": world_size,
           "gpu_names": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
           if device.type == "cuda" else [], "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        import triton
        env["versions"]["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def _version():
    from . import __version__
    return __version__


@torch.no_grad()
def evaluate(model, val_loader, num_classes, autocast, distributed, device):
    """Top-1 and top-min(5, classes) error in percent, exact over all ranks (counts are summed)."""
    was_training = model.training
    model.eval()
    k = min(5, num_classes)
    counts = torch.zeros(3, dtype=torch.int64, device=device)  # top-1 correct, top-k correct, images
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for images, labels in val_loader:
        with autocast():
            logits = model(images)
        topk = logits.float().topk(k, dim=1).indices
        hit = topk == labels[:, None]
        counts += torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum(), torch.tensor(labels.numel(), device=device)])
        loss_sum += nn.functional.cross_entropy(logits.float(), labels, reduction="sum").double()
    if distributed:
        dist.all_reduce(counts)
        dist.all_reduce(loss_sum)
    model.train(was_training)
    top1, topk_correct, n = counts.tolist()
    if n == 0:
        raise UsageError("the validation set is empty; check --val-size and the data directory")
    return {"top1_err": 100.0 * (n - top1) / n, "top5_err": 100.0 * (n - topk_correct) / n,
            "val_loss": loss_sum.item() / n, "images": n}


def eval_only(opts, rank, world_size, local_rank):
    """--eval-only PATH: the top-1/top-5 error of a checkpoint or a final.pt on the validation set."""
    path = Path(opts["eval_only"])
    if not path.is_file():
        raise UsageError(f"--eval-only {path}: no such file; pass a ckpt-<step>.pt or a final.pt")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"--eval-only {path}: unreadable ({type(e).__name__}); pass an intact checkpoint") from None
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        state, trained = obj["model"], obj["config"]
    elif isinstance(obj, dict) and all(torch.is_tensor(v) for v in obj.values()):
        cfg_file = path.parent / "config.json"  # final.pt sits in its run folder beside config.json
        state = obj
        trained = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    else:
        raise UsageError(f"--eval-only {path}: neither a training checkpoint nor a state_dict")
    # The architecture is the one the weights were trained with unless given on the command line.
    merged = {k: trained[k] for k in ("arch", "unit") if trained.get(k) is not None}
    merged.update({k: v for k, v in opts.items() if k not in ("resume", "eval_only")})
    cfg = resolve_config(merged, world_size)
    device = torch.device("cuda", local_rank) if cfg.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    distributed = world_size > 1
    if distributed:
        init_process_group(device, cfg.dist_timeout)
    from .data import build_data
    from .models import create_model
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[cfg.amp]
    sizes = {k: getattr(cfg, k) for k in ("train_size", "val_size") if getattr(cfg, k) is not None}
    if cfg.dataset == "shapes10" and cfg.train_size is None:
        sizes["train_size"] = cfg.batch_size  # evaluation needs no training images: draw one batch, not 50k
    data = build_data(cfg.dataset, data_dir=cfg.data_dir, batch_size=cfg.batch_size // world_size, device=device,
                      rank=rank, world_size=world_size, seed=cfg.seed, loader=cfg.loader, aug=cfg.aug,
                      val_crop=cfg.val_crop, workers=cfg.workers, synthetic=cfg.synthetic,
                      download=cfg.download, dtype=amp_dtype or torch.float32, **sizes)
    try:
        model = create_model(cfg.arch, data.num_classes, unit=cfg.unit, kernels=cfg.kernels)
        model.load_state_dict(state)
    except (ValueError, TypeError, RuntimeError) as e:
        first = " ".join(str(e).split())[:300]
        raise UsageError(f"--eval-only {path} does not fit {cfg.arch} ({cfg.unit}) with {data.num_classes} "
                         f"classes ({first}); pass the --arch/--unit it was trained with") from None
    model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()

    result = evaluate(model, data.val, data.num_classes, autocast, distributed, device)
    if rank == 0:
        print(f"{path}: top-1 error {result['top1_err']:.2f}%, top-{min(5, data.num_classes)} error "
              f"{result['top5_err']:.2f}% on {result['images']} {cfg.dataset} validation images")
        print(json.dumps({"checkpoint": str(path), **result}))
    if distributed:
        destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
