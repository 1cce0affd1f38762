"""Loaders for small image sets held whole on the training device (CIFAR, shapes10), airbench style.

The set lives on the device as uint8 NHWC; a batch is one gather: for each output pixel, the source
pixel of the padded, shifted and maybe mirrored image, then normalisation and a cast, all on the device.
No worker processes, no host round trip except a few hundred bytes of random offsets per batch.

Augmentation (the paper's CIFAR recipe, as in fb.resnet.torch / resnet-1k-layers): 4-pixel zero padding,
a random 32x32 crop of the 40x40 padded image, horizontal flip with probability 1/2. As in those Torch
implementations, the image is normalised first and then zero-padded, so a padded pixel is 0 after
normalisation (the data set's mean colour), not black.
"""
from __future__ import annotations

import torch

from .common import (DataError, EpochShards, Normaliser, ResumableState, ValLoader, generator,
                     train_batch_count, val_batch_ranges)


def crop_flip_params(seed: int, epoch: int, batch_index: int, rank: int, batch: int, pad: int):
    """Random choices of one batch: (offset_y, offset_x) in [0, 2*pad] per image (the crop's corner in
    the padded image) and a flip flag per image. A pure function of its arguments (CPU tensors)."""
    g = generator(seed, epoch, batch_index, rank)
    offsets = torch.randint(0, 2 * pad + 1, (batch, 2), generator=g)
    flips = torch.rand(batch, generator=g) < 0.5
    return offsets[:, 0], offsets[:, 1], flips


class OnDeviceTrainLoader(ResumableState):
    """Training batches from a uint8 NHWC image tensor already on the device.

    Yields (images [B,3,S,S] channels-last `dtype`, labels int64 [B]) for the rest of the current epoch.
    `epoch` and `position` advance as each batch is handed out (see ResumableState._advance).
    """

    def __init__(self, images, labels, *, mean, std, batch_size, rank=0, world_size=1, seed=0,
                 dtype=torch.float32, pad=4):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
            raise DataError(f"expected uint8 images [N,H,W,3], got {tuple(images.shape)} {images.dtype}")
        self.images, self.labels = images, labels
        self.device = images.device
        self.normalise = Normaliser(mean, std, self.device, dtype)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.dtype, self.pad = int(seed), dtype, pad
        self.epoch, self.position = 0, 0
        self._num_batches = train_batch_count(images.shape[0], world_size, batch_size)
        self._shards = EpochShards(images.shape[0], rank, world_size, self.device)
        self._arange = torch.arange(images.shape[1], device=self.device)

    def __len__(self):
        return self._num_batches

    def batch_indices(self, epoch: int, batch_index: int) -> torch.Tensor:
        """Indices into the training set of batch `batch_index` of `epoch` on this rank."""
        b = self.batch_size
        return self._shards(self.seed, epoch)[batch_index * b:(batch_index + 1) * b]

    def make_batch(self, epoch: int, batch_index: int):
        """Batch `batch_index` of `epoch` on this rank, without touching the loader's position."""
        idx = self.batch_indices(epoch, batch_index)
        size, pad = self.images.shape[1], self.pad
        dy, dx, flip = crop_flip_params(self.seed, epoch, batch_index, self.rank, idx.numel(), pad)
        dy, dx, flip = (t.to(self.device, non_blocking=True) for t in (dy, dx, flip))
        # Output pixel (i, j) of image k reads padded pixel (dy+i, dx+j), i.e. source (dy+i-pad, dx+j-pad);
        # a flipped image reads column size-1-j instead of j. Sources outside the image are padding.
        rows = dy[:, None] - pad + self._arange                       # [B,S]
        cols = dx[:, None] - pad + self._arange                       # [B,S]
        cols = torch.where(flip[:, None], cols.flip(1), cols)
        valid = (((rows >= 0) & (rows < size))[:, :, None] & ((cols >= 0) & (cols < size))[:, None, :])
        pixels = self.images[idx[:, None, None], rows.clamp(0, size - 1)[:, :, None],
                             cols.clamp(0, size - 1)[:, None, :]]     # [B,S,S,3] uint8
        return self.normalise(pixels, valid[..., None]), self.labels[idx]

    def __iter__(self):
        epoch = self.epoch
        for batch_index in range(self.position, len(self)):
            batch = self.make_batch(epoch, batch_index)
            self._advance(batch_index)
            yield batch


def on_device_val_loader(images, labels, *, mean, std, batch_size, rank=0, world_size=1,
                         dtype=torch.float32) -> ValLoader:
    """This rank's contiguous, disjoint slice of the validation set, in order, normalised, no padding."""
    normalise = Normaliser(mean, std, images.device, dtype)
    ranges = val_batch_ranges(images.shape[0], rank, world_size, batch_size)
    return ValLoader(ranges, lambda: ((normalise(images[lo:hi]), labels[lo:hi]) for lo, hi in ranges))
