"""The torchvision ImageNet loader: a DataLoader whose item b is batch b of the plan, decoded on the CPU
by imagenet_decode.decode_window in worker processes, then normalised on the device.

A file that passed the pre-scan and still fails to decode is dropped from its batch (the batch is one
image short; the other samples keep their crops) and named in a warning; it stays out of every later
batch (BatchPlan.drop_undecodable).
"""
from __future__ import annotations

import torch

from .common import Normaliser
from .imagefolder import UnreadableImage
from .imagenet_common import IMAGENET_MEAN, IMAGENET_STD, BatchPlan, PlanLoader
from .imagenet_decode import decode_window


class _PlanBatches(torch.utils.data.Dataset):
    """Item b = batch b of an epoch: (b, uint8 NHWC images, labels, [(path, reason)] skipped)."""

    def __init__(self, plan: BatchPlan, epoch: int):
        self.plan, self.epoch = plan, epoch

    def __len__(self):
        return self.plan.num_batches

    def __getitem__(self, batch_index):
        s = self.plan.out_size
        images, labels, skipped = [], [], []
        for path, label, window, flip in self.plan.batch(self.epoch, batch_index):
            try:
                images.append(decode_window(path, window, flip, s))
                labels.append(label)
            except UnreadableImage as exc:
                skipped.append((path, str(exc)))
        images = torch.stack(images) if images else torch.empty(0, s, s, 3, dtype=torch.uint8)
        return batch_index, images, torch.tensor(labels, dtype=torch.int64), skipped


class TorchvisionLoader(PlanLoader):
    """Train or validation loader over a BatchPlan, decoding in `workers` DataLoader processes."""

    def __init__(self, plan: BatchPlan, *, device, dtype, workers):
        super().__init__(plan, device=device, dtype=dtype, workers=workers)
        self.normalise = Normaliser(IMAGENET_MEAN, IMAGENET_STD, device, dtype)

    def _run_from(self, epoch, start):
        kw = dict(num_workers=self.workers, prefetch_factor=2) if self.workers > 0 else {}
        batches = torch.utils.data.DataLoader(
            _PlanBatches(self.plan, epoch), batch_size=None, sampler=range(start, len(self)),
            pin_memory=self.device.type == "cuda", **kw)
        for batch_index, images, labels, skipped in batches:
            self.note_undecodable(skipped)
            yield batch_index, self.normalise(images), labels.to(self.device, non_blocking=True)
