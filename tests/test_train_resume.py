"""Trainer as a user runs it (subprocesses): SIGKILL at a random point then --resume auto, a corrupt
newest checkpoint, SIGTERM, and two workers under torchrun (gloo).

Exact resume is checked by the strongest test there is: the resumed run's final.pt must equal the
uninterrupted run's bit for bit. Every process runs single-threaded so both orders of floating-point
reduction are the same.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from oracle import assert_same_weights, load_weights

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
RUN = ["shapes10", "--arch", "resnet8", "--batch-size", "16", "--train-size", "256", "--val-size", "64",
       "--iters", "40", "--ckpt-every", "4", "--eval-every", "20", "--log-every", "1"]
TRAIN = [sys.executable, "-m", "fastpreact.train"]


def run(args, **kw):
    return subprocess.run(TRAIN + args, env=ENV, capture_output=True, text=True, timeout=300, **kw)


def steps_logged(out):
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if '"kind": "train"' in line)


def start_and_interrupt(out, sig, rng):
    """Start the run, wait until a random step after the second checkpoint, send `sig`."""
    proc = subprocess.Popen(TRAIN + RUN + ["--out", str(out)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    kill_after = rng.randint(9, 28)
    deadline = time.time() + 240
    while steps_logged(out) < kill_after and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, f"the run ended before step {kill_after}: {proc.communicate()[1][-2000:]}"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err, kill_after


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = run(RUN + ["--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_sigkill_then_resume_with_corrupt_newest_checkpoint_is_bit_identical(reference, tmp_path):
    seed = int.from_bytes(os.urandom(4), "little")
    out = tmp_path / "run"
    code, _, kill_after = start_and_interrupt(out, signal.SIGKILL, random.Random(seed))
    assert code == -signal.SIGKILL, f"seed {seed}"
    ckpts = sorted((out / "checkpoints").glob("ckpt-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
    assert len(ckpts) >= 2, f"seed {seed}: {ckpts}"
    newest = ckpts[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a torn write

    proc = run(["shapes10", "--out", str(out), "--resume", "auto"])  # options come from the checkpoint
    assert proc.returncode == 0, f"seed {seed}, killed after step {kill_after}: {proc.stderr[-3000:]}"
    assert newest.name in proc.stderr and "unreadable" in proc.stderr
    assert f"resuming from {ckpts[-2]}" in proc.stderr
    assert_same_weights(out / "final.pt", reference / "final.pt")
    # metrics.jsonl: the killed run's records after the checkpoint were replaced, not duplicated
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if '"kind": "train"' in line]
    assert steps == list(range(1, 41))


def test_sigterm_writes_checkpoint_exits_and_resumes_bit_identical(reference, tmp_path):
    seed = int.from_bytes(os.urandom(4), "little")
    out = tmp_path / "run"
    code, err, _ = start_and_interrupt(out, signal.SIGTERM, random.Random(seed))
    assert code == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    stopped_at = int(err.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert (out / "checkpoints" / f"ckpt-{stopped_at}.pt").exists()
    proc = run(RUN + ["--out", str(out), "--resume", "auto"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"ckpt-{stopped_at}.pt (step {stopped_at})" in proc.stderr
    assert_same_weights(out / "final.pt", reference / "final.pt")


def test_two_workers_under_torchrun_keep_identical_weights(tmp_path):
    out, dump = tmp_path / "run", tmp_path / "dump"
    dump.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           "-m", "fastpreact.train", "shapes10", "--device", "cpu", "--arch", "resnet8", "--batch-size", "32",
           "--train-size", "256", "--val-size", "63", "--iters", "12", "--log-every", "4", "--out", str(out)]
    proc = subprocess.run(cmd, env={**ENV, "FASTPREACT_TEST_RANK_DUMP": str(dump)}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = dump / "rank0.pt", dump / "rank1.pt"
    assert_same_weights(rank0, rank1)
    assert_same_weights(rank0, out / "final.pt")
    assert not torch.equal(load_weights(rank0)["fc.weight"], torch.load(out / "checkpoints" / "ckpt-8.pt",
                                                                  weights_only=True)["model"]["fc.weight"])
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert evals[-1]["images"] == 63  # the two disjoint validation shards (32 + 31) summed exactly


def test_local_launcher_of_gpus_option_runs_workers_and_reports_their_errors(tmp_path):
    # --gpus N goes through launch_local_workers; with no GPU here it is called directly with CPU workers.
    launch = [sys.executable, "-c", "import sys; from fastpreact import train; "
              "sys.exit(train.launch_local_workers(2, sys.argv[1:], train.main))"]
    out = tmp_path / "run"
    proc = subprocess.run(launch + ["shapes10", "--device", "cpu", "--arch", "resnet8", "--batch-size", "32",
                                    "--train-size", "128", "--val-size", "32", "--iters", "4", "--out", str(out)],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["world_size"] == 2 and (out / "final.pt").exists()
    proc = subprocess.run(launch + ["cifar10", "--device", "cpu", "--arch", "resnet8", "--data-dir",
                                    str(tmp_path / "nowhere"), "--out", str(tmp_path / "bad")],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"fastpreact.train: error: data directory {tmp_path / 'nowhere'} does not exist; put the cifar10 "
        "python archive there or add --download"]
