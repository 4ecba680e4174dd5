"""Corpus workers that die, for the pool tests: a module of its own, so that a fresh worker
imports only this (not a test module with torch) to unpickle it."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from sonodistill.data import corpus

VICTIM = "examples_palette.dcm"


def die_once(task):
    """process_file, but the worker reading VICTIM is killed (SIGKILL, as the OOM killer does)
    the first time."""
    marker = Path(task.out).parent / "killed_once"
    if Path(task.file).name == VICTIM and not marker.exists():
        marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return corpus.process_file(task)


def die_always(task):
    if Path(task.file).name == VICTIM:
        os.kill(os.getpid(), signal.SIGKILL)
    return corpus.process_file(task)
