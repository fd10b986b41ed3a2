"""One writer per run folder: an OS lock on `output_dir/.lock`, held for the whole run by the process that writes.

A requeued job that starts while the old one still runs (or two commands naming the same `output_dir`) would
otherwise both write `history.jsonl` and `last.pth`. `fcntl.flock` is released by the kernel when its holder
dies, so `kill -9` leaves no stale lock, and it works across the hosts of a shared file system that supports
it (NFSv4, Lustre mounted with `flock`). Under DDP only global rank 0 takes it: it is the only rank that writes.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .distributed import launch_rank

LOCK_FILE = ".lock"
EXIT_IN_USE = 73  # sysexits.h EX_CANTCREAT: the run folder cannot be written, another run holds it

_held_fds: set[int] = set()


class OutputDirInUse(SystemExit):
    """Another live process holds the run folder; exits the tool with EXIT_IN_USE (its message on stderr)."""

    def __init__(self, message: str) -> None:
        super().__init__(EXIT_IN_USE)
        self.message = message

    def __str__(self) -> str:
        return self.message


@contextmanager
def lock_output_dir(output_dir: str | Path) -> Iterator[None]:
    """Hold `output_dir`'s lock for the block (rank 0 only; other ranks pass through). Raises OutputDirInUse,
    naming the holder (pid, host, start time), when another process holds it. Folders the lock had to create are
    removed again if the block leaves them empty (a run refused before writing leaves nothing behind)."""
    if launch_rank() != 0:
        yield
        return
    output_dir = Path(output_dir)
    created = [folder for folder in (output_dir, *output_dir.parents) if not folder.exists()]
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / LOCK_FILE
    fd = _acquire(path)
    try:
        yield
    finally:
        _release(fd, path)
        for folder in created:  # innermost first
            try:
                folder.rmdir()
            except OSError:  # holds files now: the run's
                break


def _acquire(path: Path) -> int:
    """flock `path` (created if needed) and write the holder's pid, host and start time into it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            message = f"output_dir {path.parent} is in use by another run ({_holder(path)}): wait for it to end, or " \
                      "set output_dir=<another folder>"
            print(message, file=sys.stderr)
            raise OutputDirInUse(message) from None
        except OSError as err:  # e.g. ENOSYS: Lustre mounted without -o flock
            os.close(fd)
            raise OSError(err.errno, f"cannot lock output_dir {path.parent}: {err.strerror}; its file system does not "
                          "support flock: use a folder on one that does (local disk, NFSv4, Lustre with -o flock)") \
                from None
        try:
            same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            break
        os.close(fd)  # the holder removed the file as we opened it: lock the one now at `path`
    holder = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    os.ftruncate(fd, 0)
    os.write(fd, (json.dumps(holder) + "\n").encode())
    _held_fds.add(fd)
    return fd


def _release(fd: int, path: Path) -> None:
    """Remove the lock file while still holding it (a process that opened it meanwhile sees it gone), then unlock."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    _held_fds.discard(fd)
    os.close(fd)


def _holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text())
        return f"pid {holder['pid']} on host {holder['host']}, started {holder['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet written its pid, host and start time"


def _close_in_child() -> None:
    """A forked child (a DataLoader worker) must not keep the lock alive after the holder dies: flock belongs to
    the open file, which fork shares."""
    for fd in _held_fds:
        os.close(fd)
    _held_fds.clear()


os.register_at_fork(after_in_child=_close_in_child)
