"""The comparison oracles every test uses: results are judged against a float64 reference (ref64).

assert_close64   fp32 work: |ours - ref64| <= rtol * max(max|ref64|, 1), elementwise.
assert_oracle    low precision (or a chaotic fp32 net): relative to a stock implementation's own error at
                 the same precision (flash-attention's oracle),
                     |ours - ref64| <= 2 * |stock - ref64| + atol + atol_rel * max(max|ref64|, min_scale),
                 elementwise, or on the per-tensor maxima of the errors (elementwise=False).
Both fail on a non-finite value in ours (an unwritten, NaN-poisoned output) and on a shape mismatch.
"""
import torch


def _common(what, ours, ref64):
    assert ours is not None, f"{what}: missing (no gradient?)"
    assert ours.shape == ref64.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(ours).all(), f"{what}: non-finite values (unwritten output?)"
    return (ours.double() - ref64.double()).abs(), ref64.double().abs().max()


def assert_close64(what, ours, ref64, rtol=2e-5):
    """|ours - ref64| <= rtol * max(max|ref64|, 1), elementwise."""
    err, ref_max = _common(what, ours, ref64)
    scale = ref_max.clamp_min(1.0)
    bad = ~(err <= rtol * scale)
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {err.numel()} elements off; max err "
                           f"{err.max().item():.3g} (scale {scale.item():.3g}, rtol {rtol:g})")


def assert_oracle(ours, stock, ref64, what, atol_rel=0.0, elementwise=True, *, atol=0.0, min_scale=0.0):
    """|ours - ref64| <= 2 |stock - ref64| + atol + atol_rel * max(max|ref64|, min_scale)."""
    err, ref_max = _common(what, ours, ref64)
    assert stock.shape == ref64.shape, f"{what}: stock shape {tuple(stock.shape)} != {tuple(ref64.shape)}"
    err_stock = (stock.double() - ref64.double()).abs()
    if not elementwise:
        err, err_stock = err.max(), err_stock.max()
    tol = atol + atol_rel * max(ref_max.item(), min_scale)
    bound = 2 * err_stock + tol
    bad = ~(err <= bound)
    worst = (err - bound).argmax()
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} elements off; worst |ours - ref64| "
                           f"{err.flatten()[worst].item():.3g} > bound {bound.flatten()[worst].item():.3g} "
                           f"(max stock err {err_stock.max().item():.3g}, atol {tol:.3g})")


def load_weights(path):
    """A saved state_dict (final.pt, a rank's dump), on the CPU."""
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(a, b):
    """Two saved state_dicts are bit-identical: same keys, torch.equal tensors."""
    a, b = load_weights(a), load_weights(b)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"
