"""Markdown + CSV tables laid out like the paper's Tables 2, 3, 4, 6, 7 and 8 (mean +- std)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from sonodistill.io import write_csv, write_table

METRICS = {"seg": ("dice", "iou"), "cls": ("acc", "f1")}
HEAD = {"dice": "Dice", "iou": "IoU", "acc": "Acc", "f1": "F1"}


def runs_frame(results: list[dict]) -> pd.DataFrame:
    """One row per finished run: identifiers and test metrics."""
    rows = []
    for r in results:
        row = {k: r[k] for k in ("task", "task_type", "protocol", "encoder", "fraction", "seed")}
        row.update({m: r["test"].get(m) for m in ("dice", "iou", "acc", "f1")})
        row["best_epoch"], row["wall_s"] = r["best_epoch"], r["wall_s"]
        rows.append(row)
    return pd.DataFrame(rows)


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """Mean, sample std and seed count per (task, protocol, encoder, fraction)."""
    keys = ["task", "protocol", "encoder", "fraction"]
    metrics = ["dice", "iou", "acc", "f1"]
    g = df.groupby(keys, sort=False)[metrics]
    out = g.mean().join(g.std(ddof=1).fillna(0.0).add_suffix("_std"))
    return out.join(g.size().rename("n_seeds")).reset_index()


def cell(mean: float | None, std: float | None, n: int = 2) -> str:
    """`mean ± std`; a single seed shows the value alone (no spread to report)."""
    if mean is None or pd.isna(mean):
        return "–"
    return f"{mean:.4f}" if n < 2 else f"{mean:.4f} ± {std:.4f}"


def _lookup(agg: pd.DataFrame, task: str, protocol: str, encoder: str, fraction: float):
    hit = agg[
        (agg.task == task)
        & (agg.protocol == protocol)
        & (agg.encoder == encoder)
        & ((agg.fraction - fraction).abs() < 1e-9)
    ]
    return None if hit.empty else hit.iloc[0]


def metric_table(
    agg: pd.DataFrame,
    encoders: list[str],
    columns: list[tuple[str, str, str, float, str]],
    row_keys: dict[str, list[str]] | None = None,
) -> pd.DataFrame:
    """Rows = encoders; columns = (header, task, metric, fraction, protocol)."""
    rows = []
    for enc in encoders:
        row = {"Model": enc, **{k: v[encoders.index(enc)] for k, v in (row_keys or {}).items()}}
        for header, task, metric, fraction, protocol in columns:
            hit = _lookup(agg, task, protocol, enc, fraction)
            if hit is None:
                row[header] = cell(None, None)
            else:
                row[header] = cell(hit[metric], hit[f"{metric}_std"], int(hit["n_seeds"]))
        rows.append(row)
    return pd.DataFrame(rows)


def backbone_table(results: list[dict], encoders: list[str]) -> pd.DataFrame:
    """Model, family, backbone architecture and its parameters (M), from the runs' records."""
    info = {r["encoder"]: r.get("backbone") for r in results if r.get("backbone")}
    rows = []
    for enc in encoders:
        b = info.get(enc) or {}
        params = f"{b['params'] / 1e6:.1f}" if "params" in b else "–"
        rows.append(
            {
                "Model": enc,
                "Family": b.get("family", "–"),
                "Backbone": b.get("name", "–"),
                "Params (M)": params,
            }
        )
    return pd.DataFrame(rows)


def paper_tables(
    results: list[dict],
    encoders: list[str],
    tasks: dict[str, str],
    out: Path,
    note: str,
    ablation: list[dict] | None = None,
) -> list[Path]:
    """Write every table the finished runs support; `tasks`: task name -> 'seg' | 'cls'."""
    if not results:
        return []
    out.mkdir(parents=True, exist_ok=True)
    df = runs_frame(results)
    write_csv(out / "runs.csv", df)
    agg = aggregate(df)
    write_csv(out / "summary.csv", agg)
    written = []

    def cols(protocol: str, names, fraction=1.0, only=None):
        return [
            (
                f"{t} {HEAD[m]}" if fraction == 1.0 else f"{t} {HEAD[m]} {fraction:.0%}",
                t,
                m,
                fraction,
                protocol,
            )
            for t in names
            for m in (only or {}).get(tasks[t], METRICS[tasks[t]])
        ]

    titles = {
        "linear": ("table2_linear_probe", "Table 2: linear probing on frozen encoders"),
        "finetune": ("table3_finetune", "Table 3: full fine-tuning on all labeled data"),
    }
    for protocol, (stem, title) in titles.items():
        if (df.protocol == protocol).any() and (df.fraction == 1.0).any():
            table = metric_table(agg, encoders, cols(protocol, list(tasks)))
            written.append(write_table(table, out / stem, title, note))
    fractions = sorted(f for f in df.fraction.unique() if f < 1.0)
    if fractions:
        first = {"seg": ("dice",), "cls": ("acc",)}
        columns = [c for f in fractions for c in cols("finetune", list(tasks), f, first)]
        columns.sort(key=lambda c: (list(tasks).index(c[1]), c[3]))
        table = metric_table(agg, encoders, columns)
        title = "Table 4: limited labels (fine-tuning on a fraction of the training split)"
        written.append(write_table(table, out / "table4_label_fractions", title, note))
    paper = [t for t in ("busi_cls", "ddti_seg") if t in tasks] or list(tasks)
    if (df.protocol == "finetune").any():
        table = metric_table(agg, encoders, cols("finetune", paper))
        title = "Table 7: architectures, distilled vs random (full fine-tuning)"
        written.append(write_table(table, out / "table7_architectures", title, note))
    seg = [t for t in tasks if tasks[t] == "seg"]
    if seg and (df.protocol == "finetune").any():
        table = backbone_table(results, encoders).join(
            metric_table(agg, encoders, cols("finetune", seg, only={"seg": ("dice",)})).drop(
                columns="Model"
            )
        )
        title = "Table 8: foundation models and distilled students (full fine-tuning)"
        written.append(write_table(table, out / "table8_foundation_models", title, note))
    if ablation:
        labels = [a["encoder"] for a in ablation]
        keys = {
            "Augmentation": [a.get("augmentation", "") for a in ablation],
            "Mixup": ["✓" if a.get("mixup") else "×" for a in ablation],
        }
        table = metric_table(agg, labels, cols("finetune", paper), keys)
        title = "Table 6: ablation, augmentation policy and mixup (full fine-tuning)"
        written.append(write_table(table, out / "table6_ablation", title, note))
    return written
