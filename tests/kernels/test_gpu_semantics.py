"""The kernels under what a GPU does and the interpreter hides (tests/gpu_emulation.py): autotuning over
several configs run repeatedly on the real arguments, programs finishing in any order, launches on the
tensors' own device, CUDA-graph capture of the ticket buffers, bf16 products; and the tuning table
(pinned, saved, shared between ranks).
"""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

import fastpreact
import fastpreact.functional as Fp
from fastpreact.models import create_model
from gpu_emulation import REPEATS, autotuning, launch_devices, shuffled_grid
from oracle import assert_oracle
from conftest import channels_last, requires_interpreter

pytestmark = pytest.mark.skipif(Fp.backend("cpu") != "triton" and not torch.cuda.is_available(),
                                reason="needs the Triton backend (a GPU, or TRITON_INTERPRET=1)")

NETS = {  # (arch, create_model keywords, input size): every BN sees >= 32 values with a batch of 8
    "resnet11": ("resnet11", dict(widths=(4, 8, 8)), 12),
    "resnet18": ("resnet18", dict(widths=(4, 4, 8, 8)), 40),
}


def _nets(name, momentum=0.1):
    arch, kw, size = NETS[name]
    torch.manual_seed(0)
    stock = channels_last(create_model(arch, 10, **kw))
    fused = channels_last(create_model(arch, 10, kernels="fused", **kw))
    fused.load_state_dict(stock.state_dict())
    for net in (stock, fused):
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = momentum
    x = channels_last(torch.randn(8, 3, size, size))
    return stock, fused, x, torch.arange(8) % 10


def _step(model, x, y):
    """One SGD training step; returns (loss, {name: grad}, state_dict copy)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x.to(next(model.parameters()).dtype)), y)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    return loss.detach(), grads, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_like_stock(fused_out, stock_out, ref_out):
    (lf, gf, sf), (ls, gs, ss), (lr, gr, sr) = fused_out, stock_out, ref_out
    assert_oracle(lf, ls, lr, "loss", atol=1e-5)
    for name in gs:
        assert_oracle(gf[name], gs[name], gr[name], f"grad {name}", atol=2e-5)
    for key in ss:
        if key.endswith("num_batches_tracked"):
            assert int(sf[key]) == int(ss[key]) == 1, f"{key}: {int(sf[key])} (stock {int(ss[key])})"
        else:
            assert_oracle(sf[key], ss[key], sr[key], key, atol=2e-5)


# ------------------------------------------------------------------------------------------ autotuning
@requires_interpreter
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
def test_training_step_under_autotuning_matches_stock(monkeypatch, momentum):
    """Each tuned kernel times several configs, each REPEATS times on the real arguments, before its real
    launch: the step's loss, gradients, every BN buffer and num_batches_tracked stay the stock step's."""
    stock, fused, x, y = _nets("resnet11", momentum)
    ref64 = copy.deepcopy(stock).double()
    with autotuning(monkeypatch) as tuned:
        out = _step(fused, x, y)
        from fastpreact.kernels import tuning
        chosen = tuning.table()["cards"]["interpreter"]
    assert tuned.timed >= 6 and tuned.calls == REPEATS * tuned.timed, "the candidates were not timed"
    assert set(chosen) == {"bn_relu_conv1x1_fwd", "bn_relu_conv1x1_bwd_reduce", "bn_relu_conv1x1_bwd_dgrad"}
    assert all(name != "32x32x16-w4-s1-g4" for keys in chosen.values() for name in keys.values()), \
        "the default config won: the emulation did not change the tile"
    _assert_like_stock(out, _step(stock, x, y), _step(ref64, x.double(), y))


@requires_interpreter
def test_autotuning_restores_the_finished_batchnorm(monkeypatch):
    """The forward kernel that finishes the consuming BatchNorm, tuned on its first call: the running
    statistics are updated once and num_batches_tracked counts one batch."""
    torch.manual_seed(1)
    x = channels_last(torch.randn(4, 24, 5, 5))
    w = torch.randn(40, 24, 1, 1)
    bn_in, bn_out = torch.nn.BatchNorm2d(24), torch.nn.BatchNorm2d(40)
    expect_bn = copy.deepcopy(bn_out)
    with autotuning(monkeypatch):
        y, _ = Fp.bn_relu_conv1x1(x, w, output_stats=True, next_bn=bn_out, **Fp.bn_args(bn_in))
    expect_bn(y.detach().float())
    assert int(bn_out.num_batches_tracked) == 1
    torch.testing.assert_close(bn_out.running_mean, expect_bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn_out.running_var, expect_bn.running_var, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------- grid order
@requires_interpreter
@pytest.mark.parametrize("net", ["resnet11", "resnet18"])
def test_any_program_may_finish_last(net):
    """A fused training step with every launch's programs run in shuffled orders is bit-identical to the
    in-order run: the last program to take a ticket merges the partials in a fixed order."""
    results = []
    for seed in (None, 1, 2, 3):
        _, fused, x, y = _nets(net)
        with (shuffled_grid(seed) if seed is not None else _nothing()):
            results.append(_step(fused, x, y))
    (loss0, grads0, state0), rest = results[0], results[1:]
    for seed, (loss, grads, state) in zip((1, 2, 3), rest):
        assert torch.equal(loss, loss0), f"order {seed}: loss differs"
        for k in grads0:
            assert torch.equal(grads[k], grads0[k]), f"order {seed}: grad {k} differs"
        for k in state0:
            assert torch.equal(state[k], state0[k]), f"order {seed}: {k} differs"


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@requires_interpreter
def test_shuffled_grid_really_shuffles():
    """The emulation changes which program runs last (else the test above proves nothing)."""
    import triton
    import triton.language as tl

    @triton.jit
    def order_kernel(out_ptr, counter_ptr):
        pid = tl.program_id(0)
        tl.store(out_ptr + pid, tl.atomic_add(counter_ptr, 1))

    orders = []
    for seed in (None, 5):
        out, counter = torch.zeros(16, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
        with (shuffled_grid(seed) if seed is not None else _nothing()):
            order_kernel[(16,)](out, counter)
        orders.append(out.tolist())
    assert orders[0] == list(range(16)) and orders[1] != orders[0] and sorted(orders[1]) == list(range(16))


# ------------------------------------------------------------------------------------------ devices
@requires_interpreter
def test_every_launch_runs_under_its_tensors_device(monkeypatch):
    """Every kernel of a fused training step launches under the device guard of its tensors' device
    (Triton launches on the current CUDA device, not the tensors')."""
    _, fused, x, y = _nets("resnet11")
    with launch_devices(monkeypatch) as records:
        _step(fused, x, y)
    assert records, "no launch recorded"
    names = {name for name, _, _ in records}
    assert {"_bn_relu_conv1x1_fwd_kernel", "_bn_relu_conv1x1_bwd_dgrad_kernel", "_batch_stats_kernel",
            "_bn_relu_fwd_kernel"} <= names
    for name, guard, devices in records:
        assert guard is not None, f"{name} launched without the device guard"
        assert devices == {guard}, f"{name} launched under {guard} with tensors on {devices}"


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_fused_op_on_the_second_gpu():
    """A fused op on cuda:1 while cuda:0 is current: launched there, matches stock."""
    torch.cuda.set_device(0)
    torch.manual_seed(0)
    dev = torch.device("cuda", 1)
    x = channels_last(torch.randn(8, 64, 14, 14, device=dev)).requires_grad_()
    block = fastpreact.BNReLUConv1x1(64, 96).to(dev)
    stock = torch.nn.Sequential(copy.deepcopy(block.bn), torch.nn.ReLU(), copy.deepcopy(block.conv))
    y = block(x)
    y.square().sum().backward()
    x2 = x.detach().clone().requires_grad_()
    y2 = stock(x2)
    y2.square().sum().backward()
    torch.cuda.synchronize(dev)
    torch.testing.assert_close(y, y2, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(x.grad, x2.grad, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(block.bn.running_mean, stock[0].running_mean)
    assert torch.cuda.current_device() == 0


# ------------------------------------------------------------------------------------------ tickets
def test_tickets_for_a_capture_come_from_spares_made_before_it(monkeypatch):
    """A stream first seen while capturing takes a buffer zeroed before the capture; nothing is
    allocated or filled inside it; a buffer a graph may hold is never replaced."""
    from fastpreact.kernels import tickets as tk
    monkeypatch.setattr(tk, "_BUFFERS", {})
    monkeypatch.setattr(tk, "_SPARE", {})
    monkeypatch.setattr(tk, "_RETIRED", [])
    dev = torch.device("cuda", 0)
    stream, capturing, made = [1], [False], []
    monkeypatch.setattr(tk, "_stream_of", lambda device: stream[0])
    monkeypatch.setattr(tk, "_capturing", lambda device: capturing[0])

    def zeros(device, size):
        assert not capturing[0], "a ticket buffer was allocated inside a capture"
        made.append(torch.zeros(size, dtype=torch.int32))
        return made[-1]
    monkeypatch.setattr(tk, "_zeros", zeros)
    eager = tk.tickets(dev, 10)                   # first use: the stream's buffer and the device's spares
    assert len(made) == 1 + tk.SPARES and tk.tickets(dev, 10) is eager
    stream[0], capturing[0] = 2, True              # torch.cuda.graph's capture stream
    captured = tk.tickets(dev, 10)
    assert captured is not eager and any(captured is m for m in made) and not captured.any()
    assert tk.tickets(dev, 10) is captured
    with pytest.raises(RuntimeError, match="needs more tickets than its buffer holds"):
        tk.tickets(dev, tk.SLOTS + 1)
    stream[0], capturing[0] = 1, False             # eager again: growing replaces, but keeps, the old one
    bigger = tk.tickets(dev, tk.SLOTS + 1)
    assert bigger.numel() > tk.SLOTS and any(eager is r for r in tk._RETIRED)


# ------------------------------------------------------------------------------------------ bf16
def test_bf16_through_the_interpreter_matches_the_float64_oracle():
    """bf16 products in the interpreter (which multiplies bf16 bit patterns in tl.dot) are widened first:
    the fused op's output and gradients in bf16 stay within 2x stock bf16's error."""
    torch.manual_seed(0)
    x64 = torch.randn(3, 40, 7, 5, dtype=torch.float64)
    w64 = torch.randn(24, 40, 1, 1, dtype=torch.float64) * 0.2
    dy = torch.randn(3, 24, 4, 3, dtype=torch.float64)
    results = {}
    for name, dtype in (("fused", torch.bfloat16), ("stock", torch.bfloat16), ("ref", torch.float64)):
        x = channels_last(x64.to(dtype)).requires_grad_()
        w = w64.to(dtype if name == "stock" else torch.float32 if name == "fused" else dtype).requires_grad_()
        bn = torch.nn.BatchNorm2d(40).to(torch.float64 if name == "ref" else torch.float32)
        if name == "fused":
            y = Fp.bn_relu_conv1x1(x, w, stride=2, **Fp.bn_args(bn))
        else:
            a = F.relu(F.batch_norm(x.to(bn.weight.dtype), None, None, bn.weight, bn.bias, True)).to(dtype)
            y = F.conv2d(a, w, stride=2)
        y.backward(dy.to(y.dtype))
        results[name] = (y.detach(), x.grad, w.grad)
    for i, what in enumerate(("y", "dx", "dW")):
        assert_oracle(results["fused"][i].double(), results["stock"][i].double(), results["ref"][i], what,
                      atol_rel=1e-2)


# ------------------------------------------------------------------------------------------ tuning table
def test_tuning_table_pins_saves_and_loads(tmp_path):
    from fastpreact.kernels import tuning
    saved = tuning.table()
    try:
        tuning.clear()
        tuning.pin({"format": 1, "cards": {"sm_90": {"bn_relu_conv1x1_fwd": {"M=64,K=32,N=32,dtype=bfloat16":
                                                                               "64x64x64-w4-s3-g8"}}}})
        path = tmp_path / "tuning.json"
        tuning.save(path)
        assert json.loads(path.read_text())["cards"]["sm_90"]["bn_relu_conv1x1_fwd"]
        tuning.clear()
        tuning.load(path)
        assert tuning.table()["cards"]["sm_90"]["bn_relu_conv1x1_fwd"]["M=64,K=32,N=32,dtype=bfloat16"] == \
            "64x64x64-w4-s3-g8"
        path.write_text("{not json")
        with pytest.raises(ValueError, match="not valid JSON"):
            tuning.load(path)
        path.write_text(json.dumps({"cards": {}}))
        with pytest.raises(ValueError, match="not a fastpreact tuning table"):
            tuning.load(path)
    finally:
        tuning.clear()
        tuning.pin(saved)


@requires_interpreter
def test_ranks_take_rank0s_tiles(monkeypatch):
    """Under coordinate(), rank 0 times the candidates and publishes its choice; another rank waits
    for it and launches the same tile without timing anything."""
    from torch.distributed import HashStore

    from fastpreact.kernels import tuning
    store = HashStore()
    x = channels_last(torch.randn(4, 24, 5, 5))
    w = torch.randn(40, 24, 1, 1)
    with autotuning(monkeypatch) as tuned:
        with tuning.coordinate(store, rank=0):
            Fp.bn_relu_conv1x1(x, w, **Fp.bn_args(torch.nn.BatchNorm2d(24)))
        rank0 = tuning.table()["cards"]["interpreter"]
        timed = tuned.timed
        assert timed > 0
        tuning.clear()
        with tuning.coordinate(store, rank=1, timeout_s=5):
            Fp.bn_relu_conv1x1(x, w, **Fp.bn_args(torch.nn.BatchNorm2d(24)))
        assert tuned.timed == timed, "rank 1 timed candidates itself"
        assert tuning.table()["cards"]["interpreter"] == rank0
        tuning.clear()
        with tuning.coordinate(HashStore(), rank=1, timeout_s=0.2):
            with pytest.raises(RuntimeError, match="rank 0 did not publish its tile"):
                Fp.bn_relu_conv1x1(x, w, **Fp.bn_args(torch.nn.BatchNorm2d(24)))
