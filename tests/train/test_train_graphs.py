"""The whole-step CUDA graph (--cuda-graphs): what runs on a CPU without the graph (the step function with
the optimizer inside, the lr as a tensor driven by the schedule, the static input buffers, the skip of a
batch that does not fit, exact resume), and the capture itself on a GPU (marked gpu).

On the CPU, GraphedStep(run, model, capture=False) runs the very step function the graph captures, on the
same static buffers, and must match the eager step bit for bit: lr schedule, momentum, scaler and the
skip of a non-finite step included.
"""
import io
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from conftest import run_two_ranks
from fastpreact.train import worker
from fastpreact.train.options import lr_at, resolve_config
from fastpreact.train import step as train_step_module
from fastpreact.train.step import (DDP_GRAPH_WARMUP_STEPS, GRAPH_WARMUP_STEPS, GraphedStep, StaticBatch,
                                   bind_lr_tensor, graph_warmup_steps, make_train_step)

pytestmark = pytest.mark.usefixtures("one_thread")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))  # so that this file runs alone too
from test_data_imagenet import _make_tree  # noqa: E402

STEPS = 8  # with --iters 8 --warmup-iters 2: lr/10 for 2 steps, /10 at 4 and 6 (32k and 48k of 64k)


def build(graphs, device="cpu", **opts):
    """A run at step 0 (worker.build_run) of resnet8 on shapes10, with fused SGD, the optimizer of every
    CUDA run (a CPU run takes foreach SGD, whose arithmetic differs in the last bit); graphs: the config
    of a --cuda-graphs run, which the CPU option check would refuse."""
    opts = {"dataset": "shapes10", "device": device, "arch": "resnet8", "batch_size": 16, "train_size": 128,
            "val_size": 32, "iters": STEPS, "warmup_iters": 2, **opts}
    cfg = resolve_config(opts, 1)
    cfg.cuda_graphs = True  # build_optimizer: fused SGD
    run = worker.build_run(opts, cfg, torch.device(device), 0, 1, Path("unused"), say=lambda msg: None)
    cfg.cuda_graphs = graphs
    return run


def batches(run, n, nan_at=None):
    out = [(x.clone(), y.clone()) for (x, y), _ in zip(run.data.train, range(n))]
    if nan_at is not None:
        out[nan_at][0].fill_(float("nan"))  # a non-finite loss: the scaler must skip this step
    return out


def assert_same_state(a, b):
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{name}: {m}")
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(a.optimizer.state[p]["momentum_buffer"], b.optimizer.state[q]["momentum_buffer"])
    assert a.scaler.get_scale() == b.scaler.get_scale()


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_whole_step_run_eagerly_is_bit_identical_to_the_eager_step(amp):
    eager_run, graph_run = build(False, amp=amp), build(True, amp=amp)
    assert eager_run.optimizer.defaults["fused"] and not eager_run.cfg.cuda_graphs
    eager = make_train_step(eager_run)
    whole = GraphedStep(graph_run, graph_run.train_model, capture=False)
    lrs = []
    for step, (images, labels) in enumerate(batches(eager_run, STEPS, nan_at=5)):
        lrs.append(float(whole.lr))
        assert lrs[-1] == eager_run.optimizer.param_groups[0]["lr"]
        loss_a, loss_b = eager(images, labels), whole(images, labels)
        torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=0, equal_nan=True)
        assert_same_state(eager_run, graph_run)
        assert torch.isfinite(loss_b) == (step != 5)
    cfg = graph_run.cfg
    assert lrs == [lr_at(s, **graph_run.plan.lr_schedule(cfg)) for s in range(STEPS)]
    # one tensor took every value: lr/10 (warm-up and from step 4), lr, lr/100
    assert sorted(set(lrs), reverse=True) == pytest.approx([cfg.lr, cfg.lr / 10, cfg.lr / 100])
    assert all(g["lr"] is whole.lr for g in graph_run.optimizer.param_groups)


def test_exact_resume_through_a_checkpoint_of_the_whole_step():
    data = batches(build(False), STEPS)
    straight = build(True)
    step = GraphedStep(straight, straight.train_model, capture=False)
    for images, labels in data:
        step(images, labels)

    first = build(True)
    step = GraphedStep(first, first.train_model, capture=False)
    for images, labels in data[:STEPS // 2]:
        step(images, labels)
    buf = io.BytesIO()  # what write_checkpoint saves: the optimizer's param groups hold the lr tensor
    torch.save({k: getattr(first, k).state_dict() for k in ("model", "optimizer", "scaler", "scheduler")}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = build(True)
    for k in ("model", "optimizer", "scaler", "scheduler"):
        getattr(resumed, k).load_state_dict(ckpt[k])
    step = GraphedStep(resumed, resumed.train_model, capture=False)
    assert float(step.lr) == lr_at(STEPS // 2, lr=resumed.cfg.lr, total_iters=STEPS, warmup_iters=2,
                                   milestones=resumed.plan.milestones)
    for images, labels in data[STEPS // 2:]:
        step(images, labels)
    assert_same_state(straight, resumed)


def test_lr_tensor_binding_and_its_errors():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.1 ** s)
    lr = bind_lr_tensor(opt, "cpu")
    assert lr.dtype == torch.float64 and float(lr) == 0.5
    opt.step()  # no gradients: nothing to do, but the schedule expects it first
    sched.step()
    assert opt.param_groups[0]["lr"] is lr and float(lr) == 0.5 * 0.1  # filled in place
    with pytest.raises(ValueError, match="fused SGD"):
        bind_lr_tensor(torch.optim.SGD(model.parameters(), lr=0.1, foreach=True), "cpu")
    two = torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias], "lr": 0.2}], lr=0.1, fused=True)
    with pytest.raises(ValueError, match="different lrs"):
        bind_lr_tensor(two, "cpu")


def test_static_batch_copies_into_fixed_tensors():
    static = StaticBatch()
    x, y = torch.randn(4, 3, 8, 8), torch.arange(4)
    sx, sy = static.fill(x, y)
    assert torch.equal(sx, x) and sx.data_ptr() != x.data_ptr()
    x2 = torch.randn(4, 3, 8, 8)
    sx2, _ = static.fill(x2, y)
    assert sx2.data_ptr() == sx.data_ptr() and torch.equal(sx, x2)  # the same tensors, new contents
    assert not static.fits(x2[:3], y[:3])
    with pytest.raises(ValueError, match="does not fit the static input"):
        static.fill(x2[:3], y[:3])


@pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning")
def test_imagenet_batch_short_of_an_undecodable_image_is_skipped(tmp_path, monkeypatch):
    """The torchvision loader drops a file that fails to decode from its batch; the captured step takes
    full batches only, so the loop skips that batch with one line and still takes --iters steps."""
    monkeypatch.setenv("FASTPREACT_CACHE", str(tmp_path / "cache"))
    root = _make_tree(str(tmp_path / "imagenet"), with_bad=True)
    from fastpreact.data import build_data
    for seed in range(20):  # a seed whose first epoch plans damaged.JPEG (37 usable files: 9 batches of 4)
        plan = build_data("imagenet", data_dir=root, batch_size=4, device="cpu", loader="torchvision",
                          workers=0, seed=seed).train.plan
        if any("damaged.JPEG" in p for b in range(plan.num_batches) for p, *_ in plan.batch(0, b)):
            break
    opts = {"dataset": "imagenet", "device": "cpu", "arch": "resnet8", "data_dir": root, "loader": "torchvision",
            "batch_size": 4, "iters": 9, "seed": seed, "out": str(tmp_path / "run")}
    cfg = resolve_config(opts, 1)
    cfg.cuda_graphs, cfg.workers = True, 0
    said = []
    run = worker.build_run(opts, cfg, torch.device("cpu"), 0, 1, tmp_path / "run", said.append)
    monkeypatch.setattr(worker, "make_train_step", lambda run: GraphedStep(run, run.train_model, capture=False))
    worker.open_run_files(run, None)
    with pytest.warns(UserWarning, match="damaged.JPEG"):
        stop_reason, _ = worker.train_loop(run)
    skips = [m for m in said if "skipped a training batch" in m]
    assert stop_reason is None and run.step == 9  # the epoch's 8 full batches and one of the next
    # one skip in epoch 0; epoch 1 plans the file again (it is dropped again) if it falls before its 2nd batch
    assert skips and all("of 3 images" in m and "exactly 4" in m and "\n" not in m for m in skips)
    assert run.data.train.epoch == 1


class _Said(list):
    def __call__(self, msg):
        self.append(msg)


def _captured_step_of(batch_size):
    static = StaticBatch()
    static.fill(torch.zeros(batch_size, 3, 8, 8), torch.zeros(batch_size, dtype=torch.long))
    return types.SimpleNamespace(batch_size=batch_size,
                                 fits=lambda x, y: x.shape[0] == batch_size and static.fits(x, y))


def _run_of(world_size):
    return types.SimpleNamespace(distributed=world_size > 1, rank=world_size - 1, step=7, say=_Said())


def test_a_short_batch_is_skipped_on_one_gpu():
    run, step = _run_of(1), _captured_step_of(4)
    images, labels = torch.randn(4, 3, 8, 8), torch.arange(4)
    taken = worker.batch_for_captured_step(run, step, images, labels)
    assert taken[0] is images and taken[1] is labels
    assert worker.batch_for_captured_step(run, step, images[:3], labels[:3]) is None
    assert len(run.say) == 1 and "skipped a training batch of 3 images" in run.say[0] and "exactly 4" in run.say[0]


def test_a_short_batch_is_padded_with_its_own_images_under_ddp():
    """Every rank replays the captured step together (it holds the all-reduce): a rank whose batch came
    short fills it up with its own first images instead of skipping the step."""
    run, step = _run_of(2), _captured_step_of(4)
    images, labels = torch.randn(3, 3, 8, 8), torch.tensor([5, 6, 7])
    padded_images, padded_labels = worker.batch_for_captured_step(run, step, images, labels)
    assert padded_labels.tolist() == [5, 6, 7, 5]
    assert torch.equal(padded_images[:3], images) and torch.equal(padded_images[3], images[0])
    assert len(run.say) == 1 and "rank 1" in run.say[0] and "3 images padded to 4" in run.say[0]
    assert "\n" not in run.say[0]
    with pytest.raises(RuntimeError, match="does not fit the captured step.*--no-cuda-graphs"):
        worker.batch_for_captured_step(run, step, torch.randn(3, 3, 6, 6), labels)


def test_ddp_warms_up_eleven_steps_before_the_capture_and_says_what_the_graph_holds(monkeypatch):
    """torch captures a DDP step whole only after at least 11 eager DDP steps; the start-up line names
    the all-reduce and the padding of a short batch."""
    assert graph_warmup_steps(1) == GRAPH_WARMUP_STEPS == 3
    assert graph_warmup_steps(2) == graph_warmup_steps(8) == DDP_GRAPH_WARMUP_STEPS == 11
    run = build(True)
    said = _Said()
    run.say, run.world_size, run.opts = said, 2, {**run.opts, "cuda_graphs": True}
    monkeypatch.setattr(train_step_module, "GraphedStep", lambda r, m: GraphedStep(r, m, capture=False))
    step = make_train_step(run)
    assert step.warmup_steps == 11 and step.batch_size == 8
    assert len(said) == 1 and "after 11 eager steps" in said[0] and "all-reduce" in said[0]
    assert "8 images a worker" in said[0] and "padded" in said[0] and "\n" not in said[0]


DDP_STEP = """
import torch
from pathlib import Path
from fastpreact.train import worker
from fastpreact.train.distributed import destroy_process_group, init_process_group, replica_mismatches
from fastpreact.train.options import resolve_config
from fastpreact.train.step import GraphedStep
torch.set_num_threads(1)
init_process_group(torch.device("cpu"), 60.0)
rank = torch.distributed.get_rank()
opts = {"dataset": "shapes10", "device": "cpu", "arch": "resnet8", "batch_size": 16, "train_size": 128,
        "val_size": 32, "iters": 6, "warmup_iters": 2}
cfg = resolve_config(opts, 2)
cfg.cuda_graphs = True  # fused SGD and the lr tensor: the configuration of a captured step
said = []
run = worker.build_run(opts, cfg, torch.device("cpu"), rank, 2, Path("unused"), said.append)
step = GraphedStep(run, run.train_model, capture=False)
losses = []
for i, ((images, labels), _) in enumerate(zip(run.data.train, range(6))):
    if rank == 1 and i == 2:
        images, labels = images[:5], labels[:5]  # short on one rank only
    batch = worker.batch_for_captured_step(run, step, images, labels)
    if batch is not None:  # as the training loop does
        losses.append(float(step(*batch)))
print("steps", len(losses), "padded", sum("padded to 8" in m for m in said))
worker.average_bn_buffers(run.model, True)  # as the trainer does before it compares the ranks
print("mismatches", replica_mismatches(run.model.state_dict()))
destroy_process_group(barrier=True)
"""


def test_ddp_whole_step_keeps_the_ranks_in_step_when_one_batch_comes_short():
    """Two gloo ranks run the step a DDP capture records (GraphedStep without the graph, on its static
    buffers, the DDP wrapper and fused SGD with the lr tensor); rank 1's third batch comes short and is
    padded, so both ranks take every step and their weights stay identical (a skip on one rank would
    leave the other in an all-reduce that never completes, and this test would hang, then fail)."""
    results = run_two_ranks(DDP_STEP)
    for rank, (code, out, err) in enumerate(results):
        assert code == 0, err[-3000:]
        assert out.splitlines() == [f"steps 6 padded {rank}", "mismatches []"], (out, err[-2000:])


# ---------------------------------------------------------------------------------------------- GPU
@pytest.fixture
def deterministic_cudnn(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)


def gpu_run(graphs=True, **opts):
    return build(graphs, device="cuda", kernels="stock", **opts)


@pytest.mark.gpu
def test_captured_step_follows_the_eager_step_and_the_lr_schedule(deterministic_cudnn):
    eager_run, graph_run = gpu_run(False, amp="off"), gpu_run(amp="off")
    eager, graphed = make_train_step(eager_run), GraphedStep(graph_run, graph_run.train_model)
    lrs = []
    for images, labels in batches(eager_run, STEPS):
        lrs.append(float(graphed.lr))
        torch.testing.assert_close(eager(images, labels), graphed(images, labels), rtol=1e-3, atol=1e-4)
    assert graphed.captured and graphed.eager_steps == GRAPH_WARMUP_STEPS
    # lr/10 (warm-up, then from step 4), lr, lr/100: the replays read the schedule's lr from the tensor
    assert len(set(lrs)) == 3
    for p, q in zip(eager_run.model.parameters(), graph_run.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
def test_captured_fp16_step_skips_a_nonfinite_step_and_backs_off_the_scale(deterministic_cudnn):
    run = gpu_run(amp="fp16")
    graphed = GraphedStep(run, run.train_model)
    data = batches(run, STEPS)
    for images, labels in data[:GRAPH_WARMUP_STEPS + 1]:
        graphed(images, labels)
    assert graphed.captured
    before = [p.detach().clone() for p in run.model.parameters()]
    scale = run.scaler.get_scale()
    loss = graphed(torch.full_like(data[0][0], float("nan")), data[0][1])
    assert not torch.isfinite(loss)
    assert all(torch.equal(p, q) for p, q in zip(run.model.parameters(), before))  # step skipped
    assert run.scaler.get_scale() == scale * 0.5
    # Training goes on: each step whose fp16 gradients overflow halves the scale again, so within 16
    # steps (the scale at most 2^15 / 2^16) some step's gradients are finite and it updates the weights.
    for images, labels in data * 2:
        assert torch.isfinite(graphed(images, labels))
    assert any(not torch.equal(p, q) for p, q in zip(run.model.parameters(), before))


@pytest.mark.gpu
def test_cuda_graphs_run_end_to_end(tmp_path, capsys):
    from fastpreact import train
    out = tmp_path / "run"
    code = train.main(["shapes10", "--arch", "resnet8", "--batch-size", "32", "--train-size", "256",
                       "--val-size", "64", "--iters", "12", "--cuda-graphs", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "CUDA graph: after 3 eager steps one graph replays the whole step" in err
    assert os.path.exists(out / "final.pt")
