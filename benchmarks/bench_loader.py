"""Loader suite: images per second each data loader available on this machine delivers to the device.

Every loader comes from fastpreact.data.build_data, on data made in a temporary directory (no download):
  cifar10 / device         a CIFAR-10 python archive of random images, held on the device as uint8,
                           augmented (pad + crop + flip) and normalised per batch on the device
  shapes10 / device        the embedded procedural data set, same on-device path
  imagenet / torchvision   an ImageFolder of random JPEGs, torchvision DataLoader workers decoding
  imagenet / dali          the same folder through NVIDIA DALI (only where nvidia.dali imports)
  imagenet, cifar10 / synthetic   one random batch on the device (the upper bound: no loading at all)
A row is the train loader's rate over whole batches (channels-last, normalised, on the device, in the
training dtype), after warm-up batches (worker start, DALI pipeline build).
"""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from benchmarks import _bench as B

BATCH = {"cifar10": 256, "shapes10": 256, "imagenet": 64} if B.FULL else {"cifar10": 8, "shapes10": 8, "imagenet": 4}
CIFAR_PER_FILE = 2000 if B.FULL else 40          # 5 train files + 1 test file
IMAGENET_CLASSES, IMAGENET_PER_CLASS = (8, 100) if B.FULL else (2, 6)  # GPU: 12 batches an epoch
JPEG_SIDE = 320 if B.FULL else 48
WORKERS = max(1, min(8, (os.cpu_count() or 2) // 2)) if B.FULL else 1
TRAIN_DTYPE = B.AMP_DTYPE or torch.float32

CASES = [("cifar10", "device"), ("shapes10", "device"), ("imagenet", "torchvision"), ("imagenet", "dali"),
         ("imagenet", "synthetic"), ("cifar10", "synthetic")]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader_data")
    rng = np.random.default_rng(0)
    cifar = root / "cifar-10-batches-py"
    cifar.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {b"data": rng.integers(0, 256, (CIFAR_PER_FILE, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, CIFAR_PER_FILE).tolist()}
        with open(cifar / name, "wb") as f:
            pickle.dump(entry, f)
    from PIL import Image
    for split, per_class in (("train", IMAGENET_PER_CLASS), ("val", max(2, IMAGENET_PER_CLASS // 4))):
        for c in range(IMAGENET_CLASSES):
            folder = root / "imagenet" / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                # Smooth random images (a coarse grid upsampled): JPEG sizes like a photo's, not noise's.
                coarse = rng.integers(0, 256, (JPEG_SIDE // 16, JPEG_SIDE // 16, 3), dtype=np.uint8)
                img = Image.fromarray(coarse).resize((JPEG_SIDE + 16 * (i % 3), JPEG_SIDE), Image.BILINEAR)
                img.save(folder / f"img_{i:04d}.JPEG", quality=90)
    return root


def _bundle(dataset, loader, root):
    from fastpreact.data import build_data
    common = dict(batch_size=BATCH[dataset], device=B.DEVICE, dtype=TRAIN_DTYPE, seed=0)
    if loader == "synthetic":
        return build_data(dataset, synthetic=True, train_size=BATCH[dataset] * 64, **common)
    if dataset == "cifar10":
        return build_data("cifar10", data_dir=str(root), **common)
    if dataset == "shapes10":
        return build_data("shapes10", train_size=BATCH[dataset] * (40 if B.FULL else 4), val_size=BATCH[dataset], **common)
    if loader == "dali":
        try:
            import nvidia.dali  # noqa: F401
        except ImportError as exc:
            raise _Unavailable(f"NVIDIA DALI is not installed here ({B.first_line(exc)})") from None
    return build_data("imagenet", data_dir=str(root / "imagenet"), loader=loader, workers=WORKERS, **common)


class _Unavailable(Exception):
    pass


@pytest.mark.parametrize("dataset,loader", CASES, ids=[f"{d}-{k}" for d, k in CASES])
def test_loader(benchmark, results, data_root, dataset, loader):
    row = dict(name="loader", dataset=dataset, loader=loader, batch=BATCH[dataset],
               dtype="bf16" if TRAIN_DTYPE is torch.bfloat16 else "fp32",
               workers=WORKERS if loader in ("torchvision", "dali") else None)
    try:
        bundle = _bundle(dataset, loader, data_root)
    except _Unavailable as exc:
        B.unavailable(results, row, str(exc))
    except Exception as exc:  # e.g. a loader fastpreact.data does not provide on this machine yet
        B.unavailable(results, row, f"build_data failed: {B.first_line(exc)}")
    train = bundle.train
    per_round = (4 if dataset == "imagenet" else 10) if B.FULL else 2
    state = {"it": iter(train)}

    def next_batch():
        for _ in range(2):
            try:
                return next(state["it"])
            except StopIteration:  # end of the epoch: the next iter() starts the next one
                state["it"] = iter(train)
        raise RuntimeError(f"{dataset}/{loader}: the train loader yields no batches")

    def target():
        for _ in range(per_round):
            images, labels = next_batch()
        B.sync()
        assert images.shape[0] == BATCH[dataset] and images.device.type == B.DEVICE.type

    try:
        seconds = B.time_call(benchmark, target, warmup=B.rounds(2, 1), rounds_=B.rounds(4, 2), inner=per_round)
    except Exception as exc:
        B.unavailable(results, row, f"{loader} loader failed: {B.first_line(exc)}")
    row.update(ms=B.sig(seconds * 1e3), img_per_s=B.sig(BATCH[dataset] / seconds))
    B.record(results, benchmark, row)
