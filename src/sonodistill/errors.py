"""The one error policy: what is the user's to fix, and how a command says so.

`UserError` is a bad option, a missing, corrupt or mismatched file, a full disk or a folder in
use by another run. Its message is one line naming the option or file and what to do; the CLI
prints it without a traceback and exits with `USER_ERROR` (2). Anything else is a bug and keeps
its traceback. `SONODISTILL_DEBUG=1` shows the traceback of user errors too.

`Interrupted` is not an error: a run stopped on a signal after saving what it needs to resume;
its exit code tells a scheduler what to do (`REQUEUE`: the shipped sbatch requeues the job).
"""

from __future__ import annotations

import difflib
import errno
from collections.abc import Iterable

USER_ERROR = 2
"""Exit code of every user error, in every command."""
REQUEUE = 3
"""Exit code after SIGUSR1/SIGTERM: state saved, run again with --resume (sbatch requeues)."""
INTERRUPTED = 130
"""Exit code after SIGINT (Ctrl-C): state saved, resume when you like."""

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_FILE_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)
# Why an output path cannot be written, and what to do: by errno.
_CANNOT_WRITE = {
    errno.EROFS: ("read-only file system", "write to a writable folder"),
    errno.EACCES: ("permission denied", "write to a folder you may write, or fix its permissions"),
    errno.EPERM: ("operation not permitted", "write to a folder you may write"),
    errno.EEXIST: ("a file is in the way of the folder", "choose another path or move the file"),
    errno.ENOTDIR: ("a part of the path is a file", "choose another path"),
    errno.EISDIR: ("a folder is in the way of the file", "choose another path"),
}


class UserError(Exception):
    """Something the user can fix; the message is one line naming it and what to do."""


_USER_ERRORS: list[type[BaseException]] = [UserError]


def user_error(cls: type[BaseException]) -> type[BaseException]:
    """Class decorator: errors of `cls` are the user's in every command (one line, exit 2),
    like `UserError`, though code that reads many files catches them on their own (a bad file
    of a corpus is the source's, not the build's)."""
    _USER_ERRORS.append(cls)
    return cls


class Interrupted(Exception):
    """A run stopped on a signal with its state saved; `exit_code` is for the scheduler."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def is_disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in _DISK_FULL


def disk_full(path, err: BaseException) -> UserError:
    """The user error for a write that ran out of space (or quota) at `path`."""
    why = getattr(err, "strerror", None) or "no space left on device"
    return UserError(f"disk full: cannot write {path} ({why}); free space (or quota) and run again")


def is_unwritable(err: BaseException) -> bool:
    """Whether `err` says that a path cannot be written (read-only, no permission, a file or a
    folder in the way) or that its disk is full."""
    return isinstance(err, OSError) and (err.errno in _CANNOT_WRITE or is_disk_full(err))


def cannot_write(path, err: OSError) -> UserError:
    """The user error for an output path that cannot be written (`is_unwritable(err)`), naming
    the path, why and what to do."""
    if is_disk_full(err):
        return disk_full(path, err)
    why, fix = _CANNOT_WRITE.get(err.errno, (err.strerror or str(err), "choose another path"))
    return UserError(f"cannot write {path}: {why}; {fix}")


def user_message(err: BaseException) -> str | None:
    """The one-line message of a user error, None for a bug (which keeps its traceback).

    Besides `UserError`: a full disk anywhere, and OS errors on a named path (missing file,
    no permission, a file in the way, a read-only file system), which only a user's path can
    cause in a command that checked its inputs. (Outputs written through `sonodistill.io` say
    `cannot write PATH` themselves; this is the net under every other writer.)
    """
    if is_disk_full(err):
        return str(disk_full(getattr(err, "filename", None) or "a file", err))
    if isinstance(err, OSError) and err.errno == errno.EROFS and err.filename:
        return str(cannot_write(err.filename, err))
    if isinstance(err, (*_USER_ERRORS, *_FILE_ERRORS)):
        return _one_line(err)
    return None


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return "; ".join(lines) if lines else type(err).__name__


def unknown_name(
    what: str, name: str, known: Iterable[str], option: str = "", see: str = ""
) -> UserError:
    """`--student.name resnt18: unknown model; did you mean resnet18?`; without a close match
    the known names (or `see`, where they are listed: `see sonodistill distill --help`)."""
    known = list(known)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}?" if close else see or _some(known)
    where = f"{option} {name}" if option else name if name.startswith("--") else repr(name)
    return UserError(f"{where}: unknown {what}; {hint}")


def _some(known: list[str]) -> str:
    shown = ", ".join(sorted(known)[:12])
    more = f", ... ({len(known)} in all)" if len(known) > 12 else ""
    return f"known: {shown}{more}"


def check(ok: bool, option: str, value, why: str) -> None:
    """Raise the user error `--option value: why` unless `ok`."""
    if not ok:
        raise UserError(f"{option} {value}: {why}")
