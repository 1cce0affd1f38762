"""ImageNet loaders (torchvision/PIL and DALI on the CPU) on a tiny ImageFolder tree of random-size
JPEGs built in a tmp dir: layout errors, pre-scan of broken files, crop geometry, shapes, dtypes,
labels, normalisation, determinism, disjoint shards, exact resume, and agreement between the loaders."""
import os
import random
import shutil
import warnings

import numpy as np
import pytest
import torch

from conftest import take_batches
from fastpreact.data import DataError, build_data
from fastpreact.data import imagefolder
from fastpreact.data.imagenet import IMAGENET_MEAN, IMAGENET_STD, dali_available

CLASSES = ["n01", "n02", "n03"]
TRAIN_PER_CLASS, VAL_PER_CLASS = 12, 3
needs_dali = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
LOADERS = ["torchvision", pytest.param("dali", marks=needs_dali)]
pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning")


def _jpeg(path, rs, label):
    from PIL import Image
    w, h = int(rs.randint(40, 110)), int(rs.randint(40, 110))
    # Smooth images (a per-class colour plus a gentle gradient) so resamplers agree closely.
    base = np.array([60 + 80 * label, 200 - 60 * label, 90 + 40 * label], dtype=np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = base + 15 * np.sin(xx / w * 3.1)[..., None] + 10 * np.cos(yy / h * 2.3)[..., None]
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path, quality=95)


def _make_tree(root, with_bad=False):
    rs = np.random.RandomState(0)
    for split, n in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for label, c in enumerate(CLASSES):
            os.makedirs(os.path.join(root, split, c))
            for i in range(n):
                _jpeg(os.path.join(root, split, c, f"{c}_{i}.JPEG"), rs, label)
    if with_bad:
        good = os.path.join(root, "train", "n01", "n01_0.JPEG")
        raw = open(good, "rb").read()
        with open(os.path.join(root, "train", "n02", "truncated.JPEG"), "wb") as f:
            f.write(raw[: len(raw) // 2])  # no EOI: the pre-scan catches it
        damaged = bytearray(raw)
        dht = damaged.find(b"\xff\xc4")
        damaged[dht + 5:dht + 40] = b"\xff" * 35  # broken Huffman table, SOI/SOF/EOI intact
        with open(os.path.join(root, "train", "n03", "damaged.JPEG"), "wb") as f:
            f.write(bytes(damaged))  # passes the pre-scan, fails to decode
        with open(os.path.join(root, "train", "n03", "notes.txt"), "w") as f:
            f.write("ignored: not an image extension")
    return root


@pytest.fixture(autouse=True, scope="module")
def scan_cache_in_tmp(tmp_path_factory):
    # Keep the pre-scan cache out of the user's ~/.cache.
    old = os.environ.get("FASTPREACT_CACHE")
    os.environ["FASTPREACT_CACHE"] = str(tmp_path_factory.mktemp("scan_cache"))
    yield
    if old is None:
        del os.environ["FASTPREACT_CACHE"]
    else:
        os.environ["FASTPREACT_CACHE"] = old


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return _make_tree(str(tmp_path_factory.mktemp("imagenet")))


@pytest.fixture(scope="module")
def bad_tree(tmp_path_factory):
    return _make_tree(str(tmp_path_factory.mktemp("imagenet_bad")), with_bad=True)


def _build(root, loader, **kw):
    args = dict(data_dir=root, batch_size=4, device="cpu", loader=loader, workers=0)
    args.update(kw)
    return build_data("imagenet", **args)


def test_layout_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        _build(str(tmp_path / "nope"), "torchvision")
    root = tmp_path / "t"
    (root / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="val is missing"):
        _build(str(root), "torchvision")
    (root / "val" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no images"):
        _build(str(root), "torchvision")
    shutil.copy(__file__, root / "train" / "a" / "x.txt")
    _jpeg(str(root / "train" / "a" / "1.jpg"), np.random.RandomState(1), 0)
    _jpeg(str(root / "val" / "a" / "1.jpg"), np.random.RandomState(1), 0)
    (root / "val" / "b").mkdir()
    _jpeg(str(root / "val" / "b" / "1.jpg"), np.random.RandomState(1), 0)
    with pytest.raises(DataError, match="different classes.*only in val: \\['b'\\]"):
        _build(str(root), "torchvision")
    with pytest.raises(DataError, match="only fetches CIFAR"):
        _build(str(root), "torchvision", download=True)
    with pytest.raises(DataError, match="imagenet needs a data directory"):
        build_data("imagenet", batch_size=4, device="cpu")


def test_windows_stay_inside_the_image_and_flip_half_the_time():
    rng = random.Random(0)
    flips = []
    for _ in range(3000):
        w, h = rng.randint(20, 600), rng.randint(20, 600)
        for aug in ("inception", "scale"):
            (x, y, cw, ch), flip = imagefolder.train_sample_params(rng, w, h, aug, 224)
            assert 0 <= x and 0 <= y and 0 < cw and 0 < ch and x + cw <= w and y + ch <= h
            if aug == "inception":
                area = cw * ch / (w * h)
                assert area <= 1.0 and (area >= 0.07 or cw == w or ch == h)  # fallback uses the image
            else:
                assert cw == ch
            flips.append(flip)
    assert abs(np.mean(flips) - 0.5) < 0.03
    assert imagefolder.centre_window(400, 300, 224) == (69, 19, 262, 262)
    assert imagefolder.centre_window(500, 320, 320) == (90, 0, 320, 320)


@pytest.mark.parametrize("loader", LOADERS)
def test_train_and_val_batches(tree, loader):
    b = _build(tree, loader, seed=1, dtype=torch.float16, val_batch_size=5)
    assert b.loader == loader and b.num_classes == 3 and b.image_size == 224
    assert (b.train_size, b.val_size) == (3 * TRAIN_PER_CLASS, 3 * VAL_PER_CLASS)
    assert len(b.train) == 3 * TRAIN_PER_CLASS // 4
    batches = take_batches(b.train)
    assert len(batches) == len(b.train) and b.train.epoch == 1 and b.train.position == 0
    seen = torch.cat([y for _, y in batches])
    assert sorted(seen.tolist()) == sorted([i for i in range(3) for _ in range(TRAIN_PER_CLASS)])
    for x, y in batches:
        assert x.shape == (4, 3, 224, 224) and x.dtype == torch.float16 and y.dtype == torch.int64
        assert x.is_contiguous(memory_format=torch.channels_last)
    # Normalisation: undo it and the pixels are on the 0..255 scale, and each image holds its class's
    # colour (the fixture's per-class base colour, +-25).
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for x, y in batches[:2]:
        pixels = x.float() * std + mean
        assert pixels.min() > -2 and pixels.max() < 257
        red = pixels[:, 0].mean((1, 2))
        expect = 60 + 80 * y.float()
        assert (red - expect).abs().max() < 30
    val = take_batches(b.val)
    assert [x.shape[0] for x, _ in val] == [5, 4] and val[0][0].shape[-1] == 224
    assert torch.cat([y for _, y in val]).tolist() == [i for i in range(3) for _ in range(VAL_PER_CLASS)]
    wide = _build(tree, loader, val_crop=320, val_batch_size=9)
    x, _ = next(iter(wide.val))
    assert x.shape == (9, 3, 320, 320) and x.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("loader", LOADERS)
def test_determinism_and_exact_resume(tree, loader):
    mk = lambda seed=3: _build(tree, loader, seed=seed, aug="scale").train  # noqa: E731
    reference = take_batches(mk())
    again = take_batches(mk())
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(reference, again))
    other = take_batches(mk(seed=4))
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(reference, other))
    first = mk()
    head = take_batches(first, 3)
    resumed = mk()
    resumed.load_state_dict(first.state_dict())
    tail = take_batches(resumed)
    for a, b in zip(head + tail, reference):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert len(head + tail) == len(reference)


@pytest.mark.parametrize("loader", LOADERS)
def test_resume_takes_the_checkpoints_seed(tree, loader):
    reference = take_batches(_build(tree, loader, seed=3).train, 3)
    other = _build(tree, loader, seed=4).train
    take_batches(other, 1)  # its own first epoch started under seed 4
    state = _build(tree, loader, seed=3).train.state_dict()
    other.load_state_dict({**state, "epoch": 0, "position": 0})
    assert other.seed == 3 and other.plan.seed == 3
    for a, b in zip(take_batches(other, 3), reference):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("loader", LOADERS)
def test_disjoint_shards_and_val_counts(tree, loader):
    val_count = 0
    plans = []
    for rank in range(2):
        b = _build(tree, loader, rank=rank, world_size=2, val_batch_size=2)
        plans.append(b.train.plan)
        val_count += sum(y.numel() for _, y in b.val)
    assert val_count == 3 * VAL_PER_CLASS
    files = [set(p for i in range(plan.num_batches) for p, *_ in plan.batch(0, i)) for plan in plans]
    assert not files[0] & files[1] and len(files[0]) == len(files[1]) == 3 * TRAIN_PER_CLASS // 2 // 4 * 4


@needs_dali
def test_dali_and_torchvision_agree(tree):
    for aug in ("inception", "scale"):
        d = take_batches(_build(tree, "dali", seed=5, aug=aug).train, 2)
        t = take_batches(_build(tree, "torchvision", seed=5, aug=aug).train, 2)
        for (xd, yd), (xt, yt) in zip(d, t):
            assert torch.equal(yd, yt)
            # Same windows and flips; the resamplers differ slightly (and JPEG decoders by a level).
            assert (xd - xt).abs().mean() < 0.01 and (xd - xt).abs().max() < 0.1, aug


@pytest.mark.parametrize("loader", LOADERS)
def test_broken_files_are_skipped_and_named(bad_tree, loader):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # A seed whose first epoch uses damaged.JPEG (37 usable files, 9 batches of 4: one sits out).
        for seed in range(20):
            b = _build(bad_tree, loader, seed=seed)
            plan = b.train.plan
            planned = [p for i in range(plan.num_batches) for p, *_ in plan.batch(0, i)]
            if any("damaged.JPEG" in p for p in planned):
                break
        batches = take_batches(b.train)
    messages = [str(w.message) for w in caught]
    assert any("truncated.JPEG" in m and "end marker" in m for m in messages)
    assert b.train_size == 3 * TRAIN_PER_CLASS + 1  # damaged.JPEG passes the scan, truncated does not
    assert any("damaged.JPEG" in m and "undecodable" in m for m in messages)
    assert [p for p in b.train.skipped] == [os.path.join(bad_tree, "train", "n03", "damaged.JPEG")]
    assert len(batches) == len(b.train)  # the epoch completes: no traceback, no hang
    assert sorted(x.shape[0] for x, _ in batches) == [3] + [4] * (len(batches) - 1)
    labels = torch.cat([y for _, y in batches])
    assert labels.numel() == len(planned) - 1


def test_prescan_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTPREACT_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "scan"
    (root / "c").mkdir(parents=True)
    rs = np.random.RandomState(2)
    for i in range(3):
        _jpeg(str(root / "c" / f"{i}.jpg"), rs, 0)
    samples = [(str(root / "c" / f"{i}.jpg"), 0) for i in range(3)]
    good, skipped = imagefolder.prescan(samples, 2)
    assert len(good) == 3 and not skipped and os.listdir(tmp_path / "cache")
    calls = []
    monkeypatch.setattr(imagefolder, "image_size", lambda p: calls.append(p) or (1, 1))
    assert imagefolder.prescan(samples, 2)[0] == good and not calls  # served from the cache
    with open(root / "c" / "3.jpg", "wb") as f:
        f.write(b"\xff\xd8 truncated")  # a new file changes the folder's mtime
    os.utime(root / "c", ns=(1, 1))  # make the change visible even on coarse-mtime file systems
    monkeypatch.undo()
    monkeypatch.setenv("FASTPREACT_CACHE", str(tmp_path / "cache"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        good, skipped = imagefolder.prescan(samples + [(str(root / "c" / "3.jpg"), 0)], 2)
    assert any("3.jpg" in str(w.message) for w in caught)
    assert len(good) == 3 and [p for p, _ in skipped] == [str(root / "c" / "3.jpg")]
