"""Markdown + CSV tables laid out like the paper's Tables 2, 3, 4, 6, 7 and 8, with the statistics
a reviewer needs in every cell, and `comparisons.md` (paired tests against a reference).

A cell reads `mean ± std [low, high] (n=N)`: the mean and sample std over the cell's runs
(seeds, and folds under cross-validation), the 95% bootstrap interval over test images
(`evaluate.stats`) and the number of runs; `(n=1 of 3)` when runs are missing, `–` when none
finished. Every table carries the trivial predictors as rows (all background, all foreground,
majority class) on the same test images, and a `†` marks a cell that a paired per-image test
does not show better than each of them (`stats.no_better`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from sonodistill.evaluate.stats import holm, interval, no_better, paired
from sonodistill.io import write_csv, write_table, write_text

METRICS = {"seg": ("dice", "iou"), "cls": ("acc", "f1")}
HEAD = {"dice": "Dice", "iou": "IoU", "acc": "Acc", "f1": "F1"}
BASELINES = {
    "seg": {
        "all_background": "All background (trivial)",
        "all_foreground": "All foreground (trivial)",
    },
    "cls": {"majority_class": "Majority class (trivial)"},
}
RECIPE_COLUMNS = {
    "init": "Init",
    "augmentation": "Augmentation",
    "mixup": "Mixup",
    "head": "Projection",
    "student": "Student",
    "teacher": "Teacher",
}
FLAG = "†"
STATS_NOTE = (
    "Cells: mean ± sample std over runs [95% bootstrap interval over test images; their number] "
    f"(n = runs); {FLAG}: not shown better than a trivial predictor on the same images (one-sided "
    "paired Wilcoxon signed-rank p >= 0.05 or the paired 95% interval of the difference reaches 0)."
)


def runs_frame(results: list[dict]) -> pd.DataFrame:
    """One row per finished run: identifiers and test metrics."""
    rows = []
    for r in results:
        row = {k: r[k] for k in ("task", "task_type", "protocol", "encoder", "fraction", "seed")}
        row["fold"] = r.get("fold")
        row.update({m: r["test"].get(m) for m in ("dice", "iou", "acc", "f1")})
        row["best_epoch"], row["wall_s"] = r["best_epoch"], r["wall_s"]
        rows.append(row)
    return pd.DataFrame(rows)


def cell_key(task: str, protocol: str, encoder: str, fraction: float) -> tuple:
    """A table cell: its runs share task, protocol, encoder and label fraction."""
    return (task, protocol, encoder, round(float(fraction), 9))


@dataclass
class Cell:
    mean: float | None
    std: float | None
    n: int
    expected: int
    low: float | None = None
    high: float | None = None
    images: int = 0
    flagged: bool = False

    def text(self) -> str:
        count = f"n={self.n}" if self.n >= self.expected else f"n={self.n} of {self.expected}"
        if self.mean is None or math.isnan(self.mean):
            return f"– ({count})"
        out = f"{self.mean:.4f}"
        if self.n >= 2:
            out += f" ± {self.std:.4f}"
        if self.low is not None and not math.isnan(self.low):
            images = f"; {self.images} images" if self.images else ""
            out += f" [{self.low:.4f}, {self.high:.4f}{images}]"
        out += f" ({count})"
        return out + (f" {FLAG}" if self.flagged else "")


class Results:
    """Finished runs indexed by cell, with the expected run count of every cell."""

    def __init__(
        self,
        results: list[dict],
        expected: dict[tuple, int] | None = None,
        num_classes: dict[str, int] | None = None,
    ):
        self.results = results
        self.expected = expected or {}
        self.num_classes = num_classes or {}
        self._by_cell: dict[tuple, list[dict]] = {}
        for r in results:
            self._by_cell.setdefault(
                cell_key(r["task"], r["protocol"], r["encoder"], r["fraction"]), []
            ).append(r)

    def runs(self, task, protocol, encoder, fraction) -> list[dict]:
        return self._by_cell.get(cell_key(task, protocol, encoder, fraction), [])

    def baseline(self, task: str, fraction: float, name: str, metric: str) -> float | None:
        """A trivial predictor's score on the cell's test images (any encoder, any protocol:
        the test images and the training labels are the same); mean over folds by images."""
        seen: dict = {}
        for (t, _, _, f), runs in self._by_cell.items():
            if t != task or abs(f - fraction) > 1e-9:
                continue
            for r in runs:
                fold = r.get("fold")
                if fold not in seen and name in r.get("baselines", {}):
                    seen[fold] = (r["baselines"][name].get(metric), r["n"]["test"])
        values = [(v, n) for v, n in seen.values() if v is not None and not math.isnan(v)]
        if not values:
            return None
        return sum(v * n for v, n in values) / sum(n for _, n in values)

    def cell(self, task, task_type, protocol, encoder, fraction, metric) -> Cell:
        runs = self.runs(task, protocol, encoder, fraction)
        expected = self.expected.get(cell_key(task, protocol, encoder, fraction), len(runs))
        values = [r["test"].get(metric) for r in runs]
        values = [v for v in values if v is not None and not math.isnan(v)]
        if not values:
            return Cell(None, None, len(runs), max(expected, 1))
        series = pd.Series(values, dtype=float)
        ci = interval(runs, metric, self.num_classes.get(task))
        mean = float(series.mean())
        flagged = self.no_better(runs, task, task_type, fraction, metric, mean)
        return Cell(
            mean,
            float(series.std(ddof=1)) if len(values) > 1 else 0.0,
            len(runs),
            expected,
            ci["low"],
            ci["high"],
            ci["images"],
            flagged=flagged,
        )

    def no_better(self, runs, task, task_type, fraction, metric, mean) -> bool:
        """Flag: a paired per-image test against each trivial predictor does not show the
        cell better (`stats.no_better`); runs saved without the trivial predictors' per-image
        scores (0.1) compare the means."""
        k = self.num_classes.get(task)
        for name in BASELINES[task_type]:
            trivial = [
                {**r, "per_image": r["baselines"][name]["per_image"]}
                for r in runs
                if "per_image" in r.get("baselines", {}).get(name, {})
            ]
            if trivial and len(trivial) == len(runs):
                if no_better(runs, trivial, metric, k):
                    return True
            else:
                floor = self.baseline(task, fraction, name, metric)
                if floor is not None and mean <= floor + 1e-12:
                    return True
        return False


def metric_table(
    res: Results,
    encoders: list[str],
    columns: list[tuple[str, str, str, str, float, str]],
    row_keys: dict[str, list[str]] | None = None,
    baselines: bool = True,
) -> tuple[pd.DataFrame, list[dict]]:
    """Rows = encoders (+ trivial predictors); columns = (header, task, task type, metric, fraction,
    protocol). Returns the table and one numeric record per cell (for summary.csv)."""
    rows, numbers = [], []
    for k, enc in enumerate(encoders):
        row = {"Model": enc, **{name: v[k] for name, v in (row_keys or {}).items()}}
        for header, task, task_type, metric, fraction, protocol in columns:
            c = res.cell(task, task_type, protocol, enc, fraction, metric)
            row[header] = c.text()
            numbers.append(
                {
                    "model": enc,
                    "column": header,
                    "task": task,
                    "protocol": protocol,
                    "fraction": fraction,
                    "metric": metric,
                    **c.__dict__,
                }
            )
        rows.append(row)
    if baselines:
        for task_type, names in BASELINES.items():
            if not any(col[2] == task_type for col in columns):
                continue
            for name, title in names.items():
                row = {"Model": title, **{key: "" for key in (row_keys or {})}}
                for header, task, column_type, metric, fraction, _ in columns:
                    v = (
                        res.baseline(task, fraction, name, metric)
                        if column_type == task_type
                        else None
                    )
                    row[header] = "" if v is None else f"{v:.4f}"
                rows.append(row)
    return pd.DataFrame(rows), numbers


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


def recipe_of(results: list[dict], encoder: str) -> dict:
    for r in results:
        if r["encoder"] == encoder and r.get("encoder_recipe"):
            return r["encoder_recipe"]
    return {}


def _recipe_columns(results: list[dict], encoders: list[str]) -> dict[str, list[str]]:
    recipes = [recipe_of(results, e) for e in encoders]
    out = {}
    for key, title in RECIPE_COLUMNS.items():
        values = []
        for rec in recipes:
            v = rec.get(key, "–")
            values.append("✓" if v is True else "×" if v is False else str(v))
        out[title] = values
    return out


def comparisons(
    res: Results, tasks: dict[str, str], encoders: list[str], reference: str, out: Path
) -> Path:
    """comparisons.md (+ .csv): every encoder against `reference`, per task, protocol and label
    fraction, paired over the test images both were tested on."""
    rows = []
    cells = sorted({k[:2] + (k[3],) for k in res._by_cell}, key=lambda k: (k[0], k[1], -k[2]))
    for task, protocol, fraction in cells:
        ref_runs = res.runs(task, protocol, reference, fraction)
        if not ref_runs or task not in tasks:
            continue
        for enc in encoders:
            runs = res.runs(task, protocol, enc, fraction)
            if enc == reference or not runs:
                continue
            for metric in METRICS[tasks[task]]:
                r = paired(ref_runs, runs, metric, res.num_classes.get(task))
                rows.append(
                    {
                        "task": task,
                        "protocol": protocol,
                        "fraction": fraction,
                        "encoder": enc,
                        "metric": HEAD[metric],
                        **r,
                    }
                )
    for row, adjusted in zip(
        rows, holm([r["p"] if not math.isnan(r["p"]) else 1.0 for r in rows]), strict=True
    ):
        row["p_holm"] = adjusted
    write_csv(out / "comparisons.csv", pd.DataFrame(rows))
    lines = [
        f"## Paired comparisons against {reference}",
        "",
        "Per task, protocol and label fraction, on the test images both encoders were tested on "
        "(per-image scores averaged over seeds). Δ = encoder - reference, with its 95% paired "
        "bootstrap interval; p: Wilcoxon signed-rank test on per-image scores (Dice/IoU; "
        "classification: the share of seeds that classified the image correctly), two-sided; "
        "p (Holm): adjusted for all comparisons in this file.",
        "",
        "| Task | Protocol | Fraction | Encoder | Metric | Δ | 95% interval | p | p (Holm) "
        "| Images |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = "–" if math.isnan(r["p"]) else f"{r['p']:.3g}"
        lines.append(
            f"| {r['task']} | {r['protocol']} | {r['fraction']:g} | {r['encoder']} | {r['metric']} "
            f"| {r['delta']:+.4f} | [{r['low']:+.4f}, {r['high']:+.4f}] | {p} "
            f"| {r['p_holm']:.3g} | {r['images']} |"
        )
    if not rows:
        lines.append("| – | | | | | | | | | |")
    return write_text(out / "comparisons.md", "\n".join(lines) + "\n")


def paper_tables(
    results: list[dict],
    encoders: list[str],
    tasks: dict[str, str],
    out: Path,
    note: str,
    ablation: list[dict] | None = None,
    expected: dict[tuple, int] | None = None,
    num_classes: dict[str, int] | None = None,
    reference: str | None = None,
) -> list[Path]:
    """Write every table the finished runs support; `tasks`: task name -> 'seg' | 'cls';
    `expected`: runs planned per (task, protocol, encoder, fraction)."""
    if not results:
        return []
    df = runs_frame(results)
    write_csv(out / "runs.csv", df)
    res = Results(results, expected, num_classes)
    note = f"{note} {STATS_NOTE}"
    written, numbers = [], []

    def cols(protocol: str, names, fraction=1.0, only=None):
        return [
            (
                f"{t} {HEAD[m]}" if fraction == 1.0 else f"{t} {HEAD[m]} {fraction:.0%}",
                t,
                tasks[t],
                m,
                fraction,
                protocol,
            )
            for t in names
            for m in (only or {}).get(tasks[t], METRICS[tasks[t]])
        ]

    def emit(table, cells, stem, title):
        numbers.extend({"table": stem, **c} for c in cells)
        written.append(write_table(table, out / stem, title, note))

    titles = {
        "linear": ("table2_linear_probe", "Table 2: linear probing on frozen encoders"),
        "finetune": ("table3_finetune", "Table 3: full fine-tuning on all labeled data"),
    }
    for protocol, (stem, title) in titles.items():
        if ((df.protocol == protocol) & (df.fraction == 1.0)).any():
            emit(*metric_table(res, encoders, cols(protocol, list(tasks))), stem, title)
    label_fractions = {
        "finetune": ("table4_label_fractions", "fine-tuning"),
        "linear": ("table4_label_fractions_linear", "linear probe, frozen encoder"),
    }
    for protocol, (stem, what) in label_fractions.items():
        fractions = sorted(df[(df.protocol == protocol) & (df.fraction < 1.0)].fraction.unique())
        if not fractions:
            continue
        first = {"seg": ("dice",), "cls": ("acc",)}
        columns = [c for f in fractions for c in cols(protocol, list(tasks), f, first)]
        columns.sort(key=lambda c: (list(tasks).index(c[1]), c[4]))
        title = f"Table 4: limited labels ({what} on a fraction of the training split)"
        emit(*metric_table(res, encoders, columns), stem, title)
    paper = [t for t in ("busi_cls", "ddti_seg") if t in tasks] or list(tasks)
    tuned = [e for e in encoders if (df[df.protocol == "finetune"].encoder == e).any()]
    if tuned:
        table = metric_table(res, tuned, cols("finetune", paper), _recipe_columns(results, tuned))
        title = "Table 7: architectures, distilled vs random (full fine-tuning)"
        emit(*table, "table7_architectures", title)
    seg = [t for t in tasks if tasks[t] == "seg"]
    if seg and tuned:
        dice, cells = metric_table(res, tuned, cols("finetune", seg, only={"seg": ("dice",)}))
        models = backbone_table(results, tuned)
        trivial = pd.DataFrame({"Model": dice.Model[len(tuned) :]})
        table = pd.concat([models, trivial], ignore_index=True).fillna("")
        table = table.join(dice.drop(columns="Model"))
        title = "Table 8: foundation models and distilled students (full fine-tuning)"
        emit(table, cells, "table8_foundation_models", title)
    students = [e for e in tuned if recipe_of(results, e).get("init") == "distilled"]
    rows = [a["encoder"] for a in ablation] if ablation else students
    if ablation or len(students) >= 2:
        table = metric_table(res, rows, cols("finetune", paper), _recipe_columns(results, rows))
        title = "Table 6: ablation, augmentation policy and mixup (full fine-tuning)"
        emit(*table, "table6_ablation", title)
    agg = pd.DataFrame(numbers)
    if not agg.empty:
        write_csv(out / "summary.csv", agg.drop(columns=["column"]))
    if len(encoders) > 1:
        written.append(comparisons(res, tasks, encoders, reference or encoders[0], out))
    return written
