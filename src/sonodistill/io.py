"""Files no reader ever sees half-written, run folders that belong to one run at a time, and
the one writer of result tables.

Every file the project writes goes through `atomic_path` (or `write_bytes`/`write_text`/
`write_json` built on it): the writer fills a temporary file beside the target (same folder,
so same filesystem), which is then flushed to disk (fsync), renamed over the target (readers
see the old file or the new one, never half) and the folder entry synced. On any failure the
temporary file is removed, and a full disk becomes one `UserError` naming the target.

    with atomic_path(out / "last.pt") as tmp:
        torch.save(state, tmp)

`lock_run_dir` makes a run folder exclusive: `fcntl.flock` on OUT/.lock, which the kernel
releases when the holder dies (never stale; NFS clients emulate it with POSIX locks). The file
names the holder's PID, host and command, for the message a second run gets. `claim_run_dir`
adds the house rule on top: an existing run is refused unless resumed or overwritten (the
command then removes the old run's own files, `remove_owned`, and nothing else).

Standard library only: `filelock` would replace the 20 lines of fcntl but cannot report the holder.

`write_table` writes every table the project writes (Markdown for reading, CSV and optionally
JSON for tools); pandas' own `to_markdown` needs the tabulate package, a pipe table is a few lines.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from sonodistill.errors import UserError, cannot_write, disk_full, is_disk_full, is_unwritable

if TYPE_CHECKING:
    import pandas as pd

LOCK = ".lock"
log = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_path(path: str | Path, durable: bool = True) -> Iterator[Path]:
    """A temporary path beside `path` (same suffix, so writers pick the same format) that
    replaces `path` when the block succeeds and is removed when it fails.

    `durable=False` leaves out the two fsyncs, for many small files made reachable by one
    record written after them: the writer then calls `sync_files` on the batch before it
    writes that record (the corpus build's frames and their part; measured by
    benchmarks/atomic_writes.py: an fsync per frame costs several ms on a virtual disk)."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{secrets.token_hex(3)}.tmp{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
        if durable:
            _fsync(path.parent)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if _mentions_disk_full(err):
            raise disk_full(path, err) from err
        if _about(err, path, tmp):  # read-only, no permission, a file or folder in the way
            raise cannot_write(path, err) from err
        raise


def write_bytes(path: str | Path, data: bytes, durable: bool = True) -> Path:
    with atomic_path(path, durable) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def sync_files(paths: Iterable[str | Path]) -> None:
    """fsync files written with `durable=False`, then their folders: one pass per batch is
    far cheaper than one per file (the first fsync commits the others' data with it)."""
    paths = [Path(p) for p in paths]
    for path in [*paths, *dict.fromkeys(p.parent for p in paths)]:
        try:
            _fsync(path)
        except OSError as err:
            if _mentions_disk_full(err):
                raise disk_full(path, err) from err
            raise


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj, indent: int | None = 2, **kwargs) -> Path:
    return write_text(path, json.dumps(obj, indent=indent, **kwargs) + "\n")


def write_csv(path: str | Path, frame: pd.DataFrame, **kwargs) -> Path:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, **{"index": False, **kwargs})
    return Path(path)


def write_parquet(path: str | Path, frame: pd.DataFrame) -> Path:
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)
    return Path(path)


def save_torch(path: str | Path, obj) -> Path:
    """torch.save through an open file: torch then reports a full disk as the OSError it is."""
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)
    return Path(path)


def read_json(path: str | Path, what: str = "file") -> dict | list | None:
    """A JSON file written by a previous run, or None when it is empty or unreadable (a full
    disk, a kill in an older version): the caller redoes what it records, after a warning."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        log.warning(
            "ignoring unreadable %s %s (%s); redoing what it recorded", what, path, _short(err)
        )
        return None


def _short(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text}"[:200] if text else type(err).__name__


def _fsync(path: Path) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError as err:
        if is_disk_full(err) or not path.is_dir():
            raise  # some filesystems refuse to fsync a folder: that one is harmless
    finally:
        os.close(fd)


def _about(err: BaseException, path: Path, tmp: Path) -> bool:
    """Whether `err` says that `path` (its temporary file, or a folder above it) cannot be
    written; an error on another file (an input the writer reads) keeps its own message."""
    if not (is_unwritable(err) and getattr(err, "filename", None)):
        return False
    named = Path(os.fsdecode(err.filename))
    return named in (path, tmp) or named in path.parents


def _mentions_disk_full(err: BaseException) -> bool:
    """Writers in C, C++ or Rust (torch, safetensors, pyarrow) report a full disk in their
    own exception types: look for errno 28 / 122 in the chain and in the message."""
    seen: BaseException | None = err
    while seen is not None:
        if is_disk_full(seen):
            return True
        text = str(seen)
        if any(s in text for s in ("No space left", "os error 28", "StorageFull", "Disk quota")):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


# ---------------------------------------------------------------- run folders


@contextlib.contextmanager
def lock_run_dir(folder: str | Path, command: str) -> Iterator[Path]:
    """Hold an exclusive lock on `folder` (created) for the block; a second holder gets a
    UserError naming the first (PID, host, command, start time)."""
    folder = Path(folder)
    created = not folder.exists()
    path = folder / LOCK
    while True:
        try:  # the first write of every run: an output that cannot be written stops here
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            if created:  # a claim that failed leaves no folder behind
                with contextlib.suppress(OSError):
                    folder.rmdir()
            if is_unwritable(err):
                raise cannot_write(folder, err) from err
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise UserError(
                f"{folder} is in use by {holder}; wait for it to end or choose another --out"
            ) from None
        # The previous holder removes the file as it leaves: make sure we locked the file
        # that is there now, not the one it just removed.
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        os.close(fd)
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command,
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    try:
        yield folder
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still locked: the next run creates a fresh file
        os.close(fd)
        if created:  # a run that wrote nothing leaves no folder behind
            with contextlib.suppress(OSError):
                folder.rmdir()


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        since = f"since {info['since']}"
        return f"sonodistill {info['command']} (pid {info['pid']} on {info['host']}, {since})"
    except (OSError, ValueError, KeyError):
        return "another run (it is just starting)"


def existing(folder: str | Path, owned: Iterable[str]) -> list[str]:
    """Which of a run's own files or folders (`owned`, relative names) exist in `folder`."""
    return [name for name in owned if (Path(folder) / name).exists()]


def remove_owned(folder: str | Path, owned: Iterable[str]) -> None:
    """Delete a run's own files and folders (for --overwrite); anything else stays."""
    for name in owned:
        path = Path(folder) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


@contextlib.contextmanager
def claim_run_dir(
    folder: str | Path,
    command: str,
    markers: Iterable[str],
    resume: bool | None = None,
    overwrite: bool = False,
) -> Iterator[bool]:
    """Lock `folder` for one run of `command` and apply the house rule: a folder that holds a
    run (any of the files or folders `markers` names) is refused unless `resume` (yields True:
    continue it) or `overwrite` (yields False; the caller removes the old run's files with
    `remove_owned` once everything it needs was checked, right before it writes). `resume`
    None: the command has no --resume (its message does not offer one). Call it after every
    option was checked: the lock is the first thing a run writes."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite: choose one")
    with lock_run_dir(folder, command):
        found = existing(folder, markers)
        if found and not (resume or overwrite):
            offer = "--resume true to continue it, " if resume is not None else ""
            raise UserError(
                f"{folder} already holds a sonodistill {command} run ({', '.join(found)}); "
                f"pass {offer}--overwrite true to replace it, or choose another --out"
            )
        yield bool(found) and bool(resume)


# ---------------------------------------------------------------- tables


def markdown_table(rows: pd.DataFrame | list[dict], floatfmt: str = ".4f") -> str:
    """A pipe table; numeric columns right-aligned, floats formatted with `floatfmt`."""
    import pandas as pd

    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)

    def cell(value) -> str:
        return format(value, floatfmt) if isinstance(value, float) else str(value)

    numeric = [pd.api.types.is_numeric_dtype(frame[c]) for c in frame.columns]
    lines = [
        "| " + " | ".join(map(str, frame.columns)) + " |",
        "|" + "|".join("---:" if n else "---" for n in numeric) + "|",
    ]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def write_table(
    rows: pd.DataFrame | list[dict],
    stem: str | Path,
    title: str = "",
    note: str = "",
    floatfmt: str = ".4f",
    with_json: bool = False,
) -> Path:
    """STEM.csv, STEM.md (`## title`, the note, the table) and with_json STEM.json (a list of
    rows); returns STEM.md."""
    import pandas as pd

    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    stem = Path(stem)
    write_csv(stem.with_suffix(".csv"), frame)
    if with_json:
        records = frame.astype(object).where(frame.notna(), None).to_dict(orient="records")
        write_json(stem.with_suffix(".json"), records)
    parts = [f"## {title}"] if title else []
    parts += [note] if note else []
    parts.append(markdown_table(frame, floatfmt))
    return write_text(stem.with_suffix(".md"), "\n\n".join(parts) + "\n")
