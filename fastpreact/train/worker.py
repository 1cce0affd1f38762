"""One worker's training run: set-up, the loop, checkpoints, evaluation and the end.

train_worker reads as the run does: decide what the run is (prepare.py: the run folder, the checkpoint it
resumes from, the options resolved once), set up the device those options choose, build the run (data,
model, optimizer), restore the checkpoint, open the run files, loop, finish. The steps share one RunState;
the loop is flat, and every periodic action (log, evaluate, checkpoint) is one named function of the state.
"""
import contextlib
import dataclasses
import platform
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from .checkpoint import (CHECKPOINT_FORMAT, atomic_torch_save, atomic_write_json, list_checkpoints,
                         remove_stale_tmp, rng_state, save_checkpoint, set_rng_state)
from .options import RunPlan, lr_at, plan_run
from .prepare import prepare_run
from .distributed import destroy_process_group, from_rank0, job_store, join_job, replica_mismatches
from ..kernels import tuning
from .evaluation import evaluate
from .metrics import RunLog
from .components import autocast_for, create_run_model, load_data, seed_everything, setup_worker
from .step import make_scaler, make_train_step, stream_context

MAX_NONFINITE = 20      # a loss non-finite this many steps in a row stops the run


@dataclass
class RunState:
    """Everything one worker's run holds. The bare `model` is what evaluation and checkpoints see;
    `train_model` is what the training step calls (the model, or its DDP wrapper)."""
    cfg: Any                  # the resolved config (options.resolve_config)
    plan: RunPlan             # what the data's length fixes: the schedule in iterations, eval_every
    opts: dict                # the options given explicitly: saved in checkpoints, taken over on resume
    device: torch.device
    rank: int
    world_size: int
    out: Path
    say: Callable[[str], None]
    data: Any                 # DataBundle: .train (resumable), .val (this rank's shard)
    model: nn.Module
    train_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    autocast: Callable
    step: int = 0             # optimizer steps taken
    log: Optional[RunLog] = None      # rank 0 only
    t_start: float = 0.0              # perf_counter when this process began training
    last_checkpoint: Optional[Path] = None  # the newest checkpoint this process wrote (None: skipped)
    last_checkpoint_step: int = -1
    graph_stream: Any = None          # --cuda-graphs on CUDA: the side stream that warms up and captures

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0

    def summary(self):
        """The resolved options and the plan: config.json and the checkpoints' "config"."""
        return {**vars(self.cfg), **dataclasses.asdict(self.plan)}


class ReplicasDiffer(RuntimeError):
    """The ranks' weights differ (replica_mismatches): a bug or a hardware fault, not the user's input."""


def train_worker(opts, rank, world_size, local_rank):
    """Train as worker `rank` of world_size; returns the exit code (0 done, 1 the loss was not finite or
    the ranks' weights differ, 128+N stopped by signal N)."""
    say = announcer(rank == 0)
    share = None
    if world_size > 1:  # the store first: rank 0's resume decision comes through it, before any device
        join_job(opts.get("dist_timeout"))
        share = from_rank0
    spec, ckpt = prepare_run(opts, world_size, say, share)
    device = setup_worker(spec.cfg, local_rank, world_size)  # the device of the merged options
    run = build_run(spec.opts, spec.cfg, device, rank, world_size, spec.out, say)
    if ckpt is not None:
        restore(run, ckpt)
        del ckpt  # the run holds its own copy of every tensor now
    pin_tuning(spec.cfg)
    open_run_files(run, spec.ckpt_path)
    try:
        stop_reason, signum = train_loop(run)
        exit_code = finish(run, stop_reason, signum)
    except ReplicasDiffer as e:  # every rank raises it at the same point
        run.say(f"fastpreact.train: stopped: {e}")
        exit_code = 1
    if run.distributed:
        destroy_process_group(barrier=True)
    return exit_code


def announcer(is_main):
    """say(msg): a line on stderr from rank 0, printed above the progress bar."""
    def say(msg):
        if is_main:
            from tqdm import tqdm
            tqdm.write(msg, file=sys.stderr)
    return say


# ------------------------------------------------------------------------------------------- setup
def build_run(opts, cfg, device, rank, world_size, out, say):
    """The run at step 0: data (which fixes the schedule's length), model, optimizer, lr schedule, scaler."""
    data = load_data(cfg, device, rank, world_size)
    plan = plan_run(cfg, len(data.train))
    seed_everything(cfg.seed)
    model = create_run_model(cfg, data.num_classes, device)
    if cfg.sync_bn and world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    train_model, graph_stream = model, None
    if cfg.cuda_graphs and device.type == "cuda":
        graph_stream = torch.cuda.Stream(device)  # warms up and captures the step (step.GraphedStep)
    if world_size > 1:
        # A captured DDP step needs its wrapper built on the capturing stream (torch's rule for capturing
        # the all-reduce: the reducer keeps the gradient accumulators it finds here).
        with stream_context(graph_stream):
            train_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(model, cfg, device)
    schedule = plan.lr_schedule(cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, **schedule) / cfg.lr)
    return RunState(cfg=cfg, plan=plan, opts=opts, device=device, rank=rank, world_size=world_size, out=out,
                    say=say, data=data, model=model, train_model=train_model, optimizer=optimizer,
                    scheduler=scheduler, scaler=make_scaler(cfg, device),
                    criterion=nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing),
                    autocast=autocast_for(cfg, device), graph_stream=graph_stream)


def build_optimizer(model, cfg, device):
    """The paper's SGD; --no-bn-wd exempts BN's gamma/beta and the biases (the 1-d parameters)."""
    if cfg.no_bn_wd:
        params = [{"params": [p for p in model.parameters() if p.ndim > 1]},
                  {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0}]
    else:
        params = model.parameters()
    # fused=True: one multi-tensor kernel, and it takes the scaler's found_inf and a tensor lr on the
    # device (no sync), which the captured step (--cuda-graphs) needs.
    impl = {"fused": True} if device.type == "cuda" or cfg.cuda_graphs else {"foreach": True}
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.wd,
                           nesterov=cfg.nesterov, **impl)


def restore(run, ckpt):
    """Continue exactly where the checkpoint stopped: weights, optimizer, scaler, schedule, loader, RNGs."""
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scaler.load_state_dict(ckpt["scaler"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    run.data.train.load_state_dict(ckpt["loader"])
    set_rng_state(ckpt["rng"])
    run.step = ckpt["step"]
    if ckpt.get("tuning"):  # the kernels' tile choices: the resumed run launches the same tiles
        tuning.pin(ckpt["tuning"])


def pin_tuning(cfg):
    """--tuning FILE (read and checked by resolve_config): another run's tile choices, over a checkpoint's."""
    if cfg.tuning:
        tuning.load(cfg.tuning)


def coordinated_tuning(run):
    """Around a training step of several ranks: a shape's first launch is tuned by rank 0, and every
    rank takes its choice (kernels/tuning.py), so all ranks launch the same tiles."""
    store, timeout = job_store()
    if not run.distributed or store is None:
        return contextlib.nullcontext()
    return tuning.coordinate(store, run.rank, timeout)


def open_run_files(run, ckpt_path):
    """Rank 0: the checkpoints/ folder, metrics.jsonl (cut back to the resumed step) and config.json."""
    if not run.is_main:
        return
    cfg, out = run.cfg, run.out
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(out / "checkpoints")
    run.log = RunLog(out, resume_step=run.step if ckpt_path is not None else None)
    atomic_write_json(out / "config.json", {**run.summary(), "out": str(out), "resumed_from": ckpt_path,
                                            "command": sys.argv, **environment(run.device, run.world_size)})
    plan = run.plan
    run.say(f"{cfg.arch} ({cfg.unit}, {cfg.kernels} kernels, amp {cfg.amp}) on {cfg.dataset}: {plan.total_iters} "
            f"iterations at batch {cfg.batch_size} ({run.world_size} worker(s)), lr {cfg.lr:g} "
            + (f"/10 at {plan.milestones}" if cfg.schedule == "step" else "cosine")
            + f", warm-up {plan.warmup_iters}; run files in {out}")


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
    from .. import __version__
    return __version__


# -------------------------------------------------------------------------------------------- loop
def train_loop(run):
    """Train until plan.total_iters, a stop signal or MAX_NONFINITE non-finite losses in a row; returns
    (stop reason: None, "signal" or "nonfinite"; the signal's number)."""
    cfg, plan = run.cfg, run.plan
    train_step = make_train_step(run)
    run.last_checkpoint_step = run.step
    run.model.train()
    stop_reason = None
    with StopSignals() as stop, Progress(run) as progress:
        while run.step < plan.total_iters and stop_reason is None:
            for images, labels in run.data.train:
                batch = batch_for_captured_step(run, train_step, images, labels)
                if batch is None:
                    continue
                images, labels = batch
                with coordinated_tuning(run):
                    loss = train_step(images, labels)
                run.step += 1
                progress.update(loss)
                if run.step % cfg.log_every == 0 or run.step == plan.total_iters:
                    worst_streak, signum = progress.log(stop.signum)  # the same on every rank
                    if worst_streak >= MAX_NONFINITE:
                        stop_reason = "nonfinite"
                    elif signum:
                        stop.signum, stop_reason = signum, "signal"
                elif stop.signum and not run.distributed:
                    stop_reason = "signal"
                if stop_reason == "nonfinite":
                    break
                eval_due = run.step % plan.eval_every == 0
                checkpoint_due = run.step % cfg.ckpt_every == 0 or run.step % plan.iters_per_epoch == 0
                if eval_due and run.step < plan.total_iters:
                    run_evaluation(run)
                if checkpoint_due or stop_reason == "signal":
                    write_checkpoint(run)
                if eval_due or checkpoint_due:
                    progress.restart_clock()  # throughput counts training time only
                if run.step >= plan.total_iters or stop_reason is not None:
                    break
    return stop_reason, stop.signum


def batch_for_captured_step(run, train_step, images, labels):
    """The batch the step takes, or None to skip it. --cuda-graphs replays a step captured for one batch
    shape, and the ImageNet loader drops an undecodable file from its batch. On one GPU such a short batch
    is skipped, with one line saying so: the loader moves past it and the step count does not, so the run
    still takes plan.total_iters steps. Under DDP every rank must replay together (a replay holds the
    all-reduce): a short batch is filled up with its own first images instead, with one line."""
    fits = getattr(train_step, "fits", None)
    if fits is None or fits(images, labels):
        return images, labels
    have, want = images.shape[0], train_step.batch_size
    if run.distributed:  # a skip on one rank would leave the others waiting in the replay's all-reduce
        padded = pad_batch(images, labels, want) if 0 < have < want else None
        if padded is None or not fits(*padded):
            raise RuntimeError(f"step {run.step}: rank {run.rank}: a training batch of shape {tuple(images.shape)} "
                               f"does not fit the captured step ({want} images); rerun with --no-cuda-graphs")
        run.say(f"warning: step {run.step}: rank {run.rank}: a training batch of {have} images padded to {want} "
                f"by repeating its first images: under DDP the CUDA graph (--cuda-graphs) replays on every rank "
                f"together (the loader dropped undecodable images from this one)")
        return padded
    run.say(f"warning: step {run.step}: skipped a training batch of {have} images: the CUDA graph "
            f"(--cuda-graphs) replays a step captured for batches of exactly {want} (the "
            f"loader dropped undecodable images from this one)")
    return None


def pad_batch(images, labels, size):
    """images, labels grown to `size` samples by repeating the batch's own samples from its first."""
    index = torch.arange(size, device=images.device) % images.shape[0]
    return images.index_select(0, index), labels.index_select(0, index)


class StopSignals:
    """SIGINT and SIGTERM during the loop: the first one lets the run finish its step, write a
    checkpoint and exit; a second Ctrl-C stops at once."""

    def __init__(self):
        self.signum = 0  # the signal received (0: none)
        self.previous = {}

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _on_signal(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum


class Progress:
    """The progress bar and metrics.jsonl's train records. The loss bookkeeping stays on the device, so a
    step costs no host sync; log() syncs once, over all ranks."""

    def __init__(self, run):
        from tqdm import tqdm
        self.run = run
        self.bar = tqdm(total=run.plan.total_iters, initial=run.step, disable=not run.is_main,
                        dynamic_ncols=True, unit="it", mininterval=0.5, file=sys.stderr)
        zero = dict(device=run.device, dtype=torch.int64)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)  # since the last log step
        self.finite_steps, self.streak, self.max_streak = (torch.zeros((), **zero) for _ in range(3))
        run.t_start = self.t_last = time.perf_counter()
        self.last_step = run.step

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()

    def update(self, loss):
        self.bar.update(1)
        finite = torch.isfinite(loss)
        self.loss_sum += torch.where(finite, loss.double(), 0.0)
        self.finite_steps += finite
        self.streak.copy_((self.streak + 1) * (~finite))
        torch.maximum(self.max_streak, self.streak, out=self.max_streak)

    def log(self, signum):
        """Write a train record (rank 0); returns (the longest non-finite streak since the last log,
        the signal any rank received), both the same on every rank."""
        run = self.run
        stats = torch.stack([self.loss_sum, self.finite_steps.double()])
        flags = torch.stack([self.max_streak, torch.tensor(signum, device=run.device)])
        if run.distributed:
            dist.all_reduce(stats)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        (loss_total, n_finite), (worst_streak, signum) = stats.tolist(), flags.tolist()
        now = time.perf_counter()
        img_per_s = (run.step - self.last_step) * run.cfg.batch_size / max(now - self.t_last, 1e-9)
        lr_now = float(run.optimizer.param_groups[0]["lr"])  # a device tensor under --cuda-graphs
        epoch = round(run.step / run.plan.iters_per_epoch, 4)
        if run.is_main:
            mean_loss = loss_total / n_finite if n_finite else None
            run.log.write({"kind": "train", "step": run.step, "epoch": epoch,
                           "loss": mean_loss, "lr": lr_now, "img_per_s": round(img_per_s, 1),
                           "time": round(run.log.elapsed_before + now - run.t_start, 3)})
            self.bar.set_postfix(loss="nan" if mean_loss is None else f"{mean_loss:.4f}", lr=f"{lr_now:.4g}",
                                 img_s=f"{img_per_s:.0f}", refresh=False)
        self.loss_sum.zero_()
        self.finite_steps.zero_()
        self.max_streak.copy_(self.streak)
        self.last_step, self.t_last = run.step, now
        return worst_streak, signum

    def restart_clock(self):
        self.t_last = time.perf_counter()


# ------------------------------------------------------------------- checkpoints, evaluation, end
def write_checkpoint(run):
    """Write ckpt-<step>.pt (rank 0) unless the state is not finite (then the last good one stays)."""
    run.last_checkpoint, run.last_checkpoint_step = None, run.step
    average_bn_buffers(run.model, run.distributed)
    check_replicas(run, f"ckpt-{run.step}.pt")  # first: ranks that differ may differ in finiteness too
    if not state_is_finite(run.model):
        run.say(f"warning: step {run.step}: model state is not finite; checkpoint skipped")
        return
    if not run.is_main:
        return
    state = {"format": CHECKPOINT_FORMAT, "step": run.step, "epoch": run.data.train.epoch,
             "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
             "scaler": run.scaler.state_dict(), "scheduler": run.scheduler.state_dict(),
             "loader": run.data.train.state_dict(), "rng": rng_state(), "tuning": tuning.table(),
             "options": dict(run.opts), "config": run.summary()}
    run.last_checkpoint = save_checkpoint(state, run.out / "checkpoints", run.step)
    tuning.save(run.out / "tuning.json")


def run_evaluation(run):
    """Evaluate the model on the validation set; rank 0 logs the result and redraws curves.png."""
    t = time.perf_counter()
    average_bn_buffers(run.model, run.distributed)
    result = evaluate(run.model, run.data.val, run.data.num_classes, run.autocast, run.distributed, run.device)
    if run.is_main:
        step, plan = run.step, run.plan
        run.log.write({"kind": "eval", "step": step, "epoch": round(step / plan.iters_per_epoch, 4), **result,
                       "time": round(run.log.elapsed_before + time.perf_counter() - run.t_start, 3)})
        run.log.plot()
        run.say(f"step {step}/{plan.total_iters} (epoch {step / plan.iters_per_epoch:.2f}): top-1 error "
                f"{result['top1_err']:.2f}%, top-{min(5, run.data.num_classes)} error {result['top5_err']:.2f}%"
                f" on {result['images']} images ({time.perf_counter() - t:.1f}s)")


def finish(run, stop_reason, signum):
    """The end of the run: the final evaluation, checkpoint and final.pt, or the reason it stopped early;
    returns the exit code."""
    if stop_reason == "nonfinite":
        last = list_checkpoints(run.out / "checkpoints") if run.is_main else []
        where = f"the last good checkpoint is {last[0][1]}" if last else "no checkpoint was written"
        fix = "Lower --lr" + (", or use --amp bf16 or off." if run.cfg.amp == "fp16" else ".")
        run.say(f"fastpreact.train: stopped: the loss was not finite for {MAX_NONFINITE} steps in a row (by step "
                f"{run.step}); {where}. {fix}")
        return 1
    if stop_reason == "signal":
        where = (f"checkpoint {run.last_checkpoint}" if run.last_checkpoint
                 else "no checkpoint written (the state was not finite)")
        workers = f" on {run.world_size} workers" if run.distributed else ""
        run.say(f"stopped by {signal.Signals(signum).name} at step {run.step}; {where}; "
                f"continue with --out {run.out} --resume auto{workers}")
        return 128 + signum
    run_evaluation(run)
    if run.last_checkpoint_step != run.step:
        write_checkpoint(run)
    average_bn_buffers(run.model, run.distributed)
    checked = check_replicas(run, "final.pt")
    if run.is_main:
        atomic_torch_save(run.model.state_dict(), run.out / "final.pt")
        tuning.save(run.out / "tuning.json")
        agree = (f"the {run.world_size} workers' weights are identical (checksums of {checked} tensors); "
                 if run.distributed else "")
        run.say(f"done: {run.step} iterations; {agree}final weights {run.out / 'final.pt'}")
    return 0


def check_replicas(run, what):
    """Every rank must hold the same weights and buffers (DDP keeps them so, and average_bn_buffers just
    made the BN statistics agree); another state on any rank is a bug or a hardware fault, and saving one
    rank's copy would hide it. Raises ReplicasDiffer, naming `what` is not written; returns the number of
    tensors compared. One pass over the weights and one small all_gather: cheap next to a checkpoint."""
    if not run.distributed:
        return 0
    state = run.model.state_dict()
    mismatches = replica_mismatches(state)
    if not mismatches:
        return len(state)
    ranks = sorted({r for _, rs in mismatches for r in rs})
    names = [n for n, _ in mismatches]
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    last = list_checkpoints(run.out / "checkpoints") if run.is_main else []
    raise ReplicasDiffer(
        f"the workers' weights differ at step {run.step}: rank(s) {', '.join(map(str, ranks))} differ from rank 0 "
        f"in {len(names)} of {len(state)} tensors ({shown}), which is a bug or a hardware fault; {what} not "
        f"written; " + (f"the last checkpoint is {last[0][1]}" if last else "no checkpoint was written"))


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
