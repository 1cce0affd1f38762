"""The trainer's options: the command-line parser (parse_options, which also checks every number given),
the paper's recipes, resolve_config, which fills in every option the user left out from the recipe and the
device, and plan_run, which completes the schedule once the data's length is known.

Every option defaults to None in the parser: the real default depends on the data set, the device or the
recipe, and None also tells which options the user gave (those are kept on --resume).
"""
import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import DATASETS
from .distributed import DEFAULT_TIMEOUT_S

# The paper's recipes. The 32x32 sets (CIFAR, shapes10) count in iterations, ImageNet in epochs. lr is
# for the recipe's batch and scales linearly with --batch-size; --iters/--epochs stretch the milestones
# and the warm-up by the same factor as the length.
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
# Options that describe this process, not the run: never taken over from a checkpoint on resume.
RUNTIME_OPTIONS = ("resume", "out", "eval_only", "gpus", "workers", "dist_timeout", "max_restarts", "tuning",
                   "allow_new_world_size")


class UsageError(Exception):
    """A bad input the user can fix: printed as one line, exit code 2."""


# ------------------------------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + error
        raise UsageError(f"{message} (see python -m fastpreact.train --help)")


def build_parser(description=None):
    """The command line of `python -m fastpreact.train`, one function per option group."""
    p = _Parser(prog="python -m fastpreact.train", description=description,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", metavar="DATASET", help=f"one of {', '.join(DATASETS)}")
    for add_options in (_model_options, _data_options, _recipe_options, _device_options, _run_file_options):
        add_options(p)
    return p


def _model_options(p):
    g = p.add_argument_group("model")
    g.add_argument("--arch", help="resnetN (default resnet164 for the 32x32 sets, resnet200 for imagenet)")
    g.add_argument("--unit", choices=("preact", "original"), help="residual unit (default preact)")
    g.add_argument("--kernels", choices=("fused", "stock"), help="default fused on CUDA, stock on a CPU")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    g.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction,
                   help="replay the whole training step, optimizer included, from one CUDA graph (default "
                        "on one GPU, whose eager step the host bounds; under DDP only when asked)")


def _data_options(p):
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


def _recipe_options(p):
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


def _device_options(p):
    g = p.add_argument_group("device, precision, distribution")
    g.add_argument("--device", choices=("cuda", "cpu"), help="default cuda where available")
    g.add_argument("--seed", type=int, help="every random choice of the run derives from it (default 0)")
    g.add_argument("--amp", choices=("bf16", "fp16", "off"), help="default bf16 on GPUs that have it, off on a CPU")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, help="default on")
    g.add_argument("--gpus", type=int, help="start this many local workers, one per GPU (DDP)")
    g.add_argument("--max-restarts", type=int, metavar="K",
                   help="with --gpus: start the workers again up to K times after a failure; they resume")
    g.add_argument("--dist-timeout", type=float, metavar="SECONDS",
                   help=f"a collective that waits longer fails (default {DEFAULT_TIMEOUT_S:g})")
    g.add_argument("--allow-new-world-size", action="store_true", default=None,
                   help="resume a checkpoint on another number of workers (each then takes another share of "
                        "the global batch)")
    g.add_argument("--sync-bn", action="store_true", default=None, help="BN statistics over all ranks")
    g.add_argument("--tuning", metavar="FILE", help="pin the fused kernels' tile choices from a tuning.json "
                   "(a run folder keeps its own, and a resume pins it)")


def _run_file_options(p):
    g = p.add_argument_group("run files and evaluation")
    g.add_argument("--out", help="run folder (default runs/DATASET-ARCH-TIMESTAMP)")
    g.add_argument("--resume", metavar="auto|PATH", help="auto: newest valid checkpoint in --out (or start "
                   "fresh); PATH: a checkpoint file or a run folder")
    g.add_argument("--ckpt-every", type=int, help=f"iterations between checkpoints (default {CKPT_EVERY})")
    g.add_argument("--eval-every", type=int, help="iterations between evaluations (default 4000, imagenet: an epoch)")
    g.add_argument("--log-every", type=int, help=f"iterations between metrics records (default {LOG_EVERY})")
    g.add_argument("--eval-only", metavar="PATH", help="evaluate a checkpoint or final.pt and exit")


# --------------------------------------------------------------------------------- command line
def parse_options(argv, description=None):
    """The options given on the command line (name -> value, only those given), every number checked."""
    args = build_parser(description=description).parse_args(argv)
    opts = {k: v for k, v in vars(args).items() if v is not None}
    check_numbers(opts)
    return opts


# Every number the command line takes: what a valid value is, its test (on a finite value), and how to fix a
# bad one. A checkpoint's options passed this check when its run began.
NUMBER_RULES = {
    "lr": ("a finite number > 0", lambda v: v > 0,
           "give the peak lr (e.g. --lr 0.1), or leave --lr out for the recipe's, scaled to the batch"),
    "wd": ("a finite number >= 0", lambda v: v >= 0, f"leave --wd out for the paper's {WEIGHT_DECAY:g}, or give 0"),
    "momentum": ("a finite number in [0, 1)", lambda v: 0 <= v < 1,
                 f"leave --momentum out for the paper's {MOMENTUM:g}"),
    "label_smoothing": ("a number in [0, 1)", lambda v: 0 <= v < 1, "e.g. --label-smoothing 0.1, or 0 for none"),
    "batch_size": ("a whole number > 0", lambda v: v > 0, "give the global batch, e.g. --batch-size 128"),
    "iters": ("a whole number > 0", lambda v: v > 0, "give the run's length in iterations, or use --epochs"),
    "epochs": ("a finite number > 0", lambda v: v > 0, "give the run's length in epochs, or use --iters"),
    "warmup_iters": ("a whole number >= 0", lambda v: v >= 0, "give 0 for no warm-up"),
    "ckpt_every": ("a whole number > 0", lambda v: v > 0, "give an interval in iterations"),
    "eval_every": ("a whole number > 0", lambda v: v > 0, "give an interval in iterations"),
    "log_every": ("a whole number > 0", lambda v: v > 0, "give an interval in iterations"),
    "workers": ("a whole number >= 0", lambda v: v >= 0, "give 0 to load in the training process"),
    "seed": ("a whole number in [0, 2**32)", lambda v: 0 <= v < 2 ** 32, "e.g. --seed 0"),
    "train_size": ("a whole number > 0", lambda v: v > 0, "give a number of images, or leave it out for all"),
    "val_size": ("a whole number > 0", lambda v: v > 0, "give a number of images, or leave it out for all"),
    "gpus": ("a whole number >= 1", lambda v: v >= 1, "give the number of local GPUs, one worker each"),
    "max_restarts": ("a whole number >= 0", lambda v: v >= 0, "give how many times to restart failed workers"),
    "dist_timeout": ("a finite number of seconds > 0", lambda v: v > 0,
                     f"leave --dist-timeout out for {DEFAULT_TIMEOUT_S:g} seconds"),
}


def check_numbers(opts):
    """UsageError, one line naming the option, the value and the fix, for the first number out of range."""
    for name, (valid, test, fix) in NUMBER_RULES.items():
        value = opts.get(name)
        if value is not None and not (math.isfinite(value) and test(value)):
            shown = f"{value:g}" if isinstance(value, float) else str(value)
            raise UsageError(f"--{name.replace('_', '-')} {shown}: must be {valid}; {fix}")


# ------------------------------------------------------------------------------------ resolution
def resolve_config(opts, world_size):
    """Fill in every option the user left out (dict of explicit options -> Namespace) from the recipe and
    the device; raises UsageError for every inconsistent combination and for an unknown --arch. The numbers
    themselves were checked by parse_options."""
    dataset = opts["dataset"]
    if dataset not in DATASETS:
        raise UsageError(f"unknown data set {dataset!r}; choose one of {', '.join(DATASETS)}")
    c = argparse.Namespace(**opts)
    for name in vars(build_parser().parse_args([dataset])):
        if not hasattr(c, name):
            setattr(c, name, None)
    c.recipe = "imagenet" if dataset == "imagenet" else "cifar"
    c.world_size = world_size
    _resolve_device(c)
    _resolve_recipe(c, RECIPES[c.recipe])
    _resolve_precision(c)
    _resolve_run_lengths(c)
    _check_arch(c)
    _read_tuning(c)
    return c


def _read_tuning(c):
    """--tuning FILE: read and checked now, so that a bad file stops the run before anything starts."""
    if c.tuning:
        from ..kernels import tuning
        try:
            tuning.read(c.tuning)
        except ValueError as exc:
            raise UsageError(f"--tuning: {exc}") from exc


def _resolve_device(c):
    cuda = torch.cuda.is_available()
    c.arch = c.arch or RECIPES[c.recipe]["arch"]
    c.unit = c.unit or "preact"
    c.device = c.device or ("cuda" if cuda else "cpu")
    if c.device == "cuda" and not cuda:
        raise UsageError("--device cuda: no CUDA GPU is visible (torch.cuda.is_available() is False); "
                         "use --device cpu")
    if c.gpus is not None:
        if c.device != "cuda":
            raise UsageError("--gpus needs CUDA GPUs and none is in use; drop --gpus (for CPU workers use "
                             "torchrun --nproc-per-node N ... --device cpu)")
        if c.gpus > torch.cuda.device_count():
            raise UsageError(f"--gpus {c.gpus}: only {torch.cuda.device_count()} CUDA GPU(s) visible")
    if c.max_restarts is not None and c.gpus is None:
        raise UsageError("--max-restarts restarts the workers of --gpus N; under torchrun give torchrun "
                         "--max-restarts K")


def _resolve_recipe(c, recipe):
    world_size = c.world_size
    c.batch_size = recipe["batch_size"] if c.batch_size is None else c.batch_size
    if c.batch_size % world_size:
        raise UsageError(f"--batch-size {c.batch_size} is not divisible by the world size {world_size} (the "
                         f"batch is global: each worker takes batch/{world_size}); pick a multiple of {world_size}")
    c.lr = c.lr if c.lr is not None else recipe["lr"] * c.batch_size / recipe["batch_size"]
    c.momentum = MOMENTUM if c.momentum is None else c.momentum
    c.wd = WEIGHT_DECAY if c.wd is None else c.wd
    c.label_smoothing = c.label_smoothing or 0.0
    c.schedule = c.schedule or "step"
    c.seed = c.seed or 0
    for flag in ("compile", "download", "synthetic", "nesterov", "no_bn_wd", "sync_bn",
                 "allow_new_world_size"):
        setattr(c, flag, bool(getattr(c, flag)))
    if c.nesterov and c.momentum == 0:
        raise UsageError("--nesterov needs a momentum > 0, and --momentum is 0; drop --nesterov or raise --momentum")
    c.channels_last = True if c.channels_last is None else c.channels_last


def _resolve_precision(c):
    """Kernels and autocast dtype for the device, and the options that only some devices allow."""
    c.kernels = c.kernels or ("fused" if c.device == "cuda" else "stock")
    if c.amp is None:
        c.amp = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if c.device == "cuda" else "off"
    if c.amp == "fp16" and c.device != "cuda":
        raise UsageError("--amp fp16 needs a CUDA GPU; on a CPU use --amp bf16 or --amp off")
    if c.cuda_graphs is None:
        # With the host's cost per launch measured on a CPU, the cost model predicts every eager step on
        # one GPU host-bound, ResNet-200's at batch 64 included (hundreds of launches a step): the graph
        # removes the host's part. Under DDP it is asked for with --cuda-graphs (the all-reduce is then
        # captured too, and no multi-GPU test covers that yet).
        c.cuda_graphs = (c.device == "cuda" and c.world_size == 1 and not c.compile)
    if c.cuda_graphs and c.device != "cuda":
        raise UsageError("--cuda-graphs needs a CUDA GPU; drop it on a CPU")
    if c.sync_bn and c.device != "cuda":
        raise UsageError("--sync-bn needs CUDA GPUs (torch's SyncBatchNorm runs on GPUs only); drop it on a CPU")
    if c.sync_bn and c.kernels == "fused":
        raise UsageError("--sync-bn needs --kernels stock (the fused kernels compute per-rank statistics)")


def _resolve_run_lengths(c):
    """Intervals and loader settings; the length itself is planned once the data is loaded (plan_run)."""
    if c.iters is not None and c.epochs is not None:
        raise UsageError("give --iters or --epochs, not both")
    c.ckpt_every = c.ckpt_every or CKPT_EVERY
    c.log_every = c.log_every or LOG_EVERY
    c.workers = 4 if c.workers is None else c.workers
    c.loader, c.aug, c.val_crop = c.loader or "auto", c.aug or "inception", c.val_crop or 224


def _check_arch(c):
    try:  # an unknown arch fails here, before any data is loaded (meta tensors: no memory, no init cost)
        from ..models import create_model
        with torch.device("meta"):
            create_model(c.arch, 10, unit=c.unit)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None


def default_out(cfg):
    return str(Path("runs") / f"{cfg.dataset}-{cfg.arch}-{time.strftime('%Y%m%d-%H%M%S')}")


# ------------------------------------------------------------------------------------- lr schedule
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


@dataclass(frozen=True)
class RunPlan:
    """What the training data's length fixes (plan_run): the schedule in iterations and the evaluation
    interval. Kept apart from the config, which holds the options only."""
    iters_per_epoch: int
    total_iters: int
    warmup_iters: int
    milestones: tuple
    eval_every: int

    def lr_schedule(self, cfg):
        """The keyword arguments of lr_at for this plan and the config's lr and schedule."""
        return dict(lr=cfg.lr, total_iters=self.total_iters, warmup_iters=self.warmup_iters,
                    milestones=self.milestones, schedule=cfg.schedule)


def plan_run(cfg, iters_per_epoch):
    """The RunPlan of cfg once the training loader's length (iterations per epoch) is known."""
    total, warmup, milestones = plan_schedule(cfg.recipe, cfg.batch_size, iters_per_epoch, cfg.iters, cfg.epochs,
                                              cfg.warmup_iters)
    eval_every = cfg.eval_every
    if eval_every is None:  # ImageNet: after every epoch; CIFAR: every 4000 iterations
        eval_every = iters_per_epoch if cfg.recipe == "imagenet" else RECIPES["cifar"]["eval_every"]
    return RunPlan(iters_per_epoch, total, warmup, tuple(milestones), eval_every)
