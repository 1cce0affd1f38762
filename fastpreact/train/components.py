"""What a training run and an evaluation share, each built from a resolved config (options.resolve_config):
the worker's device and process group, the data (and the launcher's check of it), the model and the
autocast context."""
import contextlib
import functools

import torch

from .options import UsageError
from .distributed import init_process_group

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def setup_worker(cfg, local_rank, world_size):
    """This worker's device (cuda:local_rank or the CPU); joins the job's process group when there are
    several workers."""
    if cfg.device == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UsageError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    if world_size > 1:
        init_process_group(device, cfg.dist_timeout)
    return device


def load_data(cfg, device, rank, world_size, **sizes):
    """This rank's training and validation loaders (a DataBundle); sizes override --train-size/--val-size."""
    from ..data import build_data
    sizes = {**{k: getattr(cfg, k) for k in ("train_size", "val_size") if getattr(cfg, k) is not None}, **sizes}
    return build_data(cfg.dataset, data_dir=cfg.data_dir, batch_size=cfg.batch_size // world_size,
                      device=device, rank=rank, world_size=world_size, seed=cfg.seed, loader=cfg.loader,
                      aug=cfg.aug, val_crop=cfg.val_crop, workers=cfg.workers, synthetic=cfg.synthetic,
                      download=cfg.download, dtype=AMP_DTYPES[cfg.amp] or torch.float32, **sizes)


def check_data(cfg, world_size, loader_state=None, **sizes):
    """What every worker's data would find wrong, found once by the launcher before any worker starts: rank
    0's loaders are built on the CPU (the files, the sizes, a batch the shards cannot fill) and given the
    resumed loader state (a mid-epoch position under another sharding), then dropped."""
    import warnings
    with warnings.catch_warnings():  # the notes on skipped files are the workers' to print
        warnings.simplefilter("ignore")
        data = load_data(cfg, torch.device("cpu"), 0, world_size, **sizes)
    if loader_state is not None:
        data.train.load_state_dict(loader_state)


def create_run_model(cfg, num_classes, device):
    """The model of cfg (arch, unit, kernels) on the device, channels-last unless --no-channels-last."""
    from ..models import create_model
    try:
        model = create_model(cfg.arch, num_classes, unit=cfg.unit, kernels=cfg.kernels)
    except (ValueError, TypeError, NotImplementedError) as e:
        raise UsageError(str(e)) from None
    return model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)


def autocast_for(cfg, device):
    """A factory of cfg.amp's autocast context (a no-op context for --amp off)."""
    dtype = AMP_DTYPES[cfg.amp]
    if dtype is None:
        return contextlib.nullcontext
    # A CUDA graph must not capture autocast's cache of cast weights (it would replay stale casts).
    return functools.partial(torch.autocast, device.type, dtype=dtype, cache_enabled=not cfg.cuda_graphs)


def seed_everything(seed):
    import random

    import numpy as np
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
