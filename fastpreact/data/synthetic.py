"""--synthetic: one random batch made once on the device and handed out again and again.

It measures the model without the loader: no decode, no augmentation, no host-device copies. The
loaders keep the real interface (len, epoch/position, state_dict, disjoint validation counts).
"""
from __future__ import annotations

import torch

from .common import ResumableState, ValLoader, generator, train_batch_count, val_batch_ranges


def _random_batch(batch, num_classes, image_size, device, dtype, seed, rank):
    g = generator(seed, rank, 0x5F17)
    images = torch.randn(batch, 3, image_size, image_size, generator=g).to(device=device, dtype=dtype)
    labels = torch.randint(0, num_classes, (batch,), generator=g).to(device)
    return images.contiguous(memory_format=torch.channels_last), labels


class SyntheticTrainLoader(ResumableState):
    def __init__(self, *, num_classes, image_size, train_size, batch_size, device, rank=0,
                 world_size=1, seed=0, dtype=torch.float32):
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, int(seed)
        self.epoch, self.position = 0, 0
        self._num_batches = train_batch_count(train_size, world_size, batch_size, "synthetic images")
        self.images, self.labels = _random_batch(batch_size, num_classes, image_size, device, dtype,
                                                 seed, rank)

    def __len__(self):
        return self._num_batches

    def __iter__(self):
        for batch_index in range(self.position, len(self)):
            self._advance(batch_index)
            yield self.images, self.labels


def synthetic_val_loader(*, num_classes, image_size, val_size, batch_size, device, rank=0, world_size=1,
                         seed=0, dtype=torch.float32) -> ValLoader:
    """The real validation counts per rank, every batch a prefix of one random batch."""
    images, labels = _random_batch(batch_size, num_classes, image_size, device, dtype, seed + 1, rank)
    ranges = val_batch_ranges(val_size, rank, world_size, batch_size)
    return ValLoader(ranges, lambda: ((images[:hi - lo], labels[:hi - lo]) for lo, hi in ranges))
