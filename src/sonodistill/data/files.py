"""The files of a source (a file, a folder or a glob) and the process pool that reads them."""

from __future__ import annotations

import fnmatch
import glob
import multiprocessing
import os
import re
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


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
    a forkserver (clean interpreter, corpus modules preloaded) where available, else spawn."""
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["sonodistill.data.corpus", "sonodistill.data.leakage"])
    else:
        ctx = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
