"""What the two ImageNet loaders (imagenet_torchvision.py, imagenet_dali.py) share: the per-channel
statistics, the batch plan, and the loader face built on it.

The batch plan: the epoch's permutation and this rank's shard (common.py), and per sample a source
window and a flip drawn by imagefolder.train_sample_params from random.Random(mix_seed(seed, epoch,
batch index, rank)), in the batch's order. Validation batches are this rank's contiguous slice, each
image's centre window, no flip. The plan does no I/O, so both loaders see the same files, windows and
flips; a loader only decodes, resizes, mirrors and normalises what the plan names.
"""
from __future__ import annotations

import random
import warnings

import numpy as np

from .common import EpochShards, ResumableState, mix_seed, train_batch_count, val_batch_ranges
from . import imagefolder

# ImageNet per-channel mean/std on the 0..255 scale (torchvision's 0.485/0.456/0.406, 0.229/0.224/0.225).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


class BatchPlan:
    """Which files, crop windows and flips make up each batch, on this rank (pure, no I/O).

    samples: [(path, label, width, height)] from imagefolder.prescan.
    """

    def __init__(self, samples, *, batch_size, rank, world_size, seed, aug, out_size, train):
        self.paths = [s[0] for s in samples]
        self.labels = np.array([s[1] for s in samples], dtype=np.int64)
        self.sizes = np.array([(s[2], s[3]) for s in samples], dtype=np.int64).reshape(-1, 2)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.aug, self.out_size, self.train = seed, aug, out_size, train
        self.bad = set()  # files found undecodable after the pre-scan: dropped from their batches
        if train:
            self.num_batches = train_batch_count(len(self.paths), world_size, batch_size,
                                                 "usable training images")
            self._shards = EpochShards(len(self.paths), rank, world_size)
        else:
            self.batch_ranges = val_batch_ranges(len(self.paths), rank, world_size, batch_size)
            self.num_batches = len(self.batch_ranges)

    def indices(self, epoch: int, batch_index: int) -> np.ndarray:
        if not self.train:
            return np.arange(*self.batch_ranges[batch_index])
        b = self.batch_size
        return self._shards(self.seed, epoch)[batch_index * b:(batch_index + 1) * b].numpy()

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

    def drop_undecodable(self, skipped) -> list:
        """Drop [(path, reason)] from every later batch, warning once per file by name; returns the
        paths not dropped before."""
        new = []
        for path, reason in skipped:
            if path not in self.bad:
                self.bad.add(path)
                new.append(path)
                warnings.warn(f"skipping undecodable image {path}: {reason}", stacklevel=3)
        return new


class PlanLoader(ResumableState):
    """A train or validation loader over a BatchPlan. A subclass decodes: `_run_from(epoch, start)`
    yields (batch_index, images, labels) from batch `start` to the epoch's end, images normalised
    channels-last on the device (none when every file of the batch proved undecodable)."""

    def __init__(self, plan: BatchPlan, *, device, dtype, workers):
        self.plan, self.device, self.dtype, self.workers = plan, device, dtype, workers
        self.epoch, self.position = 0, 0
        self.skipped = []  # paths dropped at decode time (the pre-scan's skips are in the bundle notes)

    # The plan owns the settings that give a position its meaning (ResumableState checks them), so a
    # seed restored by load_state_dict reaches the plan's crops and order.
    @property
    def seed(self):
        return self.plan.seed

    @seed.setter
    def seed(self, value):
        self.plan.seed = value

    @property
    def batch_size(self):
        return self.plan.batch_size

    @property
    def world_size(self):
        return self.plan.world_size

    def __len__(self):
        return self.plan.num_batches

    def _run_from(self, epoch, start):
        raise NotImplementedError

    def note_undecodable(self, skipped) -> None:
        self.skipped.extend(self.plan.drop_undecodable(skipped))

    def __iter__(self):
        """The rest of the current epoch (training); a batch left empty by skips is not handed out."""
        epoch = self.epoch
        for batch_index, images, labels in self._run_from(epoch, self.position):
            self._advance(batch_index)
            if images.shape[0]:
                yield images, labels

    def val_batches(self):
        """Every batch of a validation plan, from the first (for common.ValLoader)."""
        for _, images, labels in self._run_from(0, 0):
            if images.shape[0]:
                yield images, labels
