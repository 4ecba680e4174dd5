"""`sonodistill report RUN_DIR`: one self-contained HTML page (images inlined) of a run folder.

It reads the demo run layout (see docs/demo.md) and shows whatever is there, so it also works on
a partial run or on a plain distill run dir:

    demo.json / demo.yaml        summary (teacher, per-step times) and resolved demo config
    distill/config.yaml          distillation config      distill/logs/        loss/cosine curves
    evaluate/*/tables/*.md       evaluation suites' tables (else evaluate/**/*.{csv,md})
    analysis/*.png               t-SNE figure(s)          analysis/**/*.{csv,md} embedding tables
    bench/*.{csv,md}             Table 5                  samples/*.png        predicted masks

A demo with the simulated teacher opens with what the run is (a simulated world), what each
section's numbers show, and the transfer at a glance: the suites' paired comparisons of the
distilled student and the teacher against random initialisation.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

from sonodistill.io import write_text
from sonodistill.models.specs import read_run_config

TITLE = "sonodistill report"


@dataclass
class ReportConfig:
    """One self-contained HTML page (images inlined) of a run folder."""

    run_dir: str = ""
    """A run folder: a demo (runs/demo) or a distill run."""
    out: str | None = None
    """Output HTML file (default RUN_DIR/report.html)."""


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;
 margin:24px auto;padding:0 16px;color:#1d2430;line-height:1.45}
h1{margin-bottom:4px} h2{border-bottom:2px solid #e3e7ee;padding-bottom:4px;margin-top:36px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:14px}
th,td{border:1px solid #d5dbe5;padding:4px 10px;text-align:right}
th{background:#f2f5f9;text-align:left}
td:first-child,th:first-child,td.t{text-align:left}
pre{background:#f6f8fa;padding:10px;overflow-x:auto;font-size:12.5px;max-height:420px}
.warn{background:#fff4d6;border:1px solid #e8c35a;padding:10px 14px;border-radius:6px}
.ok{background:#e7f6ea;border:1px solid #7fc48c;padding:10px 14px;border-radius:6px}
.muted{color:#68738a;font-size:13px} img{max-width:100%;border:1px solid #e3e7ee}
nav a{margin-right:14px}
"""


def main(cfg: ReportConfig) -> int:
    """`sonodistill report RUN_DIR`."""
    path = build_report(cfg.run_dir, cfg.out)
    print(f"report: {path}  (open it in a browser: file://{path.resolve()})")
    return 0


def build_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write RUN_DIR/report.html (or `out`) and return its path."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder not found: {run}")
    summary = _read_json(run / "demo.json")
    sections = [
        ("Overview", _overview(run, summary)),
        ("Configuration", _configs(run)),
        ("Distillation curves", _curves(run)),
        ("Downstream evaluation", _evaluation(run / "evaluate")),
        ("Embeddings (t-SNE)", _figures(run / "analysis") + _tables(run / "analysis")),
        ("Deployment (Table 5)", _tables(run / "bench", skip=STUDENTS)),
        ("Sample frames and predicted masks", _figures(run / "samples")),
    ]
    if students := _students(run / "bench"):  # only when `bench --students` ran
        sections.insert(-1, ("Student for the device (latency vs quality)", students))
    nav = " ".join(f'<a href="#s{i}">{html.escape(t)}</a>' for i, (t, _) in enumerate(sections))
    body = "\n".join(
        f'<h2 id="s{i}">{html.escape(t)}</h2>\n{c or _missing(t)}'
        for i, (t, c) in enumerate(sections)
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{TITLE}: {html.escape(run.name)}"
        f"</title><style>{CSS}</style></head><body><h1>{TITLE}</h1>"
        f"<div class='muted'>{html.escape(str(run.resolve()))}</div><nav>{nav}</nav>{body}"
        "</body></html>"
    )
    out = Path(out) if out else run / "report.html"
    write_text(out, page)
    return out


# --- sections -------------------------------------------------------------------------------------


def _overview(run: Path, summary: dict) -> str:
    parts = []
    teacher = summary.get("teacher", {})
    kind = teacher.get("kind") or ("random" if _distill_teacher_is_random(run) else "")
    if teacher.get("random") or kind == "random":
        parts.append(
            "<p class='warn'><b>The teacher was randomly initialised</b> "
            "(no DINOv3 weights given): the numbers below show the mechanics of the method only, "
            "not its results. Pass "
            "<code>--teacher.weights FILE</code> or set <code>SONODISTILL_TEACHER_WEIGHTS</code> "
            "to distil from the real DINOv3 ViT-B/16.</p>"
        )
    elif kind == "simulated":
        parts.append(_simulated_world(teacher, summary))
        parts.append(_at_a_glance(run / "evaluate"))
    elif teacher:
        source = html.escape(str(teacher.get("source")))
        parts.append(f"<p class='ok'>Teacher: DINOv3 weights <code>{source}</code></p>")
    steps = summary.get("steps", [])
    if steps:
        rows = [
            [
                s.get("name", ""),
                s.get("status", ""),
                f"{s.get('seconds', 0):.1f}",
                s.get("detail", ""),
            ]
            for s in steps
        ]
        total = sum(s.get("seconds", 0) for s in steps)
        rows.append(["total", "", f"{total:.1f}", ""])
        parts.append(_html_table(["step", "status", "seconds", "detail"], rows))
    facts = {k: v for k, v in summary.items() if k not in ("steps", "teacher", "note")}
    if facts:
        items = "".join(
            f"<li><b>{html.escape(k)}</b>: {html.escape(str(v))}</li>" for k, v in facts.items()
        )
        parts.append(f"<ul class='muted'>{items}</ul>")
    return "\n".join(parts)


SECTIONS_SHOW = [
    (
        "Distillation curves",
        "how closely the student's projected map matches the teacher's tokens on the same view "
        "(loss, Eq. 6; token cosine) while it trains on unlabeled frames.",
    ),
    (
        "Linear probe (Table 2, Table 4 linear)",
        "what the frozen features already contain: a 1x1 conv (segmentation) or a linear layer "
        "(lesion type) trained on 5-100 % of the labels. Random init: what the architecture "
        "alone gives; distilled: what the student learned from the teacher without a label; "
        "teacher: what there was to learn.",
    ),
    (
        "Fine-tuning (Table 3)",
        "every weight trained on all labels for a few epochs: the start a distilled "
        "initialisation gives.",
    ),
    (
        "Intervals and tests",
        "[low, high] is a 95 % bootstrap interval over test images; comparisons.md pairs each "
        "encoder with random init on the same test images (Wilcoxon signed-rank, Holm-adjusted).",
    ),
    (
        "t-SNE",
        "how each encoder separates the simulated anatomies (silhouette, k-NN accuracy).",
    ),
    (
        "Table 5",
        "the deployment cost of the real ViT-B/16 architecture vs the student (not the "
        "simulated teacher).",
    ),
]
"""What each section's numbers show, for a demo in the simulated world."""


def _simulated_world(teacher: dict, summary: dict) -> str:
    seen = ", ".join(teacher.get("pretraining_presets") or []) or "some presets"
    held = ", ".join(summary.get("downstream_presets") or []) or "the others"
    items = "".join(
        f"<li><b>{html.escape(t)}</b>: {html.escape(text)}</li>" for t, text in SECTIONS_SHOW
    )
    return (
        "<p class='warn'><b>A simulated world.</b> The teacher is a small DINOv3 ViT trained "
        f"with labels on simulated frames of {html.escape(seen)} (its 'natural images'), saved "
        "in Meta's file layout and loaded like any DINOv3 file; distillation uses unlabeled "
        f"frames of every preset; the downstream tasks use {html.escape(held)}, which the "
        "teacher never saw. The numbers show whether distillation carries what a teacher knows "
        "into the student, here; they are not results on real ultrasound, and the teacher is "
        "not DINOv3 (pass <code>--teacher.weights FILE</code> for the real one).</p>"
        f"<p>What each number shows:</p><ul>{items}</ul>"
    )


def _at_a_glance(evaluate: Path) -> str:
    """The suites' paired comparisons against random init (Dice, accuracy): a row per protocol,
    task and encoder, a column per label fraction."""
    cells: dict[tuple, dict[float, str]] = {}
    for path in sorted(evaluate.glob("*/tables/comparisons.csv")):
        for r in csv.DictReader(path.open()):
            if r["metric"] not in ("Dice", "Acc"):  # the tables hold IoU and F1 too
                continue
            low, high = float(r["low"]), float(r["high"])
            sure = float(r["p_holm"]) < 0.05 and low > 0
            text = f"{float(r['delta']):+.3f} [{low:+.3f}, {high:+.3f}]" + (" ✓" if sure else "")
            key = (r["protocol"], r["task"], r["encoder"], r["metric"])
            cells.setdefault(key, {})[float(r["fraction"])] = text
    if not cells:
        return ""
    fractions = sorted({f for row in cells.values() for f in row})
    header = ["protocol", "task", "encoder", "metric", *(f"{f:.0%} labels" for f in fractions)]
    order = sorted(cells, key=lambda k: (k[0] != "linear", k[1], k[2]))  # probes first
    rows = [[*key, *(cells[key].get(f, "") for f in fractions)] for key in order]
    return (
        "<h3>Transfer at a glance: each encoder minus random initialisation</h3>"
        + _html_table(header, rows)
        + "<p class='muted'>Mean difference in test score against the same architecture at "
        "random initialisation, on the same test images, with its 95% paired bootstrap interval; "
        "✓: significant (Wilcoxon signed-rank, Holm-adjusted p &lt; 0.05, interval above 0). "
        "From evaluate/*/tables/comparisons.md.</p>"
    )


def _evaluation(folder: Path) -> str:
    """Each suite's tables (evaluate/<protocol>/tables), else every table under the folder."""
    suites = sorted(folder.glob("*/tables"))
    if not suites:
        return _tables(folder)
    return "\n".join(f"<h3>{html.escape(t.parent.name)}</h3>{_tables(t)}" for t in suites)


def _distill_run(run: Path) -> Path:
    """The distill run of a demo folder (run/distill), else the folder itself."""
    return run / "distill" if (run / "distill").is_dir() else run


def _distill_teacher_is_random(run: Path) -> bool:
    """A distill config without weights and with random_init: the teacher was random."""
    teacher = read_run_config(_distill_run(run)).get("teacher") or {}
    return bool(teacher.get("random_init")) and not teacher.get("weights")


def _configs(run: Path) -> str:
    parts = []
    for path in (run / "demo.yaml", run / "distill" / "config.yaml", run / "config.yaml"):
        if path.is_file():  # the demo's own config open, the others folded
            text = html.escape(path.read_text())
            state = " open" if path.name == "demo.yaml" else ""
            parts.append(
                f"<details{state}><summary><code>{path.relative_to(run)}</code></summary>"
                f"<pre>{text}</pre></details>"
            )
    return "\n".join(parts)


def _curves(run: Path) -> str:
    from sonodistill.distill.run import loss_title, read_metrics  # pandas: not for --help

    folder = _distill_run(run)
    try:
        rows = read_metrics(folder)  # every attempt of a resumed run, in version order
    except FileNotFoundError:
        return ""
    train = rows[rows["loss"].notna()] if "loss" in rows else rows.iloc[:0]
    if train.empty:
        return ""
    keys = ("loss", "cosine", "lr", "images_per_s")
    series = {k: train[k].tolist() for k in keys if k in train and train[k].notna().all()}
    objective = loss_title(folder)
    png = _plot_curves(train["step"].tolist(), series, objective)
    last = train.iloc[-1]
    # Several teachers (--teachers): each teacher's LABEL_loss and LABEL_cosine beside the sum.
    per_teacher = [c for c in train if c.endswith(("_loss", "_cosine")) and c not in keys]
    per_teacher = [c for c in per_teacher if not c.startswith("val_") and train[c].notna().all()]
    facts = ", ".join(
        f"{k} {float(last[k]):.4g}" for k in ("step", *keys, *per_teacher) if k in train
    )
    text = f"objective: {objective}; last logged step: {facts}"
    return _img(png, "distillation curves") + f"<p class='muted'>{html.escape(text)}</p>"


def _plot_curves(steps: list[float], series: dict[str, list[float]], loss: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # A constant lr says nothing: show the training throughput instead.
    lr_varies = len(set(series.get("lr") or [])) > 1
    keep = ("loss", "cosine", "lr" if lr_varies else "images_per_s")
    panels = [(k, series[k]) for k in keep if series.get(k)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    labels = {
        "loss": loss,
        "cosine": "teacher-student cosine",
        "lr": "lr",
        "images_per_s": "throughput (images/s)",
    }
    for ax, (key, values) in zip(axes[0], panels, strict=True):
        ax.plot(steps, values, lw=1.5)
        ax.set_title(labels[key])
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key == "loss":
            ax.set_yscale("log")
    fig.tight_layout()
    return _png(fig)


def _tables(folder: Path, skip: tuple[str, ...] = ()) -> str:
    """Every table in a folder (recursively): Markdown preferred (it has the notes), else CSV;
    files named in `skip` (stems) are left to their own section."""
    if not folder.is_dir():
        return ""
    parts = []
    for path in sorted(p for p in folder.rglob("*") if p.stem not in skip):
        csv_only = path.suffix == ".csv" and not path.with_suffix(".md").exists()
        if path.suffix == ".md" or csv_only:
            text = path.read_text()
            table = _csv_table(path) if path.suffix == ".csv" else _md_table(text)
            heading = re.search(r"^#+\s+(.+)$", text, re.M) if path.suffix == ".md" else None
            title = heading.group(1) if heading else _title(path, folder)
            if table:
                parts.append(f"<h3>{html.escape(title)}</h3>{table}")
    return "\n".join(parts)


# Titles of the files the demo's steps write; any other file is titled by its path.
TITLES = {
    "tsne": "t-SNE of the corpus embeddings, coloured by simulated anatomy (cf. paper Fig. 2)",
    "metrics": "How well each encoder separates the anatomies (silhouette, k-NN accuracy)",
    "table5": "Teacher vs student deployment cost (cf. paper Table 5)",
    "segmentation_samples": "Test frames: ground truth and each fine-tuned model's predicted mask",
}


def _title(path: Path, folder: Path) -> str:
    if path.parent == folder and path.stem in TITLES:
        return TITLES[path.stem]
    return str(path.relative_to(folder).with_suffix("")).replace("_", " ")


def _csv_table(path: Path) -> str:
    rows = list(csv.reader(path.open()))
    if len(rows) < 2:
        return ""
    return _html_table(rows[0], [[_fmt(c) for c in r] for r in rows[1:]])


def _fmt(cell: str) -> str:
    try:
        value = float(cell)
    except ValueError:
        return cell
    return cell if value.is_integer() and "." not in cell else f"{value:.4g}"


def _md_table(text: str) -> str:
    """Pipe tables of a Markdown file -> HTML; other lines are kept as paragraphs."""
    out, rows = [], []
    for line in [*text.splitlines(), ""]:
        if line.strip().startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set(":- ") for c in cells):
                rows.append(cells)
            continue
        if rows:
            out.append(_html_table(rows[0], rows[1:]))
            rows = []
        if line.strip() and not line.startswith("#"):
            out.append(f"<p class='muted'>{html.escape(line.strip())}</p>")
    return "\n".join(out)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(_td(c) for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_NUMBER = re.compile(r"[-+]?\d[\d.,]*(e[-+]?\d+)?( ± [\d.]+)?( \(median [\d.]+\))?")


def _td(cell) -> str:
    """Numbers right-aligned (they compare digit by digit), text left-aligned."""
    text = str(cell)
    numeric = bool(_NUMBER.fullmatch(text))
    return f"<td>{html.escape(text)}</td>" if numeric else f"<td class='t'>{html.escape(text)}</td>"


def _figures(folder: Path) -> str:
    if not folder.is_dir():
        return ""
    return "\n".join(
        f"<h3>{html.escape(_title(p, folder))}</h3>" + _img(p.read_bytes(), p.stem)
        for p in sorted(folder.rglob("*.png"))
    )


STUDENTS = ("students",)
"""What `bench --students` writes (deploy.students): its own section."""


def _students(folder: Path) -> str:
    """`bench --students`: the latency-vs-quality plot (Pareto front, budget) and the table of
    candidates (latency per backend, fits the budget, distillation and downstream quality)."""
    table = folder / "students.md"
    if not table.is_file():
        return ""
    plot = folder / "pareto.png"
    figure = _img(plot.read_bytes(), "latency vs quality, Pareto front") if plot.is_file() else ""
    return figure + _md_table(table.read_text())


def _missing(title: str) -> str:
    return f"<p class='muted'>No output for “{html.escape(title)}” in this run folder.</p>"


# --- helpers --------------------------------------------------------------------------------------


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'>"


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
