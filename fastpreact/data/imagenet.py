"""ImageNet (ImageFolder layout) through DALI or a torchvision/PIL DataLoader, with the same batches.

Both loaders consume the same batch plan: the epoch's permutation and this rank's shard (common.py),
and per sample a source window and a flip drawn by imagefolder.train_sample_params from
random.Random(mix_seed(seed, epoch, batch index, rank)), in the batch's order. A sample is decoded,
its window resized to the output side (bilinear, antialiased), mirrored if drawn so, normalised and cast
on the device; batches come out NHWC and are handed over as channels-last [B,3,S,S].

Exact resume: (epoch, position) is the whole state; the DALI pipeline is rebuilt per epoch (and on
resume) and fed the plan from `position` on through an external source, so no DALI RNG or reader state
is involved. What is exact: which images form each batch, their order, their crop windows and flips,
hence the output bit for bit for a given loader and machine. What is not: DALI and PIL resample with
different arithmetic, so the two loaders agree on the windows but not on every pixel value.

Unreadable images: the pre-scan (imagefolder.prescan) skips files with broken markers before training,
naming each. A file that passes it and still fails to decode is dropped from its batch with a warning
naming it (the batch is one image short; the other samples keep their crops): PIL reports the file
directly; DALI reports a failed batch without the name ("nvImageCodec failure"/"jpeg_parser" errors),
so the loader decodes that batch's files with PIL to find it, then rebuilds the pipeline from that batch
without it. If PIL reads every suspect, the loader stops with a DataError listing them.
"""
from __future__ import annotations

import importlib.util
import random
import warnings

import numpy as np
import torch

from .common import DataError, ResumableState, epoch_permutation, mix_seed, rank_shard, val_shard_range
from . import imagefolder

# ImageNet per-channel mean/std on the 0..255 scale (torchvision's 0.485/0.456/0.406, 0.229/0.224/0.225).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia.dali") is not None


class BatchPlan:
    """Which files, crop windows and flips make up each batch, on this rank (pure, no I/O)."""

    def __init__(self, samples, *, batch_size, rank, world_size, seed, aug, out_size, train):
        self.paths = [s[0] for s in samples]
        self.labels = np.array([s[1] for s in samples], dtype=np.int64)
        self.sizes = np.array([(s[2], s[3]) for s in samples], dtype=np.int64).reshape(-1, 2)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.aug, self.out_size, self.train = seed, aug, out_size, train
        self.bad = set()  # files found undecodable after the pre-scan: dropped from their batches
        n = len(self.paths)
        if train:
            self.num_batches = (n // world_size) // batch_size
        else:
            self.start, self.stop = val_shard_range(n, rank, world_size)
            self.num_batches = -(-(self.stop - self.start) // batch_size)
        self._shard_epoch, self._shard = None, None

    def indices(self, epoch: int, batch_index: int) -> np.ndarray:
        b = self.batch_size
        if not self.train:
            lo = self.start + batch_index * b
            return np.arange(lo, min(lo + b, self.stop))
        if self._shard_epoch != epoch:
            perm = epoch_permutation(len(self.paths), self.seed, epoch)
            self._shard = rank_shard(perm, self.rank, self.world_size).numpy()
            self._shard_epoch = epoch
        return self._shard[batch_index * b:(batch_index + 1) * b]

    def batch(self, epoch: int, batch_index: int):
        """[(path, label, (x, y, w, h), flip)] of one batch; known-bad files already dropped."""
        idx = self.indices(epoch, batch_index)
        if self.train:
            rng = random.Random(mix_seed(self.seed, epoch, batch_index, self.rank))
            # Draw for every planned sample before dropping bad ones, so a drop never moves other crops.
            params = [imagefolder.train_sample_params(rng, int(self.sizes[i, 0]), int(self.sizes[i, 1]),
                                                      self.aug, self.out_size) for i in idx]
        else:
            params = [(imagefolder.centre_window(int(self.sizes[i, 0]), int(self.sizes[i, 1]),
                                                 self.out_size), False) for i in idx]
        return [(self.paths[i], int(self.labels[i]), w, f) for i, (w, f) in zip(idx, params)
                if self.paths[i] not in self.bad]


def decode_pil(path, window, flip, out_size) -> np.ndarray:
    """uint8 [out,out,3]: the window of the image resized (bilinear, antialiased), maybe mirrored.
    Raises imagefolder.UnreadableImage naming the reason."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            x, y, w, h = window
            im = im.resize((out_size, out_size), Image.BILINEAR, box=(x, y, x + w, y + h))
            if flip:
                im = im.transpose(Image.FLIP_LEFT_RIGHT)
            return np.asarray(im, dtype=np.uint8)
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... on damaged files
        raise imagefolder.UnreadableImage(f"{type(exc).__name__}: {exc}") from None


class _PilBatches(torch.utils.data.Dataset):
    """Item b = batch b of an epoch, decoded with PIL in a DataLoader worker."""

    def __init__(self, plan: BatchPlan, epoch: int):
        self.plan, self.epoch = plan, epoch

    def __len__(self):
        return self.plan.num_batches

    def __getitem__(self, batch_index):
        s = self.plan.out_size
        images, labels, skipped = [], [], []
        for path, label, window, flip in self.plan.batch(self.epoch, batch_index):
            try:
                images.append(decode_pil(path, window, flip, s))
                labels.append(label)
            except imagefolder.UnreadableImage as exc:
                skipped.append((path, str(exc)))
        images = torch.from_numpy(np.stack(images)) if images else torch.empty(0, s, s, 3, dtype=torch.uint8)
        return batch_index, images, torch.tensor(labels, dtype=torch.int64), skipped


class _Normaliser:
    def __init__(self, device, dtype):
        self.device, self.dtype = device, dtype
        self.mean = torch.tensor(IMAGENET_MEAN, device=device)
        self.inv_std = 1.0 / torch.tensor(IMAGENET_STD, device=device)

    def __call__(self, pixels):
        # uint8 NHWC (host) -> normalised [B,3,S,S] channels-last on the device.
        x = pixels.to(self.device, non_blocking=True).float()
        return ((x - self.mean) * self.inv_std).to(self.dtype).permute(0, 3, 1, 2)


def _note_skips(plan, skipped, counter):
    for path, reason in skipped:
        if path not in plan.bad:
            plan.bad.add(path)
            counter.append(path)
            warnings.warn(f"skipping undecodable image {path}: {reason}", stacklevel=3)


class TorchvisionLoader(ResumableState):
    """PIL decoding in DataLoader workers; normalisation on the device. Train or validation."""

    def __init__(self, plan: BatchPlan, *, device, dtype, workers):
        self.plan, self.device, self.workers = plan, device, workers
        self.batch_size, self.world_size, self.seed = plan.batch_size, plan.world_size, plan.seed
        self.normalise = _Normaliser(device, dtype)
        self.epoch, self.position = 0, 0
        self.skipped = []  # paths dropped at decode time (the pre-scan's skips are in the bundle notes)

    def __len__(self):
        return self.plan.num_batches

    def _batches(self, epoch, start):
        ds = _PilBatches(self.plan, epoch)
        kw = dict(num_workers=self.workers, prefetch_factor=2) if self.workers > 0 else {}
        dl = torch.utils.data.DataLoader(ds, batch_size=None, sampler=range(start, len(self)),
                                         pin_memory=self.device.type == "cuda", **kw)
        for batch_index, images, labels, skipped in dl:
            _note_skips(self.plan, skipped, self.skipped)
            yield batch_index, images, labels

    def __iter__(self):
        if not self.plan.train:
            for _, images, labels in self._batches(0, 0):
                if images.shape[0]:
                    yield self.normalise(images), labels.to(self.device)
            return
        epoch = self.epoch
        for batch_index, images, labels in self._batches(epoch, self.position):
            self._advance(batch_index)
            if images.shape[0]:
                yield self.normalise(images), labels.to(self.device, non_blocking=True)


class ImageNetVal:
    """The ValLoader face of a validation-plan loader (no state, iterate from the start every time)."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)

    @property
    def skipped(self):
        return self.loader.skipped


def build_imagenet(*, data_dir, batch_size, device, rank, world_size, seed, loader, aug, val_crop,
                   workers, val_batch_size, dtype, train_size=None, val_size=None, download=False):
    from . import DATASETS, DataBundle
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
    out = DATASETS["imagenet"].image_size
    common = dict(batch_size=batch_size, rank=rank, world_size=world_size, seed=int(seed))
    train_plan = BatchPlan(train_samples, aug=aug, out_size=out, train=True, **common)
    if train_plan.num_batches == 0:
        raise DataError(f"{len(train_samples)} usable training images over {world_size} rank(s) do not "
                        f"fill one batch of {batch_size}; lower --batch-size")
    val_plan = BatchPlan(val_samples, aug=aug, out_size=val_crop, train=False,
                         **{**common, "batch_size": val_batch_size})
    if use_dali:
        from .imagenet_dali import DaliLoader
        make = lambda plan: DaliLoader(plan, device=device, dtype=dtype, workers=workers)  # noqa: E731
    else:
        make = lambda plan: TorchvisionLoader(plan, device=device, dtype=dtype, workers=workers)  # noqa
    notes = [f"skipped unreadable: {p} ({r})" for p, r in train_skips + val_skips]
    return DataBundle(make(train_plan), ImageNetVal(make(val_plan)), len(classes), out,
                      len(train_samples), len(val_samples), IMAGENET_MEAN, IMAGENET_STD, "imagenet",
                      loader="dali" if use_dali else "torchvision", notes=notes)
