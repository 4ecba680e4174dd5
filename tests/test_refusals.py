"""Every way a command was seen to lose, mix or hide results (issue 12, "Why"), one row each.

Each row runs the command in-process through the CLI's `main` and checks the one error policy:
exit code 2, one line naming the option or file at fault, no traceback, and nothing written or
overwritten (a checksum of every file under the test's folder, before and after).
"""

from __future__ import annotations

import hashlib
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest
import yaml
from conftest import TINY_TEACHER_KWARGS
from PIL import Image

from sonodistill.cli import main
from sonodistill.config import parse_config, save_config
from sonodistill.evaluate.suite import SuiteConfig

TEACHER = "{" + ", ".join(f"{k}: {v}" for k, v in TINY_TEACHER_KWARGS.items()) + "}"
DISTILL = (
    "distill --data {frames} --out {tmp}/run --teacher.random_init true "
    "--student.name test_resnet --img_size 64 --batch_size 8 --num_workers 0 --log_every 1"
)
RESUME = DISTILL + " --resume true --max_steps 2"
EVALUATE = (
    "evaluate --out {tmp}/suite --encoders [random:test_resnet] --tasks [mini] --seeds [0] "
    "--protocols [linear] --train.seg_size 32 --train.epochs 1 --train.seg_batch 4 "
    "--datasets '{{mini: {{format: seg_folder, root: {mini}}}}}'"
)
EXPORT = (
    "export --encoder random:test_resnet --frames+ ddti={data}/ddti/image --out {tmp}/export "
    "--image_size 64 --n_check 2 --n_calib 2"
)
CORPUS = "corpus build {tmp}/sources.yaml --out {tmp}/corpus --quiet true"


@dataclass
class Row:
    id: str
    argv: str
    says: tuple[str, ...]
    """Text the error line must hold (the option or file at fault, what is wrong)."""
    setup: str = ""
    """A folder to prepare first: run, corpus, suite, export, sources, ... (see `prepare`)."""
    creates: str = ""
    """A folder the command may write before it finds the error (else nothing may change)."""


ROWS = [
    # -- overwrites: a run folder belongs to one run
    Row(
        "distill over a finished run",
        DISTILL,
        ("already holds a sonodistill distill run", "--resume"),
        "run",
    ),
    Row(
        "distill with --resume and --overwrite",
        RESUME + " --overwrite true",
        ("choose one",),
        "run",
    ),
    Row(
        "corpus build over a corpus",
        CORPUS,
        ("already holds a sonodistill corpus build run",),
        "corpus",
    ),
    Row(
        "corpus resumed with other settings",
        CORPUS + " --resume true --frames.max_per_clip 2",
        ("--settings.frames.max_per_clip 3 -> 2",),
        "corpus",
    ),
    Row("evaluate over a suite", EVALUATE, ("already holds a sonodistill evaluate run",), "suite"),
    Row(
        "evaluate resumed with another lr",
        EVALUATE + " --resume true --train.lr 0.01",
        ("--train.lr 0.0001 -> 0.01",),
        "suite",
    ),
    Row(
        "export over an export",
        EXPORT,
        ("already holds a sonodistill export run", "--overwrite"),
        "export",
    ),
    # -- a failed resume never touches the run; config drift is refused with the diff
    Row(
        "resume with another student",
        RESUME + " --student.name resnet18",
        ("--student.name",),
        "run",
    ),
    Row(
        "resume with another batch size",
        RESUME + " --batch_size 4",
        ("--batch_size 8 -> 4",),
        "run",
    ),
    Row(
        "resume on two devices",
        RESUME + " --accelerator cpu --devices 2",
        ("world size (devices x nodes) 1 -> 2",),
        "run",
    ),
    Row(
        "resume with another image size", RESUME + " --img_size 32", ("--img_size 64 -> 32",), "run"
    ),
    Row("resume with another seed", RESUME + " --seed 1", ("--seed 0 -> 1",), "run"),
    Row(
        "resume on other data",
        RESUME.replace("{frames}", "{frames2}"),
        ("training images (--data)",),
        "run",
    ),
    Row("resume with a shorter schedule", RESUME + " --max_steps 1", ("total steps",), "run"),
    Row(
        "resume from a 0-byte and a garbage checkpoint",
        RESUME,
        ("no readable checkpoint", "last.pt", "previous.pt"),
        "run_broken_checkpoints",
    ),
    # -- tracebacks instead of messages
    Row("batch size 0", DISTILL + " --batch_size 0", ("--batch_size 0", "> 0")),
    Row("batch size -4", DISTILL + " --batch_size -4", ("--batch_size -4",)),
    Row("image size 50", DISTILL + " --img_size 50", ("--img_size size 50x50", "multiples of 16")),
    Row("image size 0", DISTILL + " --img_size 0", ("--img_size 0",)),
    Row("unknown student", DISTILL + " --student.name notanet", ("--student.name notanet",)),
    Row("misspelt student", DISTILL + " --student.name resnt18", ("did you mean resnet18",)),
    Row("negative lr", DISTILL + " --optim.lr -1", ("--optim.lr -1",)),
    Row("misspelt loss", DISTILL + " --loss token_mes", ("--loss token_mes", "token_mse")),
    Row("missing data", DISTILL.replace("{frames}", "{tmp}/nowhere"), ("--data", "nowhere")),
    Row(
        "batch not divisible by the world size",
        DISTILL + " --batch_size 7 --accelerator cpu --devices 2",
        ("--batch_size 7", "world size 2"),
    ),
    Row("batch larger than the data", DISTILL + " --batch_size 64", ("--batch_size 64", "27")),
    Row("evaluate 0 epochs", EVALUATE + " --train.epochs 0", ("--train.epochs 0",)),
    Row("evaluate seg batch 0", EVALUATE + " --train.seg_batch 0", ("--train.seg_batch 0",)),
    Row(
        "evaluate unknown encoder kind",
        EVALUATE.replace("random:test_resnet", "randm:test_resnet"),
        ("randm",),
    ),
    Row(
        "evaluate unknown encoder",
        EVALUATE.replace("random:test_resnet", "random:resnet1800"),
        ("resnet1800", "unknown timm architecture", "resnet18"),
    ),
    Row("evaluate unknown task", EVALUATE.replace("[mini]", "[mni]"), ("--tasks mni", "mini")),
    Row(
        "evaluate a student that is not there",
        EVALUATE.replace("random:test_resnet", "student:{tmp}/no_run"),
        ("no_run", "no such distill run"),
    ),
    Row(
        "evaluate a truncated image",
        EVALUATE.replace("{mini}", "{tmp}/mini_broken"),
        ("broken.PNG", "unreadable image"),
        "mini_broken",
    ),
    Row(
        "evaluate nested class folders",
        EVALUATE.replace(
            "seg_folder, root: {mini}", "cls_folder, task_type: cls, root: {tmp}/nested"
        ),
        ("nested", "no images found"),
        "nested",
    ),
    Row(
        "export a truncated student",
        EXPORT.replace("random:test_resnet", "student:{tmp}/cut_run"),
        ("student_backbone.safetensors", "not a readable"),
        "cut_run",
    ),
    Row(
        "export student:no_such_run",
        EXPORT.replace("random:test_resnet", "student:{tmp}/no_such_run"),
        ("no_such_run", "no such distill run"),
    ),
    Row("export fewer frames than asked", EXPORT + " --n_check 900", ("--frames", "--n_check 900")),
    Row("export image size 0", EXPORT + " --image_size 0", ("--image_size 0",)),
    # -- wrong success
    Row("epochs 0", DISTILL + " --epochs 0", ("--epochs 0",)),
    Row("max steps 0", DISTILL + " --max_steps 0", ("--max_steps 0",)),
    Row(
        "a corpus that keeps no frame",
        CORPUS,
        ("no frame kept", "blank", "summary.md"),
        "blank_sources",
        creates="corpus",
    ),
    Row("corpus workers 0", CORPUS + " --workers 0", ("--workers 0",), "sources"),
    Row(
        "pack size 4", "corpus pack {tmp}/corpus --out {tmp}/pack --size 4", ("--size 4",), "corpus"
    ),
]


def test_the_table_covers_the_issue():
    assert len(ROWS) >= 30 and len({r.id for r in ROWS}) == len(ROWS)


# ---------------------------------------------------------------- shared inputs


@pytest.fixture(scope="module")
def inputs(shared_data, tmp_path_factory):
    """Real frames, a finished tiny distill run, a small corpus and a small labelled set."""
    root = tmp_path_factory.mktemp("inputs")
    frames, frames2 = root / "frames", root / "frames2"
    frames.mkdir()
    frames2.mkdir()
    for clip in sorted((shared_data / "corpus/covid_blues/lus_videos").glob("*.mp4"))[:3]:
        with av.open(str(clip)) as video:
            for i, frame in enumerate(video.decode(video=0)):
                if i % 8 == 0:
                    frame.to_image().convert("L").save(frames / f"{clip.stem}_{i:03d}.png")
                if i >= 64:
                    break
    for png in sorted(frames.glob("*.png"))[:20]:
        shutil.copy(png, frames2 / png.name)
    mini = root / "mini"
    for sub, names in (("images", "image"), ("masks", "mask")):
        (mini / sub).mkdir(parents=True)
        for png in sorted((shared_data / "ddti" / names).glob("*.PNG"))[:12]:
            shutil.copy(png, mini / sub / png.name)
    values = {"frames": frames, "frames2": frames2, "mini": mini, "data": shared_data}
    run = root / "run"
    argv = shlex.split(DISTILL.format(tmp=root, **values)) + ["--max_steps", "2"]
    assert main([*argv, "--teacher.model_kwargs", TEACHER]) == 0
    sources = root / "sources.yaml"
    cine = shared_data / "corpus/dicom/examples_ybr_color.dcm"
    sources.write_text(yaml.safe_dump({"sources": [{"dataset": "echo", "path": str(cine)}]}))
    corpus = shlex.split(f"{CORPUS.format(tmp=root)} --frames.max_per_clip 3 --workers 1")
    assert main(corpus) == 0
    return {**values, "run": run, "corpus": root / "corpus", "sources": sources}


def prepare(kind: str, tmp: Path, inputs: dict) -> None:
    if kind in ("run", "run_broken_checkpoints"):
        shutil.copytree(inputs["run"], tmp / "run")
    if kind == "run_broken_checkpoints":
        (tmp / "run/checkpoints/last.pt").write_bytes(b"")
        (tmp / "run/checkpoints/previous.pt").write_bytes(b"not a checkpoint")
    if kind == "cut_run":
        shutil.copytree(inputs["run"], tmp / "cut_run")
        weights = tmp / "cut_run/student_backbone.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    if kind in ("corpus", "sources", "blank_sources"):
        shutil.copy(inputs["sources"], tmp / "sources.yaml")
    if kind == "corpus":
        shutil.copytree(inputs["corpus"], tmp / "corpus")
    if kind == "blank_sources":
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp / "black.png")
        (tmp / "sources.yaml").write_text(
            yaml.safe_dump({"sources": [{"dataset": "black", "path": str(tmp / "black.png")}]})
        )
    if kind == "suite":  # a suite with the same settings, started before
        argv = shlex.split(EVALUATE.format(tmp=tmp, **inputs))[1:]
        save_config(parse_config(SuiteConfig, argv, "evaluate"), tmp / "suite/suite.yaml")
    if kind == "export":
        (tmp / "export").mkdir()
        (tmp / "export/report.json").write_text("{}")
    if kind == "mini_broken":  # an image cut short, as by an interrupted download
        shutil.copytree(inputs["mini"], tmp / "mini_broken")
        for sub in ("images", "masks"):
            first = sorted((tmp / "mini_broken" / sub).glob("*.PNG"))[0]
            first.rename(first.with_name("broken.PNG"))
        cut = tmp / "mini_broken/images/broken.PNG"
        cut.write_bytes(cut.read_bytes()[:300])
    if kind == "nested":
        for cls in ("benign", "malignant"):
            (tmp / "nested" / cls / "scans").mkdir(parents=True)
            for png in sorted((inputs["mini"] / "images").glob("*.PNG"))[:2]:
                shutil.copy(png, tmp / "nested" / cls / "scans" / png.name)


def checksum(folder: Path, skip: str = "") -> dict[str, str]:
    """Every file and folder under `folder` (but `skip`) with its content hash."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if skip and (rel == skip or rel.startswith(skip + "/")):
            continue
        out[rel] = hashlib.sha1(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return out


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_refused_in_one_line_with_nothing_written(row, inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SONODISTILL_DEBUG", raising=False)
    prepare(row.setup, tmp_path, inputs)
    before = checksum(tmp_path, row.creates)
    argv = shlex.split(row.argv.format(tmp=tmp_path, **inputs))
    if argv[0] == "distill":
        argv += ["--teacher.model_kwargs", TEACHER]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith(f"sonodistill {argv[0]}:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    for text in row.says:
        assert text in errors[0], errors[0]
    assert checksum(tmp_path, row.creates) == before
