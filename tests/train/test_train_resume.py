"""Trainer as a user runs it (subprocesses): SIGKILL at a random point then --resume auto, a corrupt
newest checkpoint, SIGTERM; two workers under torchrun (gloo), their replica check, and a resume of their
checkpoints on another number of workers; the --gpus launcher, which checks every input once before any
worker starts.

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
from conftest import run_two_ranks
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


# ------------------------------------------------------------------------------------- two workers
TWO = ["shapes10", "--device", "cpu", "--arch", "resnet8", "--batch-size", "32", "--train-size", "256",
       "--val-size", "63", "--iters", "12", "--log-every", "4"]  # an epoch: 256 / 2 / 16 = 8 iterations


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    """(run folder, stderr) of a two-worker torchrun run: checkpoints at step 8 (the epoch's end) and 12."""
    out = tmp_path_factory.mktemp("two") / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           "-m", "fastpreact.train", *TWO, "--out", str(out)]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stderr


def test_two_workers_under_torchrun_keep_identical_weights(two_workers):
    out, err = two_workers
    # every rank's weights and buffers were compared at each checkpoint and before final.pt
    assert "the 2 workers' weights are identical (checksums of " in err
    final, last = load_weights(out / "final.pt"), torch.load(out / "checkpoints" / "ckpt-12.pt", weights_only=True)
    assert final.keys() == last["model"].keys() and all(torch.equal(final[k], last["model"][k]) for k in final)
    assert not torch.equal(final["fc.weight"], torch.load(out / "checkpoints" / "ckpt-8.pt",
                                                          weights_only=True)["model"]["fc.weight"])
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2 and last["config"]["world_size"] == 2
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert evals[-1]["images"] == 63  # the two disjoint validation shards (32 + 31) summed exactly


def world_size_line(ckpt, now):
    return (f"{ckpt} is from a run of 2 workers and this run has {now}: each worker's share of the global batch "
            f"of 32 images goes from 16 to {32 // now}")


def test_a_resume_on_another_number_of_workers_stops_unless_allowed(two_workers, tmp_path):
    out, _ = two_workers
    at_epoch_end = out / "checkpoints" / "ckpt-8.pt"  # the loader alone would take it on any sharding
    resume = ["shapes10", "--device", "cpu", "--resume", str(at_epoch_end), "--out", str(tmp_path / "one")]
    proc = run(resume)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"fastpreact.train: error: {world_size_line(at_epoch_end, 1)}; resume with 2 workers (--gpus 2, or torchrun "
        "with 2 in all), or add --allow-new-world-size to go on with 1"]
    assert not (tmp_path / "one").exists()

    proc = run(resume + ["--allow-new-world-size"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"warning: {world_size_line(at_epoch_end, 1)} (--allow-new-world-size)" in proc.stderr
    assert f"resuming from {at_epoch_end} (step 8)" in proc.stderr
    assert json.loads((tmp_path / "one" / "config.json").read_text())["world_size"] == 1
    assert (tmp_path / "one" / "final.pt").exists()

    mid_epoch = out / "checkpoints" / "ckpt-12.pt"  # 4 of the epoch's 8 batches: tied to the 2 shards
    proc = run(["shapes10", "--device", "cpu", "--resume", str(mid_epoch), "--out", str(tmp_path / "mid"),
                "--allow-new-world-size"])
    assert proc.returncode == 2 and f"warning: {world_size_line(mid_epoch, 1)}" in proc.stderr
    assert "error: cannot resume mid-epoch: the checkpoint's loader has world_size=2" in proc.stderr


# One process of `--gpus N --max-restarts 1` without GPUs: cli.launch with CPU workers. STUB replaces the
# start of the workers with a line, to show what the launcher found before any worker started.
LAUNCH = "import sys; from fastpreact.train import cli; sys.exit(cli.launch(int(sys.argv[1]), sys.argv[2:], 1))"
STUB = "import sys; from fastpreact.train import cli; cli.launch_local_workers = lambda *a: print('started'); "


def test_the_launcher_finds_input_errors_once_before_any_worker_starts(two_workers, tmp_path):
    bad_data = ["cifar10", "--device", "cpu", "--arch", "resnet8", "--data-dir", str(tmp_path / "nowhere"),
                "--out", str(tmp_path / "bad")]
    for code in (LAUNCH, STUB + LAUNCH):  # once with real workers and a restart, once without any
        proc = subprocess.run([sys.executable, "-c", code, "2", *bad_data], env=ENV, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines() == [
            f"fastpreact.train: error: data directory {tmp_path / 'nowhere'} does not exist; put the cifar10 "
            "python archive there or add --download"]
        assert "started" not in proc.stdout
    # a resume on 4 workers of a 2-worker checkpoint: refused by the launcher, in one line
    ckpt = two_workers[0] / "checkpoints" / "ckpt-8.pt"
    proc = subprocess.run([sys.executable, "-c", STUB + LAUNCH, "4", "shapes10", "--device", "cpu", "--resume",
                           str(ckpt), "--out", str(tmp_path / "four")], env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "started" not in proc.stdout
    assert proc.stderr.strip().splitlines() == [
        f"fastpreact.train: error: {world_size_line(ckpt, 4)}; resume with 2 workers (--gpus 2, or torchrun with 2 "
        "in all), or add --allow-new-world-size to go on with 4"]


def test_the_launcher_runs_the_workers(tmp_path):
    proc = subprocess.run([sys.executable, "-c", LAUNCH, "2", "shapes10", "--device", "cpu", "--arch", "resnet8",
                           "--batch-size", "32", "--train-size", "128", "--val-size", "32", "--iters", "4"],
                          env=ENV, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "runs").iterdir())  # the folder the launcher named for both workers
    assert len(runs) == 1 and (runs[0] / "final.pt").exists()
    assert json.loads((runs[0] / "config.json").read_text())["world_size"] == 2


# ------------------------------------------------------------------------------------------ replicas
REPLICAS = """
import sys, torch
from fastpreact.train.distributed import destroy_process_group, init_process_group, replica_mismatches
init_process_group(torch.device("cpu"), 60.0)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).to(torch.float64)
print("same", replica_mismatches(model.state_dict()))
if torch.distributed.get_rank() == 1:
    with torch.no_grad():  # one ulp of one weight
        model[0].weight[1, 2] = torch.nextafter(model[0].weight[1, 2], torch.tensor(2.0, dtype=torch.float64))
print("nudged", replica_mismatches(model.state_dict()))
# As the trainer does: both ranks reach the end before the group goes, so rank 0's store outlives the
# other rank's last use of it (exiting without this can abort a rank in gloo's teardown).
destroy_process_group(barrier=True)
"""


def test_a_rank_whose_weights_drifted_is_found():
    for code, out, err in run_two_ranks(REPLICAS):
        assert code == 0, err[-3000:]
        assert out.splitlines() == ["same []", "nudged [('0.weight', [1])]"]  # the same answer on both ranks


def test_tensor_checksums_are_exact_and_layout_free():
    from fastpreact.train.distributed import compare_checksums, tensor_checksum
    x = torch.randn(8, 4, 3, 3)
    assert tensor_checksum(x) == tensor_checksum(x.to(memory_format=torch.channels_last))
    y = x.clone()
    y.view(-1)[17] = torch.nextafter(y.view(-1)[17], torch.tensor(9.0))
    assert tensor_checksum(y) != tensor_checksum(x)
    for t in (x.bfloat16(), x.double(), torch.tensor(7), torch.ones(3, dtype=torch.bool)):
        assert tensor_checksum(t) == tensor_checksum(t.clone())
    table = torch.tensor([[1, 2, 3], [1, 5, 3], [1, 5, 4]])
    assert compare_checksums(["a", "b", "c"], table) == [("b", [1, 2]), ("c", [2])]
