"""One run folder rule for every command (`sonodistill.utils.rundir`): the lock names its holder, a
run there is refused without --resume/--overwrite (offering --resume only where it exists),
the precheck writes nothing, a resume may change only what its layout frees, and --overwrite
removes the run's own files (globs included) and nothing else."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys

import pytest
import yaml

from sonodistill.errors import UserError
from sonodistill.utils import rundir as rundir_module
from sonodistill.utils.rundir import LOCK, Layout, RunDir, lock_run_dir

TOY = Layout(
    "toy",
    owned=("config.yaml", "logs", "*.npy"),
    free_on_resume=("workers", "train.device", "logging"),  # `logging` frees logging.*
    resumable=True,
)


def test_a_locked_run_folder_names_its_holder(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from sonodistill.utils.rundir import lock_run_dir\n"
            "with lock_run_dir(sys.argv[1], 'distill'):\n"
            "    print('locked', flush=True); time.sleep(60)",
            str(tmp_path / "run"),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError) as err, lock_run_dir(tmp_path / "run", "test"):
            pass
        message = str(err.value)
        assert f"pid {holder.pid} on {socket.gethostname()}" in message
        assert "sonodistill distill" in message and str(tmp_path / "run") in message
    finally:
        holder.kill()
        holder.wait()
    # The kernel released the lock with the process: the folder is free again.
    with lock_run_dir(tmp_path / "run", "test"):
        assert (tmp_path / "run" / LOCK).is_file()
    assert not (tmp_path / "run" / LOCK).exists()


def test_without_flock_the_lock_falls_back_to_an_exclusive_file(tmp_path, monkeypatch):
    """As on Lustre mounted without `-o flock`: flock raises ENOSYS. The lock is then a file
    created exclusively: a second holder is refused with the first one named, the file goes
    with the holder, and one left by a process of this host that is gone is taken over."""

    def no_flock(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(rundir_module.fcntl, "flock", no_flock)
    run = tmp_path / "run"
    with lock_run_dir(run, "distill"):
        assert json.loads((run / ".lock.held").read_text())["pid"] == os.getpid()
        with pytest.raises(UserError) as err, lock_run_dir(run, "evaluate"):
            pass
        message = str(err.value)
        assert f"pid {os.getpid()} on {socket.gethostname()}" in message
        assert "sonodistill distill" in message and "delete" in message and "\n" not in message
    assert not (run / ".lock.held").exists() and not run.exists()
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    run.mkdir()
    held = {
        "pid": int(gone.stdout),
        "host": socket.gethostname(),
        "command": "distill",
        "since": "2026-01-01 00:00:00",
    }
    (run / ".lock.held").write_text(json.dumps(held))  # left by a process killed outright
    with lock_run_dir(run, "test"):
        assert json.loads((run / ".lock.held").read_text())["pid"] == os.getpid()


def test_claim_refuses_an_existing_run_without_resume_or_overwrite(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("seed: 0\n")
    (out / "notes.txt").write_text("mine")
    refused = pytest.raises(
        UserError, match=r"already holds a sonodistill distill run \(config\.yaml\)"
    )
    layout = Layout("distill", ("config.yaml", "logs"), resumable=True)
    with refused, RunDir(out, layout).claim():
        pass
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "notes.txt"]  # untouched
    with RunDir(out, layout, resume=True).claim() as run:
        assert run.resuming
    with RunDir(out, layout, overwrite=True).claim() as run:
        assert not run.resuming
        run.clear()
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # only the run's own files go
    both = pytest.raises(UserError, match="choose one")
    with both, RunDir(out, layout, resume=True, overwrite=True).claim():
        pass


def test_precheck_writes_nothing_and_names_what_it_found(tmp_path):
    RunDir(tmp_path / "new", TOY).precheck()
    assert not (tmp_path / "new").exists()
    with pytest.raises(UserError, match="choose one"):
        RunDir(tmp_path / "new", TOY, resume=True, overwrite=True).precheck()
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"^cannot write .*file: a file is in the way"):
        RunDir(tmp_path / "file", TOY).precheck()
    out = tmp_path / "run"
    (out / "logs").mkdir(parents=True)
    (out / "a.npy").write_bytes(b"")
    with pytest.raises(UserError) as err:
        RunDir(out, TOY).precheck()
    message = str(err.value)
    assert "already holds a sonodistill toy run (logs, a.npy)" in message
    assert "--resume true to continue it" in message
    once = Layout("once", owned=("report.json",))  # no --resume: none offered
    (out / "report.json").write_text("{}")
    with pytest.raises(UserError) as err:
        RunDir(out, once).precheck()
    assert "--overwrite true" in str(err.value) and "--resume" not in str(err.value)
    with pytest.raises(ValueError):
        RunDir(out, once, resume=True)
    assert sorted(p.name for p in out.iterdir()) == ["a.npy", "logs", "report.json"]


def test_markers_default_to_owned_and_staging_counts(tmp_path):
    layout = Layout("predict", owned=("predictions.csv",), markers=(), staging=".partial")
    (tmp_path / ".partial").mkdir()
    run = RunDir(tmp_path, layout)
    assert run.found() == [".partial"]
    marked = Layout("evaluate", owned=("suite.yaml", "runs", "tables"), markers=("suite.yaml",))
    (tmp_path / "tables").mkdir()
    assert RunDir(tmp_path, marked).found() == []  # tables alone are no suite


def test_overwrite_removes_owned_files_and_globs_only(tmp_path):
    out = tmp_path / "run"
    (out / "logs/version_0").mkdir(parents=True)
    for name in ("config.yaml", "a.npy", "b.npy", "notes.txt", "keep.npz"):
        (out / name).write_text("x")
    run = RunDir(out, TOY, overwrite=True)
    with run.claim():
        assert not run.resuming
        run.clear()
        assert (out / LOCK).is_file()
    assert sorted(p.name for p in out.iterdir()) == ["keep.npz", "notes.txt"]


def test_resume_compares_options_except_the_free_ones(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stored = {"seed": 0, "workers": 2, "out": "a", "train": {"device": "cpu", "lr": 0.1}}
    stored["logging"] = {"every": 10, "to": "csv"}
    (out / "config.yaml").write_text(yaml.safe_dump(stored))
    run = RunDir(out, TOY, resume=True)
    with run.claim():
        assert run.resuming
        same = {**stored, "workers": 8, "out": "b", "train": {"device": "cuda", "lr": 0.1}}
        same["logging"] = {"every": 1, "to": "tensorboard"}
        run.check_resume(same)  # only free options changed
        changed = {**same, "seed": 1, "train": {"device": "cpu", "lr": 0.2}}
        with pytest.raises(UserError) as err:
            run.check_resume(changed, derived={"world size": (1, 2), "images": ("x", "x")})
    message = str(err.value)
    assert message.startswith(f"{out}: --resume with options that change the run: ")
    assert "--seed 0 -> 1, --train.lr 0.1 -> 0.2, world size 1 -> 2;" in message
    assert "images" not in message and "\n" not in message


def test_a_resume_of_a_run_without_config_compares_only_what_is_derived(tmp_path):
    (tmp_path / "logs").mkdir()
    run = RunDir(tmp_path, TOY, resume=True)
    with run.claim():
        run.check_resume({"seed": 3})
        with pytest.raises(UserError, match="steps 10 -> 5"):
            run.check_resume({"seed": 3}, derived={"steps": (10, 5)})
