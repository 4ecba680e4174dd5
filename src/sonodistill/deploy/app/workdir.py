"""The app's private working folder: one per running app, named after its process, removed
when the app stops and, when it could not be (kill -9, a power cut), by the next app to start.

`sonodistill-app-<pid>-<random>` (mode 0700) under the system's temporary folder or
`--work_dir`. At start an app removes every such folder of its user whose process is gone
(`os.kill(pid, 0)`); the folder of a live app is never touched, so two apps can run side by
side. A recycled PID only delays the clean-up until that process ends. Apps in separate PID
namespaces (containers) that share one temporary folder need a `--work_dir` each.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

PREFIX = "sonodistill-app-"
_NAME = re.compile(re.escape(PREFIX) + r"(\d+)-\w+")


def make_workdir(parent: str | Path | None = None) -> Path:
    """A new folder owned by this process under `parent` (default: the temporary folder)."""
    parent = Path(parent or tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=parent))


def clear_stale_workdirs(parent: str | Path | None = None) -> list[Path]:
    """Remove the folders under `parent` left by apps of this user that are no longer
    running (their uploads included); returns what was removed."""
    parent = Path(parent or tempfile.gettempdir())
    removed = []
    for path in sorted(parent.glob(PREFIX + "*")):
        match = _NAME.fullmatch(path.name)
        if not match or path.is_symlink() or not path.is_dir():
            continue
        if path.stat().st_uid != os.getuid() or _alive(int(match[1])):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process; no PID at all
        return True
    return True
