"""Launch plans (kernels/tuning.py's Plan): each launcher works out sizes, grid and keywords once per shape
and flags; a caller may keep a launcher's plan and hand it back (plan=). These tests check that a kept
plan launches exactly what the launcher alone launches, that the channels-last tensors the bottleneck
node passes give the row matrices' results, and that the plans are forgotten with the tuning table (a
plan holds a tile).
"""
import pytest
import torch

from conftest import channels_last, requires_interpreter

pytestmark = [requires_interpreter, pytest.mark.usefixtures("poison_outputs")]


def _kernels():
    from fastpreact.kernels import batch_stats as ks, bn_relu as kb, bn_relu_conv1x1 as kc, tuning
    return kc, kb, ks, tuning


def _rows(t):
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def test_batch_stats_and_bn_relu_take_channels_last_tensors_as_their_rows():
    """The node passes [N, C, H, W] channels-last activations; the results are those of the [M, C] rows."""
    _, kb, ks, _ = _kernels()
    torch.manual_seed(0)
    x = channels_last(torch.randn(3, 13, 5, 7) * 2 + 1)
    da = channels_last(torch.randn(3, 13, 5, 7))
    g, b = torch.rand(13) + 0.5, torch.randn(13)
    mean, var = ks.batch_stats(_rows(x))
    mean4, var4 = ks.batch_stats(x)
    assert torch.equal(mean, mean4) and torch.equal(var, var4)
    rstd = (var + 1e-5).rsqrt()
    a = kb.bn_relu_fwd(x, g, b, mean, rstd)
    assert a.shape == x.shape and a.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(_rows(a), kb.bn_relu_fwd(_rows(x), g, b, mean, rstd))
    sums = kb.bn_relu_bwd_reduce(da, x, g, b, mean, rstd)
    assert torch.equal(sums, kb.bn_relu_bwd_reduce(_rows(da), _rows(x), g, b, mean, rstd))
    dx = kb.bn_relu_bwd_dx(da, x, g, b, mean, rstd, sums, True)
    assert torch.equal(_rows(dx), kb.bn_relu_bwd_dx(_rows(da), _rows(x), g, b, mean, rstd, sums, True))
    with pytest.raises(ValueError, match="channels-last contiguous"):
        kb.bn_relu_fwd(x.contiguous(), g, b, mean, rstd)
    with pytest.raises(ValueError, match="channels-last contiguous"):
        ks.batch_stats(x.contiguous())


@pytest.mark.parametrize("stride", [1, 2])
def test_a_kept_plan_launches_what_the_launcher_does(stride):
    """Forward with output statistics and a next BatchNorm to finish, then the two-pass backward with an
    added gradient: the same bits with the plans handed back as without them."""
    kc, _, _, _ = _kernels()
    torch.manual_seed(1)
    x = channels_last(torch.randn(2, 12, 7, 5))
    w = torch.randn(9, 12)
    m, r, g, b = torch.randn(12) * 0.1, torch.rand(12) + 0.5, torch.rand(12) + 0.5, torch.randn(12) * 0.1

    def next_bn():
        return dict(eps=1e-5, running_mean=torch.zeros(9), running_var=torch.ones(9),
                    num_batches_tracked=torch.zeros((), dtype=torch.long), momentum=0.1)

    outs = []
    for keep in (False, True):
        nb = next_bn()
        plan = kc.fwd_plan(x, w, stride=stride, output_stats=True, next_bn=nb) if keep else None
        y, stats = kc.bn_relu_conv1x1_fwd(x, w, m, r, g, b, stride=stride, output_stats=True, next_bn=nb, plan=plan)
        dy = channels_last(y.cos())
        add = channels_last(x.sin())
        bplan = kc.bwd_plan(x, dy, w, stride=stride, accumulate=True) if keep else None
        grads = kc.bn_relu_conv1x1_bwd(x, dy, w, m, r, g, b, stride=stride, add_grad=add, plan=bplan)
        outs.append([y, *stats, *grads, nb["running_mean"], nb["running_var"], nb["num_batches_tracked"]])
    for a, b_ in zip(*outs):
        assert torch.equal(a, b_)


def test_plans_are_forgotten_with_the_tuning_table():
    """clear() and pin() empty every launcher's plans and the bottleneck node's, since a plan holds a tile."""
    kc, kb, ks, tuning = _kernels()
    from fastpreact.kernels.bn_relu_conv1x1 import forward
    x = channels_last(torch.randn(2, 8, 4, 4))
    kc.bn_relu_conv1x1_fwd(x, torch.randn(8, 8), torch.zeros(8), torch.ones(8), torch.ones(8), torch.zeros(8))
    ks.batch_stats(x)
    assert forward._PLANS and ks._PLANS
    assert any(tuning._PLAN_CACHES)
    saved = tuning.table()
    tuning.clear()
    assert not any(tuning._PLAN_CACHES)
    kc.bn_relu_conv1x1_fwd(x, torch.randn(8, 8), torch.zeros(8), torch.ones(8), torch.ones(8), torch.zeros(8))
    assert forward._PLANS
    tuning.pin(saved)
    assert not any(tuning._PLAN_CACHES)
