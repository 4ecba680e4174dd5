"""The fault and attack table of issue 22: every failure a round of fault injection found on
real files, one row each, asserting its outcome.

Refusal rows run the command in-process through the CLI's `main` (`conftest.assert_refused`):
exit code 2, exactly one line on stderr naming the option or file at fault (and nothing it must
not say), no traceback, and every file under the test's folder unchanged.
"""

from __future__ import annotations

import errno
import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CORPUS, DISTILL, EVALUATE, EXPORT, RESUME, TEACHER, VIDEOS, assert_refused
from conftest import Refusal as Row

from sonodistill import io as sio
from sonodistill.distill import recipe as recipe_module
from sonodistill.errors import UserError

# --- one error path, nothing left behind (issue 22.4-5)

BENCH = (
    "bench --teacher '{{family: dinov3, weights: random, model_kwargs: "
    + TEACHER.replace("{", "{{").replace("}", "}}")
    + "}}' --student random:test_resnet --image_size 32 --warmup 0 --runs 1 "
    "--backends [torch_fp32] --gpu off --out {tmp}/bench"
)
EMBED = (
    "embed --sources+ ddti={mini}/images --encoders [random:test_resnet] --max_per_source 2 "
    "--image_size 32 --out {tmp}/embed"
)
AUDIT = EVALUATE.replace("evaluate ", "evaluate audit ", 1)
PREDICT = "predict --inputs+ {mini}/images --model {head} --out {tmp}/predict"
OUTPUTS = {  # every command, its output option at {OUT}, and what it needs first
    "corpus build": (CORPUS.replace("{tmp}/corpus", "{OUT}"), "sources"),
    "corpus pack": ("corpus pack {tmp}/corpus --out {OUT}", "corpus"),
    "corpus check-leakage": (
        "corpus check-leakage {tmp}/corpus --against+ ddti={mini}/images --report {OUT}/p.csv",
        "corpus",
    ),
    "distill": (DISTILL.replace("{tmp}/run", "{OUT}"), ""),
    "evaluate": (EVALUATE.replace("{tmp}/suite", "{OUT}"), ""),
    "evaluate audit": (AUDIT.replace("{tmp}/suite", "{OUT}"), ""),
    "embed": (EMBED.replace("{tmp}/embed", "{OUT}"), ""),
    "analyze": ("analyze --embeddings {embeddings} --out {OUT}", ""),
    "export": (EXPORT.replace("{tmp}/export", "{OUT}"), ""),
    "bench": (BENCH.replace("{tmp}/bench", "{OUT}"), ""),
    "predict": (PREDICT.replace("{tmp}/predict", "{OUT}"), ""),
    "demo": ("demo --out {OUT}", ""),
    "report": ("report {run} --out {OUT}/report.html", ""),
}


def nan_from_the_first_step(monkeypatch) -> None:
    real_step = recipe_module.train_step

    def diverging(*args, **kwargs):
        loss, metrics = real_step(*args, **kwargs)
        return loss * float("nan"), metrics

    monkeypatch.setattr(recipe_module, "train_step", diverging)


ONE_ERROR_PATH = [
    # -- an output that cannot be written: the one line names it, in every command
    *(
        Row(
            f"{name} --out a file",
            argv.replace("{OUT}", "{tmp}/file"),
            ("--out {tmp}/file is a file",)
            if name == "predict"  # checked with its other options, before the model is read
            else ("cannot write {tmp}/file", "a file is in the way of the folder"),
            f"{needs} file",
        )
        for name, (argv, needs) in OUTPUTS.items()
        if name != "report"
    ),
    Row(
        "report --out a folder",
        "report {run} --out {tmp}/folder",
        ("cannot write {tmp}/folder: a folder is in the way",),
        "folder",
    ),
    Row(
        "distill --out below a file",
        DISTILL.replace("{tmp}/run", "{tmp}/file/run"),
        ("cannot write {tmp}/file/run: a part of the path is a file",),
        "file",
    ),
    *(
        Row(
            f"{name} --out on a read-only file system",
            argv.replace("{OUT}", "{tmp}/ro/out"),
            ("cannot write {tmp}/ro/out",),
            f"{needs} read_only",
        )
        for name, (argv, needs) in OUTPUTS.items()
    ),
    # -- abbreviations, unknown options and misspelt keys: one line with the close match
    Row(
        "--overw true replaces no finished run",
        DISTILL + " --overw true",
        ("--overw: unknown option; did you mean --overwrite",),
        "run",
    ),
    Row(
        "--epoch 3 is not --epochs", DISTILL + " --epoch 3", ("--epoch: unknown option", "--epochs")
    ),
    Row(
        "corpus build --work 1",
        CORPUS + " --work 1",
        ("--work: unknown option", "--workers"),
        "sources",
    ),
    Row(
        "a misspelt nested flag",
        AUDIT + " --train.epoch 1",
        ("--train.epoch: unknown option; did you mean --train.epochs",),
    ),
    Row(
        "an unknown option without a close match",
        EXPORT + " --zzz 1",
        ("--zzz: unknown option; see sonodistill export --help",),
    ),
    Row(
        "exclud: in sources.yaml",
        CORPUS,
        ("{tmp}/sources.yaml: exclud: unknown key; did you mean exclude?",),
        "sources_exclud",
    ),
    Row(
        "a misspelt build setting in sources.yaml",
        CORPUS,
        ("{tmp}/sources.yaml: settings:", "'frames.max_per_clp': unknown option", "max_per_clip"),
        "sources_max_per_clp",
    ),
    Row(
        "a misspelt key of a source in sources.yaml",
        CORPUS,
        ("{tmp}/sources.yaml: source 'echo': anatomyy: unknown key; did you mean anatomy?",),
        "sources_anatomyy",
    ),
    Row(
        "a misspelt nested key in a --config YAML",
        DISTILL + " --config {tmp}/lrr.yaml",
        ("--config {tmp}/lrr.yaml: optim.lrr: unknown key; did you mean optim.lr",),
        "config_lrr",
    ),
    Row(
        "a misspelt top-level key in a --config YAML",
        DISTILL + " --config {tmp}/epoch.yaml",
        ("--config {tmp}/epoch.yaml: epoch: unknown key; did you mean epochs",),
        "config_epoch",
    ),
    Row(
        "a misspelt subcommand",
        "corpus biuld {tmp}/sources.yaml",
        ("'biuld': unknown command; did you mean build?",),
    ),
    Row("a misspelt evaluate audit", AUDIT.replace("audit", "audt"), ("'audt'", "audit?")),
    Row("a word for a number", DISTILL + " --batch_size eight", ("--batch_size eight",)),
    Row(
        "a choice not offered",
        DISTILL + " --augment usx",
        ("--augment usx: must be one of 'us', 'default', 'none'",),
    ),
    # -- numbers out of range, in every command, before anything is written
    Row(
        "distill val fraction 1", DISTILL + " --val_fraction 1", ("--val_fraction 1: must be >= 0",)
    ),
    Row(
        "distill beta 1",
        DISTILL + " --optim.betas [0.9,1]",
        ("--optim.betas 1: must be >= 0 and < 1",),
    ),
    Row("distill 0 teacher blocks", DISTILL + " --teacher.n_blocks 0", ("--teacher.n_blocks 0",)),
    Row(
        "distill prefetch 0",
        DISTILL + " --prefetch_factor 0",
        ("--prefetch_factor 0: must be > 0",),
    ),
    Row(
        "corpus content fraction 2",
        CORPUS + " --frames.min_content 2",
        ("--frames.min_content 2: must be >= 0 and <= 1",),
        "sources",
    ),
    Row(
        "corpus workers 0 in sources.yaml",
        CORPUS,
        ("{tmp}/sources.yaml: settings: workers 0: must be > 0",),
        "sources_workers_0",
    ),
    Row(
        "a source's clip cap -1 in sources.yaml",
        CORPUS,
        ("{tmp}/sources.yaml: source 'echo': frames.max_per_clip -1: must be >= 0",),
        "sources_max_per_clip_negative",
    ),
    Row(
        "check-leakage similarity 0",
        "corpus check-leakage {corpus} --against+ ddti={mini}/images --similarity 0",
        ("--similarity 0: must be > 0",),
    ),
    Row("evaluate fraction 0", EVALUATE + " --fractions [1,0]", ("--fractions 0: must be > 0",)),
    Row("evaluate 1 fold", EVALUATE + " --folds 1", ("--folds 1: must be == 0 or >= 2",)),
    Row("evaluate seed -2", EVALUATE + " --seeds [0,-2]", ("--seeds -2: must be >= 0",)),
    Row("evaluate lr 0", EVALUATE + " --train.lr 0", ("--train.lr 0: must be > 0",)),
    Row("export opset 99", EXPORT + " --opset 99", ("--opset 99: must be >= 7 and <= 23",)),
    Row("export tolerance -1", EXPORT + " --tolerance -1", ("--tolerance -1: must be > 0",)),
    Row("bench runs 0", BENCH + " --runs 0", ("--runs 0: must be > 0",)),
    Row("predict threshold 1", PREDICT + " --threshold 1", ("--threshold 1: must be > 0 and < 1",)),
    Row("predict 0 frames", PREDICT + " --max_frames 0", ("--max_frames 0: must be > 0",)),
    Row("embed batch 0", EMBED + " --batch_size 0", ("--batch_size 0: must be > 0",)),
    Row(
        "analyze 10 t-SNE steps",
        "analyze --embeddings {embeddings} --tsne_iter 10",
        ("--tsne_iter 10: must be >= 250",),
    ),
    Row("demo 0 bench runs", "demo --out {tmp}/demo --bench_runs 0", ("--bench_runs 0",)),
    # -- messages name only options the command has, and what exists
    Row(
        "export over an export offers no --resume",
        EXPORT,
        ("already holds a sonodistill export run", "--overwrite true"),
        "export",
        lacks=("--resume",),
    ),
    Row(
        "pack over a pack offers no --resume",
        "corpus pack {tmp}/corpus --out {tmp}/pack",
        ("already holds a sonodistill corpus pack run", "--overwrite true"),
        "corpus pack",
        lacks=("--resume",),
    ),
    Row(
        "predict over predictions offers no --resume",
        PREDICT,
        ("--out {tmp}/predict already holds predictions", "--overwrite true"),
        "predictions",
        lacks=("--resume",),
    ),
    Row(
        "predict over a stopped predict offers no --resume",
        PREDICT,
        ("already holds a sonodistill predict run (.partial)", "--overwrite true"),
        "partial",
        lacks=("--resume",),
    ),
    Row(
        "--conf is not --config", EXPORT + " --conf x.yaml", ("--conf: unknown option", "--config")
    ),
    Row(
        "a garbage checkpoint is called what it is",
        RESUME,
        (
            "no readable checkpoint",
            "last.pt: empty (0 bytes)",
            "previous.pt: damaged, or not a checkpoint of sonodistill distill",
        ),
        "run_broken_checkpoints",
        lacks=("weights_only", "torch.load"),
    ),
    Row(
        "a loss not finite from the first step claims no checkpoint",
        DISTILL + " --max_steps 2",
        ("not finite (nan or inf) at step 1", "no checkpoint was saved"),
        creates="run",  # config and logs: the run had started
        lacks=("(step 0)", "is kept"),
        fault=nan_from_the_first_step,
    ),
    # -- a run that fails its input checks writes nothing
    Row(
        "distill on only unreadable images",
        DISTILL.replace("{frames}", "{tmp}/cut"),
        ("--data {tmp}/cut: no readable image among the 27 training images",),
        "unreadable_frames",
    ),
    Row(
        "export on unreadable frames",
        EXPORT.replace("ddti={data}/ddti/image", "cut={tmp}/cut"),
        ("{tmp}/cut/", "image file is truncated"),
        "unreadable_frames",
    ),
    Row(
        "embed on unreadable frames",
        EMBED.replace("ddti={mini}/images", "cut={tmp}/cut"),
        ("{tmp}/cut/", "image file is truncated"),
        "unreadable_frames",
    ),
    Row(
        "analyze a model without embeddings",
        "analyze --embeddings {embeddings} --models [tst] --out {tmp}/analysis",
        ("--models tst: unknown model",),
    ),
]
if not torch.cuda.is_available():
    ONE_ERROR_PATH.append(
        Row(
            "bench --gpu on without CUDA", BENCH + " --gpu on", ("--gpu on: CUDA is not available",)
        )
    )


def prepare_faults(kinds: str, tmp: Path, sources: Path) -> None:
    """What this section's rows prepare beside `conftest.prepare`."""
    echo = yaml.safe_load(sources.read_text())["sources"]
    files = {
        "sources_exclud": {"sources": echo, "exclud": [{"name": "ddti", "path": str(tmp)}]},
        "sources_max_per_clp": {"sources": echo, "settings": {"frames": {"max_per_clp": 3}}},
        "sources_anatomyy": {"sources": [{**echo[0], "anatomyy": "heart"}]},
        "sources_workers_0": {"sources": echo, "settings": {"workers": 0}},
        "sources_max_per_clip_negative": {"sources": [{**echo[0], "frames": {"max_per_clip": -1}}]},
    }
    for kind in kinds.split():
        if kind in files:
            (tmp / "sources.yaml").write_text(yaml.safe_dump(files[kind]))
        if kind == "config_lrr":
            (tmp / "lrr.yaml").write_text("optim:\n  lrr: 0.1\n")
        if kind == "config_epoch":
            (tmp / "epoch.yaml").write_text("epoch: 3\n")
        if kind == "pack":
            (tmp / "pack").mkdir()
            (tmp / "pack/pack.json").write_text("{}")
        if kind == "partial":  # what a killed predict leaves
            (tmp / "predict/.partial").mkdir(parents=True)
        if kind == "predictions":
            (tmp / "predict").mkdir()
            (tmp / "predict/predictions.csv").write_text("source,frame\n")


@pytest.mark.parametrize("row", ONE_ERROR_PATH, ids=[r.id for r in ONE_ERROR_PATH])
def test_one_error_path(row, tmp_path, request, cli_inputs):
    prepare_faults(row.setup, tmp_path, cli_inputs["sources"])
    assert_refused(row, tmp_path, request)


def test_every_command_is_in_the_table():
    from sonodistill.cli import COMMANDS

    assert {name.split()[0] for name in OUTPUTS} == set(COMMANDS) - {"app"}  # the app: its own


@pytest.mark.parametrize(
    "code, says",
    [
        (errno.EROFS, "cannot write {}: read-only file system"),
        (errno.EACCES, "cannot write {}: permission denied"),  # a user's 0o555 folder
        (errno.EEXIST, "cannot write {}: a file is in the way of the folder"),
        (errno.ENOTDIR, "cannot write {}: a part of the path is a file"),
        (errno.EISDIR, "cannot write {}: a folder is in the way of the file"),
        (errno.ENOSPC, "disk full: cannot write {}"),
    ],
)
def test_an_output_that_cannot_be_written_is_one_line_naming_it(code, says, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_os_open, real_io_open = os.open, io.open

    def refused(path) -> bool:
        return Path(os.fsdecode(path)).is_relative_to(out)

    def os_open(path, flags, *args, **kwargs):
        if refused(path) and flags & os.O_CREAT:
            raise OSError(code, os.strerror(code), os.fsdecode(path))
        return real_os_open(path, flags, *args, **kwargs)

    def io_open(path, mode="r", *args, **kwargs):
        if isinstance(path, (str, os.PathLike)) and refused(path) and "w" in mode:
            raise OSError(code, os.strerror(code), os.fsdecode(path))
        return real_io_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(io, "open", io_open)
    claim = pytest.raises(UserError, match=re.escape(says.format(out)))
    with claim, sio.lock_run_dir(out, "test"):  # a run folder's claim
        pass
    assert not out.exists()
    out.mkdir()
    with pytest.raises(UserError, match=re.escape(says.format(out / "a.json"))):  # a result
        sio.write_json(out / "a.json", {})
    assert list(out.iterdir()) == []
    # An input the writer reads is not the output: its error stays its own.
    with pytest.raises(PermissionError), sio.atomic_path(tmp_path / "b.bin"):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "input.png"))


def descendants(pid: int) -> set[int]:
    """Every process below `pid`, from /proc (each process's parent is field 4 of its stat)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= frontier
    return found


def alive(pid: int) -> bool:
    """Running, not a zombie (a dead child its new parent has not reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_kill_9_of_a_two_worker_corpus_build_leaves_no_process_behind(shared_data, tmp_path):
    sources = tmp_path / "sources.yaml"
    clips = shared_data / VIDEOS / "*.mp4"  # 150 clips: minutes of work for two workers
    sources.write_text(yaml.safe_dump({"sources": [{"dataset": "lung", "path": str(clips)}]}))
    argv = ["corpus", "build", str(sources), "--out", str(tmp_path / "c"), "--workers", "2"]
    code = "import sys; from sonodistill.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    build = subprocess.Popen([sys.executable, "-c", code, *argv, "--quiet", "true"], env=env)
    pool: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the forkserver, its two workers, the tracker
            pool = descendants(build.pid)
            if len(pool) >= 4 and list((tmp_path / "c" / "parts").rglob("*.parquet")):
                break
            time.sleep(0.2)
        assert len(pool) >= 4, f"the build's pool never started: {pool}"
        os.kill(build.pid, signal.SIGKILL)
        build.wait()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(map(alive, pool)):
            time.sleep(0.2)
        assert not [pid for pid in pool if alive(pid)], "left behind after kill -9"
    finally:
        build.kill()
        for pid in filter(alive, pool):  # what a failed test leaves: by PID, nothing else
            os.kill(pid, signal.SIGKILL)
