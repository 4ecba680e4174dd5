"""A distillation run's logs: the attempts' metrics merged, and how plots name its objective.

    OUT/config.yaml                    the resolved DistillConfig
    OUT/run_info.json                  teacher weights, world size, precision, device, torch;
                                       each attempt's start, world size and ending
    OUT/checkpoints/last.pt            student, optimiser, scheduler and step (for --resume)
    OUT/checkpoints/previous.pt        the checkpoint before it (read when last.pt is not)
    OUT/logs/version_N/metrics.csv     one CSV (and TensorBoard) log per start or resume
    OUT/student_backbone.safetensors   the distilled backbone: a timm state dict, no classifier

The file names live in `sonodistill.models.specs` (the `student:RUN_DIR` encoder family reads
them: `models.build_encoder("student:RUN")`), the folder's rules in `distill.config.DISTILL`.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from sonodistill.io import read_json, write_json
from sonodistill.models.specs import (
    CHECKPOINTS,
    LAST_CHECKPOINT,
    LOGS,
    RUN_INFO,
    STUDENT_WEIGHTS,
    read_run_config,
)


def loss_title(run_dir: str | Path) -> str:
    """How to name a run's objective in plots: its registered title (token MSE by default,
    the objective of runs older than the `loss` option)."""
    from sonodistill.distill.config import LOSSES

    name = read_run_config(run_dir).get("loss", "token_mse")
    return LOSSES.entry(name).title if name in LOSSES else f"{name} loss"


ENDINGS = ("finished", "stopped", "user error", "crashed")
"""How an attempt ended (run_info.json `attempts[-1].ending`): done; stopped on a signal with its
checkpoint saved; a user error (a bad option or file, a loss that stopped being finite); any
other exception. An attempt killed outright (SIGKILL, a node lost) records none."""


def record_ending(run_dir: str | Path, ending: str) -> None:
    """Note in run_info.json how the current attempt ended (`ENDINGS`)."""
    path = Path(run_dir) / RUN_INFO
    info = read_json(path, "run info") if path.is_file() else None
    if info and info.get("attempts"):
        info["attempts"][-1]["ending"] = ending
        write_json(path, info)


def requeue_decision(run_dir: str | Path) -> tuple[bool, str]:
    """Whether a scheduler should start the job again to continue the run in `run_dir`, and
    why, from the folder alone (a launcher's exit code does not tell: srun reports 128 + the
    signal that killed a task, torchrun its own code): a checkpoint to continue from, no
    exported backbone (the run is not done), and a last attempt that did not end on a user
    error, which a new start would repeat."""
    run_dir = Path(run_dir)
    # checkpoint.PREVIOUS, named here to keep this module free of torch
    checkpoints = [run_dir / LAST_CHECKPOINT, run_dir / CHECKPOINTS / "previous.pt"]
    if (run_dir / STUDENT_WEIGHTS).exists():
        return False, f"{run_dir / STUDENT_WEIGHTS} exists: the run is finished"
    if not any(p.is_file() for p in checkpoints):
        return False, f"{run_dir} holds no checkpoint to continue from"
    path = run_dir / RUN_INFO
    attempts = (read_json(path, "run info") or {}).get("attempts", []) if path.is_file() else []
    ending = attempts[-1].get("ending", "killed") if attempts else "unknown"
    if ending == "user error":
        return False, "its last attempt ended on a user error (see the job's log): fix it first"
    return True, f"a checkpoint and no backbone in {run_dir}, last attempt: {ending}"


def main(argv: list[str] | None = None) -> int:
    """`python -m sonodistill.distill.run OUT`: exit 0 (requeue) or 1, the reason printed;
    what scripts/slurm_distill.sbatch asks after each start."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m sonodistill.distill.run RUN_DIR", file=sys.stderr)
        return 2
    requeue, why = requeue_decision(args[0])
    print(f"{'requeue' if requeue else 'no requeue'}: {why}")
    return 0 if requeue else 1


def next_log_version(run_dir: str | Path) -> int:
    """Each start or resume logs into its own logs/version_N (Fabric's CSVLogger would
    otherwise delete the metrics of the interrupted attempt); `read_metrics` merges them."""
    return len(list((Path(run_dir) / LOGS).glob("version_*")))


def read_metrics(run_dir: str | Path) -> pd.DataFrame:
    """All logged rows of a run, attempts merged in version order (version_10 after version_9);
    a later attempt's rows replace the ones it repeats."""
    files = sorted(
        (Path(run_dir) / LOGS).glob("version_*/metrics.csv"),
        key=lambda p: int(p.parent.name.split("_")[1]),
    )
    if not files:
        raise FileNotFoundError(f"{run_dir}: no {LOGS}/version_*/metrics.csv")
    frames = [pd.read_csv(f).assign(attempt=i) for i, f in enumerate(files)]
    rows = pd.concat(frames, ignore_index=True)
    # Train and validation rows share step numbers: dedupe within each of the two.
    is_val = rows["val_loss"].notna() if "val_loss" in rows else False
    rows["_val"] = is_val
    rows = rows.drop_duplicates(["_val", "step"], keep="last").drop(columns=["_val"])
    return rows.sort_values(["step", "attempt"]).reset_index(drop=True)


if __name__ == "__main__":
    raise SystemExit(main())
