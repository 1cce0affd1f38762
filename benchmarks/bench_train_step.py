"""Training-step suite: forward + backward + SGD step, img/s and peak GPU memory, in one run.

Variants of each net (fastpreact.models.create_model, same initial weights):
  stock           kernels="stock", PyTorch eager, channels-last, bf16 autocast
  fused           kernels="fused" (the Triton kernels), eager
  compile         torch.compile of the stock model
  fused+compile   torch.compile of the fused model: inductor around the fused ops (needs the fused ops to
                  be operators dynamo can trace; where they are not, the row says why)
  fused + graph   the fused step captured whole in a CUDA graph (row kernels "fused", cuda_graph true:
                  fused+graphs): no launch cost
  stock + graph   the same for stock, to separate what the graph gives from what the kernels give
                  (resnet1001, resnet164)

GPU: resnet200 (batch 64, 224 px), resnet50 (batch 64, 224 px), resnet1001 and resnet164 (batch 128,
32 px), every variant of each (compiling resnet1001 takes minutes: its compile rows run last). CPU:
resnet11 (bottleneck) and resnet8 (basic) at batch 2, interpreter sizes, no compile or graph rows (each
says why). Synthetic data already on the device: the model is measured, not the loader (bench_loader.py
measures the loaders). SGD: lr 0.1, momentum 0.9, weight decay 1e-4, as the paper's recipe.
Besides img/s and peak memory, eager rows carry saved_mb_per_img: the activations autograd keeps for
backward per image (saved_tensors_hooks, parameters excluded), which needs no GPU to mean something,
but needs real sizes: at the CPU run's tiny sizes the per-channel statistics weigh as much as the
activations (resnet11 at 32 px, batch 8, on a CPU: fused 0.79 MB/img, stock 1.52 MB/img).
"""
from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from benchmarks import _bench as B

if B.FULL:
    NETS = {
        "resnet200": dict(batch=64, image=224, num_classes=1000, compile=True, graph=True, stock_graph=False),
        "resnet1001": dict(batch=128, image=32, num_classes=10, compile=True, graph=True, stock_graph=True),
        "resnet164": dict(batch=128, image=32, num_classes=10, compile=True, graph=True, stock_graph=True),
        "resnet50": dict(batch=64, image=224, num_classes=1000, compile=True, graph=True, stock_graph=False),
    }
else:
    NETS = {
        "resnet11": dict(batch=2, image=8, num_classes=10, compile=True, graph=True, stock_graph=True,
                         stands_for="resnet200/resnet1001/resnet164/resnet50"),
        "resnet8": dict(batch=2, image=16, num_classes=10, compile=False, graph=False, stock_graph=False,
                        stands_for="basic-unit nets"),
    }
# (row kernels, CUDA graph): "compile" and "fused+compile" are torch.compile of the stock and fused models.
VARIANTS = (("stock", False), ("fused", False), ("compile", False), ("fused+compile", False), ("fused", True),
            ("stock", True))
COMPILED = {"compile": "stock", "fused+compile": "fused"}  # row kernels -> the kernels of the compiled model
IDS = {"compile": "compile-inductor", "fused+compile": "fused-inductor"}


def _cases():
    out = []
    for arch, cfg in NETS.items():
        for kernels, graph in VARIANTS:
            if kernels in COMPILED and not cfg["compile"]:
                continue
            if graph and not cfg["stock_graph" if kernels == "stock" else "graph"]:
                continue
            tag = IDS.get(kernels, f"{kernels}-{'graph' if graph else 'eager'}")
            out.append(pytest.param(arch, kernels, graph, id=f"{arch}-{tag}"))
    # Compiling resnet1001 takes minutes: its compile rows run last, so a time budget cut leaves them out.
    return sorted(out, key=lambda p: p.values[0] == "resnet1001" and p.values[1] in COMPILED)


def build(arch, kernels, cfg):
    """Model (channels-last, on the device, train mode) and SGD optimizer; the same weights every time."""
    from fastpreact.models import create_model
    torch.manual_seed(0)
    model = create_model(arch, cfg["num_classes"], kernels=COMPILED.get(kernels, kernels))
    model = model.to(B.DEVICE, memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    return model, opt


def graph_step(model, opt, x, y, warmup=3):
    """The whole step (forward, backward, optimizer) captured in one CUDA graph; returns its replay.

    Follows PyTorch's whole-network capture recipe: warm up on a side stream (optimizer state and
    lazily built kernels exist before capture), grads set to None before capture so the graph owns
    them, autocast's weight cache off while capturing. A fresh batch is copied into the static input
    each step, as a training loop would.
    """
    source = x.clone()
    static_x = x
    step = B.eager_step(model, opt, static_x, y)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        with torch.autocast("cuda", dtype=B.AMP_DTYPE, cache_enabled=False):
            loss = F.cross_entropy(model(static_x), y)
        loss.backward()
        opt.step()

    def replay():
        static_x.copy_(source)
        graph.replay()
    return replay


def saved_bytes(model, x, y):
    """Bytes autograd saves for backward in one training forward, parameters excluded, each storage once.

    A device-independent figure: it is what the fused design saves less of (x, mean, rstd
    and W instead of the BN and ReLU outputs). Autocast's per-step bf16 weight copies count, as they
    are saved in both variants.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set = set()
    total = 0

    def pack(t):
        nonlocal total
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and ptr not in seen:
            seen.add(ptr)
            total += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with B.autocast():
            loss = F.cross_entropy(model(x), y)
    del loss
    return total


@pytest.mark.parametrize("arch,kernels,graph", _cases())
def test_train_step(benchmark, results, arch, kernels, graph):
    cfg = NETS[arch]
    row = dict(name="train_step", arch=arch, kernels=kernels, cuda_graph=graph, batch=cfg["batch"],
               image_size=cfg["image"], dtype=B.DTYPE_NAME, stands_for=cfg.get("stands_for"))
    if graph and not B.ON_GPU:
        B.unavailable(results, row, "CUDA graphs need a CUDA GPU; measured by gpu_check.sh")
    if kernels in COMPILED and not B.ON_GPU:
        B.unavailable(results, row, "CPU run: no torch.compile rows for whole nets (compiling one takes "
                                    "minutes on a CPU, over the 5-minute budget); measured on a GPU")
    B.free_memory()
    try:
        model, opt = build(arch, kernels, cfg)
        if kernels in COMPILED:
            torch._dynamo.reset()
            model = torch.compile(model)
    except Exception as exc:
        if kernels == "stock":
            raise
        B.unavailable(results, row, f"cannot build the {kernels} model: {B.first_line(exc)}")
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(cfg["batch"], 3, cfg["image"], cfg["image"], generator=g).to(B.DEVICE)
    x = x.to(B.AMP_DTYPE or torch.float32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, cfg["num_classes"], (cfg["batch"],), generator=g).to(B.DEVICE)

    saved = None
    if kernels not in COMPILED and not graph:  # compiled graphs save inside AOTAutograd, out of the hooks' sight
        try:
            saved = saved_bytes(model, x, y) / cfg["batch"] / 1e6
        except Exception as exc:
            if kernels == "stock":
                raise
            B.unavailable(results, row, f"{kernels} forward failed: {B.first_line(exc)}")
        opt.zero_grad(set_to_none=True)
        B.free_memory()
    try:
        t0 = time.perf_counter()
        if graph:
            step = graph_step(model, opt, x, y)
        else:
            step = B.eager_step(model, opt, x, y)
            if B.warmup_steps(kernels):
                step()  # first step: compilation (compile), autotuning (fused), cuDNN algorithm search
        B.sync()
        first_s = time.perf_counter() - t0
        for _ in range(B.warmup_steps(kernels) - 1):
            step()
        B.reset_peak()

        def target():
            step()
            B.sync()

        seconds = B.time_call(benchmark, target, warmup=0, rounds_=B.rounds(10, 1))
    except Exception as exc:
        if kernels == "stock" and not graph:
            raise
        B.unavailable(results, row, f"{kernels}{' + CUDA graph' if graph else ''} failed: {B.first_line(exc)}")
    peak = B.peak_gb()
    row.update(ms=B.sig(seconds * 1e3), img_per_s=B.sig(cfg["batch"] / seconds),
               peak_mem_gb=None if peak is None else B.sig(peak),
               saved_mb_per_img=None if saved is None else B.sig(saved),
               compile_s=B.sig(first_s, 3) if kernels in COMPILED else None)
    B.record(results, benchmark, row)
