"""Preemption: SIGTERM, SIGUSR1 and SIGINT stop training at an iteration every rank agrees on, with a checkpoint.

Schedulers warn before they kill: SLURM sends SIGTERM at preemption and at the time limit (and SIGUSR1 ahead of
it with `#SBATCH --signal=USR1@120`), Kubernetes and spot instances SIGTERM, torchrun passes what it gets on to
its workers' process groups, and Ctrl-C is SIGINT. The handler only records the request; the training loop adds
it to the scalars it already sums over ranks every iteration, so every rank sees it at the same iteration even
when the signal reached only some ranks, and it costs no extra collective.
"""
from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.util  # its exit handler is registered first, so the one below runs before it
import os
import signal
import sys
import threading
import time
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: stopped with a checkpoint; the same command with --resume continues
SAME_REQUEST_S = 1.0  # a signal this soon after the first is the same request delivered twice (SLURM and torchrun
# both signal a worker, and Ctrl-C reaches torchrun and its workers); a later one exits at once


class Preempted(SystemExit):
    """Raised by the training loop once the preemption checkpoint is written: exits with EXIT_PREEMPTED."""

    def __init__(self) -> None:
        super().__init__(EXIT_PREEMPTED)


class StopRequest:
    """While entered (from the main thread), the stop signals set `signum` instead of killing the process; a
    second one more than SAME_REQUEST_S later kills the DataLoader workers and exits at once (128 + signal)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._first_at = 0.0
        self._pid = os.getpid()
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:  # a forked child that has not yet set its own handlers
            return
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first_at = signum, now
            print(f"{signal.Signals(signum).name}: stopping after this iteration with a checkpoint (a second signal "
                  "exits at once, without one)", file=sys.stderr, flush=True)
        elif now - self._first_at > SAME_REQUEST_S:
            for child in multiprocessing.active_children():
                child.kill()
            os._exit(128 + signum)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: a worker gets the stop signals too (torchrun signals the process group, SLURM
    every process of the job), but must serve the main process until it has finished its iteration; it is then
    shut down by the main process, killed at its exit (below), or ended by torch's watchdog if it dies."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


@atexit.register
def _kill_workers_at_exit() -> None:
    """multiprocessing ends the daemonic children still alive at exit (DataLoader workers, after an exception)
    with SIGTERM and then joins them without a timeout: workers that ignore SIGTERM would hang the exit."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report the killed workers as failures
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
