"""Files no reader ever sees half-written, run folders that belong to one run at a time, and
the one writer of result tables.

Every file the project writes goes through `atomic_path` (or `write_bytes`/`write_text`/
`write_json` built on it): the writer fills a temporary file beside the target (same folder,
so same filesystem), which is then flushed to disk (fsync), renamed over the target (readers
see the old file or the new one, never half) and the folder entry synced. On any failure the
temporary file is removed, and a full disk becomes one `UserError` naming the target.

    with atomic_path(out / "last.pt") as tmp:
        torch.save(state, tmp)

Run folders (the lock, --resume, --overwrite) are `sonodistill.utils.rundir`'s.

`write_table` writes every table the project writes (Markdown for reading, CSV and optionally
JSON for tools); pandas' own `to_markdown` needs the tabulate package, a pipe table is a few lines.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from sonodistill.errors import cannot_write, disk_full, is_disk_full, is_unwritable

if TYPE_CHECKING:
    import pandas as pd

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
