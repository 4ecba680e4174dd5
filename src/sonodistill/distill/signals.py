"""Stopping a run cleanly on a signal: the training loop saves a checkpoint at the next step
boundary and exits with a code for the scheduler.

    SIGUSR1, SIGTERM   a scheduler's warning (SLURM sends SIGUSR1 `--signal=SIGUSR1@120` before
                       the time limit, SIGTERM on preemption): exit code errors.REQUEUE (3),
                       which the shipped sbatch turns into `scontrol requeue`
    SIGINT (Ctrl-C)    the same, exit code errors.INTERRUPTED (130); a second Ctrl-C stops at once

DataLoader workers ignore these signals (`ignore_stop_signals` as their `worker_init_fn`): a
scheduler signals the whole process group, and a worker killed by SIGUSR1 would take the run
down before it can save anything.
"""

from __future__ import annotations

import signal
import threading

from sonodistill.errors import INTERRUPTED, REQUEUE

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Context manager recording the first stop signal; `signum` is None until one arrives."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # handlers live there only
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum = signum
            if signum == signal.SIGINT:  # the second Ctrl-C is Python's KeyboardInterrupt
                signal.signal(signal.SIGINT, signal.default_int_handler)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    @property
    def exit_code(self) -> int:
        return INTERRUPTED if self.signum == signal.SIGINT else REQUEUE


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A DataLoader `worker_init_fn`: the main process decides when the run stops."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
