"""The training step, built once per run by make_train_step: eager, through torch.compile (--compile), or
replayed whole from one CUDA graph (--cuda-graphs).

A step takes one batch (images, labels) and returns its loss, detached and on the device (reading it
would cost a host sync). It runs forward and backward under the run's autocast, then the optimizer step
through the loss scaler (which skips a step whose gradients are not finite), the scaler update and the lr
schedule.

--cuda-graphs captures all of that but the lr schedule in one graph: forward, backward, the scaler's
finite check, fused SGD and the scale update. What makes it capturable:
- the lr is a device tensor shared by the param groups (bind_lr_tensor); the schedule (LambdaLR) fills
  it in place after each replay, so the graph reads the new lr and is never recaptured;
- fused SGD takes that tensor, and the scaler's scale and found-inf flag, inside its kernel: no host
  read (torch's foreach SGD reads a tensor lr on the host, and SGD has no capturable flag);
- the scaler hands its scale and found-inf tensors to the fused step instead of checking them on the host,
  and updates its scale in place (fp16: backoff/growth on the device; bf16/fp32: held at 1), so a
  non-finite step is skipped inside the graph, the scaler's state stays in its own tensors and the
  checkpoint reads it as in an eager run;
- each batch is copied into static input tensors (StaticBatch), so the batch shape is fixed.
Under DDP the graph holds the gradients' all-reduce too (NCCL collectives can be captured), following
torch's rules for whole-network capture: the DDP wrapper is built on the stream that later warms up and
captures the step (worker.build_run), and at least 11 DDP steps run eagerly before the capture (DDP
rebuilds its buckets after its first steps). Every rank captures at the same step and replays together:
a replay is a collective. torch's NCCL watchdog queues no captured work, so asynchronous error handling
stays on.
The eager step and the captured one call the same function (whole_step); GraphedStep(run, model,
capture=False) runs it on the same static buffers without a graph, which is how the CPU tests check it.
"""
import contextlib

import torch

GRAPH_WARMUP_STEPS = 3  # eager steps before capturing the CUDA graph (lazy init, autotuning, cudnn)
DDP_GRAPH_WARMUP_STEPS = 11  # under DDP: torch's minimum of eager DDP steps before a whole-network capture


def graph_warmup_steps(world_size):
    """Eager steps before the capture: DDP_GRAPH_WARMUP_STEPS under DDP, GRAPH_WARMUP_STEPS on one GPU."""
    return DDP_GRAPH_WARMUP_STEPS if world_size > 1 else GRAPH_WARMUP_STEPS


def make_train_step(run):
    """The training step of `run` (a worker.RunState): images, labels -> loss. With --cuda-graphs it is a
    GraphedStep, whose batch_size is the only batch size it takes."""
    cfg = run.cfg
    # The step does not care which kernels the model runs: with --kernels fused on a GPU, torch.compile
    # decomposes the fused operators into their Triton launches (functional/library.py), which inductor's
    # generated code then calls like its own kernels.
    model = torch.compile(run.train_model) if cfg.compile else run.train_model
    if cfg.cuda_graphs:
        scaling = "dynamic fp16 loss scale" if cfg.amp == "fp16" else "finite check"
        why = "" if "cuda_graphs" in run.opts else (" (the default on one GPU, whose eager step the host "
                                                     "bounds; --no-cuda-graphs runs it eagerly)")
        reduce = ", the gradients' all-reduce" if run.distributed else ""
        short = ("a short one (undecodable images dropped) is padded with its own images, so that every rank "
                 "replays" if run.distributed else "a short one is skipped")
        run.say(f"CUDA graph{why}: after {graph_warmup_steps(run.world_size)} eager steps one graph replays "
                f"the whole step (forward, backward{reduce}, {scaling}, fused SGD with the lr in a device "
                f"tensor); training batches hold {cfg.batch_size // run.world_size} images a worker, {short}")
        return GraphedStep(run, model)
    step = whole_step(run, model)

    def train_step(images, labels):
        loss = step(images, labels)
        run.optimizer.zero_grad(set_to_none=True)
        run.scheduler.step()
        return loss

    return train_step


def held_scale(cfg):
    """The scale the loss scaler is held at, or None for a dynamic one. fp16 needs loss scaling; bf16 and
    fp32 hold the scaler at scale 1, where it only skips the steps whose gradients are not finite, as under
    fp16, without a host sync on CUDA."""
    return None if cfg.amp == "fp16" else 1.0


def make_scaler(cfg, device):
    """The run's loss scaler: torch's dynamic scale from 2**16 (fp16), or one held at held_scale(cfg)."""
    held = held_scale(cfg)
    return torch.amp.GradScaler(device.type, init_scale=2.0 ** 16 if held is None else held)


def whole_step(run, model):
    """forward, backward, the scaler's step of the optimizer and its update, as one function of the batch:
    what the CUDA graph captures. It neither clears the gradients nor steps the lr schedule."""
    fixed_scale = held_scale(run.cfg)

    def step(images, labels):
        with run.autocast():
            loss = run.criterion(model(images), labels)
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)  # skipped when the gradients are not finite (fused SGD: in its kernel)
        run.scaler.update(fixed_scale)
        return loss.detach()

    return step


def bind_lr_tensor(optimizer, device):
    """Give every param group the same 0-d lr tensor on `device`, holding the groups' current lr, and
    return it. LambdaLR fills a tensor lr in place, and fused SGD reads it in its kernel. The dtype is the
    one that kernel reads: float32 on CUDA; float64 on a CPU, where the kernel takes the value as a
    double, so the step is bit-identical to one with the float lr."""
    lrs = {float(g["lr"]) for g in optimizer.param_groups}
    if len(lrs) != 1:
        raise ValueError(f"the param groups have different lrs {sorted(lrs)}; one lr tensor cannot drive them")
    if not all(g.get("fused") for g in optimizer.param_groups):
        raise ValueError("the captured step needs fused SGD (fused=True): foreach SGD reads a tensor lr "
                         "on the host, which a CUDA graph cannot capture")
    device = torch.device(device)
    dtype = torch.float32 if device.type == "cuda" else torch.float64
    lr = torch.tensor(lrs.pop(), dtype=dtype, device=device)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


@contextlib.contextmanager
def stream_context(stream):
    """Run the block on `stream` (a CUDA side stream, ordered after the current stream's work and before
    what follows it), or as it is when `stream` is None."""
    if stream is None:
        yield
        return
    current = torch.cuda.current_stream(stream.device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        yield
    current.wait_stream(stream)


class StaticBatch:
    """The captured step's input tensors: each batch is copied into them (copy_), so a replay reads it.
    Allocated from the first batch; a batch of another shape does not fit (fits() says so)."""

    def __init__(self):
        self.images = self.labels = None

    def fits(self, images, labels):
        return self.images is None or (images.shape == self.images.shape and labels.shape == self.labels.shape)

    def fill(self, images, labels):
        if self.images is None:
            self.images, self.labels = torch.empty_like(images), torch.empty_like(labels)
        if not self.fits(images, labels):
            raise ValueError(f"a batch of shape {tuple(images.shape)} does not fit the static input "
                             f"{tuple(self.images.shape)} of the captured step")
        self.images.copy_(images)
        self.labels.copy_(labels)
        return self.images, self.labels


class GraphedStep:
    """The whole training step (whole_step) run eagerly for graph_warmup_steps() steps, then captured once
    in a CUDA graph and replayed on the static copy of each batch; the lr schedule steps after each.
    The capture allocates the gradients and every replay writes into them: they are never freed after it.
    capture=False runs the same step function on the same static buffers eagerly, every step (the way
    to check it without a GPU)."""

    def __init__(self, run, model, capture=True):
        self.run, self.capture = run, capture
        self.step_fn = whole_step(run, model)
        self.lr = bind_lr_tensor(run.optimizer, run.device)
        self.batch_size = run.cfg.batch_size // run.world_size
        self.warmup_steps = graph_warmup_steps(run.world_size)
        self.batch = StaticBatch()
        self.eager_steps, self.graph, self.static_loss = 0, None, None
        # One side stream warms up and captures (and, under DDP, built the wrapper: run.graph_stream).
        self.stream = (run.graph_stream or torch.cuda.Stream(run.device)) if capture else None

    @property
    def captured(self):
        return self.graph is not None

    def fits(self, images, labels):
        """Whether the batch has the captured step's shape (batch_size images of the first batch's size)."""
        return images.shape[0] == self.batch_size and self.batch.fits(images, labels)

    def __call__(self, images, labels):
        images, labels = self.batch.fill(images, labels)
        if not self.capture or self.eager_steps < self.warmup_steps:
            self.eager_steps += 1
            loss = self._eager(images, labels)
            self.run.optimizer.zero_grad(set_to_none=True)
        else:
            if self.graph is None:
                self._capture(images, labels)
            self.graph.replay()  # the capture only recorded: this replay is the step of this batch
            loss = self.static_loss
        self.run.scheduler.step()  # fills self.lr in place for the next step
        return loss

    def _eager(self, images, labels):
        # The warm-up before a capture runs on a side stream, as torch.cuda.graphs asks (none: capture=False).
        with stream_context(self.stream):
            return self.step_fn(images, labels)

    def _capture(self, images, labels):
        self.run.optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=self.stream):
            self.static_loss = self.step_fn(images, labels)
