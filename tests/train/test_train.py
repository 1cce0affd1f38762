"""Trainer: recipes and lr schedule, run files, CIFAR/shapes10 end to end, non-finite loss, bad input.

The runs here call fastpreact.train.main() in-process (no interpreter start-up) on tiny settings:
resnet8, a few hundred images, tens of iterations. Kill/resume and torchrun: test_train_resume.py.
"""
import json
import pickle

import numpy as np
import pytest
import torch

from fastpreact import train
from fastpreact.train import options
from fastpreact.train.checkpoint import (atomic_torch_save, list_checkpoints, load_checkpoint,
                                   newest_valid_checkpoint, rng_state, save_checkpoint, set_rng_state)
from fastpreact.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--arch", "resnet8", "--batch-size", "16", "--train-size", "128", "--val-size", "64"]


def run_main(argv, capsys):
    code = train.main(argv)
    captured = capsys.readouterr()
    return code, captured.err


# ------------------------------------------------------------------------------ recipe and schedule
def test_paper_cifar_schedule():
    total, warmup, milestones = options.plan_schedule("cifar", 128, 390)
    assert (total, warmup, milestones) == (64000, 400, (32000, 48000))
    s = dict(lr=0.1, total_iters=total, warmup_iters=warmup, milestones=milestones)
    assert options.lr_at(0, **s) == pytest.approx(0.01)
    assert options.lr_at(399, **s) == pytest.approx(0.01)
    assert options.lr_at(400, **s) == pytest.approx(0.1)
    assert options.lr_at(31999, **s) == pytest.approx(0.1)
    assert options.lr_at(32000, **s) == pytest.approx(0.01)
    assert options.lr_at(47999, **s) == pytest.approx(0.01)
    assert options.lr_at(48000, **s) == pytest.approx(0.001)
    assert options.lr_at(63999, **s) == pytest.approx(0.001)


def test_paper_imagenet_schedule_and_stretching():
    ipe = 1281167 // 256
    total, warmup, milestones = options.plan_schedule("imagenet", 256, ipe)
    assert (total, warmup, milestones) == (90 * ipe, 0, (30 * ipe, 60 * ipe))
    s = dict(lr=0.1, total_iters=total, warmup_iters=warmup, milestones=milestones)
    assert options.lr_at(0, **s) == pytest.approx(0.1)
    assert options.lr_at(30 * ipe - 1, **s) == pytest.approx(0.1)
    assert options.lr_at(30 * ipe, **s) == pytest.approx(0.01)
    assert options.lr_at(60 * ipe, **s) == pytest.approx(0.001)
    # --epochs 45 halves every milestone; --iters 6400 on CIFAR is a tenth of the recipe.
    assert options.plan_schedule("imagenet", 256, ipe, epochs=45) == (45 * ipe, 0, (15 * ipe, 30 * ipe))
    assert options.plan_schedule("cifar", 128, 390, iters=6400) == (6400, 40, (3200, 4800))
    assert options.plan_schedule("cifar", 128, 390, epochs=2) == (780, 5, (390, 585))
    assert options.plan_schedule("cifar", 128, 390, iters=6400, warmup_iters=0) == (6400, 0, (3200, 4800))


def test_cosine_schedule():
    s = dict(lr=0.2, total_iters=1000, warmup_iters=100, schedule="cosine")
    assert options.lr_at(50, **s) == pytest.approx(0.02)
    assert options.lr_at(100, **s) == pytest.approx(0.2)
    assert options.lr_at(550, **s) == pytest.approx(0.1)
    assert options.lr_at(1000, **s) == pytest.approx(0.0, abs=1e-12)


def test_resolve_config_scales_lr_with_global_batch():
    cfg = options.resolve_config({"dataset": "cifar10", "device": "cpu", "batch_size": 512}, world_size=4)
    assert cfg.lr == pytest.approx(0.4) and cfg.arch == "resnet164" and cfg.kernels == "stock"
    assert cfg.amp == "off" and cfg.momentum == 0.9 and cfg.wd == 1e-4 and cfg.channels_last
    cfg = options.resolve_config({"dataset": "imagenet", "device": "cpu"}, world_size=8)
    assert (cfg.arch, cfg.batch_size, cfg.lr, cfg.recipe) == ("resnet200", 256, pytest.approx(0.1), "imagenet")
    cfg = options.resolve_config({"dataset": "shapes10", "device": "cpu", "batch_size": 64, "lr": 0.3}, 1)
    assert cfg.lr == 0.3 and cfg.recipe == "cifar"  # an explicit --lr is taken as given


def test_lr_scheduler_follows_schedule_in_training(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_main(["shapes10", *TINY, "--iters", "12", "--warmup-iters", "3", "--log-every", "1",
                          "--out", str(out)], capsys)
    assert code == 0, err
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
           if r["kind"] == "train"}
    # record at step s holds the lr of the NEXT step (index s); milestones at 6 and 9 (64k/32k/48k x 12/64k)
    base = 0.1 * 16 / 128
    expected = {s: options.lr_at(s, lr=base, total_iters=12, warmup_iters=3, milestones=(6, 9)) for s in lrs}
    assert lrs == pytest.approx(expected)
    assert lrs[1] == pytest.approx(base / 10) and lrs[3] == pytest.approx(base) and lrs[9] == pytest.approx(base / 100)


# ------------------------------------------------------------------------------------- checkpoints
def test_atomic_checkpoints_rotate_and_skip_corrupt(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    for step in (10, 20, 30, 40):
        save_checkpoint({"format": "fastpreact-checkpoint-1", "step": step}, ckpt_dir, step)
    assert [s for s, _ in list_checkpoints(ckpt_dir)] == [40, 30, 20]  # the last 3 kept
    assert not list(ckpt_dir.glob("*.tmp"))
    (ckpt_dir / "ckpt-40.pt").write_bytes((ckpt_dir / "ckpt-40.pt").read_bytes()[:100])  # truncated
    (ckpt_dir / "ckpt-50.pt.tmp").write_bytes(b"half written")  # never a candidate
    warnings = []
    path, ckpt = newest_valid_checkpoint(ckpt_dir, warn=warnings.append)
    assert path.name == "ckpt-30.pt" and ckpt["step"] == 30
    assert len(warnings) == 1 and "ckpt-40.pt" in warnings[0] and "unreadable" in warnings[0]


def test_rng_state_roundtrip_through_weights_only_file(tmp_path):
    import random
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    atomic_torch_save({"format": "fastpreact-checkpoint-1", "rng": rng_state()}, tmp_path / "c.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


# -------------------------------------------------------------------------------------- end to end
def test_shapes10_end_to_end_run_files_and_eval_only(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_main(["shapes10", *TINY, "--iters", "20", "--eval-every", "10", "--ckpt-every", "3",
                          "--log-every", "5", "--out", str(out)], capsys)
    assert code == 0, err
    assert {p.name for p in out.iterdir()} == {"config.json", "metrics.jsonl", "checkpoints", "final.pt", "curves.png",
                                               "tuning.json"}
    config = json.loads((out / "config.json").read_text())
    assert config["arch"] == "resnet8" and config["total_iters"] == 20 and config["versions"]["torch"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in records if r["kind"] == "train"]
    eval_recs = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train_recs] == [5, 10, 15, 20]
    assert all({"step", "epoch", "loss", "lr", "img_per_s"} <= r.keys() for r in train_recs)
    assert [r["step"] for r in eval_recs] == [10, 20]
    assert all(0 <= r["top5_err"] <= r["top1_err"] <= 100 and r["images"] == 64 for r in eval_recs)
    # checkpoints every 3 iterations and at each epoch's end (8 iterations), the last 3 kept
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [20, 18, 16]
    ckpt = load_checkpoint(out / "checkpoints" / "ckpt-20.pt")
    assert {"model", "optimizer", "scaler", "scheduler", "loader", "rng", "step"} <= ckpt.keys()
    model = create_model("resnet8", 10)
    model.load_state_dict(torch.load(out / "final.pt", weights_only=True))
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "top-1 error" in err and "top-5 error" in err

    # --eval-only on final.pt reproduces the final evaluation exactly (arch from config.json)
    code, _ = train.main(["shapes10", "--val-size", "64", "--train-size", "128", "--eval-only",
                          str(out / "final.pt")]), None
    printed = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    result = json.loads(printed[-1])
    assert result["top1_err"] == eval_recs[-1]["top1_err"] and result["top5_err"] == eval_recs[-1]["top5_err"]

    # the same --out again without --resume: refused, nothing touched
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    code, err = run_main(["shapes10", *TINY, "--iters", "2", "--out", str(out)], capsys)
    assert code == 2 and "already holds a run" in err and "--resume auto" in err
    assert len(err.strip().splitlines()) == 1
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*")}


def test_resume_auto_without_checkpoint_starts_fresh(tmp_path, capsys):
    out = tmp_path / "new"
    code, err = run_main(["shapes10", *TINY, "--iters", "2", "--resume", "auto", "--out", str(out)], capsys)
    assert code == 0, err
    assert "no valid checkpoint" in err and "starting fresh" in err and (out / "final.pt").exists()


def test_fused_run_keeps_its_tile_choices_and_a_resume_pins_them(tmp_path, capsys, monkeypatch):
    """The kernels' tuning table goes into every checkpoint and RUN/tuning.json; a resume pins the
    checkpoint's; --tuning pins a file's, and a bad file is one line."""
    from fastpreact.kernels import tuning
    out = tmp_path / "run"
    common = ["shapes10", "--arch", "resnet8", "--batch-size", "8", "--train-size", "64", "--val-size", "8",
              "--kernels", "fused", "--out", str(out)]
    tuning.clear()
    code, err = run_main([*common, "--iters", "2"], capsys)
    assert code == 0, err
    saved = json.loads((out / "tuning.json").read_text())
    kernels = saved["cards"]["interpreter"]
    assert {"bn_relu_conv1x1_fwd", "bn_relu_conv1x1_bwd_reduce", "bn_relu_conv1x1_bwd_dgrad"} <= set(kernels)
    assert load_checkpoint(out / "checkpoints" / "ckpt-2.pt")["tuning"] == saved

    pinned = []
    monkeypatch.setattr(tuning, "pin", lambda table, _pin=tuning.pin: (pinned.append(table), _pin(table))[1])
    tuning.clear()
    code, err = run_main([*common, "--iters", "3", "--resume", "auto"], capsys)
    assert code == 0, err
    assert pinned and pinned[0] == saved

    (tmp_path / "bad.json").write_text("{broken")
    code, err = run_main([*common, "--iters", "4", "--resume", "auto", "--tuning", str(tmp_path / "bad.json")],
                         capsys)
    assert code == 2 and "--tuning" in err and "not valid JSON" in err and len(err.strip().splitlines()) == 1
    tuning.clear()


def write_cifar10_fixture(root, per_batch=40, test_size=40, seed=0):
    """cifar-10-batches-py with the real format: pickled dicts of uint8 [N, 3072] and a label list."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = test_size if name == "test_batch" else per_batch
        entry = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, n).tolist(), b"batch_label": name.encode()}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    return root


def test_cifar10_fixture_end_to_end(tmp_path, capsys):
    data_dir = write_cifar10_fixture(tmp_path / "data")
    out = tmp_path / "run"
    code, err = run_main(["cifar10", "--data-dir", str(data_dir), "--arch", "resnet8", "--batch-size", "32",
                          "--iters", "8", "--out", str(out)], capsys)
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["iters_per_epoch"] == 200 // 32 and config["lr"] == pytest.approx(0.025)
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "eval"]
    assert len(evals) == 1 and evals[0]["images"] == 40 and evals[0]["step"] == 8


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    # lr 1e30: the first step blows the weights up, every later loss is inf/nan and its step is skipped
    code, err = run_main(["shapes10", *TINY, "--iters", "60", "--lr", "1e30", "--ckpt-every", "1",
                          "--log-every", "5", "--out", str(out)], capsys)
    assert code == 1
    assert "not finite for 20 steps in a row" in err and "ckpt-1.pt" in err
    assert not (out / "final.pt").exists()
    ckpts = list_checkpoints(out / "checkpoints")
    assert [s for s, _ in ckpts] == [1]  # every later state held non-finite BN statistics
    state = load_checkpoint(ckpts[0][1])["model"]
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


# ------------------------------------------------------------------------------------- bad input
def test_bad_inputs_one_line_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    malformed = tmp_path / "malformed" / "cifar-10-batches-py"
    malformed.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (malformed / name).write_bytes(b"not a pickle")
    cases = [
        (["mnist"], "unknown data set"),
        (["shapes10", "--arch", "vgg16"], "vgg16"),
        (["shapes10", "--arch", "resnet8", "--unit", "postact"], "invalid choice"),
        (["cifar10", "--arch", "resnet8", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o1")],
         "does not exist"),
        (["cifar10", "--arch", "resnet8", "--data-dir", str(empty), "--out", str(tmp_path / "o2")], "neither"),
        (["cifar10", "--arch", "resnet8", "--data-dir", str(malformed.parent), "--out", str(tmp_path / "o3")],
         "corrupt"),
        (["shapes10", "--batch-size", "0"], "--batch-size 0: must be a whole number > 0"),
        (["shapes10", "--resume", str(tmp_path / "missing.pt")], "no such file"),
        (["shapes10", "--eval-only", str(tmp_path / "missing.pt")], "no such file"),
        (["shapes10", "--iters", "10", "--epochs", "1"], "not both"),
        (["shapes10", "--iters", "-3"], "--iters -3: must be a whole number > 0"),
        (["shapes10", "--lr", "fast"], "invalid float"),
    ]
    if not torch.cuda.is_available():
        cases += [
            (["shapes10", "--gpus", "2"], "--gpus needs CUDA"),
            (["shapes10", "--device", "cuda"], "no CUDA GPU"),
            (["shapes10", "--cuda-graphs"], "--cuda-graphs needs a CUDA GPU"),
            (["shapes10", "--amp", "fp16"], "fp16 needs a CUDA GPU"),
            (["shapes10", "--sync-bn"], "--sync-bn needs CUDA"),
        ]
    for argv, expected in cases:
        code, err = run_main(argv, capsys)
        lines = err.strip().splitlines()
        assert code == 2, (argv, err)
        assert len(lines) == 1 and expected in lines[0] and "Traceback" not in err, (argv, err)
    # the global batch must split evenly over the workers
    with pytest.raises(options.UsageError, match="--batch-size 64 is not divisible by the world size 3"):
        options.resolve_config({"dataset": "shapes10", "batch_size": 64}, world_size=3)
    # a corrupt checkpoint named explicitly is an error naming it
    bad = tmp_path / "ckpt-5.pt"
    bad.write_bytes(b"\x00" * 64)
    code, err = run_main(["shapes10", *TINY, "--resume", str(bad), "--out", str(tmp_path / "o4")], capsys)
    assert code == 2 and "ckpt-5.pt" in err and "unreadable" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, line", [
    (["--lr", "-1"], "--lr -1: must be a finite number > 0; give the peak lr (e.g. --lr 0.1), or leave --lr out "
                     "for the recipe's, scaled to the batch"),
    (["--lr", "nan"], "--lr nan: must be a finite number > 0;"),
    (["--lr", "inf"], "--lr inf: must be a finite number > 0;"),
    (["--wd", "-1"], "--wd -1: must be a finite number >= 0; leave --wd out for the paper's 0.0001, or give 0"),
    (["--label-smoothing", "1.5"], "--label-smoothing 1.5: must be a number in [0, 1); e.g. --label-smoothing 0.1, "
                                   "or 0 for none"),
    (["--momentum", "1"], "--momentum 1: must be a finite number in [0, 1); leave --momentum out for the paper's 0.9"),
    (["--epochs", "inf"], "--epochs inf: must be a finite number > 0;"),
    (["--warmup-iters", "-1"], "--warmup-iters -1: must be a whole number >= 0; give 0 for no warm-up"),
    (["--eval-every", "0"], "--eval-every 0: must be a whole number > 0;"),
    (["--workers", "-1"], "--workers -1: must be a whole number >= 0;"),
    (["--seed", "-1"], "--seed -1: must be a whole number in [0, 2**32);"),
    (["--train-size", "0"], "--train-size 0: must be a whole number > 0;"),
    (["--gpus", "0"], "--gpus 0: must be a whole number >= 1;"),
    (["--nesterov", "--momentum", "0"], "--nesterov needs a momentum > 0, and --momentum is 0; drop --nesterov or "
                                        "raise --momentum"),
])
def test_every_number_is_checked_before_the_run_in_one_line(args, line, capsys):
    """Each bad number is one line naming the option, the value and the fix, before any data or model
    (before this check, --lr -1 and --wd -1 ended in a traceback from SGD, --label-smoothing 1.5 in one from
    the loss, and --lr nan trained until the non-finite-loss stop)."""
    code, err = run_main(["shapes10", "--arch", "resnet8", "--device", "cpu", *args], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"fastpreact.train: error: {line}"), err
    assert set(options.NUMBER_RULES) >= {"lr", "wd", "momentum", "label_smoothing", "batch_size", "iters", "epochs",
                                         "warmup_iters", "ckpt_every", "eval_every", "log_every", "workers", "seed",
                                         "train_size", "val_size", "gpus", "max_restarts", "dist_timeout"}


def test_the_plan_is_apart_from_the_options():
    """plan_run returns what the data's length fixes and leaves the resolved options as they were."""
    cfg = options.resolve_config({"dataset": "cifar10", "device": "cpu", "iters": 6400}, world_size=1)
    before = dict(vars(cfg))
    plan = options.plan_run(cfg, 390)
    assert vars(cfg) == before and cfg.warmup_iters is None and cfg.eval_every is None
    assert (plan.total_iters, plan.warmup_iters, plan.milestones, plan.eval_every) == (6400, 40, (3200, 4800), 4000)
    imagenet = options.resolve_config({"dataset": "imagenet", "device": "cpu"}, world_size=1)
    assert options.plan_run(imagenet, 5004).eval_every == 5004


# ------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("extra", [[], ["--cuda-graphs"], ["--amp", "fp16", "--cuda-graphs"],
                                   ["--kernels", "stock", "--amp", "off", "--no-channels-last"]],
                         ids=["fused-bf16", "fused-bf16-graphs", "fused-fp16-graphs", "stock-fp32"])
def test_gpu_training_paths(tmp_path, capsys, extra):
    out = tmp_path / "run"
    code, err = run_main(["shapes10", "--arch", "resnet11", "--batch-size", "64", "--train-size", "1024",
                          "--val-size", "256", "--iters", "24", "--log-every", "4", "--out", str(out), *extra], capsys)
    assert code == 0, err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] is not None for r in records if r["kind"] == "train")  # every step finite
    assert [r["step"] for r in records if r["kind"] == "eval"] == [24]
    model = create_model("resnet11", 10)
    model.load_state_dict(torch.load(out / "final.pt", map_location="cpu", weights_only=True))
    config = json.loads((out / "config.json").read_text())
    assert config["device"] == "cuda" and config["gpu_names"]


def test_cuda_graphs_are_the_default_where_the_host_bounds_the_step(monkeypatch):
    """On one GPU every net replays its step from a CUDA graph unless --no-cuda-graphs (the cost model
    predicts every eager step there host-bound); several workers take it when asked; --compile runs
    eagerly."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)

    def graphs(dataset, world_size=1, **opts):
        return options.resolve_config({"dataset": dataset, **opts}, world_size).cuda_graphs

    assert graphs("cifar10") is True and graphs("shapes10") is True
    assert graphs("cifar10", cuda_graphs=False) is False
    assert graphs("cifar10", world_size=2) is False
    assert graphs("cifar10", compile=True) is False
    assert graphs("imagenet") is True and graphs("imagenet", cuda_graphs=False) is False
    assert graphs("imagenet", world_size=8) is False and graphs("imagenet", world_size=8, cuda_graphs=True) is True
