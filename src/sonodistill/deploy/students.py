"""`sonodistill bench --students [...]`: the student chosen for the device.

Times each candidate backbone on this machine's deployment runtimes (the backends of
`--backends`, written and opened as `export` and `predict` do, in the steady-state blocks of
`bench.time_blocks`, all candidates taking turns in one run), marks which fit `--budget_ms`,
and, for distilled candidates (`student:RUN`), adds their distillation validation loss and
cosine (the run's last `val_loss`/`val_cosine`) and, given an evaluate suite's folder
(`--scores`), their downstream score (`--score_metric` on the test split, averaged over the
encoder's runs). The latency-vs-quality plot marks the Pareto front: the candidates no other
beats on both latency and quality.

Writes `students.{md,csv,json}` and `pareto.png` to `--out`.
"""

from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from sonodistill.deploy.bench import _calibration, backend_runners, check_config, time_blocks
from sonodistill.deploy.config import BENCH, BenchConfig
from sonodistill.deploy.environment import environment
from sonodistill.deploy.runtimes import BACKENDS
from sonodistill.errors import UserError
from sonodistill.io import atomic_path, read_json, write_json, write_table
from sonodistill.models import to_model_input
from sonodistill.models.encoders import EncoderSpec, build_encoder, encoder_label
from sonodistill.models.flops import count_flops, count_params
from sonodistill.models.specs import LOGS
from sonodistill.utils.rundir import RunDir

log = logging.getLogger(__name__)

TABLE, PLOT = "students", "pareto.png"


def candidate_spec(item: str | dict, index: int) -> EncoderSpec:
    """A candidate: an encoder spec, or a bare timm name (`resnet18`: a random init, whose
    latency is the architecture's)."""
    option = f"--students[{index}]"
    if isinstance(item, str) and ":" not in item:
        item = f"random:{item}@{item}"
    return EncoderSpec.parse(item, option)


def run_quality(spec: EncoderSpec) -> dict:
    """A distilled candidate's last validation loss and cosine (empty for other candidates or
    runs without held-out images). Read from the newest attempt's log that has a validation
    here: deploy imports nothing from distill (tests/test_layers.py)."""
    if spec.family != "student" or not spec.weights:
        return {}
    logs = sorted(
        Path(spec.weights, LOGS).glob("version_*/metrics.csv"),
        key=lambda p: int(p.parent.name.split("_")[1]),
    )
    logged = [t for t in (pd.read_csv(p) for p in logs) if "val_loss" in t]
    logged = [t.dropna(subset=["val_loss"]) for t in logged]
    logged = [t for t in logged if len(t)]
    if not logged:
        return {}
    last = logged[-1].iloc[-1]
    out = {"distill_val_loss": float(last["val_loss"])}
    if "val_cosine" in last and not math.isnan(last["val_cosine"]):
        out["distill_val_cosine"] = float(last["val_cosine"])
    return out


def downstream_scores(folder: str, metric: str) -> dict[str, dict]:
    """{encoder label: {"score": mean, "runs": n, "tasks": [...]}} from an evaluate suite's
    runs/*.json: `metric` of each run's test split, averaged over the encoder's runs."""
    runs = sorted(Path(folder, "runs").glob("*.json"))
    if not runs:
        raise UserError(f"--scores {folder}: no evaluate results (runs/*.json) there")
    found: dict[str, list] = {}
    for path in runs:
        result = read_json(path, "evaluate result") or {}
        value = (result.get("test") or {}).get(metric)
        if value is not None:
            found.setdefault(result["encoder"], []).append((float(value), result.get("task")))
    if not found:
        raise UserError(f"--scores {folder}: no run reports test {metric} (--score_metric)")
    return {
        label: {
            "score": float(np.mean([v for v, _ in values])),
            "runs": len(values),
            "tasks": sorted({t for _, t in values if t}),
        }
        for label, values in found.items()
    }


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: lower x (latency) and higher y (quality),
    at least as good on both and better on one. Sorted by x."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (x2 <= x and y2 >= y) and (x2 < x or y2 > y)
            for j, (x2, y2) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def bench_students(cfg: BenchConfig) -> dict:
    """Time every candidate on the backends of `--backends`; write the table and the plot."""
    names, _ = check_config(cfg)  # the GPU is not timed here: the device is the target's CPU
    specs = [candidate_spec(item, i) for i, item in enumerate(cfg.students)]
    labels = [encoder_label(s) for s in specs]
    if len(set(labels)) < len(labels):
        raise UserError(f"--students: two candidates share a label ({labels}); give @LABEL")
    scores = downstream_scores(cfg.scores, cfg.score_metric) if cfg.scores else {}
    encoders = [build_encoder(s, f"--students[{i}]").eval() for i, s in enumerate(specs)]
    for i, encoder in enumerate(encoders):
        encoder.check_input_size(cfg.image_size, cfg.image_size, f"--students[{i}]")
    threads = cfg.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    cfg.threads = threads
    calib, calib_note = _calibration(cfg)
    run = RunDir(cfg.out, BENCH, overwrite=cfg.overwrite)
    with run.claim():
        run.clear()
        run.save_options(cfg)
        x = to_model_input(torch.rand(1, 1, cfg.image_size, cfg.image_size))
        rows, runners, infos = [], {}, []
        with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
            for i, (label, encoder) in enumerate(zip(labels, encoders, strict=True)):
                found, info = backend_runners(f"student{i}", encoder, cfg, names, calib, Path(tmp))
                runners |= {(i, b): fn for b, fn in found.items()}
                infos.append(info)
                rows.append(
                    {
                        "student": label,
                        "params_m": count_params(encoder.backbone) / 1e6,
                        "gflops": count_flops(encoder, x)[0] / 1e9,
                    }
                )
            timed = time_blocks(runners, cfg.warmup, cfg.runs, cfg.block)
        for i, row in enumerate(rows):
            for b in names:
                stats = timed.get((i, b))
                row[f"{b}_ms"] = stats["latency_median_ms"] if stats else None
                if stats is None:
                    about = infos[i].get(b, {})
                    row.setdefault("not_timed", {})[b] = about.get("error") or about.get("skipped")
            deployed = [row[f"{b}_ms"] for b in names if row[f"{b}_ms"] is not None]
            row["best_ms"] = min(deployed) if deployed else None
            if cfg.budget_ms is not None:
                fits = [b for b in names if row[f"{b}_ms"] is not None]
                fits = [b for b in fits if row[f"{b}_ms"] <= cfg.budget_ms]
                row["fits_budget"] = ", ".join(fits) if fits else "no"
            row |= run_quality(specs[i])
            if labels[i] in scores:
                row["downstream"] = scores[labels[i]]["score"]
        env = environment(threads) | {
            "warmup": cfg.warmup,
            "runs": cfg.runs,
            "image_size": cfg.image_size,
            "calibration": calib_note,
            "budget_ms": cfg.budget_ms,
            "score_metric": cfg.score_metric if scores else None,
        }
        quality = _quality_key(rows)
        front = []
        if quality:
            points = [(r["best_ms"], r[quality]) for r in rows if _plotted(r, quality)]
            kept = [r for r in rows if _plotted(r, quality)]
            front = [kept[i]["student"] for i in pareto_front(points)]
        for row in rows:
            row["pareto"] = row["student"] in front
        result = {"rows": rows, "backends": names, "quality": quality, "env": env}
        _write(result, cfg, run.path)
    return result


def _quality_key(rows: list[dict]) -> str | None:
    """What the plot's y axis shows: the downstream score when any candidate has one, else the
    distillation validation cosine, else nothing (latency only)."""
    for key in ("downstream", "distill_val_cosine"):
        if any(r.get(key) is not None for r in rows):
            return key
    return None


def _plotted(row: dict, quality: str) -> bool:
    return row.get(quality) is not None and row["best_ms"] is not None


def _cell(value, fmt: str = ".2f") -> str:
    return "n/a" if value is None else format(value, fmt)


def _write(result: dict, cfg: BenchConfig, out: Path) -> None:
    rows, names, env = result["rows"], result["backends"], result["env"]
    table = []
    for r in rows:
        line = {
            "student": r["student"],
            "params (M)": _cell(r["params_m"]),
            "GFLOPs": _cell(r["gflops"]),
        }
        for b in names:
            line[f"{BACKENDS.get(b).label} (ms, median)"] = _cell(r[f"{b}_ms"])
        if cfg.budget_ms is not None:
            line[f"fits {cfg.budget_ms:g} ms"] = r["fits_budget"]
        if any("distill_val_loss" in x for x in rows):
            line["distill val loss"] = _cell(r.get("distill_val_loss"), ".4f")
            line["distill val cosine"] = _cell(r.get("distill_val_cosine"), ".4f")
        if any("downstream" in x for x in rows):
            line[f"downstream {cfg.score_metric}"] = _cell(r.get("downstream"), ".4f")
        line["Pareto"] = "yes" if r["pareto"] else ""
        table.append(line)
    note = (
        f"Batch 1, {cfg.image_size}x{cfg.image_size} grey input, backbone only, {env['warmup']} "
        f"warm-up + {env['runs']} timed runs per candidate and backend in blocks of {cfg.block} "
        f"taking turns, {env['threads']} CPU threads on {env['cpu']}; int8 calibrated on "
        f"{env['calibration']}. A candidate fits the budget on the backends listed."
    )
    if result["quality"]:
        note += (
            f" Pareto: no other candidate is both faster (best backend) and better "
            f"({result['quality'].replace('_', ' ')})."
        )
    for r in rows:
        for b, why in r.get("not_timed", {}).items():
            note += f" No {BACKENDS.get(b).label} time for {r['student']}: {why}."
    write_table(table, out / TABLE, note=note)
    write_json(out / f"{TABLE}.json", result, default=str)
    plot(result, cfg.budget_ms, out / PLOT)


def plot(result: dict, budget_ms: float | None, path: Path) -> Path:
    """Latency (best backend, median) against quality, the Pareto front joined, the budget as
    a dashed line; without a quality, candidates sit on one row by latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, quality = result["rows"], result["quality"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r["best_ms"] is None:
            continue
        y = r.get(quality) if quality else 0.0
        if y is None:
            continue
        ax.scatter(r["best_ms"], y, s=40, color="C3" if r["pareto"] else "C0", zorder=3)
        ax.annotate(r["student"], (r["best_ms"], y), textcoords="offset points", xytext=(5, 4))
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["best_ms"])
    if len(front) > 1:
        ax.step(
            [r["best_ms"] for r in front],
            [r[quality] for r in front],
            where="post",
            color="C3",
            label="Pareto front",
        )
    if budget_ms is not None:
        ax.axvline(budget_ms, ls="--", color="grey", label=f"budget {budget_ms:g} ms")
    unplotted = [r["student"] for r in rows if quality and r.get(quality) is None]
    if unplotted:  # timed, but nothing says how good they are
        ax.set_title("no quality measure: " + ", ".join(unplotted), fontsize=9, loc="left")
    ax.set_xlabel("latency, best deployment backend (ms, median, batch 1)")
    names = {"downstream": "downstream score", "distill_val_cosine": "distillation val cosine"}
    ax.set_ylabel(names.get(quality, "(no quality measure given)"))
    if not quality:
        ax.set_yticks([])
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
