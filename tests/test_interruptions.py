"""Runs that stop in the middle and continue: signals, a non-finite loss, damaged checkpoints
and results, a full disk, a killed worker, a second run into the same folder.

A full disk is a real one where the test may mount a small tmpfs (CI runs as root), and an
injected ENOSPC (fsync fails for files in the folder) otherwise; either way the next run after
freeing space completes and equals a clean run.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import av
import pandas as pd
import pytest
import torch
import yaml
from conftest import TINY_TEACHER_KWARGS
from safetensors.torch import load_file
from worker_faults import VICTIM, die_always, die_once

from sonodistill.cli import main
from sonodistill.data import corpus as corpus_module
from sonodistill.distill import read_metrics
from sonodistill.distill import recipe as recipe_module
from sonodistill.distill.run import requeue_decision
from sonodistill.errors import REQUEUE
from sonodistill.evaluate import suite as suite_module

TEACHER = "{" + ", ".join(f"{k}: {v}" for k, v in TINY_TEACHER_KWARGS.items()) + "}"


def distill_argv(data, out, *extra) -> list[str]:
    flags = (
        f"distill --data {data} --out {out} --teacher.random_init true --student.name test_resnet "
        "--image_size 64 --batch_size 8 --num_workers 0 --log_every 1 --checkpoint_every 2 "
        "--optim.lr 0.001"
    )
    return [*shlex.split(flags), "--teacher.model_kwargs", TEACHER, *extra]


@pytest.fixture(scope="module")
def frames(shared_data, tmp_path_factory) -> Path:
    """24 real lung-ultrasound frames: three batches of 8 per epoch."""
    out = tmp_path_factory.mktemp("frames")
    for clip in sorted((shared_data / "corpus/covid_blues/lus_videos").glob("*.mp4"))[:3]:
        with av.open(str(clip)) as video:
            for i, frame in enumerate(video.decode(video=0)):
                if i % 8 == 0:
                    frame.to_image().convert("L").save(out / f"{clip.stem}_{i:03d}.png")
                if i >= 56:
                    break
    assert len(list(out.glob("*.png"))) == 24
    return out


@pytest.fixture(scope="module")
def straight(frames, tmp_path_factory) -> Path:
    """A 6-step run without interruption: what every interrupted run must equal."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert main(distill_argv(frames, out, "--max_steps", "6")) == 0
    return out


def assert_same_run(run: Path, reference: Path) -> None:
    got, expected = read_metrics(run).set_index("step"), read_metrics(reference).set_index("step")
    assert list(got.index) == list(expected.index)
    for column in ("loss", "cosine", "lr"):
        torch.testing.assert_close(
            torch.tensor(got[column].to_numpy()), torch.tensor(expected[column].to_numpy())
        )
    a = load_file(str(run / "student_backbone.safetensors"))
    b = load_file(str(reference / "student_backbone.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def checkpoint_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["step"]


# ---------------------------------------------------------------- signals and divergence


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGINT])
def test_a_signal_checkpoints_that_step_and_the_resume_equals_a_straight_run(
    signum, frames, straight, tmp_path, monkeypatch, capsys
):
    real_step, calls = recipe_module.train_step, {"n": 0}

    def signalled_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # during step 3, as a scheduler would, between two checkpoints
            os.kill(os.getpid(), signum)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(recipe_module, "train_step", signalled_step)
    out = tmp_path / "run"
    expected = REQUEUE if signum == signal.SIGUSR1 else 130
    handler = signal.getsignal(signum)
    assert main(distill_argv(frames, out, "--max_steps", "6")) == expected
    assert signal.getsignal(signum) == handler  # the run's handler is gone with the run
    err = capsys.readouterr().err
    assert f"stopped by {signal.Signals(signum).name} at step 3 of 6" in err
    assert checkpoint_step(out / "checkpoints/last.pt") == 3  # the step of the signal
    assert not (out / "student_backbone.safetensors").exists()  # not reported as finished

    monkeypatch.setattr(recipe_module, "train_step", real_step)
    assert main(distill_argv(frames, out, "--max_steps", "6", "--resume", "true")) == 0
    assert "at step 3 of 6: 3 steps skipped, 3 to go" in capsys.readouterr().out
    assert_same_run(out, straight)


def test_a_second_ctrl_c_stops_at_once(frames, tmp_path, monkeypatch, capsys):
    real_step, calls = recipe_module.train_step, {"n": 0}

    def impatient(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(recipe_module, "train_step", impatient)
    assert main(distill_argv(frames, tmp_path / "run", "--max_steps", "6")) == 130
    assert "sonodistill distill: interrupted" in capsys.readouterr().err
    assert not (tmp_path / "run/checkpoints/last.pt").exists()  # step 2 was never finished
    assert not (tmp_path / "run/.lock").exists()


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    frames, tmp_path, monkeypatch, capsys
):
    real_step, calls = recipe_module.train_step, {"n": 0}

    def diverging(*args, **kwargs):
        calls["n"] += 1
        loss, metrics = real_step(*args, **kwargs)
        return (loss * float("nan") if calls["n"] == 5 else loss), metrics

    monkeypatch.setattr(recipe_module, "train_step", diverging)
    out = tmp_path / "run"
    assert main(distill_argv(frames, out, "--max_steps", "6")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "not finite (nan or inf) at step 5" in err[0] and "(step 4)" in err[0]
    assert checkpoint_step(out / "checkpoints/last.pt") == 4
    assert not (out / "student_backbone.safetensors").exists()
    assert read_metrics(out).step.max() == 4  # the bad step was never applied nor logged
    info = json.loads((out / "run_info.json").read_text())
    assert info["attempts"][-1]["ending"] == "user error"
    requeue, why = requeue_decision(out)
    assert not requeue and "user error" in why  # a new start would diverge again


def test_a_slurm_signal_from_outside_with_a_loader_worker_and_a_second_run_refused(
    frames, tmp_path, capsys
):
    """As under SLURM (--signal=SIGUSR1@120): the signal comes from another process and reaches
    the DataLoader worker too; meanwhile a second distill into the folder is refused."""
    out = tmp_path / "run"
    argv = distill_argv(frames, out, "--max_steps", "500", "--num_workers", "1")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen(
        [sys.executable, "-m", "sonodistill.cli", *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        metrics = out / "logs/version_0/metrics.csv"
        deadline = time.time() + 120
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) > 3):
            assert run.poll() is None and time.time() < deadline, run.communicate()
            time.sleep(0.2)
        assert main(distill_argv(frames, out, "--max_steps", "500")) == 2
        refused = capsys.readouterr().err
        assert f"in use by sonodistill distill (pid {run.pid} on {socket.gethostname()}" in refused
        run.send_signal(signal.SIGUSR1)
        _, err = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == REQUEUE, err
    step = checkpoint_step(out / "checkpoints/last.pt")
    assert f"stopped by SIGUSR1 at step {step} of 500" in err and step >= 3
    assert not (out / ".lock").exists()


CHECKPOINT = "mkdir -p $OUT/checkpoints && touch $OUT/checkpoints/last.pt"


def ending(value: str | None) -> str:
    attempt = {"from_step": 0} if value is None else {"from_step": 0, "ending": value}
    return f"echo '{json.dumps({'attempts': [attempt]})}' > $OUT/run_info.json"


@pytest.mark.parametrize(
    ("srun_does", "srun_rc", "requeued"),
    [  # what the fake srun leaves in the run folder, its exit code, whether the job requeues
        (f"{CHECKPOINT}; {ending('stopped')}", 128 + signal.SIGUSR1, True),
        (f"{CHECKPOINT}; {ending('stopped')}", REQUEUE, True),
        (f"{CHECKPOINT}; {ending(None)}", 128 + signal.SIGKILL, True),  # killed without a word
        (f"{CHECKPOINT}; {ending('crashed')}", 1, True),  # a lost node, an NCCL timeout
        (f"{CHECKPOINT}; {ending('finished')}; touch $OUT/student_backbone.safetensors", 0, False),
        (f"{CHECKPOINT}; {ending('user error')}", 2, False),  # the loss stopped being finite
        ("true", 2, False),  # a bad option: refused before anything was written
    ],
    ids=["SIGUSR1 via srun", "exit 3", "SIGKILL", "crash", "finished", "user error", "refused"],
)
def test_the_sbatch_requeues_from_what_the_run_folder_says(srun_does, srun_rc, requeued, tmp_path):
    """scripts/slurm_distill.sbatch with srun and scontrol stand-ins: srun's exit code does not
    decide (128 + signal when --kill-on-bad-exit ended a task); the run folder does."""
    script = Path(__file__).resolve().parents[1] / "scripts/slurm_distill.sbatch"
    bin_dir, work = tmp_path / "bin", tmp_path / "work"
    bin_dir.mkdir()
    (work / ".venv/bin").mkdir(parents=True)
    (work / ".venv/bin/activate").write_text("")
    (bin_dir / "python").symlink_to(sys.executable)
    for name, body in (
        ("srun", f'echo "$@" > srun.args; {srun_does}; exit {srun_rc}'),
        ("scontrol", "echo $@ > scontrol.args"),
    ):
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHONPATH": os.pathsep.join(sys.path),
        "SLURM_SUBMIT_DIR": str(work),
        "SLURM_JOB_ID": "42",
        "SLURM_NNODES": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_CPUS_PER_TASK": "2",
        "OUT": str(work / "run"),
    }
    done = subprocess.run(["bash", str(script)], env=env, cwd=work, capture_output=True, text=True)
    assert (work / "scontrol.args").is_file() == requeued, done.stdout + done.stderr
    assert done.returncode == (0 if requeued else srun_rc)
    if requeued:
        assert (work / "scontrol.args").read_text().split() == ["requeue", "42"]
    assert ("no requeue" not in done.stdout) == requeued
    args = (work / "srun.args").read_text()
    assert "--resume true" in args and f"--out {work / 'run'}" in args


# ---------------------------------------------------------------- damaged checkpoints


def test_an_unreadable_last_checkpoint_falls_back_to_the_previous_one(
    frames, straight, tmp_path, capsys, caplog
):
    out = tmp_path / "run"
    assert main(distill_argv(frames, out, "--max_steps", "4")) == 0  # checkpoints at 2 and 4
    assert checkpoint_step(out / "checkpoints/previous.pt") == 2
    (out / "checkpoints/last.pt").write_bytes(b"")  # as a full disk left it in older versions
    assert main(distill_argv(frames, out, "--max_steps", "6", "--resume", "true")) == 0
    assert "last.pt is unreadable" in caplog.text
    assert "previous.pt at step 2 of 6" in capsys.readouterr().out
    assert_same_run(out, straight)


def test_overwrite_replaces_only_the_runs_own_files(frames, straight, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    (out / "notes.md").write_text("mine")
    assert main(distill_argv(frames, out, "--max_steps", "2", "--overwrite", "true")) == 0
    assert (out / "notes.md").read_text() == "mine"
    assert read_metrics(out).step.max() == 2 and len(list((out / "logs").iterdir())) == 1
    assert checkpoint_step(out / "checkpoints/last.pt") == 2
    assert not (out / "checkpoints/previous.pt").exists()


# ---------------------------------------------------------------- a full disk


class SmallDisk:
    """A folder on a small filesystem that `fill` fills and `free` frees: a real tmpfs (when
    this process may mount one) or an injected ENOSPC on fsync of any file inside it."""

    def __init__(self, root: Path, kind: str, monkeypatch):
        self.root, self.kind, self.full = root, kind, False
        root.mkdir()
        if kind == "tmpfs":
            mounted = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(root)],
                capture_output=True,
                text=True,
            )
            if mounted.returncode:
                pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
        else:
            real_fsync = os.fsync

            def fsync(fd):
                if self.full and os.readlink(f"/proc/self/fd/{fd}").startswith(str(root)):
                    raise OSError(errno.ENOSPC, "No space left on device")
                return real_fsync(fd)

            monkeypatch.setattr(os, "fsync", fsync)

    def fill(self) -> None:
        self.full = True
        if self.kind == "tmpfs":
            with open(self.root / ".filler", "wb") as fh:
                try:
                    while True:
                        fh.write(bytes(1 << 20))
                        fh.flush()
                except OSError as err:
                    assert err.errno == errno.ENOSPC

    def free(self) -> None:
        self.full = False
        (self.root / ".filler").unlink(missing_ok=True)

    def close(self) -> None:
        if self.kind == "tmpfs":
            subprocess.run(["umount", "-l", str(self.root)], check=False)


@pytest.fixture(params=["tmpfs", "injected"])
def disk(request, tmp_path, monkeypatch):
    small = SmallDisk(tmp_path / "disk", request.param, monkeypatch)
    yield small
    small.close()


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if ".tmp" in p.name]


def test_distill_on_a_full_disk_says_disk_and_the_next_run_equals_a_clean_one(
    disk, frames, straight, monkeypatch, capsys
):
    real_step, calls = recipe_module.train_step, {"n": 0}

    def filling(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            disk.fill()  # the checkpoint of step 4 meets a full disk
        return real_step(*args, **kwargs)

    monkeypatch.setattr(recipe_module, "train_step", filling)
    out = disk.root / "run"
    assert main(distill_argv(frames, out, "--max_steps", "6")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "disk full: cannot write" in err[0], err
    assert no_temp_files(out)
    assert checkpoint_step(out / "checkpoints/last.pt") == 2  # the last good one stays
    disk.free()
    monkeypatch.setattr(recipe_module, "train_step", real_step)
    assert main(distill_argv(frames, out, "--max_steps", "6", "--resume", "true")) == 0
    assert_same_run(out, straight)


@pytest.fixture(scope="module")
def dicom_sources(shared_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sources")
    sources = root / "sources.yaml"
    folder = shared_data / "corpus/dicom"
    spec = {"sources": [{"dataset": "echo", "path": str(folder)}]}
    sources.write_text(yaml.safe_dump(spec))
    return sources


def corpus_argv(sources: Path, out: Path, *extra) -> list[str]:
    return ["corpus", "build", str(sources), "--out", str(out), "--quiet", "true", *extra]


@pytest.fixture(scope="module")
def clean_corpus(dicom_sources, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "corpus"
    assert main(corpus_argv(dicom_sources, out, "--workers", "1")) == 0
    return out


def assert_same_corpus(out: Path, clean: Path) -> None:
    pd.testing.assert_frame_equal(
        pd.read_parquet(out / "manifest.parquet"), pd.read_parquet(clean / "manifest.parquet")
    )
    pngs = sorted(p.relative_to(clean) for p in (clean / "frames").rglob("*.png"))
    assert pngs and pngs == sorted(p.relative_to(out) for p in (out / "frames").rglob("*.png"))
    assert all((out / p).read_bytes() == (clean / p).read_bytes() for p in pngs)


def test_a_corpus_build_on_a_full_disk_stops_and_resumes_to_a_clean_corpus(
    disk, dicom_sources, clean_corpus, monkeypatch, capsys
):
    real_run = corpus_module._run_tasks

    def filling(*args, **kwargs):
        disk.fill()
        return real_run(*args, **kwargs)

    monkeypatch.setattr(corpus_module, "_run_tasks", filling)
    workers = "2" if disk.kind == "tmpfs" else "1"  # an injected ENOSPC reaches this process only
    out = disk.root / "corpus"
    assert main(corpus_argv(dicom_sources, out, "--workers", workers)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and f"disk full: cannot write {out}/" in err[0], err
    assert no_temp_files(out) and not (out / "manifest.parquet").exists()
    disk.free()
    monkeypatch.setattr(corpus_module, "_run_tasks", real_run)
    assert main(corpus_argv(dicom_sources, out, "--workers", workers, "--resume", "true")) == 0
    assert_same_corpus(out, clean_corpus)


def evaluate_argv(mini: Path, out: Path, *extra) -> list[str]:
    flags = (
        f"evaluate --out {out} --encoders [random:test_resnet] --tasks [mini] --seeds [0,1] "
        "--protocols [linear] --train.seg_size 32 --train.epochs 1 --train.seg_batch 4"
    )
    datasets = f"{{mini: {{format: seg_folder, root: {mini}}}}}"
    return [*shlex.split(flags), "--datasets", datasets, *extra]


@pytest.fixture(scope="module")
def mini(shared_data, tmp_path_factory) -> Path:
    """12 DDTI images with their masks."""
    root = tmp_path_factory.mktemp("mini")
    for sub, name in (("images", "image"), ("masks", "mask")):
        (root / sub).mkdir()
        for png in sorted((shared_data / "ddti" / name).glob("*.PNG"))[:12]:
            shutil.copy(png, root / sub / png.name)
    return root


@pytest.fixture(scope="module")
def clean_suite(mini, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("suite") / "suite"
    assert main(evaluate_argv(mini, out)) == 0
    return out


def test_an_evaluation_result_on_a_full_disk_and_the_resumed_suite(
    disk, mini, clean_suite, monkeypatch, capsys, caplog
):
    real_run = suite_module.run_one

    def filling(*args, **kwargs):
        result = real_run(*args, **kwargs)
        disk.fill()  # the first run's result meets a full disk
        return result

    monkeypatch.setattr(suite_module, "run_one", filling)
    out = disk.root / "suite"
    assert main(evaluate_argv(mini, out)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "disk full: cannot write" in err[0] and "runs/" in err[0], err
    assert no_temp_files(out) and not list((out / "runs").glob("*.json"))
    disk.free()
    monkeypatch.setattr(suite_module, "run_one", real_run)
    # an empty result file, as older versions left after a full disk, is run again
    (out / "runs").mkdir(exist_ok=True)
    (out / "runs" / "mini__linear__test_resnet-rand__f1__s1.json").write_text("")
    assert main(evaluate_argv(mini, out, "--resume", "true")) == 0
    assert "ignoring unreadable run result" in caplog.text
    for path in sorted((clean_suite / "runs").glob("*.json")):
        got, expected = (pd.read_json(p, typ="series") for p in (out / "runs" / path.name, path))
        assert got["test"] == expected["test"] and got["run_key"] == expected["run_key"]
    assert main(evaluate_argv(mini, out, "--resume", "true")) == 0
    assert "2 of 2 runs already done (skipped)" in capsys.readouterr().out


# ---------------------------------------------------------------- the corpus worker pool


def test_a_killed_corpus_worker_is_retried_once_then_stops_the_build(
    dicom_sources, clean_corpus, tmp_path, monkeypatch, capsys, caplog
):
    monkeypatch.setattr(corpus_module, "process_file", die_once)
    out = tmp_path / "corpus"
    assert main(corpus_argv(dicom_sources, out, "--workers", "2")) == 0
    assert (tmp_path / "killed_once").is_file()
    died = [r.message for r in caplog.records if "a worker died while reading" in r.message]
    assert len(died) == 1 and VICTIM in died[0]
    assert_same_corpus(out, clean_corpus)  # nothing recorded as unreadable, nothing lost

    # an empty part (as a full disk left it in older versions) is read again, with a warning;
    # the progress says what the resumed build skipped
    caplog.clear()
    part = sorted((out / "parts").rglob("*.parquet"))[0]
    part.write_bytes(b"")
    verbose = ["corpus", "build", str(dicom_sources), "--out", str(out), "--resume", "true"]
    assert main(verbose) == 0
    assert f"ignoring unreadable part {part}" in caplog.text
    assert "resuming: 3 of 4 files already built (skipped), 1 to read" in caplog.text
    assert_same_corpus(out, clean_corpus)

    monkeypatch.setattr(corpus_module, "process_file", die_always)
    out = tmp_path / "again"
    assert main(corpus_argv(dicom_sources, out, "--workers", "2")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and VICTIM in err[0] and "died twice" in err[0]
    assert not (out / "manifest.parquet").exists()


# ---------------------------------------------------------------- two runs, one folder


def test_a_folder_in_use_is_refused_by_every_command(
    frames, mini, dicom_sources, shared_data, tmp_path, capsys
):
    folders = {name: tmp_path / name for name in ("run", "corpus", "suite", "export")}
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time, contextlib; from sonodistill.utils.rundir import lock_run_dir\n"
            "with contextlib.ExitStack() as stack:\n"
            "    for f in sys.argv[1:]: stack.enter_context(lock_run_dir(f, 'distill'))\n"
            "    print('locked', flush=True); time.sleep(120)",
            *map(str, folders.values()),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    commands = {
        "run": distill_argv(frames, folders["run"], "--max_steps", "2"),
        "corpus": corpus_argv(dicom_sources, folders["corpus"]),
        "suite": evaluate_argv(mini, folders["suite"]),
        "export": [
            *shlex.split(
                f"export --encoder random:test_resnet --frames+ ddti={shared_data}/ddti/image "
                f"--out {folders['export']} --image_size 64 --n_check 2 --n_calib 2"
            )
        ],
    }
    try:
        assert holder.stdout.readline().strip() == "locked"
        for name, argv in commands.items():
            capsys.readouterr()
            assert main(argv) == 2, name
            err = capsys.readouterr().err
            assert f"{folders[name]} is in use by sonodistill distill (pid {holder.pid}" in err
            assert sorted(p.name for p in folders[name].iterdir()) == [".lock"]
    finally:
        holder.kill()
        holder.wait()
