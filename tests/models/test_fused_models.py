"""kernels="fused" end to end: the fused ResNets train like the stock ones, with fewer saved bytes.

Runs the Triton kernels through the interpreter on a CPU (conftest sets TRITON_INTERPRET=1), so the nets
are tiny. Train-mode BatchNorm over few values is ill-conditioned, so every BN here sees >= 32 values
and deep comparisons are judged against a float64 copy of the stock model with the relative oracle
|fused - ref64| <= 2 |stock32 - ref64| + atol (two correct fp32 implementations differ by about as much
as either differs from the exact result).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastpreact.functional as Fp
from fastpreact.models import FusedPreActBottleneck, create_model, fused_components
from fastpreact.nn import FusedBatchNormReLU2d
from oracle import assert_oracle
from conftest import channels_last, use_torch_backend

# (arch, create_model keywords, input size): with a batch of 8 every BN sees >= 32 values per channel.
CIFAR_NET = ("resnet11", dict(widths=(4, 8, 8)), 12)  # stride on the first 1x1, projections
IMAGENET_NET = ("resnet14", dict(family="imagenet", layers=(1, 1, 1, 1), widths=(4, 4, 8, 8)), 48)


def sgd_steps(model, x, y, steps):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x.to(next(model.parameters()).dtype)), y)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


# ------------------------------------------------------------------------------------- model training
@pytest.mark.parametrize("arch,kw,size", [CIFAR_NET, IMAGENET_NET],
                         ids=["cifar-resnet11", "imagenet-resnet14"])
def test_sgd_steps_match_stock(arch, kw, size, unit="preact", steps=3):
    """Pre-act bottleneck nets: loss at every SGD step (momentum, weight decay), then parameters and BN
    buffers, fused vs stock vs a float64 reference; then eval-mode outputs."""
    torch.manual_seed(0)
    stock = channels_last(create_model(arch, 10, unit=unit, **kw))
    fused = channels_last(create_model(arch, 10, unit=unit, kernels="fused", **kw))
    fused.load_state_dict(stock.state_dict())
    ref64 = copy.deepcopy(stock).double()
    x = channels_last(torch.randn(8, 3, size, size))
    y = torch.arange(8) % 10
    losses = {name: sgd_steps(m, x, y, steps) for name, m in
              (("stock", stock), ("fused", fused), ("ref64", ref64))}
    torch.testing.assert_close(losses["fused"], losses["stock"], rtol=1e-4, atol=1e-5)
    assert_oracle(losses["fused"], losses["stock"], losses["ref64"], "loss", atol=1e-5)
    state = {name: m.state_dict() for name, m in (("stock", stock), ("fused", fused), ("ref64", ref64))}
    assert state["fused"].keys() == state["stock"].keys()
    for key, value in state["stock"].items():
        if key.endswith("num_batches_tracked"):
            assert state["fused"][key] == value == steps, key
            continue
        torch.testing.assert_close(state["fused"][key], value, rtol=1e-3, atol=1e-4, msg=key)
        assert_oracle(state["fused"][key], value, state["ref64"][key], key, atol=2e-5)

    # eval mode (running statistics) after training
    stock.eval(), fused.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), stock(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch,kw,size", [CIFAR_NET, IMAGENET_NET],
                         ids=["cifar-resnet11", "imagenet-resnet14"])
def test_torch_backend_fused_matches_stock(arch, kw, size, monkeypatch):
    """Without a GPU or the interpreter the fused models run the same Functions on torch math."""
    use_torch_backend(monkeypatch)
    assert Fp.backend("cpu") == "torch"
    torch.manual_seed(0)
    stock = channels_last(create_model(arch, 10, **kw))
    fused = channels_last(create_model(arch, 10, kernels="fused", **kw))
    fused.load_state_dict(stock.state_dict())
    x, y = channels_last(torch.randn(8, 3, size, size)), torch.arange(8)
    torch.testing.assert_close(sgd_steps(fused, x, y, 2), sgd_steps(stock, x, y, 2), rtol=1e-4, atol=1e-5)
    for (k, a), b in zip(fused.state_dict().items(), stock.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=k)


def test_state_dict_round_trip_stock_fused_stock():
    torch.manual_seed(0)
    kw = dict(widths=(4, 8, 8))
    stock = create_model("resnet11", 10, **kw)
    with torch.no_grad():  # non-trivial buffers and parameters, so a mix-up would show
        for b in stock.buffers():
            b.add_(torch.rand_like(b.float()).to(b.dtype))
        for p in stock.parameters():
            p.add_(0.1 * torch.randn_like(p))
    fused = create_model("resnet11", 10, kernels="fused", **kw)
    fused.load_state_dict(stock.state_dict(), strict=True)
    back = create_model("resnet11", 10, **kw)
    back.load_state_dict(fused.state_dict(), strict=True)
    sd, sd_back = stock.state_dict(), back.state_dict()
    assert list(sd) == list(fused.state_dict()) == list(sd_back)
    for k in sd:
        assert sd[k].shape == sd_back[k].shape and torch.equal(sd[k], sd_back[k]), k
    x = channels_last(torch.randn(2, 3, 8, 8))
    stock.eval(), fused.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), stock(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("unit,arch,kw,size", [
    ("original", *CIFAR_NET),
    ("preact", "resnet8", dict(widths=(4, 8, 8)), 8),
    ("original", "resnet8", dict(widths=(4, 8, 8)), 8),
    ("preact", "resnet10", dict(family="imagenet", layers=(1, 1, 1, 1), widths=(4, 4, 8, 8)), 48),
], ids=["original-resnet11", "preact-resnet8", "original-resnet8", "preact-imagenet-resnet10"])
def test_other_units_fused_match_stock(unit, arch, kw, size):
    """Original units and basic pre-act units: two SGD steps, losses and state agree (fp32 tolerance:
    shallow nets)."""
    torch.manual_seed(0)
    stock = channels_last(create_model(arch, 10, unit=unit, **kw))
    fused = channels_last(create_model(arch, 10, unit=unit, kernels="fused", **kw))
    fused.load_state_dict(stock.state_dict())
    x, y = channels_last(torch.randn(8, 3, size, size)), torch.arange(8)
    torch.testing.assert_close(sgd_steps(fused, x, y, 2), sgd_steps(stock, x, y, 2), rtol=1e-4, atol=1e-5)
    for (k, a), b in zip(fused.state_dict().items(), stock.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=k)


@pytest.mark.parametrize("arch,unit", [("resnet50", "preact"), ("resnet164", "preact"), ("resnet18", "preact"),
                                       ("resnet110", "original"), ("resnet50", "original")])
def test_fused_state_dict_keys_and_shapes_equal_stock(arch, unit):
    with torch.device("meta"):
        stock = create_model(arch, 10, unit=unit)
        fused = create_model(arch, 10, unit=unit, kernels="fused")
    assert [(k, v.shape) for k, v in fused.state_dict().items()] == \
        [(k, v.shape) for k, v in stock.state_dict().items()]
    assert all(type(u).__name__ == "Fused" + type(s).__name__ for u, s in zip(fused.units(), stock.units()))


def test_statistics_chained_between_kernels(monkeypatch):
    """Training forward of a fused pre-act net: every BN1 after the first unit, every BN2 and the final
    BN get their batch statistics from the producing kernel's epilogue (input_stats), and they are the
    true statistics of that input. Seen on the per-op path (the one-node path launches the same kernels
    with the same arguments: test_bottleneck_as_one_node_is_bit_identical_to_its_ops)."""
    monkeypatch.setattr(Fp, "bottleneck_eligible", lambda *a, **k: False)
    seen = []

    def spy(fn, name):
        def wrapper(x, *args, **kw):
            stats = kw.get("input_stats")
            seen.append((name, stats is not None))
            if stats is not None:
                torch.testing.assert_close(stats[0], x.detach().float().mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(stats[1], x.detach().float().var((0, 2, 3), unbiased=False),
                                           rtol=1e-4, atol=1e-5)
            return fn(x, *args, **kw)
        return wrapper
    monkeypatch.setattr(Fp, "bn_relu_conv1x1_dual", spy(Fp.bn_relu_conv1x1_dual, "dual"))
    monkeypatch.setattr(Fp, "bn_relu_conv1x1", spy(Fp.bn_relu_conv1x1, "1x1"))
    monkeypatch.setattr(Fp, "bn_relu_conv2d", spy(Fp.bn_relu_conv2d, "3x3"))
    monkeypatch.setattr(Fp, "bn_relu", spy(Fp.bn_relu, "head"))
    torch.manual_seed(0)
    model = create_model("resnet20", 10, block="bottleneck", kernels="fused", widths=(4, 8, 8))
    model(channels_last(torch.randn(4, 3, 8, 8)))
    # 2 units per stage; projections at the first unit of each stage; BN3 after cuDNN's 3x3 measures
    assert seen == [("dual", False), ("3x3", True), ("1x1", False),
                    ("1x1", True), ("3x3", True), ("1x1", False),
                    ("dual", True), ("3x3", True), ("1x1", False),
                    ("1x1", True), ("3x3", True), ("1x1", False),
                    ("dual", True), ("3x3", True), ("1x1", False),
                    ("1x1", True), ("3x3", True), ("1x1", False),
                    ("head", True)]


# ------------------------------------------------------------------------------------------- pieces
def test_pieces_save_only_their_input():
    """bn_relu_conv2d and the fused bottleneck keep no pre-activation for backward."""
    torch.manual_seed(0)
    unit = FusedPreActBottleneck(8, 16, stride=2, norm_layer=FusedBatchNormReLU2d)
    x = channels_last(torch.randn(4, 8, 8, 8)).requires_grad_()
    params = {t.untyped_storage().data_ptr() for t in list(unit.parameters()) + list(unit.buffers())}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params and t.dim() == 4:
            saved[t.untyped_storage().data_ptr()] = tuple(t.shape)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, stats = unit.forward_with_stats(x)
    # x, conv1's output (the 3x3 conv's pre-BN input) and the 3x3 conv's output: nothing else
    assert sorted(saved.values()) == sorted([(4, 8, 8, 8), (4, 4, 8, 8), (4, 4, 4, 4)])
    torch.testing.assert_close(stats[0], y.detach().mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stats[1], y.detach().var((0, 2, 3), unbiased=False), rtol=1e-4, atol=1e-5)


def test_fused_components_rejects_unknown_units():
    with pytest.raises(ValueError, match="no fused version of Linear"):
        fused_components(nn.Linear)


# ------------------------------------------------------------------------------- saved-tensor bytes
def saved_activation_bytes(model, x):
    """Bytes of the distinct storages autograd saves for backward during one training forward,
    parameters and buffers excluded (torch.autograd.graph.saved_tensors_hooks)."""
    state = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in state:
            seen[storage.data_ptr()] = storage.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return sum(seen.values())


@pytest.mark.parametrize("arch,size", [("resnet50", 64), ("resnet164", 32)])
def test_saved_activation_bytes_ratio(arch, size, monkeypatch, record_property):
    """fused / stock saved bytes <= 0.6. Sizes and what is saved do not depend on the backend, so the
    torch backend (the same Functions' fallback math) runs this, fast."""
    use_torch_backend(monkeypatch)
    assert Fp.backend("cpu") == "torch"
    sizes = {}
    for kernels in ("stock", "fused"):
        torch.manual_seed(0)
        model = channels_last(create_model(arch, 10, kernels=kernels))
        sizes[kernels] = saved_activation_bytes(model, channels_last(torch.randn(1, 3, size, size)))
    ratio = sizes["fused"] / sizes["stock"]
    record_property("saved_bytes_ratio", ratio)
    print(f"\n{arch} {size}x{size}: saved activations fused {sizes['fused']} B / stock {sizes['stock']} B "
          f"= {ratio:.3f}")
    assert ratio <= 0.6


# ------------------------------------------------------------------------------------------------ GPU
def check_fp32_training_matches(device, arch, kw, size, batch, steps=3):
    """fused vs stock vs float64 over SGD steps on `device`, TF32 off (so fp32 means fp32)."""
    torch.manual_seed(0)
    stock = channels_last(create_model(arch, 10, **kw).to(device))
    fused = channels_last(create_model(arch, 10, kernels="fused", **kw).to(device))
    fused.load_state_dict(stock.state_dict())
    ref64 = copy.deepcopy(stock).double()
    x = channels_last(torch.randn(batch, 3, size, size, device=device))
    y = torch.arange(batch, device=device) % 10
    losses = {n: sgd_steps(m, x, y, steps) for n, m in (("stock", stock), ("fused", fused), ("ref64", ref64))}
    assert_oracle(losses["fused"], losses["stock"], losses["ref64"], "loss", atol=1e-5)
    ref = ref64.state_dict()
    for key, value in stock.state_dict().items():
        if value.is_floating_point():
            assert_oracle(fused.state_dict()[key], value, ref[key], key, atol=1e-4)


def check_bf16_step_matches(device, arch, kw, size, batch):
    """One bf16-autocast forward/backward: the fused loss and every gradient are at most twice as far
    (relative Frobenius norm) from the float64 result as stock PyTorch's bf16 ones, plus a small atol."""
    torch.manual_seed(0)
    models = {"stock": channels_last(create_model(arch, 10, **kw).to(device))}
    models["fused"] = channels_last(create_model(arch, 10, kernels="fused", **kw).to(device))
    models["fused"].load_state_dict(models["stock"].state_dict())
    models["ref64"] = copy.deepcopy(models["stock"]).double()
    x = channels_last(torch.randn(batch, 3, size, size, device=device))
    y = torch.arange(batch, device=device) % 10
    losses = {}
    for name, m in models.items():
        with torch.autocast(device.type if isinstance(device, torch.device) else device,
                            dtype=torch.bfloat16, enabled=name != "ref64"):
            losses[name] = F.cross_entropy(m(x.to(next(m.parameters()).dtype)), y)
        losses[name].backward()
    loss_err = {n: (losses[n].double() - losses["ref64"]).abs().item() for n in ("stock", "fused")}
    assert loss_err["fused"] <= 2 * loss_err["stock"] + 2e-2, loss_err
    # Per-tensor gradients of a deep net in bf16 are chaotic (stock's own BN-gamma gradients can be off
    # by ~100%), so the gradients are judged all together and per stage of the net.
    def grads(model, prefix=""):
        return torch.cat([p.grad.double().flatten() for n, p in model.named_parameters()
                          if n.startswith(prefix)])
    for prefix in ["", "stem", "stages.0", "stages.1", "stages.2", "fc"]:
        g_ref = grads(models["ref64"], prefix)
        err = {n: ((grads(models[n], prefix) - g_ref).norm() / g_ref.norm()).item()
               for n in ("stock", "fused")}
        assert err["fused"] <= 2 * err["stock"] + 2e-2, (prefix or "all", err)


@pytest.mark.gpu
@pytest.mark.parametrize("arch,kw,size,batch", [
    ("resnet11", {}, 32, 32),
    ("resnet14", dict(family="imagenet", layers=(1, 1, 1, 1), widths=(16, 16, 32, 32)), 64, 16),
    ("resnet8", {}, 32, 32),
], ids=["cifar-resnet11", "imagenet-resnet14", "cifar-resnet8"])
def test_fused_training_matches_stock_cuda_fp32(arch, kw, size, batch, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    check_fp32_training_matches(torch.device("cuda"), arch, kw, size, batch)


@pytest.mark.gpu
@pytest.mark.parametrize("arch,kw,size,batch", [
    ("resnet164", {}, 32, 32),
    ("resnet50", {}, 96, 8),
], ids=["resnet164", "resnet50"])
def test_fused_bf16_step_matches_stock_cuda(arch, kw, size, batch):
    check_bf16_step_matches(torch.device("cuda"), arch, kw, size, batch)


def assert_state_follows(model, eager):
    """A bf16 run's state_dict against the same model's eager run: floating tensors close, counters equal."""
    for (k, a), b in zip(model.state_dict().items(), eager.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-2, msg=k)
        else:
            assert torch.equal(a, b), k


@pytest.mark.gpu
def test_fused_training_step_cuda_graph_bf16():
    """A whole training step (forward, backward, SGD) captured by a CUDA graph under bf16 autocast
    replays like the same model run eagerly: no host sync or data-dependent host logic in the fused
    path."""
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = channels_last(create_model("resnet164", 10, kernels="fused").to(dev))
    eager = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    opt_eager = torch.optim.SGD(eager.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = channels_last(torch.randn(32, 3, 32, 32, device=dev))
    y = torch.randint(0, 10, (32,), device=dev)

    def step(m, o):
        o.zero_grad(set_to_none=False)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(m(x), y)
        loss.backward()
        o.step()
        return loss.detach()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm up (Triton compilation and autotuning, cuDNN plans) before capture
            step(model, opt), step(eager, opt_eager)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(model, opt)
    for _ in range(3):
        graph.replay()
        eager_loss = step(eager, opt_eager)
        torch.testing.assert_close(static_loss.float(), eager_loss.float(), rtol=2e-2, atol=2e-2)
    torch.cuda.synchronize()
    assert_state_follows(model, eager)


@pytest.mark.gpu
def test_fused_training_under_reduce_overhead_compile_follows_eager():
    """torch.compile(mode="reduce-overhead") (inductor's CUDA graph trees) with the fused operators in its
    graphs: a few bf16 SGD steps follow the same model run eagerly, and no graph is skipped."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = channels_last(create_model("resnet11", 10, kernels="fused").to(dev))
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, mode="reduce-overhead")
    runs = [(compiled, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)),
            (eager, torch.optim.SGD(eager.parameters(), lr=0.1, momentum=0.9))]
    x = channels_last(torch.randn(32, 3, 32, 32, device=dev))
    y = torch.randint(0, 10, (32,), device=dev)
    for _ in range(5):  # warm-up runs, the recording, then replays
        torch.compiler.cudagraph_mark_step_begin()
        losses = []
        for m, opt in runs:
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(m(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.detach().float().clone())
        torch.testing.assert_close(losses[0], losses[1], rtol=2e-2, atol=2e-2)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert_state_follows(model, eager)


@pytest.mark.gpu
def test_inductor_calls_the_kernels_from_its_generated_code():
    """torch.compile (inductor) of a fused training step: the operators decomposed into their launches
    (functional/library.py), so the generated Python calls the Triton kernels themselves and no
    fastpreact operator is left; loss and gradients follow eager."""
    from torch._inductor.utils import run_and_get_code
    torch._dynamo.reset()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = channels_last(create_model("resnet11", 10, kernels="fused").to(dev))
    eager = copy.deepcopy(model)
    compiled = torch.compile(model)
    x = channels_last(torch.randn(32, 3, 32, 32, device=dev))
    y = torch.randint(0, 10, (32,), device=dev)

    def step(m):
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        return loss.detach()

    loss, code = run_and_get_code(step, compiled)
    source = "\n".join(code)
    for kernel in ("_batch_stats_kernel", "_bn_relu_conv1x1_fwd_kernel", "_bn_relu_conv1x1_bwd_reduce_kernel",
                   "_bn_relu_conv1x1_bwd_dgrad_kernel"):
        assert kernel in source, kernel
    assert "torch.ops.fastpreact" not in source
    torch.testing.assert_close(loss, step(eager), rtol=1e-3, atol=1e-3)
    for (name, a), b in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-2, atol=1e-3, msg=name)
    for (name, a), b in zip(model.named_buffers(), eager.buffers()):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.skipif(not Fp.backend("cpu") == "triton", reason="the unit node runs on the Triton path")
@pytest.mark.parametrize("arch,kw,size,amp", [(*CIFAR_NET, None), (*CIFAR_NET, torch.float16), (*IMAGENET_NET, None)],
                         ids=["cifar-resnet11", "cifar-resnet11-fp16-autocast", "imagenet-resnet14"])
def test_bottleneck_as_one_node_is_bit_identical_to_its_ops(arch, kw, size, amp, monkeypatch):
    """A pre-activation bottleneck in training runs as one autograd node (functional.preact_bottleneck):
    the same launches as its three fused ops, so two SGD steps give the same bits, BN buffers included."""
    from fastpreact.functional import bottleneck
    results = []
    for one_node in (True, False):
        if not one_node:
            monkeypatch.setattr(Fp, "bottleneck_eligible", lambda *a, **k: False)
        used = []
        orig = bottleneck._PreActBottleneck.apply
        monkeypatch.setattr(bottleneck._PreActBottleneck, "apply",
                            lambda *a, used=used, orig=orig: used.append(1) or orig(*a))
        torch.manual_seed(0)
        model = channels_last(create_model(arch, 10, kernels="fused", **kw))
        x, y = channels_last(torch.randn(8, 3, size, size)), torch.arange(8) % 10
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        losses = []
        for _ in range(2):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        assert bool(used) == one_node, "the unit node ran where it should not, or not where it should"
        results.append((losses, {k: v.clone() for k, v in model.state_dict().items()}))
    (l1, s1), (l2, s2) = results
    assert all(torch.equal(a, b) for a, b in zip(l1, l2)), (l1, l2)
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k


@pytest.mark.skipif(not Fp.backend("cpu") == "triton", reason="the unit node runs on the Triton path")
@pytest.mark.parametrize("in_chs,out_chs,stride", [(16, 16, 1), (8, 16, 2)], ids=["identity", "projection"])
def test_one_node_unit_with_an_fp32_input_under_autocast(in_chs, out_chs, stride, monkeypatch):
    """A single unit fed an fp32 x under fp16 autocast (the identity shortcut's gradient then changes
    dtype on its way back): one node and three ops agree bit for bit, gradients and BN buffers included."""
    outs = []
    for one_node in (True, False):
        if not one_node:
            monkeypatch.setattr(Fp, "bottleneck_eligible", lambda *a, **k: False)
        torch.manual_seed(3)
        unit = channels_last(FusedPreActBottleneck(in_chs, out_chs, stride=stride, norm_layer=FusedBatchNormReLU2d))
        x = channels_last(torch.randn(4, in_chs, 6, 6)).requires_grad_()
        with torch.autocast("cpu", dtype=torch.float16):
            y, stats = unit.forward_with_stats(x)
        y.float().square().sum().backward()
        outs.append([y, stats.mean, stats.var, x.grad] + [p.grad for p in unit.parameters()]
                    + list(unit.buffers()))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
