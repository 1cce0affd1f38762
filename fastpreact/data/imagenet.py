"""ImageNet (ImageFolder layout) through DALI or torchvision, with the same batches.

Both loaders consume the same batch plan (imagenet_common.BatchPlan): the epoch's order, this rank's
shard, and every sample's crop window and flip. A sample is decoded, its window resized to the output
side (bilinear, antialiased), mirrored if drawn so, normalised and cast on the device; batches come out
as channels-last [B,3,S,S].

Exact resume: (epoch, position) is the whole state; the DALI pipeline is rebuilt per epoch (and on
resume) and fed the plan from `position` on through an external source, so no DALI RNG or reader state
is involved. What is exact: which images form each batch, their order, their crop windows and flips,
hence the output bit for bit for a given loader and machine. What is not: DALI and the CPU decoders
resample with different arithmetic, so the two loaders agree on the windows but not on every pixel.

Unreadable images: the pre-scan (imagefolder.prescan) skips files with broken markers before training,
naming each. A file that passes it and still fails to decode is dropped from its batch with a warning
naming it (imagenet_torchvision.py, imagenet_dali.py say how each loader finds it).
"""
from __future__ import annotations

import importlib.util

from .common import DataBundle, DataError, ValLoader
from . import imagefolder
from .imagenet_common import IMAGENET_MEAN, IMAGENET_STD, BatchPlan

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "build_imagenet", "dali_available"]


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia.dali") is not None


def build_imagenet(*, data_dir, batch_size, device, rank, world_size, seed, loader, aug, val_crop,
                   workers, val_batch_size, dtype, image_size, train_size=None, val_size=None,
                   download=False) -> DataBundle:
    """The ImageNet DataBundle (see build_data); image_size is the training crop side."""
    if download:
        raise DataError("--download only fetches CIFAR; ImageNet must be downloaded by hand (from "
                        "image-net.org) into train/<class>/ and val/<class>/ under --data-dir")
    if not isinstance(val_crop, int) or val_crop < 16:
        raise DataError(f"val_crop must be an integer side of at least 16 pixels, got {val_crop!r}")
    if loader == "dali" and not dali_available():
        raise DataError("--loader dali needs NVIDIA DALI (pip install nvidia-dali-cuda130); "
                        "use --loader torchvision or auto")
    use_dali = loader == "dali" or (loader == "auto" and dali_available())
    classes, samples = imagefolder.validate_layout(data_dir)
    for split, n in (("train", train_size), ("val", val_size)):
        if n is not None and n < len(samples[split]):
            step = len(samples[split]) / n  # an evenly spread subset keeps every class present
            samples[split] = [samples[split][int(i * step)] for i in range(n)]
    scan_threads = max(4, workers)
    train_samples, train_skips = imagefolder.prescan(samples["train"], scan_threads, "training images")
    val_samples, val_skips = imagefolder.prescan(samples["val"], scan_threads, "validation images")
    out = image_size
    common = dict(batch_size=batch_size, rank=rank, world_size=world_size, seed=int(seed))
    train_plan = BatchPlan(train_samples, aug=aug, out_size=out, train=True, **common)
    val_plan = BatchPlan(val_samples, aug=aug, out_size=val_crop, train=False,
                         **{**common, "batch_size": val_batch_size})
    if use_dali:
        from .imagenet_dali import DaliLoader
        make = lambda plan: DaliLoader(plan, device=device, dtype=dtype, workers=workers)  # noqa: E731
    else:
        from .imagenet_torchvision import TorchvisionLoader
        make = lambda plan: TorchvisionLoader(plan, device=device, dtype=dtype, workers=workers)  # noqa
    notes = [f"skipped unreadable: {p} ({r})" for p, r in train_skips + val_skips]
    val_decoder = make(val_plan)
    val = ValLoader(val_plan.batch_ranges, val_decoder.val_batches, skipped=val_decoder.skipped)
    return DataBundle(make(train_plan), val, len(classes), out,
                      len(train_samples), len(val_samples), IMAGENET_MEAN, IMAGENET_STD, "imagenet",
                      loader="dali" if use_dali else "torchvision", notes=notes)
