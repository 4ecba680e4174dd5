"""Results as tables: one writer for every table the project writes (Markdown for reading,
CSV and optionally JSON for tools). pandas' own `to_markdown` needs the tabulate package;
a pipe table is a few lines."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd


def markdown_table(rows: pd.DataFrame | list[dict], floatfmt: str = ".4f") -> str:
    """A pipe table; numeric columns right-aligned, floats formatted with `floatfmt`."""
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)

    def cell(value) -> str:
        return format(value, floatfmt) if isinstance(value, float) else str(value)

    numeric = [pd.api.types.is_numeric_dtype(frame[c]) for c in frame.columns]
    lines = [
        "| " + " | ".join(map(str, frame.columns)) + " |",
        "|" + "|".join("---:" if n else "---" for n in numeric) + "|",
    ]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def write_table(
    rows: pd.DataFrame | list[dict],
    stem: str | Path,
    title: str = "",
    note: str = "",
    floatfmt: str = ".4f",
    with_json: bool = False,
) -> Path:
    """STEM.csv, STEM.md (`## title`, the note, the table) and with_json STEM.json (a list of
    rows); returns STEM.md."""
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(stem.with_suffix(".csv"), index=False)
    if with_json:
        records = frame.astype(object).where(frame.notna(), None).to_dict(orient="records")
        stem.with_suffix(".json").write_text(json.dumps(records, indent=2))
    parts = [f"## {title}"] if title else []
    parts += [note] if note else []
    parts.append(markdown_table(frame, floatfmt))
    path = stem.with_suffix(".md")
    path.write_text("\n\n".join(parts) + "\n")
    return path
