"""--synthetic: one random batch made once on the device and handed out again and again.

It measures the model without the loader: no decode, no augmentation, no host-device copies. The
loaders keep the real interface (len, epoch/position, state_dict, disjoint validation counts).
"""
from __future__ import annotations

import torch

from .common import DataError, ResumableState, generator, val_shard_range


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
        self._num_batches = (train_size // world_size) // batch_size
        if self._num_batches == 0:
            raise DataError(f"{train_size} synthetic images over {world_size} rank(s) do not fill one "
                            f"batch of {batch_size}; lower --batch-size")
        self.images, self.labels = _random_batch(batch_size, num_classes, image_size, device, dtype,
                                                 seed, rank)

    def __len__(self):
        return self._num_batches

    def __iter__(self):
        for batch_index in range(self.position, len(self)):
            self._advance(batch_index)
            yield self.images, self.labels


class SyntheticValLoader:
    def __init__(self, *, num_classes, image_size, val_size, batch_size, device, rank=0, world_size=1,
                 seed=0, dtype=torch.float32):
        start, stop = val_shard_range(val_size, rank, world_size)
        self.num_images, self.batch_size = stop - start, batch_size
        self.images, self.labels = _random_batch(batch_size, num_classes, image_size, device, dtype,
                                                 seed + 1, rank)

    def __len__(self):
        return -(-self.num_images // self.batch_size)

    def __iter__(self):
        for lo in range(0, self.num_images, self.batch_size):
            n = min(self.batch_size, self.num_images - lo)
            yield self.images[:n], self.labels[:n]
