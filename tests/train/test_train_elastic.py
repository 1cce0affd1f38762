"""Faults survived: a worker lost after a checkpoint or while writing one, under torchrun and under the
trainer's own launcher (--gpus N --max-restarts K); collectives that fail after --dist-timeout instead of
hanging; the per-attempt store prefix that keeps a restarted attempt away from the previous one's keys.

Every run here is two gloo workers on a CPU, single-threaded, so a restarted run must end bit-identical
to an uninterrupted one. Kills happen at a point the test observes (a checkpoint file that appeared, a
checkpoint write that the test holds open), never after a sleep.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from datetime import timedelta

import pytest
import torch.distributed as dist

from fastpreact import train
from fastpreact.train import distributed, options
from oracle import assert_same_weights

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
RUN = ["shapes10", "--device", "cpu", "--arch", "resnet8", "--batch-size", "16", "--train-size", "256",
       "--val-size", "64", "--iters", "24", "--ckpt-every", "4", "--eval-every", "12", "--log-every", "4"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
LAUNCH = [sys.executable, "-c", "import sys; from fastpreact import train; from fastpreact.train.distributed import launch_local_workers; "
          "sys.exit(launch_local_workers(2, sys.argv[2:], train.main, eval(sys.argv[1])))"]
DEADLINE_S = 150  # far above what any of these runs takes; only a hang reaches it


def start(cmd, tag):
    return subprocess.Popen(cmd, env={**ENV, "FASTPREACT_TEST_TAG": tag}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc):
    try:
        out, err = proc.communicate(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the run hung for {DEADLINE_S} s: {err[-3000:]}")
    return proc.returncode, err


def wait_for(condition, proc, what):
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (code {proc.returncode}) before {what}: {proc.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} after {DEADLINE_S} s")
        time.sleep(0.002)


def processes():
    """{pid: (parent pid, environ at start, command line)} of this user's processes."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
                with open(f"/proc/{entry}/environ", "rb") as f:
                    env = set(f.read().split(b"\0"))
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
            except (OSError, IndexError, ValueError):
                continue
            found[int(entry)] = (ppid, env, cmdline)
    return found


def kill_torchrun_worker(tag, rank):
    """SIGKILL the worker of this RANK, on attempt 0, of the torchrun started with `tag`."""
    want = {f"FASTPREACT_TEST_TAG={tag}".encode(), f"RANK={rank}".encode(), b"TORCHELASTIC_RESTART_COUNT=0"}
    pids = [pid for pid, (_, env, _) in processes().items() if want <= env]
    assert len(pids) == 1, f"workers of rank {rank} on attempt 0: {pids}"
    os.kill(pids[0], signal.SIGKILL)


def kill_launched_worker(launcher):
    """SIGKILL the newest worker that the launcher process started (its workers are multiprocessing spawns,
    which set RANK after they start)."""
    pids = [pid for pid, (ppid, _, cmdline) in processes().items()
            if ppid == launcher.pid and b"spawn_main" in cmdline and b"resource_tracker" not in cmdline]
    assert len(pids) == 2, f"workers of the launcher: {pids}"
    os.kill(max(pids), signal.SIGKILL)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted two-worker run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = subprocess.run(TORCHRUN + ["-m", "fastpreact.train"] + RUN + ["--out", str(out)], env=ENV,
                          capture_output=True, text=True, timeout=DEADLINE_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "final.pt"


def resumed_step(err, out):
    marker = f"resuming from {out / 'checkpoints'}/ckpt-"
    assert marker in err, err[-3000:]
    return int(err.split(marker)[1].split(".pt")[0])


def test_torchrun_restart_after_a_lost_worker_resumes_bit_identical(reference, tmp_path):
    out, tag = tmp_path / "run", uuid.uuid4().hex
    proc = start(TORCHRUN + ["--max-restarts", "1", "-m", "fastpreact.train"] + RUN
                 + ["--out", str(out), "--resume", "auto"], tag)
    wait_for((out / "checkpoints" / "ckpt-8.pt").exists, proc, "checkpoint 8")
    kill_torchrun_worker(tag, rank=1)
    code, err = finish(proc)
    assert code == 0, err[-3000:]
    assert resumed_step(err, out) >= 8
    assert_same_weights(out / "final.pt", reference)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if '"kind": "train"' in line]
    assert steps == list(range(4, 25, 4))  # the killed attempt's records after the checkpoint: replaced


def hold_checkpoint_write(ckpt_dir, step, proc):
    """Make ckpt-<step>.pt.tmp a pipe the test reads from; return once rank 0 has written part of the
    checkpoint into it and is blocked writing the rest (the pipe is full). Returns the read end."""
    fifo = ckpt_dir / f"ckpt-{step}.pt.tmp"
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    got = 0
    deadline = time.monotonic() + DEADLINE_S
    while got < 4096:
        assert proc.poll() is None and time.monotonic() < deadline, "rank 0 never wrote the checkpoint"
        try:
            got += len(os.read(fd, 4096 - got))
        except BlockingIOError:  # the writer has it open, nothing written yet
            pass
        time.sleep(0.001)
    return fd


def test_torchrun_worker_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(reference, tmp_path):
    out, tag = tmp_path / "run", uuid.uuid4().hex
    ckpt_dir = out / "checkpoints"
    proc = start(TORCHRUN + ["--max-restarts", "1", "-m", "fastpreact.train"] + RUN
                 + ["--out", str(out), "--resume", "auto"], tag)
    # config.json comes after rank 0 cleared stale temporary files and before the first step
    wait_for((out / "config.json").exists, proc, "config.json")
    assert not list(ckpt_dir.glob("ckpt-*.pt")), "the run passed step 4 before the test could hold step 12"
    fd = hold_checkpoint_write(ckpt_dir, 12, proc)
    before = {p.name: p.read_bytes() for p in ckpt_dir.glob("ckpt-*.pt")}
    assert sorted(before) == ["ckpt-4.pt", "ckpt-8.pt"]
    kill_torchrun_worker(tag, rank=0)  # the writer, in the middle of torch.save
    os.close(fd)
    code, err = finish(proc)
    assert code == 0, err[-3000:]
    assert resumed_step(err, out) == 8
    assert_same_weights(out / "final.pt", reference)
    assert not list(ckpt_dir.glob("*.tmp"))


def test_gpus_launcher_restarts_with_max_restarts_and_resumes_bit_identical(reference, tmp_path):
    # --gpus N --max-restarts K goes through launch_local_workers; with no GPU here it is called with CPU workers.
    out, tag = tmp_path / "run", uuid.uuid4().hex
    proc = start(LAUNCH + ["1"] + RUN + ["--out", str(out)], tag)
    wait_for((out / "checkpoints" / "ckpt-8.pt").exists, proc, "checkpoint 8")
    kill_launched_worker(proc)
    code, err = finish(proc)
    assert code == 0, err[-3000:]
    assert "fastpreact.train: worker restart 1 of 1" in err
    assert resumed_step(err, out) >= 8  # the restarted workers got --resume auto
    assert_same_weights(out / "final.pt", reference)


def test_gpus_launcher_without_max_restarts_ends_with_the_failure(tmp_path):
    out, tag = tmp_path / "run", uuid.uuid4().hex
    proc = start(LAUNCH + ["None"] + RUN + ["--out", str(out)], tag)
    wait_for((out / "checkpoints" / "ckpt-4.pt").exists, proc, "checkpoint 4")
    kill_launched_worker(proc)
    code, err = finish(proc)
    assert code != 0 and not (out / "final.pt").exists()
    assert "worker restart" not in err and "resuming from" not in err


def test_restarted_workers_resume_unless_the_command_says_from_what():
    argv = ["shapes10", "--out", "r"]
    assert distributed.restart_argv(argv, 0) == argv
    assert distributed.restart_argv(argv, 2) == argv + ["--resume", "auto"]
    assert distributed.restart_argv(argv + ["--resume", "x.pt"], 1) == argv + ["--resume", "x.pt"]
    assert distributed.restart_argv(argv + ["--resume=auto"], 1) == argv + ["--resume=auto"]


PEER = """
import os, sys, time
import torch, torch.distributed as dist
from fastpreact.train.distributed import init_process_group
init_process_group(torch.device("cpu"), float(sys.argv[1]))
if dist.get_rank() == 1:
    sys.stdin.read()  # never reaches the collective; ends when the test closes stdin
    os._exit(0)  # rank 0 and its store are gone by now: a normal exit's gloo teardown could abort
t = time.monotonic()
try:
    dist.all_reduce(torch.ones(1))
except Exception as e:
    print(f"{time.monotonic() - t:.2f} {type(e).__name__}", flush=True)
    os._exit(3)  # not sys.exit: tearing down gloo after a timed-out collective can abort the interpreter
print("no error", flush=True)
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_collective_whose_peer_never_arrives_fails_within_the_timeout():
    env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    for k in ("TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RESTART_COUNT"):
        env.pop(k, None)
    procs = [subprocess.Popen([sys.executable, "-c", PEER, "3"], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    try:
        out, err = procs[0].communicate(timeout=90)
    finally:
        procs[1].stdin.close()
        procs[1].wait(timeout=60)
    assert procs[0].returncode == 3, out + err[-3000:]
    seconds, error = out.split()
    assert 3.0 <= float(seconds) < 30.0 and error.endswith("Error"), out  # gloo's default: 30 minutes
    assert procs[1].returncode == 0


def test_a_restarted_attempt_never_meets_the_previous_attempts_keys():
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    stale = "fastpreact/previous-attempt"
    server.set(distributed._ATTEMPT_KEY, stale)  # what a dead attempt left: its token and its answers
    server.set(f"{stale}/go/somebody", "1")
    client = lambda: dist.TCPStore("127.0.0.1", server.port, is_master=False, timeout=timedelta(seconds=30))
    tokens = {}

    def join(rank, store):
        tokens[rank] = distributed._agree_on_attempt(store, rank, 3, 30.0)

    late = [threading.Thread(target=join, args=(r, client())) for r in (1, 2)]
    for t in late:  # ranks 1 and 2 come first and read the stale token
        t.start()
    deadline = time.monotonic() + 30
    while not server.check([f"{stale}/hello/1", f"{stale}/hello/2"]):
        assert time.monotonic() < deadline
        time.sleep(0.001)
    join(0, client())
    for t in late:
        t.join(timeout=30)
    assert tokens[0] != stale and tokens[0] == tokens[1] == tokens[2]
    again = [threading.Thread(target=join, args=(r, client())) for r in (0, 1, 2)]
    for t in again:
        t.start()
    for t in again:
        t.join(timeout=30)
    assert tokens[0] == tokens[1] == tokens[2] and len({tokens[0], stale}) == 2


@pytest.mark.parametrize("args, message", [
    (["--dist-timeout", "0"], "--dist-timeout 0: must be a finite number of seconds > 0; leave --dist-timeout out "
                              "for 600 seconds"),
    (["--dist-timeout", "soon"], "argument --dist-timeout: invalid float value: 'soon'"),
    (["--dist-timeout", "nan"], "--dist-timeout nan: must be a finite number of seconds > 0;"),
    (["--dist-timeout", "inf"], "--dist-timeout inf: must be a finite number of seconds > 0;"),
    (["--max-restarts", "-1"], "--max-restarts -1: must be a whole number >= 0; give how many times to restart "
                               "failed workers"),
    (["--max-restarts", "2"], "--max-restarts restarts the workers of --gpus N; under torchrun give torchrun "
                              "--max-restarts K"),
])
def test_bad_fault_options_are_one_line_errors(args, message, capsys):
    assert train.main(["shapes10", "--device", "cpu"] + args) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fastpreact.train: error: {message}"), err


def test_dist_timeout_is_a_runtime_option():
    assert {"dist_timeout", "max_restarts"} <= set(options.RUNTIME_OPTIONS)
    assert options.build_parser().parse_args(["shapes10", "--dist-timeout", "90"]).dist_timeout == 90.0
