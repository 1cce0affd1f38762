"""CIFAR loaders on the device (CPU here): archive reading, normalisation, augmentation geometry,
determinism, disjoint shards and exact resume. Fixtures are tiny CIFAR-format pickles in tmp dirs."""
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import take_batches
from fastpreact.data import DATASETS, DataError, build_data, loader_throughput
from fastpreact.data.cifar import CIFAR_STATS
from fastpreact.data.ondevice import crop_flip_params

N_PER_BATCH, N_TEST = 24, 30


def _image(i):
    # Image i: channel c, row y, column x holds (i * 7 + c * 50 + y * 3 + x) % 256, so every image is
    # distinct and any mix-up of channels, rows, columns or images shows.
    c, y, x = np.meshgrid(np.arange(3), np.arange(32), np.arange(32), indexing="ij")
    return ((i * 7 + c * 50 + y * 3 + x) % 256).astype(np.uint8)  # CHW


def _write_cifar(root, dataset="cifar10"):
    if dataset == "cifar10":
        folder, members, key, classes = "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + [
            "test_batch"], b"labels", 10
    else:
        folder, members, key, classes = "cifar-100-python", ["train", "test"], b"fine_labels", 100
    os.makedirs(os.path.join(root, folder), exist_ok=True)
    start = 0
    for m in members:
        n = N_TEST if "test" in m else (N_PER_BATCH * (5 if dataset == "cifar100" else 1))
        idx = np.arange(start, start + n)
        start += n
        entry = {b"data": np.stack([_image(i).reshape(-1) for i in idx]),
                 key: [int(i % classes) for i in idx]}
        with open(os.path.join(root, folder, m), "wb") as f:
            pickle.dump(entry, f)
    return os.path.join(root, folder)


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cifar"))
    _write_cifar(root)
    return root


def _pixels(images, mean, std):
    # Undo the normalisation: [B,3,H,W] -> float pixels on the 0..255 scale.
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return images.float() * s + m


def test_val_loader_reads_archive_in_order_normalised(cifar_dir):
    b = build_data("cifar10", data_dir=cifar_dir, batch_size=8, device="cpu")
    assert (b.num_classes, b.image_size, b.train_size, b.val_size) == (10, 32, 5 * N_PER_BATCH, N_TEST)
    assert b.mean == CIFAR_STATS["cifar10"][0]
    seen = 0
    for images, labels in b.val:
        assert images.dtype == torch.float32 and labels.dtype == torch.int64
        assert images.is_contiguous(memory_format=torch.channels_last)
        for k in range(images.shape[0]):
            i = 5 * N_PER_BATCH + seen + k  # test images follow the training images in the fixture
            torch.testing.assert_close(_pixels(images[k:k + 1], b.mean, b.std)[0],
                                       torch.from_numpy(_image(i)).float(), atol=1e-3, rtol=0)
            assert labels[k] == i % 10
        seen += images.shape[0]
    assert seen == N_TEST and len(b.val) == -(-N_TEST // 8)


def test_tarball_and_cifar100(tmp_path):
    src = tmp_path / "src"
    folder = _write_cifar(str(src), "cifar100")
    with tarfile.open(tmp_path / "cifar-100-python.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname="cifar-100-python")
    b = build_data("cifar100", data_dir=str(tmp_path), batch_size=16, device="cpu", dtype=torch.float16)
    assert b.num_classes == 100 and b.train_size == 5 * N_PER_BATCH
    images, labels = next(iter(b.train))
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.float16
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert 0 <= labels.min() and labels.max() < 100


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_train_batches_are_padded_crops_and_flips_of_the_right_images(cifar_dir, dtype):
    b = build_data("cifar10", data_dir=cifar_dir, batch_size=16, device="cpu", seed=3, dtype=dtype)
    loader = b.train
    raw = loader.images.permute(0, 3, 1, 2).float()  # N,3,32,32 pixels
    mean = torch.tensor(b.mean).view(1, 3, 1, 1)
    std = torch.tensor(b.std).view(1, 3, 1, 1)
    padded = F.pad((raw - mean) / std, (4, 4, 4, 4))  # normalise, then zero-pad (fb.resnet.torch)
    for batch_index, (images, labels) in enumerate(loader):
        assert images.dtype == dtype and images.shape == (16, 3, 32, 32)
        idx = loader.batch_indices(0, batch_index)
        assert torch.equal(labels, loader.labels[idx])
        dy, dx, flip = crop_flip_params(3, 0, batch_index, 0, 16, 4)
        assert 0 <= dy.min() and dy.max() <= 8 and 0 <= dx.min() and dx.max() <= 8
        for k in range(16):
            expect = padded[idx[k], :, dy[k]:dy[k] + 32, dx[k]:dx[k] + 32]
            if flip[k]:
                expect = expect.flip(-1)
            torch.testing.assert_close(images[k].float(), expect.to(dtype).float(), atol=1e-5, rtol=0)
    assert loader.epoch == 1 and loader.position == 0


def test_crops_cover_all_offsets_and_flip_about_half():
    dy, dx, flip = [], [], []
    for b in range(200):
        y, x, f = crop_flip_params(0, 0, b, 0, 64, 4)
        dy.append(y), dx.append(x), flip.append(f)
    dy, dx, flip = torch.cat(dy), torch.cat(dx), torch.cat(flip)
    assert set(dy.tolist()) == set(range(9)) == set(dx.tolist())
    assert abs(flip.float().mean().item() - 0.5) < 0.02  # 12800 draws: 4.5 sigma


def test_determinism_per_seed_and_epochs_differ(cifar_dir):
    mk = lambda seed: build_data("cifar10", data_dir=cifar_dir, batch_size=8, device="cpu", seed=seed).train  # noqa
    a, b, c = take_batches(mk(1)), take_batches(mk(1)), take_batches(mk(2))
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert not all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, c))
    loader = mk(1)
    e0, e1 = take_batches(loader), take_batches(loader)
    assert loader.epoch == 2
    assert not all(torch.equal(y1, y2) for (_, y1), (_, y2) in zip(e0, e1))


def test_exact_resume_mid_epoch_and_across_epochs(cifar_dir):
    mk = lambda: build_data("cifar10", data_dir=cifar_dir, batch_size=8, device="cpu", seed=5).train  # noqa
    full = mk()
    reference = take_batches(full) + take_batches(full)  # two epochs
    n = len(full)
    for k in (0, 3, n - 1, n, n + 2):
        first = mk()
        taken = []
        while len(taken) < k:
            taken += take_batches(first, k - len(taken))
        state = first.state_dict()
        resumed = mk()
        resumed.load_state_dict(state)
        rest = []
        while len(taken) + len(rest) < 2 * n:
            rest += take_batches(resumed)
        for (x1, y1), (x2, y2) in zip(taken + rest, reference):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_state_dict_semantics_and_mismatch(cifar_dir):
    loader = build_data("cifar10", data_dir=cifar_dir, batch_size=8, device="cpu").train
    it = iter(loader)
    next(it)
    assert loader.state_dict()["position"] == 1 and loader.state_dict()["epoch"] == 0
    for _ in it:
        pass
    assert (loader.epoch, loader.position) == (1, 0)
    other = build_data("cifar10", data_dir=cifar_dir, batch_size=4, device="cpu").train
    with pytest.raises(DataError, match="same --batch-size"):
        other.load_state_dict({**loader.state_dict(), "position": 2})
    other.load_state_dict(loader.state_dict())  # an epoch boundary resumes under any batch size
    assert other.epoch == 1


def test_resume_takes_the_checkpoints_seed(cifar_dir):
    mk = lambda seed: build_data("cifar10", data_dir=cifar_dir, batch_size=8, device="cpu", seed=seed).train  # noqa
    reference = take_batches(mk(1))
    other = mk(2)
    take_batches(other, 1)  # draws seed 2's order of epoch 0
    other.load_state_dict(mk(1).state_dict())
    assert other.seed == 1
    for (x1, y1), (x2, y2) in zip(take_batches(other), reference):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_disjoint_shards_and_val_counts(cifar_dir):
    world = 3
    shards, val_labels = [], []
    for rank in range(world):
        b = build_data("cifar10", data_dir=cifar_dir, batch_size=4, device="cpu", rank=rank,
                       world_size=world, seed=7, val_batch_size=7)
        shards.append(torch.cat([b.train.batch_indices(0, i) for i in range(len(b.train))]))
        val_labels.append(sum(y.numel() for _, y in b.val))
        assert len(b.train) == (5 * N_PER_BATCH // world) // 4
    everything = torch.cat(shards)
    assert everything.unique().numel() == everything.numel()  # no image on two ranks
    assert sum(val_labels) == N_TEST


def test_errors_are_data_errors(tmp_path, cifar_dir):
    with pytest.raises(DataError, match="does not exist"):
        build_data("cifar10", data_dir=str(tmp_path / "nope"), batch_size=8, device="cpu")
    with pytest.raises(DataError, match="--data-dir"):
        build_data("cifar10", batch_size=8, device="cpu")
    with pytest.raises(DataError, match="unknown data set"):
        build_data("mnist", batch_size=8, device="cpu")
    with pytest.raises(DataError, match="batch_size"):
        build_data("cifar10", data_dir=cifar_dir, batch_size=0, device="cpu")
    with pytest.raises(DataError, match="lower --batch-size"):
        build_data("cifar10", data_dir=cifar_dir, batch_size=1000, device="cpu")
    bad = tmp_path / "bad"
    folder = _write_cifar(str(bad))
    with open(os.path.join(folder, "data_batch_3"), "wb") as f:
        f.write(b"\x80\x04garbage")
    with pytest.raises(DataError, match="data_batch_3 is corrupt"):
        build_data("cifar10", data_dir=str(bad), batch_size=8, device="cpu")
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    with open(trunc / "cifar-10-python.tar.gz", "wb") as f:
        f.write(b"\x1f\x8b\x08\x00broken")
    with pytest.raises(DataError, match="not a complete cifar10 archive"):
        build_data("cifar10", data_dir=str(trunc), batch_size=8, device="cpu")
    assert issubclass(DataError, ValueError)


def test_synthetic_and_throughput(cifar_dir):
    b = build_data("cifar10", batch_size=8, device="cpu", synthetic=True, dtype=torch.bfloat16,
                   train_size=64, val_size=20, world_size=2, rank=1)
    x, y = next(iter(b.train))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.bfloat16 and y.dtype == torch.int64
    assert len(b.train) == 4 and sum(v.numel() for _, v in b.val) == 10
    real = build_data("cifar10", data_dir=cifar_dir, batch_size=8, device="cpu")
    state = real.train.state_dict()
    assert loader_throughput(real, batches=5) > 0
    assert real.train.state_dict() == state
    assert DATASETS["cifar100"].num_classes == 100
