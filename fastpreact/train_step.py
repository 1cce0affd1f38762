"""The training step, built once per run by make_train_step: eager, through torch.compile (--compile), or
with forward and backward replayed from one CUDA graph (--cuda-graphs).

A step takes one batch (images, labels) and returns its loss, detached and on the device (reading it
would cost a host sync). It runs forward and backward under the run's autocast, then the optimizer step
through the loss scaler (which skips a step whose gradients are not finite), the scaler update and the lr
schedule.
"""
import torch

GRAPH_WARMUP_STEPS = 3  # eager steps before capturing the CUDA graph (lazy init, autotuning, cudnn)


def make_train_step(run):
    """The training step of `run` (a trainer.RunState): images, labels -> loss."""
    cfg = run.cfg
    model = torch.compile(run.train_model) if cfg.compile else run.train_model
    # bf16 and fp32 hold the scaler at scale 1: it then only skips non-finite steps (see build_run).
    fixed_scale = None if cfg.amp == "fp16" else 1.0

    def forward_backward(images, labels):
        with run.autocast():
            loss = run.criterion(model(images), labels)
        run.scaler.scale(loss).backward()
        return loss.detach()

    graphed = GraphedForwardBackward(forward_backward, run.optimizer) if cfg.cuda_graphs else None

    def train_step(images, labels):
        loss = (graphed or forward_backward)(images, labels)
        run.scaler.step(run.optimizer)  # skipped when the gradients are not finite
        run.scaler.update(fixed_scale)
        if graphed is None or not graphed.captured:  # replays overwrite the grads the capture allocated
            run.optimizer.zero_grad(set_to_none=True)
        run.scheduler.step()
        return loss

    return train_step


class GraphedForwardBackward:
    """forward_backward(images, labels) run eagerly for GRAPH_WARMUP_STEPS steps, then captured once in a
    CUDA graph and replayed on static copies of each batch. The capture allocates the gradients, and every
    replay writes into them: they must never be freed (zero_grad(set_to_none=True)) after the capture."""

    def __init__(self, forward_backward, optimizer):
        self.forward_backward, self.optimizer = forward_backward, optimizer
        self.eager_steps, self.graph = 0, None
        self.static_images = self.static_labels = self.static_loss = None

    @property
    def captured(self):
        return self.graph is not None

    def __call__(self, images, labels):
        if self.eager_steps < GRAPH_WARMUP_STEPS:
            self.eager_steps += 1
            return self._eager_on_side_stream(images, labels)
        if self.graph is None:
            self._capture(images, labels)
        self.static_images.copy_(images)
        self.static_labels.copy_(labels)
        self.graph.replay()
        return self.static_loss

    def _eager_on_side_stream(self, images, labels):
        # The warm-up before a capture runs on a side stream, as torch.cuda.graphs asks.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            loss = self.forward_backward(images, labels)
        torch.cuda.current_stream().wait_stream(side)
        return loss

    def _capture(self, images, labels):
        self.static_images, self.static_labels = images.clone(), labels.clone()
        self.optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_loss = self.forward_backward(self.static_images, self.static_labels)
