"""Preloaded by the corpus pools' forkserver (`files.worker_pool`) before anything else, and
imported nowhere else: the forkserver dies with the process that started it (`die_with_parent`),
and its workers, forked from it, find its PID here."""

from __future__ import annotations

import os

from sonodistill.data.files import die_with_parent

PID = os.getpid()
"""The forkserver's PID, inherited by every worker it forks: their parent."""

die_with_parent()
