"""The DALI ImageNet loader: one pipeline per rank, fed the batch plan through an external source.

Pipeline: encoded bytes + window + flip (external source, from imagenet_common.BatchPlan)
  -> fn.decoders.image_slice (ROI decode of the window; "mixed" = nvJPEG on the GPU, "cpu" without one)
  -> fn.resize to out x out (linear, antialiased)
  -> fn.crop_mirror_normalize (mirror, per-channel mean/std, fp16 or fp32, HWC)
The GPU and CPU pipelines are the same graph; only the decoder's device and device_id differ
(device_id=None on a machine without a GPU, as the tests run it). File bytes are read on a thread pool
of `workers` threads, one batch ahead. Output: [B,3,S,S] channels-last torch tensors on the device
(bf16 is cast from DALI's fp16 by torch).

The pipeline is rebuilt at the start of every epoch, on resume, and after a decode failure; DALI's own
reader, shuffling and random operators are not used, so nothing about the order or the crops lives in
DALI (see imagenet.py for what is exact).

DALI reports a failed batch without naming the file ("nvImageCodec failure"/"jpeg_parser" errors), so
the loader decodes that batch's files on the CPU (imagenet_decode.decode_window, as the torchvision
loader does) to find it, then rebuilds the pipeline from that batch without it. If the CPU decoder
reads every suspect, the loader stops with a DataError listing them.
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .common import DataError
from .imagefolder import UnreadableImage
from .imagenet_common import IMAGENET_MEAN, IMAGENET_STD, PlanLoader
from .imagenet_decode import decode_window

_PREFETCH = 2  # DALI's prefetch queue depth: batches fed ahead of the one being returned


class _PlanSource:
    """DALI external source callback: one planned batch per call, in order; remembers what it fed."""

    def __init__(self, plan, epoch, start, pool):
        self.plan, self.epoch, self.next_batch, self.pool = plan, epoch, start, pool
        self.fed = deque()  # (batch_index, [(path, ...)]) not yet returned by the pipeline
        self._ahead = None

    def _read(self, batch_index):
        entries = self.plan.batch(self.epoch, batch_index)
        return batch_index, entries, self.pool.map(lambda e: np.fromfile(e[0], dtype=np.uint8), entries)

    def __call__(self):
        while True:
            if self.next_batch >= self.plan.num_batches:
                raise StopIteration
            batch_index, entries, data = self._ahead or self._read(self.next_batch)
            self.next_batch += 1
            # Start reading the following batch while DALI decodes this one.
            self._ahead = self._read(self.next_batch) if self.next_batch < self.plan.num_batches else None
            if entries:  # a batch whose every file proved bad is skipped (position still advances)
                break
        self.fed.append((batch_index, entries))
        return (list(data),
                [np.array(e[3], dtype=np.int32) for e in entries],            # mirror flags
                [np.array(e[2][:2], dtype=np.int32) for e in entries],        # window start (x, y)
                [np.array(e[2][2:], dtype=np.int32) for e in entries],        # window shape (w, h)
                [np.array(e[1], dtype=np.int64) for e in entries])            # labels


def _build_pipeline(source, batch_size, out_size, on_gpu, device_index, dtype, threads):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def
    def imagenet_pipeline():
        encoded, flips, starts, shapes, labels = fn.external_source(
            source=source, num_outputs=5, batch=True)
        images = fn.decoders.image_slice(encoded, start=starts, shape=shapes,
                                         device="mixed" if on_gpu else "cpu", output_type=types.RGB,
                                         adjust_orientation=False)  # PIL ignores EXIF orientation too
        images = fn.resize(images, size=[out_size, out_size], interp_type=types.INTERP_LINEAR,
                           antialias=True)
        images = fn.crop_mirror_normalize(
            images, mirror=flips, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD),
            dtype=types.FLOAT if dtype == torch.float32 else types.FLOAT16, output_layout="HWC")
        return images, labels

    pipe = imagenet_pipeline(batch_size=batch_size, num_threads=threads,
                             device_id=device_index if on_gpu else None,
                             prefetch_queue_depth=_PREFETCH, exec_dynamic=True)
    pipe.build()
    return pipe


def _to_torch(tensor_list, device, dtype):
    """A dense DALI batch as a torch tensor on `device` (a device copy for GPU output)."""
    from nvidia.dali.backend import TensorListGPU
    if isinstance(tensor_list, TensorListGPU):
        from nvidia.dali.plugin.pytorch import feed_ndarray
        dense = tensor_list.as_tensor()
        out = torch.empty(tuple(dense.shape()), dtype=dtype, device=device)
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    return torch.from_numpy(np.array(tensor_list.as_tensor())).to(device, non_blocking=True)


class DaliLoader(PlanLoader):
    """Train or validation loader over a BatchPlan (imagenet_common.py), decoding with DALI."""

    def __init__(self, plan, *, device, dtype, workers):
        super().__init__(plan, device=device, dtype=dtype, workers=workers)
        self.on_gpu = device.type == "cuda"
        self.device_index = (device.index if device.index is not None else torch.cuda.current_device()
                             ) if self.on_gpu else None
        self.threads = max(1, min(workers, os.cpu_count() or 1))
        self.pool = ThreadPoolExecutor(max(1, workers))

    def _run_from(self, epoch, start):
        """Yield (batch_index, images, labels) from batch `start` to the end of `epoch`, recovering
        from decode failures by naming the file and rebuilding the pipeline after it."""
        while True:
            source = _PlanSource(self.plan, epoch, start, self.pool)
            pipe = _build_pipeline(source, self.plan.batch_size, self.plan.out_size, self.on_gpu,
                                   self.device_index, self.dtype, self.threads)
            try:
                while True:
                    try:
                        images, labels = pipe.run()
                    except StopIteration:
                        return
                    batch_index, _ = source.fed.popleft()
                    x = _to_torch(images, self.device,
                                  torch.float32 if self.dtype == torch.float32 else torch.float16)
                    if self.dtype == torch.bfloat16:
                        x = x.to(torch.bfloat16)
                    yield batch_index, x.permute(0, 3, 1, 2), _to_torch(labels, self.device, torch.int64)
                    start = batch_index + 1
            except RuntimeError as exc:  # DALI's "Critical error in pipeline": the pipeline is dead
                suspects = [e for _, entries in source.fed for e in entries]
                start = self._find_culprits(exc, suspects, source.fed[0][0] if source.fed else start)
            finally:
                del pipe

    def _find_culprits(self, exc, suspects, failed_batch):
        bad = []
        for path, _, window, flip in suspects:
            try:
                decode_window(path, window, flip, 8)
            except UnreadableImage as why:
                bad.append((path, str(why)))
        if not bad:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            names = ", ".join(p for p, *_ in suspects[:8]) + (" ..." if len(suspects) > 8 else "")
            raise DataError(f"DALI failed on a batch that torchvision/PIL decode ({first}); suspects: "
                            f"{names}; try --loader torchvision") from None
        self.note_undecodable(bad)
        return failed_batch
