"""The fused ops under dynamo, torch.compile and fake tensors (the Triton path, through the interpreter).

- dynamo traces every fused unit type, the dual op, the BN-ReLU ops and fuse()'d models in one graph
  (no graph break), with the fastpreact operators in it (so the Triton path was traced, not a fallback);
- the compiled training step (aot_eager, inductor) equals the eager one: outputs, gradients, running
  statistics and num_batches_tracked;
- the operators pass torch.library.opcheck (schema and declared mutations, fake implementation against
  the real one, autograd registration);
- a whole fused ResNet-200 training step runs on fake tensors (nothing launched).
"""
import collections
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastpreact
from fastpreact import functional as Fp
from fastpreact import fused_chains
from fastpreact.models import create_model
from conftest import channels_last

pytestmark = pytest.mark.skipif(Fp.backend("cpu") != "triton",
                                reason="needs the Triton backend on the CPU (TRITON_INTERPRET=1)")

IMAGENET_TINY = dict(layers=(1, 1, 1, 1), widths=(4, 8, 8, 8), family="imagenet")
NETS = {
    # name: (arch, create_model keywords, input size)
    "preact bottleneck": ("resnet11", dict(unit="preact", widths=(4, 8, 8)), 8),
    "preact basic": ("resnet8", dict(unit="preact", widths=(4, 8, 8)), 8),
    "original bottleneck": ("resnet11", dict(unit="original", widths=(4, 8, 8)), 8),
    "original basic": ("resnet8", dict(unit="original", widths=(4, 8, 8)), 8),
    "imagenet preact bottleneck": ("resnet14", dict(IMAGENET_TINY, block="bottleneck"), 32),
    "imagenet preact basic": ("resnet10", dict(IMAGENET_TINY, block="basic"), 32),
    "imagenet original bottleneck": ("resnet14", dict(IMAGENET_TINY, block="bottleneck", unit="original"), 32),
    "imagenet original basic": ("resnet10", dict(IMAGENET_TINY, block="basic", unit="original"), 32),
}


def small_net(name, seed=0):
    arch, kw, size = NETS[name]
    torch.manual_seed(seed)
    model = create_model(arch, 10, kernels="fused", **kw).to(memory_format=torch.channels_last)
    return model, channels_last(torch.randn(2, 3, size, size))


def one_graph(fn, *args):
    """The fastpreact operators in dynamo's graph of fn(*args) ({name: calls}, autograd.Function bodies
    included), asserting that it is one graph, without a break."""
    torch._dynamo.reset()
    ex = torch._dynamo.explain(fn)(*args)
    assert ex.graph_break_count == 0, [str(r) for r in ex.break_reasons]
    assert ex.graph_count == 1
    names = [str(node.target).split(".")[1] for gm in ex.graphs[0].modules() if isinstance(gm, torch.fx.GraphModule)
             for node in gm.graph.nodes if node.op == "call_function" and str(node.target).startswith("fastpreact.")]
    return collections.Counter(names)


# ---------------------------------------------------------------------------------------------------
# No graph break
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(NETS))
def test_fused_units_trace_without_graph_break(name):
    model, x = small_net(name)
    ops = {"preact bottleneck": "bn_relu_conv1x1", "original bottleneck": "bn_relu_conv1x1",
           "imagenet original bottleneck": "bn_relu_conv1x1", "imagenet preact bottleneck": "bn_relu_conv1x1"}
    for train in (True, False):
        model.train(train)
        graph = one_graph(model, x)
        assert ("bn_stats_update" in graph) == train
        if name in ops:
            assert ops[name] in graph
        if "preact basic" in name:
            assert "bn_relu" in graph


def test_dual_op_traces_without_graph_break():
    torch.manual_seed(0)
    x = channels_last(torch.randn(2, 8, 6, 6))
    w_a, w_b = torch.randn(4, 8, 1, 1, requires_grad=True), torch.randn(16, 8, 1, 1, requires_grad=True)
    bn = nn.BatchNorm2d(8)

    def dual(x, stride_b):
        (y_a, (mean, var, _, _)), y_b = Fp.bn_relu_conv1x1_dual(
            x, w_a, w_b, **Fp.bn_args(bn), stride_a=1, stride_b=stride_b, output_stats_a=True)
        return y_a.sum() + y_b.sum() + mean.sum() + var.sum()

    assert one_graph(dual, x, 1)["bn_relu_conv1x1"] == 1
    assert one_graph(dual, x, 2)["bn_relu_conv1x1"] == 2


def test_bn_relu_ops_trace_without_graph_break():
    torch.manual_seed(0)
    x = channels_last(torch.randn(2, 8, 6, 6))
    bn, conv, pool = nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3, padding=1, bias=False), nn.MaxPool2d(3, 2, 1)

    def f(x):
        mean, var, _, _ = Fp.batch_stats(x)
        return (Fp.bn_relu(x, bn).sum() + Fp.bn_relu_conv2d(x, bn, conv).sum()
                + Fp.bn_relu_max_pool2d(x, bn, pool).sum() + mean.sum() + var.sum())

    graph = one_graph(f, x)
    for op in ("batch_stats", "bn_stats_update", "bn_relu", "bn_relu_backward"):
        assert op in graph
    bn.eval()
    assert "bn_finish" in one_graph(f, x)


def _fused(model):
    fused = fastpreact.fuse(model)
    assert sum(fused_chains(fused).values()) > 0
    return fused


def test_fused_sequential_traces_without_graph_break():
    seq = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 1, bias=False))
    assert "bn_relu_conv1x1" in one_graph(_fused(seq), torch.randn(2, 8, 4, 4))


def test_fused_torchvision_bottleneck_traces_without_graph_break():
    tvr = pytest.importorskip("torchvision.models.resnet")
    torch.manual_seed(0)
    projection = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
    model = nn.Sequential(tvr.Bottleneck(16, 4), tvr.Bottleneck(16, 8, stride=2, downsample=projection))
    graph = one_graph(_fused(model), channels_last(torch.randn(2, 16, 8, 8)))
    assert "bn_relu_conv1x1" in graph


def test_fused_timm_batchnormact_traces_without_graph_break():
    timm = pytest.importorskip("timm")
    from timm.models.resnetv2 import ResNetV2
    torch.manual_seed(0)
    model = ResNetV2(layers=(1, 1), channels=(16, 32), stem_chs=8, num_classes=10,
                     conv_layer=timm.layers.create_conv2d, norm_layer=timm.layers.BatchNormAct2d)
    graph = one_graph(_fused(model), torch.randn(2, 3, 16, 16))
    assert "bn_relu_conv1x1" in graph


# ---------------------------------------------------------------------------------------------------
# Compiled against eager
# ---------------------------------------------------------------------------------------------------
def _train_step(model, x, step):
    """Outputs, gradients, buffers of one training step of model (model or its compiled step)."""
    for p in model.parameters():
        p.grad = None
    out = step(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return out.detach(), grads, {n: b.clone() for n, b in model.named_buffers()}


STEP_TOL, BUFFER_TOL = dict(rtol=1e-4, atol=1e-5), dict(rtol=1e-5, atol=1e-6)


def assert_same_step(got, want, tol=STEP_TOL, buffer_tol=BUFFER_TOL):
    """A compiled step's (output, gradients, buffers) (_train_step) against eager's."""
    torch.testing.assert_close(got[0], want[0], **tol)
    for n in want[1]:
        torch.testing.assert_close(got[1][n], want[1][n], **tol, msg=n)
    for n in want[2]:
        torch.testing.assert_close(got[2][n], want[2][n], **buffer_tol, msg=n)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_step_matches_eager(backend):
    torch._dynamo.reset()
    eager_model, x = small_net("preact bottleneck")
    compiled_model, _ = small_net("preact bottleneck")
    compiled = torch.compile(compiled_model, backend=backend, fullgraph=True)
    start = time.perf_counter()
    for _ in range(2):  # the second step runs on the running statistics the first one updated
        want = _train_step(eager_model, x, eager_model)
        got = _train_step(compiled_model, x, compiled)
        assert got[1].keys() == want[1].keys() and got[2].keys() == want[2].keys()
        assert_same_step(got, want)
    assert got[2]["stages.0.0.norm1.num_batches_tracked"].item() == 2
    eager_model.eval(), compiled_model.eval()
    torch.testing.assert_close(compiled(x), eager_model(x), rtol=1e-4, atol=1e-5)
    print(f"{backend}: compile and 2 steps + eval {time.perf_counter() - start:.1f} s")


# ---------------------------------------------------------------------------------------------------
# The kernels in compiled graphs: each operator decomposed into its launches (functional/library.py)
# ---------------------------------------------------------------------------------------------------
class RecordingBackend:
    """aot_eager (the graphs run node by node, Triton's interpreter running the kernels), keeping the
    forward and backward graphs AOTAutograd hands its compilers."""

    def __init__(self):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd
        self.graphs = []

        def keep(gm, _):
            self.graphs.append(gm)
            return make_boxed_func(gm.forward)
        self.backend = aot_autograd(fw_compiler=keep, bw_compiler=keep)

    def __call__(self, gm, inputs):
        return self.backend(gm, inputs)

    def nodes(self):
        return [n for gm in self.graphs for n in gm.graph.nodes if n.op == "call_function"]

    def operators(self):
        """{fastpreact operator: nodes}; one that mutates its arguments is an auto_functionalized node."""
        ops = [n.args[0] if "auto_functionalized" in str(n.target) else n.target for n in self.nodes()]
        return collections.Counter(str(op).split(".")[1] for op in ops if str(op).startswith("fastpreact."))

    def kernels(self):
        """[(kernel name, the arguments the functional graph copies because the kernel writes them)]."""
        from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
        out = []
        for n in self.nodes():
            if "triton_kernel_wrapper" in str(n.target):
                kernel = kernel_side_table.get_kernel(n.kwargs["kernel_idx"])
                out.append((kernel.fn.__name__, set(n.kwargs.get("tensors_to_clone", ()))))
        return out


def _steps_match(name, backend, steps=2, dynamic=None, amp=None):
    """Two training steps and an eval forward of small_net(name), compiled with `backend` and eager."""
    torch._dynamo.reset()
    eager_model, x = small_net(name)
    compiled_model, _ = small_net(name)
    compiled = torch.compile(compiled_model, backend=backend, fullgraph=True, dynamic=dynamic)
    tol = STEP_TOL if amp is None else dict(rtol=2e-2, atol=2e-2)
    for _ in range(steps):  # later steps run on the running statistics the first one updated
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            want = _train_step(eager_model, x, eager_model)
            got = _train_step(compiled_model, x, compiled)
        assert_same_step(got, want, tol, tol)
    eager_model.eval(), compiled_model.eval()
    torch.testing.assert_close(compiled(x), eager_model(x), **tol)


# Arguments no kernel writes: a graph that copies one of them has lost torch's analysis of the kernel
# (which falls back to "every argument is written", wrong where one tensor is passed for two arguments).
READ_ONLY = {"x_ptr", "w_ptr", "gamma_ptr", "beta_ptr", "dy_ptr", "dy2_ptr", "res_ptr", "bias_ptr"}


@pytest.mark.parametrize("name", ["preact bottleneck", "imagenet original bottleneck", "preact basic"])
def test_compiled_graphs_hold_the_kernels_and_match_eager(name):
    """Under FunctionalTensorMode (AOTAutograd) the operators decompose into wrap_triton launches: the
    forward and backward graphs name the Triton kernels, keep no fastpreact operator, copy only what a
    kernel writes, and run (aot_eager) to eager's outputs, gradients and buffers."""
    rec = RecordingBackend()
    with Fp.trace_kernels_on_cpu():
        _steps_match(name, rec)
    assert not rec.operators(), rec.operators()
    kernels = rec.kernels()
    names = {k for k, _ in kernels}
    want = {"_batch_stats_kernel"}
    if "bottleneck" in name:
        want |= {"_bn_relu_conv1x1_fwd_kernel", "_bn_relu_conv1x1_bwd_reduce_kernel",
                 "_bn_relu_conv1x1_bwd_dgrad_kernel"}
    else:
        want |= {"_bn_relu_fwd_kernel", "_bn_relu_bwd_reduce_kernel", "_bn_relu_bwd_dx_kernel"}
    assert want <= names, names
    for kernel, written in kernels:
        assert written and not written & READ_ONLY, (kernel, written)


def _inductor_source(kernel) -> str:
    """The module inductor's generated code defines for a user kernel: triton's imports and the kernel's
    transitive closure (its helpers and the globals it reads), as inductor's Python wrapper emits it."""
    from torch._inductor.codegen import wrapper
    closure = wrapper.user_defined_triton_kernel_transitive_closure_source_code
    try:
        body = closure(kernel, None)
    except TypeError:  # torch 2.11: no epilogue fusion argument
        body = closure(kernel)
    return "import triton\nimport triton.language as tl\n\n@triton.jit\n" + body


@pytest.mark.parametrize("passes", [2, 3])
def test_the_source_inductor_emits_for_each_kernel_is_complete(passes, monkeypatch, tmp_path):
    """Inductor does not call the kernel objects: it re-emits each kernel's source with its helpers and
    globals into its generated module and compiles that. Here that source, for every kernel a compiled
    training step and eval forward name (the fused backward in two and in three passes), is loaded as a
    module of its own (the interpreter runs it) and replaces the kernel in torch's kernel table: the
    compiled runs still match eager, so no helper, constant or import is missing from what inductor would
    compile."""
    import importlib.util
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from triton.runtime.autotuner import Autotuner
    from fastpreact.kernels import tracing
    from fastpreact.kernels.bn_relu_conv1x1 import backward
    monkeypatch.setattr(backward, "FORCED_PASSES", passes)
    rec = RecordingBackend()
    torch._dynamo.reset()
    eager_model, x = small_net("imagenet original bottleneck")
    compiled_model, _ = small_net("imagenet original bottleneck")
    compiled = torch.compile(compiled_model, backend=rec, fullgraph=True)

    def both_ways():
        eager_model.train(), compiled_model.train()
        want, got = _train_step(eager_model, x, eager_model), _train_step(compiled_model, x, compiled)
        assert_same_step(got, want)
        eager_model.eval(), compiled_model.eval()
        torch.testing.assert_close(compiled(x), eager_model(x), rtol=1e-4, atol=1e-5)

    with Fp.trace_kernels_on_cpu():
        both_ways()
        names = set()
        for idx in sorted({n.kwargs["kernel_idx"] for n in rec.nodes() if "triton_kernel_wrapper" in str(n.target)}):
            # torch hands a launch with num_warps/num_stages on as a one-config Autotuner around the
            # kernel; inductor emits the source of the kernel inside
            outer = kernel_side_table.get_kernel(idx)
            kernel = outer.fn if isinstance(outer, Autotuner) else outer
            name = kernel.fn.__name__
            names.add(name)
            path = tmp_path / f"emitted_{idx}_{name}.py"
            path.write_text(_inductor_source(kernel))
            spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            emitted = tracing.traceable_kernel(getattr(module, name))
            assert emitted.fn is not kernel.fn
            if outer is kernel:
                monkeypatch.setitem(kernel_side_table.id_to_kernel, idx, emitted)
            else:
                monkeypatch.setattr(outer, "fn", emitted)
        both_ways()
    want = {"_batch_stats_kernel", "_bn_finalize_kernel", "_bn_relu_fwd_kernel", "_bn_relu_conv1x1_fwd_kernel"}
    want |= ({"_bn_relu_conv1x1_bwd_dz_kernel", "_bn_relu_conv1x1_bwd_dx_kernel"} if passes == 3 else
             {"_bn_relu_conv1x1_bwd_reduce_kernel", "_bn_relu_conv1x1_bwd_dgrad_kernel"})
    assert want <= names, names


def test_fused_torchvision_blocks_compile_into_their_kernels():
    """fuse() on torchvision bottlenecks (post-activation: the fused ops behind nn modules, a strided
    projection): the compiled training step holds the kernels, no operator, and matches eager."""
    tvr = pytest.importorskip("torchvision.models.resnet")

    def blocks():
        torch.manual_seed(0)
        projection = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
        model = nn.Sequential(tvr.Bottleneck(16, 4), tvr.Bottleneck(16, 8, stride=2, downsample=projection))
        return _fused(model).to(memory_format=torch.channels_last)

    torch._dynamo.reset()
    eager_model, compiled_model = blocks(), blocks()
    x = channels_last(torch.randn(2, 16, 8, 8))
    rec = RecordingBackend()
    compiled = torch.compile(compiled_model, backend=rec, fullgraph=True)
    with Fp.trace_kernels_on_cpu():
        want, got = _train_step(eager_model, x, eager_model), _train_step(compiled_model, x, compiled)
    assert rec.kernels() and not rec.operators(), rec.operators()
    assert_same_step(got, want)


def test_compiled_graphs_hold_the_kernels_under_autocast():
    rec = RecordingBackend()
    with Fp.trace_kernels_on_cpu():
        _steps_match("preact bottleneck", rec, amp=torch.float16)
    assert not rec.operators() and rec.kernels()


def test_operators_stay_opaque_where_they_cannot_decompose(monkeypatch):
    """CPU tensors by default (inductor cannot lower Triton for the CPU), symbolic sizes (a launch plan is
    keyed by concrete sizes) and FASTPREACT_COMPILE_KERNELS=0: one operator node each, still matching
    eager."""
    from fastpreact.functional import library
    rec = RecordingBackend()
    _steps_match("preact bottleneck", rec, steps=1)
    assert rec.operators()["bn_relu_conv1x1"] > 0 and not rec.kernels()
    rec = RecordingBackend()
    with Fp.trace_kernels_on_cpu():
        _steps_match("preact bottleneck", rec, steps=1, dynamic=True)
    assert rec.operators()["bn_relu_conv1x1"] > 0 and not rec.kernels()
    monkeypatch.setattr(library, "COMPILE_KERNELS", False)
    rec = RecordingBackend()
    with Fp.trace_kernels_on_cpu():
        _steps_match("preact bottleneck", rec, steps=1)
    assert rec.operators()["bn_relu_conv1x1"] > 0 and not rec.kernels()


def test_traced_launches_tune_their_tiles_on_stand_ins(monkeypatch):
    """A compiled graph's tiles: the tracer has only fake tensors, so each tuned kernel is timed on real
    stand-ins of their sizes (as on a GPU) and the winner (the last candidate here, not the default)
    enters the table, which the eager run then reuses without timing. The timing never touches the
    model (its running statistics are updated once, as eager's), and the step matches eager, every grid
    run in a shuffled program order."""
    from gpu_emulation import autotuning, shuffled_grid
    from fastpreact.kernels import tuning
    torch._dynamo.reset()
    compiled_model, x = small_net("preact bottleneck")
    eager_model, _ = small_net("preact bottleneck")
    rec = RecordingBackend()
    with autotuning(monkeypatch) as state, Fp.trace_kernels_on_cpu(), shuffled_grid(1):
        compiled = torch.compile(compiled_model, backend=rec, fullgraph=True)
        got = _train_step(compiled_model, x, compiled)  # traced first: every tile is tuned while tracing
        timed = state.timed
        tuned = {kernel for choices in tuning.table()["cards"].values() for kernel in choices}
        want = _train_step(eager_model, x, eager_model)
        assert state.timed == timed  # the eager step found every shape's tile in the table
    assert timed > 0 and {"bn_relu_conv1x1_fwd", "bn_relu_conv1x1_bwd_reduce", "bn_relu_conv1x1_bwd_dgrad"} <= tuned
    assert rec.kernels() and not rec.operators()
    assert_same_step(got, want)
    assert got[2]["stages.0.0.norm1.num_batches_tracked"].item() == 1


# ---------------------------------------------------------------------------------------------------
# The operators' registrations; fake tensors
# ---------------------------------------------------------------------------------------------------
def _vec(c, lo=0.5):
    return (torch.rand(c) + lo).requires_grad_()


def opcheck_cases():
    torch.manual_seed(0)
    x = channels_last(torch.randn(2, 8, 5, 5) + 1)
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    rstd = torch.rsqrt(var + 1e-5)
    g, b = _vec(8), _vec(8, -0.5)
    xg = x.clone().requires_grad_()
    w = torch.randn(12, 8, 1, 1, requires_grad=True)
    res = channels_last(torch.randn(2, 12, 3, 3)).requires_grad_()
    bias = torch.randn(12, requires_grad=True)
    dy = channels_last(torch.randn(2, 12, 5, 5))
    ops = torch.ops.fastpreact
    no_bn = (None,) * 5  # no next BatchNorm to finish
    return [
        (ops.bn_relu_conv1x1, (xg, w, g, b, mean, rstd, bias, res, 2, 0, True, True, *no_bn, None)),
        (ops.bn_relu_conv1x1, (xg, w, g, b, mean, rstd, None, None, 1, 0, False, False, *no_bn, None)),
        (ops.bn_relu_conv1x1, (xg, w, g, b, mean, rstd, None, None, 1, 4, True, True, *no_bn, None)),
        # finishing the next BatchNorm: its running statistics and counter are mutated arguments
        (ops.bn_relu_conv1x1, (xg, w, g, b, mean, rstd, None, res, 2, 0, True, True, torch.zeros(12),
                               torch.ones(12), torch.tensor(3), 0.1, 1e-5, None)),
        (ops.bn_relu_conv1x1, (xg, w, g, b, mean, rstd, None, None, 1, 4, True, True, torch.zeros(4), torch.ones(4),
                               torch.tensor(3), None, 1e-5, None)),
        # an fp32 x normalised as it comes, the GEMM in fp16 (autocast's compute dtype)
        (ops.bn_relu_conv1x1, (xg, w, g, b, mean, rstd, None, res.detach().half().requires_grad_(), 2, 0, True,
                               True, *no_bn, torch.float16)),
        (ops.bn_relu_conv1x1_backward, (dy, None, x, w.detach(), g.detach(), b.detach(), mean, rstd, 1, True,
                                        True, True, True, None)),
        (ops.bn_relu_conv1x1_backward, (dy[:, :4].contiguous(memory_format=torch.channels_last),
                                        channels_last(dy[:, 4:]), x, w.detach(), g.detach(), b.detach(), mean,
                                        rstd, 1, False, False, True, True, None)),
        # the identity shortcut's gradient, added in the dx pass
        (ops.bn_relu_conv1x1_backward, (dy, None, x, w.detach(), g.detach(), b.detach(), mean, rstd, 1, True,
                                        True, False, True, channels_last(torch.randn(2, 8, 5, 5)))),
        (ops.batch_stats, (x,)),
        (ops.bn_stats, (x, 1e-5)),
        (ops.bn_stats_update, (x, torch.zeros(8), torch.ones(8), torch.tensor(3), None, 1e-5)),
        (ops.bn_stats_update, (x, torch.zeros(8), torch.ones(8), None, 0.1, 1e-5)),
        (ops.bn_finish, (mean, var, 1e-5, 50)),
        (ops.bn_finish_update, (mean, var, torch.zeros(8), torch.ones(8), None, 0.1, 1e-5, 50)),
        (ops.bn_relu, (x, g.detach(), b.detach(), mean, rstd)),
        (ops.bn_relu_backward, (channels_last(torch.randn(2, 8, 5, 5)), x, g.detach(), b.detach(), mean, rstd,
                                True)),
    ]


@pytest.mark.parametrize("case", range(len(opcheck_cases())))
def test_operator_registrations(case):
    op, args = opcheck_cases()[case]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_fake_resnet200_step_launches_nothing(monkeypatch):
    """A whole fused ResNet-200 training step (forward, loss, backward, SGD) on fake tensors: shapes only,
    no kernel launched."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction

    def no_launch(*args, **kwargs):
        raise AssertionError("a Triton kernel was launched on fake tensors")
    monkeypatch.setattr(Autotuner, "run", no_launch)
    monkeypatch.setattr(InterpretedFunction, "run", no_launch)
    with FakeTensorMode():
        model = create_model("resnet200", 1000, kernels="fused")
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        x = channels_last(torch.randn(2, 3, 224, 224))
        loss = F.cross_entropy(model(x), torch.zeros(2, dtype=torch.long))
        loss.backward()
        opt.step()
        grads = [p.grad for p in model.parameters()]
    assert all(g is not None and g.shape == p.shape for g, p in zip(grads, model.parameters()))
    assert model.stages[3][2].norm1.num_batches_tracked.shape == ()
