"""Run folders that belong to one run at a time: one `Layout` per command, one `RunDir` rule.

    DISTILL = Layout("distill", owned=("config.yaml", "run_info.json", "checkpoints", "logs",
                     "student_backbone.safetensors"), free_on_resume=("log_every", ...),
                     resumable=True)

    run = RunDir(cfg.out, DISTILL, resume=cfg.resume, overwrite=cfg.overwrite)
    run.precheck()                       # with the other option checks: nothing written yet
    with run.claim():                    # lock; the same checks again, under the lock
        if run.resuming:
            run.check_resume(to_dict(cfg), derived={...})
        else:
            run.clear()                  # --overwrite: the old run's own files, nothing else
        ...

The rule (every command): a folder that holds a run (any of its layout's `markers`) is refused
unless resumed (`--resume`, where the command has it) or overwritten (`--overwrite`, which
removes the layout's `owned` files and nothing else); a resume may change only the layout's
`free_on_resume` options (a dotted key frees its sub-keys), plus whatever the command derives
and compares itself (world size, images, sources).

`lock_run_dir` makes a folder exclusive: `fcntl.flock` on OUT/.lock, which the kernel releases
when the holder dies (never stale; NFS clients emulate it with POSIX locks). The file names the
holder's PID, host and command, for the message a second run gets. Standard library only:
`filelock` would replace the 20 lines of fcntl but cannot report the holder.

Where `flock` is not supported (ENOSYS: Lustre mounted without `-o flock`; EOPNOTSUPP, ENOLCK),
the lock falls back to OUT/.lock.held, created exclusively (O_EXCL) with the same holder
information and removed on release. A holder killed outright leaves it behind: a later run on
the same host takes it over when that PID is gone; from another host, the message names the
file to delete.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from sonodistill.errors import UserError, cannot_write, is_unwritable

LOCK = ".lock"
ALWAYS_FREE = ("out", "resume", "overwrite")
"""Options every resume may change."""


@dataclass(frozen=True)
class Layout:
    """What a command's run folder holds, and what a resume may change."""

    command: str
    """`corpus build`, `distill`, ...: in messages and in the lock file."""
    owned: tuple[str, ...]
    """What the run writes (relative names; glob patterns allowed: `*.npy`): --overwrite
    removes these and nothing else."""
    markers: tuple[str, ...] = ()
    """What shows that a run is there (default: `owned`)."""
    config: str | None = "config.yaml"
    """The resolved options, compared on --resume (None: the command keeps none)."""
    free_on_resume: tuple[str, ...] = ()
    """Dotted options a resume may change; a key frees its sub-keys (`train` frees
    `train.lr`). `out`, `resume` and `overwrite` are always free."""
    staging: str | None = None
    """A folder written first and moved into place (predict: `.partial`): a marker and owned."""
    resumable: bool = False
    """Whether the command has --resume (else its messages never offer one)."""

    @property
    def all_owned(self) -> tuple[str, ...]:
        return (*self.owned, *((self.staging,) if self.staging else ()))

    @property
    def all_markers(self) -> tuple[str, ...]:
        markers = self.markers or self.owned
        return (*markers, *((self.staging,) if self.staging else ()))

    def is_free(self, key: str) -> bool:
        """Whether a resume may change the dotted option `key`."""
        free = (*ALWAYS_FREE, *self.free_on_resume)
        return any(key == f or key.startswith(f + ".") for f in free)


class RunDir:
    """One run's claim on its folder (see the module doc)."""

    def __init__(
        self, path: str | Path, layout: Layout, *, resume: bool = False, overwrite: bool = False
    ):
        if resume and not layout.resumable:
            raise ValueError(f"sonodistill {layout.command} runs cannot be resumed")
        self.path = Path(path)
        self.layout = layout
        self.resume = resume
        self.overwrite = overwrite
        self.resuming = False
        """Set by `claim`: a run is there and --resume continues it."""

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r}, {self.layout.command!r})"

    def found(self) -> list[str]:
        """The layout's markers present in the folder."""
        return existing(self.path, self.layout.all_markers)

    def precheck(self) -> None:
        """The folder checks that need no lock, so a command can make them with its other
        option checks and write nothing when one fails: --resume with --overwrite, a file
        where the folder should be, a run there without --resume or --overwrite."""
        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite: choose one")
        if self.path.exists() and not self.path.is_dir():
            raise cannot_write(self.path, FileExistsError(errno.EEXIST, "File exists"))
        found = self.found()
        if found and not (self.resume or self.overwrite):
            offer = "--resume true to continue it, " if self.layout.resumable else ""
            raise UserError(
                f"{self.path} already holds a sonodistill {self.layout.command} run "
                f"({', '.join(found)}); pass {offer}--overwrite true to replace it, or choose "
                "another --out"
            )

    @contextlib.contextmanager
    def claim(self) -> Iterator[RunDir]:
        """Lock the folder for this run and check it again under the lock; sets `resuming`.
        The lock is the first thing a run writes: call it after every option was checked."""
        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite: choose one")
        with lock_run_dir(self.path, self.layout.command):
            self.precheck()
            self.resuming = bool(self.found()) and self.resume
            yield self

    @contextlib.contextmanager
    def lock(self) -> Iterator[Path]:
        """Lock the folder without claiming it (a command that reads a run, or adds to it)."""
        with lock_run_dir(self.path, self.layout.command) as folder:
            yield folder

    def clear(self) -> None:
        """--overwrite: remove the old run's own files and folders, nothing else. Call it
        right before the first write (after everything was checked)."""
        if self.overwrite and not self.resuming:
            remove_owned(self.path, self.layout.all_owned)

    def stored_options(self, cls: type | None = None) -> dict:
        """The options the run in the folder was started with ({} when there are none yet),
        with renamed options upgraded through `config.upgrade` when `cls` is given."""
        if self.layout.config is None:
            return {}
        try:
            values = yaml.safe_load((self.path / self.layout.config).read_text())
        except (OSError, yaml.YAMLError):
            return {}
        if not isinstance(values, dict):
            return {}
        if cls is not None:
            from sonodistill.config import upgrade

            values = upgrade(cls, values)
        return values

    def resume_changes(
        self, options: dict, derived: dict[str, tuple] | None = None, cls: type | None = None
    ) -> dict[str, tuple]:
        """{option: (stored, now)} of what a resume would change that the layout does not
        free, plus the command's `derived` changes ({name: (before, now)}, named as the
        message shows them: `world size (devices x nodes)`)."""
        from sonodistill.config import config_changes

        stored = self.stored_options(cls)
        changes = {}
        if stored:
            changes = {
                k: v
                for k, v in config_changes(stored, options).items()
                if not self.layout.is_free(k)
            }
        changes.update({k: v for k, v in (derived or {}).items() if v[0] != v[1]})
        return changes

    def check_resume(
        self, options: dict, derived: dict[str, tuple] | None = None, cls: type | None = None
    ) -> None:
        """Refuse a resume that changes the run (see `resume_changes`), naming every change."""
        from sonodistill.config import describe_changes

        changes = self.resume_changes(options, derived, cls)
        if changes:
            raise UserError(
                f"{self.path}: --resume with options that change the run: "
                f"{describe_changes(changes)}; keep them, or start a new run (--overwrite true "
                "or another --out)"
            )

    def save_options(self, cfg) -> Path:
        """The resolved options, written atomically to the layout's config file."""
        from sonodistill.config import save_config

        return save_config(cfg, self.path / self.layout.config)


# ---------------------------------------------------------------- the lock and the file rules


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
        held = None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise UserError(
                f"{folder} is in use by {holder}; wait for it to end or choose another --out"
            ) from None
        except OSError as err:
            if err.errno not in NO_FLOCK:
                os.close(fd)
                raise
            try:
                held = _hold_exclusively(folder / HELD, command)
            except BaseException:
                os.close(fd)
                raise
            break
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
        if held is not None:
            with contextlib.suppress(OSError):
                held.unlink()
        if created:  # a run that wrote nothing leaves no folder behind
            with contextlib.suppress(OSError):
                folder.rmdir()


NO_FLOCK = (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK)
"""flock's errors on file systems without it (module doc)."""
HELD = ".lock.held"


def _hold_exclusively(path: Path, command: str) -> Path:
    """The fallback lock (module doc): `path` created with O_EXCL, holding the holder's info."""
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command,
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            fd = os.open(path, os.O_RDONLY)
            try:
                holder, stale = _holder(fd), _is_stale(fd)
            finally:
                os.close(fd)
            if stale:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            raise UserError(
                f"{path.parent} is in use by {holder}; wait for it to end or choose another "
                f"--out (this file system has no flock: if no run uses it, delete {path})"
            ) from None
        with os.fdopen(fd, "w") as file:
            json.dump(info, file)
        return path
    raise UserError(f"{path}: could not take the lock; try again")


def _is_stale(fd: int) -> bool:
    """Whether the holder recorded in `fd` was a process on this host that is gone."""
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        if info["host"] != socket.gethostname():
            return False
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError, KeyError):
        return False
    return False


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        since = f"since {info['since']}"
        return f"sonodistill {info['command']} (pid {info['pid']} on {info['host']}, {since})"
    except (OSError, ValueError, KeyError):
        return "another run (it is just starting)"


def _matches(folder: Path, name: str) -> list[Path]:
    if any(c in name for c in "*?["):
        return sorted(folder.glob(name))
    path = folder / name
    return [path] if path.exists() or path.is_symlink() else []


def existing(folder: str | Path, owned: Iterable[str]) -> list[str]:
    """Which of a run's own files or folders (`owned`, relative names or glob patterns) exist
    in `folder` (the names as found)."""
    folder = Path(folder)
    return [p.relative_to(folder).as_posix() for name in owned for p in _matches(folder, name)]


def remove_owned(folder: str | Path, owned: Iterable[str]) -> None:
    """Delete a run's own files and folders (for --overwrite); anything else stays."""
    for name in owned:
        for path in _matches(Path(folder), name):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
