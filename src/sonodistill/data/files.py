"""The files of a source (a file, a folder or a glob) and the process pool that reads them."""

from __future__ import annotations

import ctypes
import fnmatch
import glob
import multiprocessing
import os
import re
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def list_files(pattern: str, skip_patterns: list[str] = ()) -> list[Path]:
    """Files of a source: a file, every file under a folder, or a glob's matches; sorted, hidden
    files and `skip_patterns` (fnmatch on the path below the source root, any case) left out."""
    p = Path(pattern)
    if p.is_file():
        return [p]
    if p.is_dir():
        root, files = p, [f for f in p.rglob("*") if f.is_file()]
    else:
        prefix = re.split(r"[*?\[]", pattern)[0]
        root = Path(prefix) if prefix.endswith(os.sep) else Path(prefix).parent
        files = [Path(f) for f in glob.glob(pattern, recursive=True) if os.path.isfile(f)]
    out = []
    for f in sorted(files):
        rel = f.relative_to(root).as_posix() if f.is_relative_to(root) else f.name
        if any(part.startswith(".") for part in Path(rel).parts):
            continue
        if any(fnmatch.fnmatch(rel.lower(), s.lower()) for s in skip_patterns):
            continue
        out.append(f)
    return out


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """A process pool whose workers do not inherit the caller's threads (torch, OpenMP, rich):
    a forkserver (clean interpreter, corpus modules preloaded) where available, else spawn.

    On Linux the forkserver dies with the process that started it and the workers with the
    forkserver (`die_with_parent`), so a build killed with -9 leaves none of them (nor the
    resource tracker, which exits when they are gone). Start pools from a thread that lives as
    long as they do (the CLI's main thread): the kernel watches the thread that started it."""
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(
            ["sonodistill.data._forkserver", "sonodistill.data.corpus", "sonodistill.data.leakage"]
        )
        return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_start)
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


def die_with_parent(parent: int | None = None) -> None:
    """Have Linux SIGKILL this process when its parent dies (prctl PR_SET_PDEATHSIG): the one
    mechanism that holds after a kill -9 of the parent, which runs no exit hook and signals no
    process group. With `parent`, a process whose parent is already another one (it died before
    this call) exits at once. Elsewhere nothing: the pool then ends with its parent's pipes."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def _worker_start() -> None:
    """A forkserver worker's initializer: it dies with the forkserver that forked it, whose PID
    it inherited with the preloaded `_forkserver` module (already in `sys.modules`: importing
    it here would make a cycle)."""
    forkserver = sys.modules.get("sonodistill.data._forkserver")
    die_with_parent(forkserver.PID if forkserver else None)
