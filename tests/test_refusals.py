"""Every way a command was seen to lose, mix or hide results (issue 12, "Why"), one row each.

Each row runs the command in-process through the CLI's `main` and checks the one error policy:
exit code 2, one line naming the option or file at fault, no traceback, and nothing written or
overwritten (a checksum of every file under the test's folder, before and after).
"""

from __future__ import annotations

import pytest
from conftest import CORPUS, DISTILL, EVALUATE, EXPORT, RESUME, assert_refused
from conftest import Refusal as Row

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
        "resume with another image size",
        RESUME + " --image_size 32",
        ("--image_size 64 -> 32",),
        "run",
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
    Row(
        "image size 50",
        DISTILL + " --image_size 50",
        ("--image_size size 50x50", "multiples of 16"),
    ),
    Row("image size 0", DISTILL + " --image_size 0", ("--image_size 0",)),
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
        "pack size 4",
        "corpus pack {tmp}/corpus --out {tmp}/pack --image_size 4",
        ("--image_size 4",),
        "corpus",
    ),
]


def test_the_table_covers_the_issue():
    assert len(ROWS) >= 30 and len({r.id for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_refused_in_one_line_with_nothing_written(row, tmp_path, request):
    assert_refused(row, tmp_path, request)
