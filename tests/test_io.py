"""The house rules' building blocks: atomic writes, a full disk in one line, the CLI's error
policy (run-folder locks: test_rundir.py)."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch

from sonodistill import io
from sonodistill.cli import main
from sonodistill.config import config_changes, describe_changes
from sonodistill.errors import UserError, check, unknown_name, user_message


def test_atomic_write_replaces_whole_files_and_leaves_no_temp_on_failure(tmp_path):
    target = tmp_path / "sub" / "result.json"
    io.write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    with pytest.raises(RuntimeError, match="writer broke"), io.atomic_path(target) as tmp:
        tmp.write_text('{"a": 2, "half')
        raise RuntimeError("writer broke")
    assert json.loads(target.read_text()) == {"a": 1}  # the old file, whole
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.json"]
    io.save_torch(tmp_path / "w.pt", {"x": torch.arange(3)})
    assert torch.load(tmp_path / "w.pt")["x"].tolist() == [0, 1, 2]


def test_a_full_disk_is_one_line_naming_the_file_and_no_temp_stays(tmp_path, monkeypatch):
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UserError, match=r"disk full: cannot write .*last\.pt"):
        io.save_torch(tmp_path / "last.pt", {"x": torch.zeros(10)})
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert list(tmp_path.iterdir()) == []
    # Writers in C++ wrap the OSError: the chain still tells.
    wrapped = RuntimeError("unexpected pos 704 vs 598")
    wrapped.__context__ = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(UserError, match="disk full"), io.atomic_path(tmp_path / "x.bin"):
        raise wrapped
    assert user_message(OSError(errno.ENOSPC, "No space left on device", "a.csv")).startswith(
        "disk full: cannot write a.csv"
    )


def test_read_json_treats_empty_or_garbage_files_as_missing(tmp_path, caplog):
    (tmp_path / "empty.json").write_text("")
    (tmp_path / "bad.json").write_text('{"half": ')
    assert io.read_json(tmp_path / "empty.json") is None
    assert io.read_json(tmp_path / "bad.json", "result") is None
    assert io.read_json(tmp_path / "missing.json") is None
    assert "unreadable result" in caplog.text and "bad.json" in caplog.text


def test_option_checks_and_config_diffs_read_as_one_line():
    with pytest.raises(UserError, match=r"^--batch_size -4: must be > 0$"):
        check(-4 > 0, "--batch_size", -4, "must be > 0")
    err = unknown_name(
        "timm model", "resnt18", ["resnet18", "resnet50", "vit_base"], "--student.name"
    )
    assert (
        str(err) == "--student.name resnt18: unknown timm model; did you mean resnet18 or resnet50?"
    )
    changes = config_changes(
        {"batch_size": 8, "optim": {"lr": 1e-4}}, {"batch_size": 16, "optim": {"lr": 1e-4}}
    )
    assert describe_changes(changes) == "--batch_size 8 -> 16"


def test_the_cli_turns_user_errors_into_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    missing = tmp_path / "nowhere.yaml"
    assert main(["corpus", "build", str(missing), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(missing) in err[0]
    monkeypatch.setenv("SONODISTILL_DEBUG", "1")
    with pytest.raises(UserError):
        main(
            [
                "export",
                "--encoder",
                "student:" + str(tmp_path / "no_run"),
                "--out",
                str(tmp_path / "x"),
            ]
        )
