"""Top-1 and top-5 error on the validation set: during training, and for `--eval-only PATH`."""
import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from .checkpoint import CHECKPOINT_FORMAT
from .options import UsageError, resolve_config
from .distributed import destroy_process_group
from .components import autocast_for, create_run_model, load_data, setup_worker


@torch.no_grad()
def evaluate(model, val_loader, num_classes, autocast, distributed, device):
    """Top-1 and top-min(5, classes) error in percent, exact over all ranks (counts are summed)."""
    was_training = model.training
    model.eval()
    k = min(5, num_classes)
    counts = torch.zeros(3, dtype=torch.int64, device=device)  # top-1 correct, top-k correct, images
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for images, labels in val_loader:
        with autocast():
            logits = model(images)
        topk = logits.float().topk(k, dim=1).indices
        hit = topk == labels[:, None]
        counts += torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum(), torch.tensor(labels.numel(), device=device)])
        loss_sum += nn.functional.cross_entropy(logits.float(), labels, reduction="sum").double()
    if distributed:
        dist.all_reduce(counts)
        dist.all_reduce(loss_sum)
    model.train(was_training)
    top1, topk_correct, n = counts.tolist()
    if n == 0:
        raise UsageError("the validation set is empty; check --val-size and the data directory")
    return {"top1_err": 100.0 * (n - top1) / n, "top5_err": 100.0 * (n - topk_correct) / n,
            "val_loss": loss_sum.item() / n, "images": n}


def prepare_evaluation(opts, world_size):
    """(path, state_dict, cfg, data sizes) of --eval-only PATH: the options resolved once, the architecture
    the weights were trained with unless given on the command line."""
    path = Path(opts["eval_only"])
    state, trained = read_weights(path)
    merged = {k: trained[k] for k in ("arch", "unit") if trained.get(k) is not None}
    merged.update({k: v for k, v in opts.items() if k not in ("resume", "eval_only")})
    cfg = resolve_config(merged, world_size)
    # Evaluation needs no training images: shapes10 draws one batch of them, not 50k.
    sizes = {"train_size": cfg.batch_size} if cfg.dataset == "shapes10" and cfg.train_size is None else {}
    return path, state, cfg, sizes


def evaluate_checkpoint(opts, rank, world_size, local_rank):
    """--eval-only PATH: print the top-1/top-5 error of a checkpoint or a final.pt on the validation set,
    with the device, data and precision setup of a training run."""
    path, state, cfg, sizes = prepare_evaluation(opts, world_size)
    device = setup_worker(cfg, local_rank, world_size)
    data = load_data(cfg, device, rank, world_size, **sizes)
    model = create_run_model(cfg, data.num_classes, device)
    try:
        model.load_state_dict(state)
    except (ValueError, TypeError, RuntimeError) as e:
        first = " ".join(str(e).split())[:300]
        raise UsageError(f"--eval-only {path} does not fit {cfg.arch} ({cfg.unit}) with {data.num_classes} "
                         f"classes ({first}); pass the --arch/--unit it was trained with") from None
    result = evaluate(model, data.val, data.num_classes, autocast_for(cfg, device), world_size > 1, device)
    if rank == 0:
        print(f"{path}: top-1 error {result['top1_err']:.2f}%, top-{min(5, data.num_classes)} error "
              f"{result['top5_err']:.2f}% on {result['images']} {cfg.dataset} validation images")
        print(json.dumps({"checkpoint": str(path), **result}))
    if world_size > 1:
        destroy_process_group()
    return 0


def read_weights(path):
    """(state_dict, the config it was trained with) of a training checkpoint or of a final.pt."""
    if not path.is_file():
        raise UsageError(f"--eval-only {path}: no such file; pass a ckpt-<step>.pt or a final.pt")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"--eval-only {path}: unreadable ({type(e).__name__}); pass an intact checkpoint") from None
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        return obj["model"], obj["config"]
    if isinstance(obj, dict) and all(torch.is_tensor(v) for v in obj.values()):
        cfg_file = path.parent / "config.json"  # final.pt sits in its run folder beside config.json
        return obj, (json.loads(cfg_file.read_text()) if cfg_file.is_file() else {})
    raise UsageError(f"--eval-only {path}: neither a training checkpoint nor a state_dict")
