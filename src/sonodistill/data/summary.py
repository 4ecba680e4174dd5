"""What a built corpus holds: summary.json / summary.md (counts per dataset, kind and drop
reason; unreadable files, skipped, and truncated ones, whose frames read are used) and
contact_sheet.png (random kept frames)."""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd

from sonodistill.data import frames as fr
from sonodistill.io import atomic_path, markdown_table, write_json, write_text


def summarize(manifest: pd.DataFrame) -> dict:
    frames = manifest[manifest.frame >= 0]
    files = manifest.source.nunique()
    file_rows = manifest[manifest.frame < 0]  # one per unreadable or truncated file
    cut = file_rows.reason.str.startswith(fr.TRUNCATED)
    seen = frames.groupby("source").agg(frames=("frame", "size"), kept=("kept", "sum"))
    per = (
        frames.groupby(["dataset", "anatomy"])
        .agg(frames=("frame", "size"), kept=("kept", "sum"))
        .reset_index()
    )
    nfiles = manifest.groupby(["dataset", "anatomy"]).source.nunique().rename("files").reset_index()
    per = nfiles.merge(per, how="left", on=["dataset", "anatomy"]).fillna(0)
    reasons = manifest.loc[~manifest.kept, "reason"].map(
        lambda r: next((k for k in (fr.UNREADABLE, fr.TRUNCATED) if r.startswith(k)), r)
    )
    kind_counts = frames.groupby(frames.kind.fillna("unknown")).agg(
        frames=("frame", "size"), kept=("kept", "sum")
    )
    truncated = [
        {
            "source": row.source,
            "reason": row.reason,
            "frames": int(seen.frames.get(row.source, 0)),
            "kept": int(seen.kept.get(row.source, 0)),
        }
        for row in file_rows[cut].itertuples()
    ]
    return {
        "frames_seen": int(len(frames)),
        "frames_kept": int(manifest.kept.sum()),
        "files": int(files),
        "files_unreadable": int((~cut).sum()),
        "files_truncated": len(truncated),
        "per_dataset": [
            {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
            for row in per.astype({"files": int, "frames": int, "kept": int}).to_dict("records")
        ],
        "per_kind": {
            k: {"frames": int(v.frames), "kept": int(v.kept)} for k, v in kind_counts.iterrows()
        },
        "drop_reasons": {k: int(v) for k, v in reasons.value_counts().items()},
        "skipped_files": file_rows[~cut][["source", "reason"]].to_dict("records"),
        "truncated_files": truncated,
    }


def write_summary(
    manifest: pd.DataFrame, out: Path, seconds: float = 0.0, files_read: int = 0
) -> dict:
    summary = summarize(manifest)
    summary["seconds"] = round(seconds, 2)
    summary["files_read"] = files_read
    write_json(out / "summary.json", summary)
    per_dataset = pd.DataFrame(
        summary["per_dataset"], columns=["dataset", "anatomy", "files", "frames", "kept"]
    ).rename(columns={"frames": "frames seen"})
    per_kind = pd.DataFrame(
        [(k, v["frames"], v["kept"]) for k, v in summary["per_kind"].items()],
        columns=["kind", "frames seen", "kept"],
    )
    reasons = pd.DataFrame(list(summary["drop_reasons"].items()), columns=["drop reason", "frames"])
    lines = [
        f"# Corpus summary: {out.name}",
        "",
        f"{summary['frames_kept']} frames kept of {summary['frames_seen']} seen, from "
        f"{summary['files']} files; {summary['files_unreadable']} source files could not be "
        f"read and {summary['files_truncated']} end before their declared frames (their frames "
        "read before the cut are used; both listed at the end; the build's own failures stop "
        "it instead).",
        "",
        markdown_table(per_dataset),
        "",
        markdown_table(per_kind),
        "",
        markdown_table(reasons),
    ]
    if summary["skipped_files"]:
        lines += ["", "Skipped files (unreadable):", ""]
        lines += [f"- `{r['source']}`: {r['reason']}" for r in summary["skipped_files"]]
    if summary["truncated_files"]:
        lines += ["", "Truncated files (the frames read before the cut are used):", ""]
        lines += [
            f"- `{r['source']}`: {r['reason']}; {r['frames']} frames read, {r['kept']} kept"
            for r in summary["truncated_files"]
        ]
    write_text(out / "summary.md", "\n".join(lines) + "\n")
    return summary


def contact_sheet(
    manifest: pd.DataFrame, out: Path, n: int = 48, seed: int = 0, thumb: int = 128
) -> Path | None:
    """A grid of `n` random kept frames, labelled with their dataset."""
    from PIL import Image, ImageDraw

    kept = manifest[manifest.kept]
    if kept.empty or n <= 0:
        return None
    rows = kept.iloc[sorted(random.Random(seed).sample(range(len(kept)), min(n, len(kept))))]
    cols = 8
    grid = Image.new("L", (cols * thumb, -(-len(rows) // cols) * (thumb + 14)), 0)
    draw = ImageDraw.Draw(grid)
    for k, (_, row) in enumerate(rows.iterrows()):
        with Image.open(out / row.path) as im:
            im = im.convert("L")
            im.thumbnail((thumb, thumb))
        x, y = (k % cols) * thumb, (k // cols) * (thumb + 14)
        grid.paste(im, (x + (thumb - im.width) // 2, y + (thumb - im.height) // 2))
        draw.text((x + 2, y + thumb), f"{row.dataset}:{row.frame}"[:20], fill=255)
    path = out / "contact_sheet.png"
    with atomic_path(path) as tmp:
        grid.save(tmp)
    return path
