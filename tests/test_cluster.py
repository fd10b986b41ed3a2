"""Runs that survive a cluster (issue 21): torchrun restarts with one command line (`--resume auto`), preemption
checkpoints on SIGTERM / SIGUSR1 / SIGINT at an iteration every rank agrees on, and one writer per run folder.
Every interrupted run must end bit-identical to the uninterrupted one (tests/test_exactness.py's rule)."""
from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from test_exactness import TOOLS, assert_same_run

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import train_det  # noqa: E402

from engine.checkpoint import save_checkpoint, start_run  # noqa: E402
from engine.config import parse_args  # noqa: E402
from engine.preemption import EXIT_PREEMPTED  # noqa: E402
from engine.run_lock import EXIT_IN_USE, LOCK_FILE, OutputDirInUse, lock_output_dir  # noqa: E402

# the tiny detection run of tests/test_exactness.py: 16 generated 64 px images, 4 batches an epoch
DET = [*TOOLS["det"][1], "data.synthetic.enabled=true", "train.log_every=1", "eval.every=0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # in-process runs use one thread too (conftest): same bits
# torchrun's agent otherwise shares one TCPStore across restart attempts, and a restarted rank can read the previous
# attempt's addresses and fail to connect (pytorch/pytorch#135712, #167288; seen here with torch 2.14 and gloo)
TORCHRUN_ENV = {**ENV, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def det_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return [*DET, f"data.root={data}", f"output_dir={out}", *extra]


def wait_for(condition: Callable[[], object], process: subprocess.Popen, what: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended (exit {process.returncode}) before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def history(out: Path) -> list[dict]:
    """The complete lines of a history.jsonl that may be being written."""
    path = out / "history.jsonl"
    return [json.loads(line) for line in path.read_text().split("\n")[:-1]] if path.is_file() else []


def iterations(out: Path) -> list[int]:
    return [record["iteration"] for record in history(out) if "train/loss" in record]


def workers(launcher_pid: int) -> dict[int, int]:
    """{RANK: pid} of the training processes torchrun started."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) != launcher_pid:
                continue
            items = (proc / "environ").read_bytes().decode().split("\0")
            env = dict(item.split("=", 1) for item in items if "=" in item)
        except (OSError, ValueError):  # exited meanwhile
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = int(proc.name)
    return found


def children(pid: int) -> list[int]:
    return [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()]


def alive(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


# ------------------------------------------------------------------ torchrun: restarts and a signal to one rank

def test_torchrun_restarts_and_a_signal_to_one_rank_continue_the_run_exactly(tmp_path):
    """One command line for the first start and every restart: a worker SIGKILLed after the first checkpoint (torchrun
    restarts both, they resume), then SIGTERM to rank 1 only (both ranks stop at the same iteration, rank 0 saves it,
    torchrun restarts, they resume): the weights equal the uninterrupted 2-process run's, each iteration logged once."""
    def torchrun(out: Path, *extra: str, restarts: int = 0) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                f"--max-restarts={restarts}", str(ROOT / "tools" / "train_det.py"),
                *det_argv(tmp_path / "data", out, "train.batch_size=2", "train.iters=12", "train.checkpoint_every=2",
                          "data.num_workers=1"), *extra]

    full = subprocess.run(torchrun(tmp_path / "full"), env=TORCHRUN_ENV, capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-3000:]

    cut, log = tmp_path / "cut", tmp_path / "cut.log"
    with open(log, "w") as sink:
        run = subprocess.Popen(torchrun(cut, "--resume", "auto", restarts=2), env=TORCHRUN_ENV, stdout=sink,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: (cut / "last.pth").is_file(), run, "the first checkpoint")  # complete: written by rename
        first, first_save = workers(run.pid), (cut / "last.pth").stat().st_mtime_ns
        os.kill(first[1], signal.SIGKILL)
        wait_for(lambda: (cut / "last.pth").stat().st_mtime_ns != first_save, run, "a checkpoint after the restart")
        restarted = workers(run.pid)
        assert len(restarted) == 2 and not set(restarted.values()) & set(first.values())
        os.kill(restarted[1], signal.SIGTERM)  # the signal reaches one rank only
        assert run.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    text = log.read_text()
    stop = re.search(r"stopped by a stop signal to another rank after iteration (\d+)", text)
    assert stop, text[-3000:]
    assert f"resumed from {cut / 'last.pth'} at iteration {stop[1]} " in text  # the restart lost no iteration
    assert int(stop[1]) < 12
    assert iterations(cut) == list(range(1, 13))
    assert_same_run(tmp_path / "full", cut)


# ------------------------------------------------------------------ one process: SIGTERM, then --resume auto

def test_sigterm_mid_epoch_checkpoints_that_iteration_and_resume_auto_ends_exactly(tmp_path):
    """SIGTERM to the run's process group (as torchrun sends it: DataLoader workers get it too) mid-epoch, with no
    periodic checkpoint due: the run finishes its iteration, writes last.pth there, shuts its workers down and
    exits with EXIT_PREEMPTED; the same command with --resume auto ends bit-identical to the uninterrupted run."""
    data, full, cut = tmp_path / "data", tmp_path / "full", tmp_path / "cut"
    train_det.main(det_argv(data, full, "data.num_workers=0", "train.checkpoint_every=null"))

    command = [sys.executable, str(ROOT / "tools" / "train_det.py"),
               *det_argv(data, cut, "data.num_workers=2", "train.checkpoint_every=null"), "--resume", "auto"]
    run = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        wait_for(lambda: len(iterations(cut)) >= 5, run, "iteration 5")  # epoch 2 (4 batches an epoch), batch 1
        loader_workers = children(run.pid)
        os.killpg(run.pid, signal.SIGTERM)
        _, stderr = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    assert run.returncode == EXIT_PREEMPTED, stderr[-3000:]
    assert len(loader_workers) == 2 and not any(alive(pid) for pid in loader_workers)
    state = torch.load(cut / "last.pth", map_location="cpu", weights_only=True)
    stopped = iterations(cut)[-1]
    assert state["iteration"] == stopped and state["loop"]["step_in_epoch"] == stopped - 4 > 0  # mid-epoch
    assert f"stopped by SIGTERM after iteration {stopped} of 10" in stderr

    train_det.main(det_argv(data, cut, "data.num_workers=0", "train.checkpoint_every=null", "--resume", "auto"))
    assert_same_run(full, cut)


# ------------------------------------------------------------------ one writer per run folder

def test_a_folder_in_use_refuses_every_other_run_until_its_holder_is_killed(tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "run"
    command = [sys.executable, str(ROOT / "tools" / "train_det.py"),
               *det_argv(data, out, "data.num_workers=2", "train.iters=400", "train.checkpoint_every=2")]
    run = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    try:
        wait_for(lambda: (out / "last.pth").is_file(), run, "the first checkpoint")
        for flags in ([], ["--resume"], ["--resume", "auto"], ["--overwrite"], ["--eval-only"]):
            with pytest.raises(OutputDirInUse) as refused:
                train_det.main(det_argv(data, out, "data.num_workers=0", *flags))
            assert refused.value.code == EXIT_IN_USE
            assert re.search(rf"{out} is in use by another run \(pid {run.pid} on host \S+, started \d{{4}}-",
                             capsys.readouterr().err)
        assert (out / "last.pth").is_file() and run.poll() is None  # --overwrite deleted nothing

        lock = str(out / LOCK_FILE)
        loader_workers = children(run.pid)
        assert len(loader_workers) == 2 and lock in open_files(run.pid)
        assert not any(lock in open_files(pid) for pid in loader_workers)  # so the holder's death frees it at once
        os.kill(run.pid, signal.SIGKILL)  # the holder only, not its DataLoader workers
        run.wait()
        trained = torch.load(out / "last.pth", map_location="cpu", weights_only=True)["iteration"]
        train_det.main(det_argv(data, out, "data.num_workers=2", "train.iters=400", "train.checkpoint_every=2",
                                "--resume", "auto", f"train.iters={trained + 2}"))  # overrides after --resume
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    assert (out / "metrics.json").is_file() and not (out / LOCK_FILE).exists()
    assert iterations(out) == list(range(1, trained + 3))
    deadline = time.time() + 30  # the killed holder's workers end by themselves (torch's watchdog)
    while any(alive(pid) for pid in loader_workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in loader_workers)


def open_files(pid: int) -> list[str]:
    folder = Path(f"/proc/{pid}/fd")
    return [os.readlink(fd) for fd in folder.iterdir()] if folder.is_dir() else []


def test_lock_is_per_folder_and_leaves_no_folder_behind(tmp_path):
    with lock_output_dir(tmp_path / "a" / "run"):
        with lock_output_dir(tmp_path / "b"):  # another folder: another lock
            pass
        with pytest.raises(OutputDirInUse, match=rf"{tmp_path / 'a' / 'run'} is in use .*pid {os.getpid()} "):
            with lock_output_dir(tmp_path / "a" / "run"):
                pass
    assert not any(tmp_path.iterdir())  # the folders were created for the locks, and removed with them


def test_a_file_system_without_flock_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr("engine.run_lock.fcntl.flock", mock.Mock(side_effect=OSError(errno.ENOSYS, "Function not "
                                                                                     "implemented")))
    with pytest.raises(OSError, match=rf"cannot lock output_dir {tmp_path}: Function not implemented; .*flock"):
        with lock_output_dir(tmp_path):
            pass


def test_only_rank_0_takes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with lock_output_dir(tmp_path / "run"):
        assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ signals

STOP_SCRIPT = """
import os, signal, sys, time
from engine.preemption import StopRequest
with StopRequest() as stop:
    print("ready", flush=True)
    deadline = time.time() + 30
    while time.time() < deadline:
        time.sleep(0.01)
    sys.exit(0 if stop.requested else 3)
"""


@pytest.mark.parametrize("gap, code", [(0.1, 0), (1.5, 128 + signal.SIGUSR1)])
def test_a_second_signal_exits_at_once_unless_it_is_the_same_request_delivered_twice(gap, code):
    """SLURM and torchrun both signal a worker within milliseconds: one request. A second one later: exit now."""
    process = subprocess.Popen([sys.executable, "-c", STOP_SCRIPT], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "ready\n"
    process.send_signal(signal.SIGTERM)
    time.sleep(gap)
    start = time.time()
    process.send_signal(signal.SIGUSR1)
    if code:
        assert process.wait(timeout=10) == code and time.time() - start < 5
    else:
        time.sleep(0.5)
        assert process.poll() is None
        process.kill()
        process.wait()


# ------------------------------------------------------------------ command lines and run folders

@pytest.mark.parametrize("argv, resume", [
    (["--resume", "train.iters=5"], True),
    (["train.iters=5", "--resume", "auto"], "auto"),
    (["--resume", "auto", "train.iters=5"], "auto"),
    (["--resume=auto", "train.lr=0.5", "train.iters=5"], "auto"),
    (["train.iters=5"], False),
])
def test_overrides_may_come_before_or_after_resume(argv, resume):
    args, cfg = parse_args("t", ROOT / "configs" / "det" / "default.yaml", argv)
    assert args.resume == resume and cfg.train.iters == 5


def config(tmp_path: Path, **train) -> dict:
    return OmegaConf.create({"train": {"lr": 0.1, "epochs": 2, **train}, "output_dir": str(tmp_path)})


def test_resume_auto_continues_a_checkpoint_and_starts_anew_without_one(tmp_path, caplog):
    assert start_run(tmp_path / "empty", config(tmp_path), resume="auto") is None
    (tmp_path / "history.jsonl").write_text('{"iteration": 1}\n')  # a run killed before its first checkpoint
    (tmp_path / "tb").mkdir()
    assert start_run(tmp_path, config(tmp_path), resume="auto") is None
    assert "never wrote a checkpoint (history.jsonl): nothing to resume; starting a new run" in caplog.text
    assert not (tmp_path / "history.jsonl").exists() and not (tmp_path / "tb").exists()

    save_checkpoint(tmp_path / "last.pth", model=nn.Linear(2, 2), epoch=0, iteration=3,
                    config=OmegaConf.to_container(config(tmp_path)), extra={"loop": {"world_size": 1}})
    assert start_run(tmp_path, config(tmp_path, epochs=4), resume="auto")["config_changes"] == {"train.epochs": (2, 4)}
    with pytest.raises(ValueError, match=r"train\.lr: 0\.1 -> 0\.2"):  # today's resume rules
        start_run(tmp_path, config(tmp_path, lr=0.2), resume="auto")
    with pytest.raises(FileExistsError, match=r"holds an earlier run \(last\.pth\)"):
        start_run(tmp_path, config(tmp_path))


def test_a_changed_world_size_is_refused_before_anything_loads(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / "last.pth", model=nn.Linear(2, 2), epoch=0, iteration=3,
                    config=OmegaConf.to_container(config(tmp_path)), extra={"loop": {"world_size": 2}})
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match=r"trained by 2 process\(es\), this launch has 4.*--nnodes MIN:MAX"):
        start_run(tmp_path, config(tmp_path), resume="auto")
