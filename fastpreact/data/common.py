"""Pieces every loader shares: the error type, seed mixing, the per-epoch permutation and its shards,
the training batch count, normalisation, the resumable train-loader state and the validation loader.

Determinism model (all loaders): the order of an epoch is a permutation drawn from a generator seeded
by mix_seed(seed, epoch), identical on every rank; rank r takes every world_size-th element of it
(interleaved), so the images all ranks have consumed after k batches are exactly a prefix of the
permutation. Every augmentation choice of batch b on rank r comes from a generator seeded by
mix_seed(seed, epoch, b, rank). Nothing else is random, so (epoch, position) is the whole loader state.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

_MASK64 = (1 << 64) - 1


class DataError(ValueError):
    """A problem with the data a user pointed us at (missing directory, bad layout, corrupt archive)."""


def _splitmix64(x: int) -> int:
    # SplitMix64 finaliser: a bijective avalanche on 64 bits, so nearby inputs give unrelated seeds.
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of the integers given (stable across runs and machines)."""
    h = 0x243F6A8885A308D3
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK64))
    return h >> 1  # torch.Generator.manual_seed wants a value that fits in int64


def generator(*parts: int) -> torch.Generator:
    """A CPU torch.Generator seeded from mix_seed(*parts)."""
    g = torch.Generator()
    g.manual_seed(mix_seed(*parts))
    return g


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The epoch's order of the n training items (int64, CPU), the same on every rank."""
    return torch.randperm(n, generator=generator(seed, epoch, 0x5EED))


def rank_shard(perm: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's disjoint part of the permutation: every world_size-th item starting at rank.

    The tail (n % world_size items) is dropped so that every rank gets the same count; which items fall
    in the tail changes every epoch with the permutation.
    """
    per_rank = perm.numel() // world_size
    return perm[: per_rank * world_size].view(per_rank, world_size)[:, rank]


def val_shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous [start, stop) of the validation set for this rank; sizes differ by at most one and
    the ranges tile [0, n) exactly (no padding duplicates)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def val_batch_ranges(n: int, rank: int, world_size: int, batch_size: int) -> list[tuple[int, int]]:
    """[lo, hi) of each validation batch of this rank, in order; only the last one may be short, so
    the counts over all ranks add up to n exactly."""
    start, stop = val_shard_range(n, rank, world_size)
    return [(lo, min(lo + batch_size, stop)) for lo in range(start, stop, batch_size)]


def train_batch_count(n: int, world_size: int, batch_size: int, what: str = "training images") -> int:
    """Full batches per rank and epoch (every rank takes the same count; the tail sits the epoch out),
    or a DataError when not even one batch fills."""
    count = (n // world_size) // batch_size
    if count == 0:
        raise DataError(f"{n} {what} over {world_size} rank(s) do not fill one batch of {batch_size}; "
                        f"lower --batch-size")
    return count


class EpochShards:
    """This rank's shard of an epoch's permutation, kept for the epoch last asked for: a loader asks
    once per batch, and the permutation of a large set costs more than a batch to draw."""

    def __init__(self, n: int, rank: int, world_size: int, device="cpu"):
        self.n, self.rank, self.world_size, self.device = n, rank, world_size, device
        self._key, self._shard = None, None

    def __call__(self, seed: int, epoch: int) -> torch.Tensor:
        # Keyed on the seed too: load_state_dict may replace it with the checkpoint's.
        if self._key != (seed, epoch):
            perm = epoch_permutation(self.n, seed, epoch)
            self._shard = rank_shard(perm, self.rank, self.world_size).to(self.device)
            self._key = (seed, epoch)
        return self._shard


class Normaliser:
    """uint8 NHWC pixels (host or device) -> (pixels - mean) / std as [B,3,H,W] channels-last `dtype`
    on `device`. The arithmetic is fp32 whatever the output dtype, so bf16 batches lose nothing extra."""

    def __init__(self, mean, std, device, dtype):
        self.device, self.dtype = torch.device(device), dtype
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device)
        self.inv_std = 1.0 / torch.tensor(std, dtype=torch.float32, device=self.device)

    def __call__(self, pixels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = (pixels.to(self.device, non_blocking=True).float() - self.mean) * self.inv_std
        if mask is not None:
            x = x * mask  # zero after normalisation: the data set's mean colour (padding)
        return x.to(self.dtype).permute(0, 3, 1, 2)


class ValLoader:
    """This rank's contiguous, disjoint slice of the validation set, in order, the same on every pass
    (no state to save or resume). `batch_ranges` are val_batch_ranges(); `batches()` yields the
    (images, labels) of those ranges in order: slices of a tensor, or a decoding pipeline's output.
    `skipped` lists files dropped at decode time (ImageNet)."""

    def __init__(self, batch_ranges, batches, skipped=None):
        self.batch_ranges, self._batches = batch_ranges, batches
        self.skipped = [] if skipped is None else skipped

    def __len__(self):
        return len(self.batch_ranges)

    def __iter__(self):
        return iter(self._batches())


@dataclass
class DataBundle:
    """What build_data returns: the two loaders and what a trainer needs to know about the data set."""

    train: Any            # TrainLoader: len, iter, epoch, position, state_dict, load_state_dict
    val: Any              # ValLoader: this rank's disjoint shard of the validation set, in order
    num_classes: int
    image_size: int       # training crop side (validation uses val_crop for imagenet)
    train_size: int       # images in the whole training set (all ranks)
    val_size: int         # images in the whole validation set (all ranks)
    mean: tuple           # per-channel, 0..255 scale
    std: tuple            # per-channel, 0..255 scale
    name: str
    loader: str = "device"  # "device" (CIFAR/shapes10 on the device), "dali", "torchvision", "synthetic"
    notes: list = field(default_factory=list)  # e.g. files skipped as unreadable


def check_common_args(batch_size, rank, world_size, dtype):
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer per rank, got {batch_size!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise DataError(f"world_size must be a positive integer, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise DataError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise DataError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}")


class ResumableState:
    """The state_dict()/load_state_dict() every train loader shares: (epoch, position) plus the
    settings that give a position its meaning, checked on load so a mismatched resume fails loudly."""

    def _state_keys(self):
        return {"seed": self.seed, "world_size": self.world_size, "batch_size": self.batch_size,
                "num_batches": len(self)}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, **self._state_keys()}

    def load_state_dict(self, state: dict) -> None:
        try:
            epoch, position = int(state["epoch"]), int(state["position"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"loader state must hold integer 'epoch' and 'position', got {state!r}") from None
        mine = self._state_keys()
        if position != 0:
            # Mid-epoch, a position only means the same batches under the same sharding and batch size.
            for key, value in mine.items():
                if key in state and state[key] != value:
                    raise DataError(
                        f"cannot resume mid-epoch: the checkpoint's loader has {key}={state[key]} but this "
                        f"one has {key}={value}; resume with the same --batch-size, GPU count and seed, "
                        f"or from a checkpoint taken at an epoch boundary")
        if not 0 <= position < len(self):
            raise DataError(f"loader position {position} is outside this epoch's {len(self)} batches")
        if "seed" in state:
            self.seed = int(state["seed"])  # the saved run's seed defines its batches
        self.epoch, self.position = epoch, position

    def _advance(self, batch_index: int) -> None:
        # Called as batch `batch_index` is handed out: a state_dict() taken while the caller works on it
        # already points past it, and after the epoch's last batch it points at the next epoch's start.
        self.position = batch_index + 1
        if self.position >= len(self):
            self.epoch += 1
            self.position = 0
