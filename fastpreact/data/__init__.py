"""Data: CIFAR-10/100 and shapes10 on the device, ImageNet through DALI or torchvision, synthetic.

    bundle = build_data("cifar10", data_dir="data", batch_size=128, device="cuda", dtype=torch.bfloat16)
    for images, labels in bundle.train: ...       # the rest of the current epoch, channels-last
    ckpt["loader"] = bundle.train.state_dict()     # (epoch, position, ...): the whole loader state
    bundle.train.load_state_dict(ckpt["loader"])   # the resumed run sees exactly the same batches

Training order and augmentation are pure functions of (seed, epoch, batch index, rank) (see common.py),
so a resume is exact and ranks see disjoint shards. Every loader normalises with the data set's
per-channel mean/std, given in DataBundle.mean/std on the 0..255 pixel scale.
"""
from __future__ import annotations

import time

import torch

from .common import DataBundle, DataError, check_common_args

__all__ = ["build_data", "DataBundle", "DataError", "DATASETS", "loader_throughput"]


class DatasetInfo(dict):
    """num_classes, image_size (training crop), train_size, val_size: as keys and as attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


DATASETS = {
    "cifar10": DatasetInfo(num_classes=10, image_size=32, train_size=50000, val_size=10000),
    "cifar100": DatasetInfo(num_classes=100, image_size=32, train_size=50000, val_size=10000),
    "imagenet": DatasetInfo(num_classes=1000, image_size=224, train_size=1281167, val_size=50000),
    "shapes10": DatasetInfo(num_classes=10, image_size=32, train_size=50000, val_size=10000),
}

LOADERS = ("auto", "dali", "torchvision")
AUGS = ("inception", "scale")


def _subset(n_default, n, what, dataset):
    if n is None:
        return n_default
    if not isinstance(n, int) or n < 1:
        raise DataError(f"{what} must be a positive integer, got {n!r}")
    if n > n_default and dataset != "shapes10":
        raise DataError(f"{what}={n} exceeds the {n_default} images {dataset} has; lower it")
    return n


def build_data(dataset, *, data_dir=None, batch_size, device, rank=0, world_size=1, seed=0,
               loader="auto", aug="inception", val_crop=224, workers=4, synthetic=False,
               download=False, dtype=torch.float32, val_batch_size=None, train_size=None,
               val_size=None) -> DataBundle:
    """Build the training and validation loaders of `dataset` for this rank (see the module docstring).

    batch_size and val_batch_size (default batch_size) are per rank. train_size/val_size: shapes10 and
    synthetic draw that many images (default 50k/10k); CIFAR and ImageNet use a subset (the first
    images of the archive; every k-th file of ImageNet), for quick experiments.
    """
    if dataset not in DATASETS:
        raise DataError(f"unknown data set {dataset!r}; choose one of {', '.join(DATASETS)}")
    if loader not in LOADERS:
        raise DataError(f"unknown loader {loader!r}; choose one of {', '.join(LOADERS)}")
    if aug not in AUGS:
        raise DataError(f"unknown augmentation {aug!r}; choose one of {', '.join(AUGS)}")
    check_common_args(batch_size, rank, world_size, dtype)
    val_batch_size = batch_size if val_batch_size is None else val_batch_size
    check_common_args(val_batch_size, rank, world_size, dtype)
    device = torch.device(device)
    info = DATASETS[dataset]
    n_train = _subset(info.train_size, train_size, "train_size", dataset)
    n_val = _subset(info.val_size, val_size, "val_size", dataset)
    common = dict(rank=rank, world_size=world_size, dtype=dtype)

    if synthetic:
        from .synthetic import SyntheticTrainLoader, synthetic_val_loader
        size = info.image_size
        train = SyntheticTrainLoader(num_classes=info.num_classes, image_size=size, train_size=n_train,
                                     batch_size=batch_size, device=device, seed=seed, **common)
        vsize = val_crop if dataset == "imagenet" else size
        val = synthetic_val_loader(num_classes=info.num_classes, image_size=vsize, val_size=n_val,
                                   batch_size=val_batch_size, device=device, seed=seed, **common)
        return DataBundle(train, val, info.num_classes, size, n_train, n_val, (0.0,) * 3, (1.0,) * 3,
                          dataset, loader="synthetic")

    if dataset == "imagenet":
        from .imagenet import build_imagenet
        return build_imagenet(data_dir=data_dir, batch_size=batch_size, device=device, seed=seed,
                              loader=loader, aug=aug, val_crop=val_crop, workers=workers,
                              val_batch_size=val_batch_size, train_size=train_size, val_size=val_size,
                              download=download, image_size=info.image_size, **common)

    from .ondevice import OnDeviceTrainLoader, on_device_val_loader
    if dataset == "shapes10":
        from . import shapes10
        tx, ty, vx, vy = shapes10.load_shapes10(n_train, n_val)
        mean, std = shapes10.MEAN, shapes10.STD
    else:
        from . import cifar
        tx, ty, vx, vy = cifar.load_cifar(dataset, data_dir, download)
        tx, ty, vx, vy = (torch.from_numpy(a[:n]) for a, n in
                          ((tx, n_train), (ty, n_train), (vx, n_val), (vy, n_val)))
        n_train, n_val = tx.shape[0], vx.shape[0]
        mean, std = cifar.CIFAR_STATS[dataset]
    tx, ty, vx, vy = (t.contiguous().to(device) for t in (tx, ty, vx, vy))
    train = OnDeviceTrainLoader(tx, ty, mean=mean, std=std, batch_size=batch_size, seed=seed, **common)
    val = on_device_val_loader(vx, vy, mean=mean, std=std, batch_size=val_batch_size, **common)
    return DataBundle(train, val, info.num_classes, info.image_size, n_train, n_val, mean, std, dataset)


def loader_throughput(bundle: DataBundle, batches: int = 50, split: str = "train",
                      warmup: int = 2) -> float:
    """Images per second the loader delivers (to the device, normalised), over `batches` batches after
    `warmup` batches. The train loader's state is restored afterwards."""
    loader = bundle.train if split == "train" else bundle.val
    state = loader.state_dict() if split == "train" else None
    device = None
    images_seen = 0
    start = time.perf_counter() if warmup == 0 else None
    try:
        taken = 0
        while taken < batches + warmup:
            progressed = False
            for images, _ in loader:
                progressed = True
                device = images.device
                taken += 1
                if taken == warmup:
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    start = time.perf_counter()
                elif taken > warmup:
                    images_seen += images.shape[0]
                if taken >= batches + warmup:
                    break
            if not progressed:
                break
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        if state is not None:
            loader.load_state_dict(state)
    if start is None or images_seen == 0:
        raise DataError(f"the {split} loader has fewer than {warmup + 1} batches; lower warmup or batch size")
    return images_seen / (time.perf_counter() - start)
