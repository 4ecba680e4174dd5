"""Corpus build: heterogeneous ultrasound downloads -> a clean, deduplicated 2D grey corpus.

    sources (SOURCES.yaml) -> files -> per-file tasks in a process pool (read, clean, select,
    write PNGs, write a per-file manifest part) -> corpus-wide dedup and evaluation-set exclusion
    -> manifest.parquet, summary.json/.md, contact_sheet.png

Output folder:
    frames/<dataset>/<file_key>/<frame:06d>.png    the kept frames (grey), and only those
    manifest.parquet                                one row per frame seen (kept or not) and one
                                                    row (frame -1) per unreadable file
    summary.json, summary.md, contact_sheet.png, corpus.yaml (resolved sources and settings),
    build.log, parts/ (per-file results: what makes the build resumable)

Resumable and idempotent: a source whose settings did not change and whose files all have a
part is not read again; a killed build redoes only the files in flight.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import hashlib
import json
import logging
import multiprocessing
import os
import random
import re
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from sonodistill.data import frames as fr
from sonodistill.data import hashing
from sonodistill.data.readers import ReadError, detect_kind, read_frames

log = logging.getLogger("sonodistill.corpus")

MANIFEST_COLUMNS = [
    "id", "dataset", "anatomy", "source", "kind", "frame", "kept", "reason", "path",
    "height", "width", "orig_height", "orig_width", "phash", "sha1", "duplicate_of",
]  # fmt: skip


@dataclass
class BuildSettings:
    """Settings of a corpus build (the `settings:` section of SOURCES.yaml, or flags)."""

    workers: int = 2  # processes reading files in parallel (1: in this process)
    frames: fr.FrameSettings = field(default_factory=fr.FrameSettings)
    corpus_dup_threshold: int = 0  # phash bits for a cross-file near duplicate (-1: exact only)
    exclude_threshold: int = 4  # phash bits for a match with an evaluation set
    contact_sheet: int = 48  # random kept frames on the contact sheet
    seed: int = 0
    force: bool = False  # rebuild every source, ignoring finished parts


@dataclass
class Source:
    dataset: str
    anatomy: str
    path: str  # file, folder (read recursively) or glob; relative to SOURCES.yaml
    kind: str = "auto"  # auto | image | video | dicom | nifti | itk
    frames: dict = field(default_factory=dict)  # FrameSettings overrides for this source


@dataclass
class EvalSet:
    name: str
    path: str


@dataclass
class CorpusSpec:
    settings: BuildSettings
    sources: list[Source]
    exclude: list[EvalSet]


# ---------------------------------------------------------------- SOURCES.yaml


def load_sources(path: str | Path, overrides: BuildSettings | None = None) -> CorpusSpec:
    """Read SOURCES.yaml; relative paths are resolved against its folder. `overrides` (already
    merged with the file's `settings:` by the CLI) replaces the file's settings when given."""
    from sonodistill.config import from_dict

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read sources file: {exc}") from exc
    if not isinstance(raw, dict) or not raw.get("sources"):
        raise ValueError(f"{path}: expected a mapping with a non-empty `sources:` list")
    base = path.resolve().parent
    settings = overrides or from_dict(BuildSettings, raw.get("settings") or {})
    sources = []
    for i, item in enumerate(raw["sources"]):
        if not isinstance(item, dict) or "path" not in item or "dataset" not in item:
            raise ValueError(f"{path}: source #{i + 1} needs at least `dataset:` and `path:`")
        unknown = set(item) - {f.name for f in dataclasses.fields(Source)}
        if unknown:
            raise ValueError(f"{path}: source {item['dataset']!r}: unknown keys {sorted(unknown)}")
        src = Source(**{"anatomy": "unknown", **item})
        src.path = _resolve(base, src.path)
        from_dict(fr.FrameSettings, {**dataclasses.asdict(settings.frames), **src.frames})
        sources.append(src)
    exclude = []
    items = raw.get("exclude") or []
    if isinstance(items, dict):
        items = [{"name": k, "path": v} for k, v in items.items()]
    for item in items:
        if isinstance(item, str) and "=" in item:
            item = dict(zip(("name", "path"), item.split("=", 1), strict=True))
        if not isinstance(item, dict) or "path" not in item:
            raise ValueError(
                f"{path}: exclude entries are {{name: NAME, path: PATH}}, got {item!r}"
            )
        eval_set = EvalSet(
            item.get("name") or Path(item["path"]).name, _resolve(base, item["path"])
        )
        if not list_files(eval_set.path):
            raise ValueError(f"{path}: exclude {eval_set.name!r}: no file at {eval_set.path}")
        exclude.append(eval_set)
    return CorpusSpec(settings, sources, exclude)


def _resolve(base: Path, p: str) -> str:
    p = os.path.expanduser(str(p))
    return p if os.path.isabs(p) else str(base / p)


def list_files(pattern: str, skip_patterns: list[str] = ()) -> list[Path]:
    """Files of a source: a file, every file under a folder, or a glob's matches; sorted, hidden
    files and `skip_patterns` (fnmatch on the path below the source root, any case) left out."""
    p = Path(pattern)
    if p.is_file():
        return [p]
    if p.is_dir():
        root, files = p, [f for f in p.rglob("*") if f.is_file()]
    else:
        prefix = re.split(r"[*?\[]", pattern)[0]
        root = Path(prefix) if prefix.endswith(os.sep) else Path(prefix).parent
        files = [Path(f) for f in glob.glob(pattern, recursive=True) if os.path.isfile(f)]
    out = []
    for f in sorted(files):
        rel = f.relative_to(root).as_posix() if f.is_relative_to(root) else f.name
        if any(part.startswith(".") for part in Path(rel).parts):
            continue
        if any(fnmatch.fnmatch(rel.lower(), s.lower()) for s in skip_patterns):
            continue
        out.append(f)
    return out


# ---------------------------------------------------------------- per-file work (in a worker)


def _short_hash(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80]


def file_key(path: Path) -> str:
    stem = path.name.split(".")[0] or path.name
    return f"{_safe(stem)}-{_short_hash(str(path.resolve()))}"


class WriteError(RuntimeError):
    """A kept frame could not be written into the corpus folder."""


@dataclass
class FileTask:
    dataset: str
    anatomy: str
    file: str
    kind: str
    settings: dict  # FrameSettings as a dict
    out: str  # corpus folder
    part: str  # parquet file this task writes


def process_file(task: FileTask) -> pd.DataFrame:
    """Read one file, clean and select its frames, write kept PNGs and the file's manifest part.
    Never raises for bad input: an unreadable file becomes a row with its reason."""
    import cv2

    cv2.setNumThreads(1)
    s = fr.FrameSettings(**task.settings)
    path = Path(task.file)
    key = file_key(path)
    rel_dir = Path("frames") / _safe(task.dataset) / key
    out_dir = Path(task.out) / rel_dir
    kind = detect_kind(path) if task.kind == "auto" else task.kind
    rows: list[dict] = []
    base = {"dataset": task.dataset, "anatomy": task.anatomy, "source": str(path), "kind": kind}
    select = fr.FrameSelector(s)
    try:
        for index, frame in read_frames(path, kind, s.layout, s.volume_axis):
            d = select(index, frame)
            row = {
                **base, "id": f"{_safe(task.dataset)}/{key}/{index:06d}", "frame": index,
                "kept": d.keep, "reason": d.reason, "path": None, "phash": d.phash or None,
                "sha1": d.sha1 or None, "orig_height": d.orig_shape[0],
                "orig_width": d.orig_shape[1], "height": 0, "width": 0,
            }  # fmt: skip
            if d.keep:
                out_dir.mkdir(parents=True, exist_ok=True)
                rel = rel_dir / f"{index:06d}.png"
                if not cv2.imwrite(str(Path(task.out) / rel), d.grey):
                    raise WriteError(f"cannot write {Path(task.out) / rel}")
                row.update(path=rel.as_posix(), height=d.grey.shape[0], width=d.grey.shape[1])
            rows.append(row)
    except WriteError:
        raise  # the output's problem, not the file's: no part, the file is retried
    except (ReadError, OSError, ValueError, MemoryError) as exc:
        reason = f"{fr.UNREADABLE}: {exc}"
        rows.append({**base, "id": f"{_safe(task.dataset)}/{key}/file", "frame": -1, "kept": False,
                     "reason": reason})  # fmt: skip
    except Exception as exc:  # a decoder or library failure on odd input: report, go on
        log.exception("unexpected error on %s", path)
        reason = f"{fr.UNREADABLE}: unexpected {type(exc).__name__}: {exc}"
        rows.append({**base, "id": f"{_safe(task.dataset)}/{key}/file", "frame": -1, "kept": False,
                     "reason": reason})  # fmt: skip
    df = pd.DataFrame(rows).reindex(columns=MANIFEST_COLUMNS)
    df = _typed(df)
    Path(task.part).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(task.part).with_suffix(".tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, task.part)
    return df


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    for col in ("frame", "height", "width", "orig_height", "orig_width"):
        df[col] = df[col].fillna(0).astype("int64") if col != "frame" else df[col].astype("int64")
    df["kept"] = df["kept"].astype(bool)
    for col in ("id", "dataset", "anatomy", "source", "kind", "reason", "path", "phash", "sha1",
                "duplicate_of"):  # fmt: skip
        df[col] = df[col].astype("object").where(df[col].notna(), None)
    df["reason"] = df["reason"].fillna("")
    return df


# ---------------------------------------------------------------- the build


@dataclass
class BuildResult:
    out: Path
    manifest: pd.DataFrame
    summary: dict
    seconds: float = 0.0
    files_read: int = 0


def _source_key(src: Source, frames: dict) -> str:
    return (
        f"{_safe(src.dataset)}-{_short_hash(src.dataset, src.anatomy, src.path, src.kind, frames)}"
    )


def build_corpus(spec: CorpusSpec, out: str | Path, progress: bool = True) -> BuildResult:
    """Build (or resume) a corpus into `out`; see the module docstring."""
    from sonodistill.config import save_config

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "build.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    try:
        save_config(spec, out / "corpus.yaml")
        t0 = time.perf_counter()
        settings = spec.settings
        tasks, parts, done_markers = _plan(spec, out)
        if not tasks:
            log.info("all %d sources already built in %s", len(spec.sources), out)
        files_read, failed = _run_tasks(tasks, settings.workers, progress)
        for marker, files in done_markers:
            # a source is finished when every file has its part (a crashed worker leaves none:
            # the file is reported now and retried by the next build)
            if all((marker.parent / f"{file_key(Path(f))}.parquet").is_file() for f in files):
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(json.dumps({"files": files}))
        manifest = _finish(spec, out, parts, failed)
        missing = manifest[
            manifest.kept & ~manifest.path.map(lambda p: bool(p) and (out / p).is_file())
        ]
        if len(missing):  # frames removed by an earlier build (e.g. excluded then): redo files
            redo = set(missing.source)
            log.info("re-reading %d files whose kept frames are missing on disk", len(redo))
            redo_tasks = [t for t in _plan(spec, out, force_files=redo)[0] if t.file in redo]
            n, more = _run_tasks(redo_tasks, settings.workers, progress)
            files_read += n
            manifest = _finish(spec, out, parts, failed + more)
        seconds = time.perf_counter() - t0
        summary = write_summary(manifest, out, seconds=seconds, files_read=files_read)
        contact_sheet(manifest, out, settings.contact_sheet, settings.seed)
        return BuildResult(out, manifest, summary, seconds, files_read)
    finally:
        log.removeHandler(handler)
        handler.close()


def _plan(spec: CorpusSpec, out: Path, force_files: set[str] = frozenset()):
    tasks, parts, markers = [], [], []
    for src in spec.sources:
        frames = {**dataclasses.asdict(spec.settings.frames), **src.frames}
        key = _source_key(src, frames)
        part_dir = out / "parts" / key
        marker = part_dir / "_done.json"
        if marker.is_file() and not spec.settings.force and not force_files:
            files = json.loads(marker.read_text())["files"]
            parts += [part_dir / f"{file_key(Path(f))}.parquet" for f in files]
            continue
        files = list_files(src.path, frames.get("skip_patterns", []))
        if not files:
            raise FileNotFoundError(f"source {src.dataset!r}: no file matches {src.path}")
        for f in files:
            part = part_dir / f"{file_key(f)}.parquet"
            parts.append(part)
            if part.is_file() and not spec.settings.force and str(f) not in force_files:
                continue
            tasks.append(FileTask(src.dataset, src.anatomy, str(f), src.kind, frames, str(out),
                                  str(part)))  # fmt: skip
        markers.append((marker, [str(f) for f in files]))
    return tasks, parts, markers


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """A process pool whose workers do not inherit the caller's threads (torch, OpenMP, rich):
    a forkserver (clean interpreter, corpus modules preloaded) where available, else spawn."""
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["sonodistill.data.corpus", "sonodistill.data.leakage"])
    else:
        ctx = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx)


def _run_tasks(tasks: list[FileTask], workers: int, progress: bool) -> tuple[int, list[dict]]:
    """Run the file tasks; returns how many ran and a row for each whose worker crashed."""
    failed: list[dict] = []
    if not tasks:
        return 0, failed
    from sonodistill.progress import progress_bar

    kept = 0
    bar = progress_bar() if progress else None

    def report(df: pd.DataFrame, task: FileTask) -> None:
        nonlocal kept
        kept += int(df.kept.sum())
        bad = df[df.frame < 0]
        for reason in bad.reason:
            log.warning("skipped %s: %s", task.file, reason)
        if bar is not None:
            bar.update(bar_task, advance=1, info=f"{kept} frames kept")

    if workers <= 1:
        if bar is not None:
            bar.start()
            bar_task = bar.add_task("corpus build", total=len(tasks), info="")
        try:
            for task in tasks:
                report(process_file(task), task)
        finally:
            if bar is not None:
                bar.stop()
        return len(tasks), failed
    with worker_pool(min(workers, len(tasks))) as pool:
        futures = {pool.submit(process_file, t): t for t in tasks}
        if bar is not None:
            bar.start()
            bar_task = bar.add_task("corpus build", total=len(tasks), info="")
        try:
            for future in as_completed(futures):
                task = futures[future]
                try:
                    df = future.result()
                except Exception as exc:  # a crash in a worker (e.g. a decoder segfault)
                    row = {
                        "id": f"{_safe(task.dataset)}/{file_key(Path(task.file))}/file",
                        "dataset": task.dataset,
                        "anatomy": task.anatomy,
                        "source": task.file,
                        "frame": -1,
                        "kept": False,
                        "reason": f"{fr.UNREADABLE}: worker failed: {exc!r}",
                    }
                    failed.append(row)
                    df = pd.DataFrame([row])
                report(df, task)
        finally:
            if bar is not None:
                bar.stop()
    return len(tasks), failed


def _finish(
    spec: CorpusSpec, out: Path, parts: list[Path], failed: list[dict] = ()
) -> pd.DataFrame:
    frames_list = [pd.read_parquet(p) for p in parts if p.is_file()]
    if failed:
        frames_list.append(pd.DataFrame(list(failed)).reindex(columns=MANIFEST_COLUMNS))
    if not frames_list:
        raise RuntimeError(f"no file could be processed into {out}")
    df = pd.concat(frames_list, ignore_index=True)
    # Parts hold per-file decisions only: corpus-level ones are recomputed on every build.
    df = _typed(df.reindex(columns=MANIFEST_COLUMNS))
    dedup_corpus(df, spec.settings.corpus_dup_threshold)
    if spec.exclude:
        from sonodistill.data.leakage import exclude_matches

        exclude_matches(
            df, spec.exclude, spec.settings.exclude_threshold, workers=spec.settings.workers
        )
    df.loc[~df.kept, "path"] = None
    keep_paths = set(df.loc[df.kept, "path"])
    frames_dir = out / "frames"
    for png in frames_dir.rglob("*.png") if frames_dir.is_dir() else []:
        if png.relative_to(out).as_posix() not in keep_paths:
            png.unlink()  # excluded, duplicate or stale frames never stay in the corpus folder
    tmp = out / "manifest.parquet.tmp"
    df.to_parquet(tmp, index=False)
    os.replace(tmp, out / "manifest.parquet")
    return df


def dedup_corpus(df: pd.DataFrame, threshold: int) -> None:
    """Across files: drop later exact copies (same pixels) and, if threshold >= 0, later frames
    whose phash is within `threshold` bits of an earlier kept frame (in manifest order)."""
    kept = df.index[df.kept].to_numpy()
    first: dict[str, str] = {}
    for i in kept:
        sha = df.at[i, "sha1"]
        if sha in first:
            df.at[i, "kept"] = False
            df.at[i, "reason"] = fr.CORPUS_DUP
            df.at[i, "duplicate_of"] = first[sha]
        else:
            first[sha] = df.at[i, "id"]
    if threshold < 0:
        return
    kept = df.index[df.kept].to_numpy()
    if len(kept) < 2:
        return
    hashes = hashing.hex_to_uint64(df.loc[kept, "phash"])
    sources = df.loc[kept, "source"].to_numpy()
    partners: dict[int, list[int]] = {}
    for i, j, _ in hashing.near_pairs(hashes, hashes, threshold, same=True):
        if sources[i] != sources[j]:  # within a file the clip filter already decided
            partners.setdefault(j, []).append(i)
    alive = np.ones(len(kept), dtype=bool)
    for j in sorted(partners):
        alive_partners = [i for i in partners[j] if alive[i]]
        if alive_partners:
            alive[j] = False
            row = kept[j]
            df.at[row, "kept"] = False
            df.at[row, "reason"] = fr.CORPUS_DUP
            df.at[row, "duplicate_of"] = df.at[kept[alive_partners[0]], "id"]


# ---------------------------------------------------------------- summary and contact sheet


def summarize(manifest: pd.DataFrame) -> dict:
    frames = manifest[manifest.frame >= 0]
    files = manifest.groupby("source").agg(
        dataset=("dataset", "first"),
        kind=("kind", "first"),
        unreadable=("frame", lambda f: bool((f < 0).any())),
    )
    per = (
        frames.groupby(["dataset", "anatomy"])
        .agg(frames=("frame", "size"), kept=("kept", "sum"))
        .reset_index()
    )
    nfiles = manifest.groupby(["dataset", "anatomy"]).source.nunique().rename("files").reset_index()
    per = nfiles.merge(per, how="left", on=["dataset", "anatomy"]).fillna(0)
    reasons = manifest.loc[~manifest.kept, "reason"].map(
        lambda r: fr.UNREADABLE if r.startswith(fr.UNREADABLE) else r
    )
    kind_counts = frames.groupby(frames.kind.fillna("unknown")).agg(
        frames=("frame", "size"), kept=("kept", "sum")
    )
    skipped = manifest[manifest.frame < 0][["source", "reason"]]
    return {
        "frames_seen": int(len(frames)),
        "frames_kept": int(manifest.kept.sum()),
        "files": int(len(files)),
        "files_unreadable": int(files.unreadable.sum()),
        "per_dataset": [
            {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
            for row in per.astype({"files": int, "frames": int, "kept": int}).to_dict("records")
        ],
        "per_kind": {
            k: {"frames": int(v.frames), "kept": int(v.kept)} for k, v in kind_counts.iterrows()
        },
        "drop_reasons": {k: int(v) for k, v in reasons.value_counts().items()},
        "skipped_files": skipped.to_dict("records"),
    }


def write_summary(
    manifest: pd.DataFrame, out: Path, seconds: float = 0.0, files_read: int = 0
) -> dict:
    summary = summarize(manifest)
    summary["seconds"] = round(seconds, 2)
    summary["files_read"] = files_read
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = [
        f"# Corpus summary: {out.name}",
        "",
        f"{summary['frames_kept']} frames kept of {summary['frames_seen']} seen, from "
        f"{summary['files']} files ({summary['files_unreadable']} unreadable).",
        "",
        "| dataset | anatomy | files | frames seen | kept |",
        "|---|---|---:|---:|---:|",
    ]
    lines += [
        f"| {r['dataset']} | {r['anatomy']} | {r['files']} | {r['frames']} | {r['kept']} |"
        for r in summary["per_dataset"]
    ]
    lines += ["", "| kind | frames seen | kept |", "|---|---:|---:|"]
    lines += [f"| {k} | {v['frames']} | {v['kept']} |" for k, v in summary["per_kind"].items()]
    lines += ["", "| drop reason | frames |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in summary["drop_reasons"].items()]
    if summary["skipped_files"]:
        lines += ["", "Skipped files:", ""]
        lines += [f"- `{r['source']}`: {r['reason']}" for r in summary["skipped_files"]]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return summary


def contact_sheet(manifest: pd.DataFrame, out: Path, n: int = 48, seed: int = 0,
                  thumb: int = 128) -> Path | None:  # fmt: skip
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
    grid.save(path)
    return path


def load_manifest(path: str | Path) -> tuple[pd.DataFrame, Path]:
    """The manifest of a corpus folder or a manifest file, and the folder its paths are in."""
    path = Path(path)
    manifest = path / "manifest.parquet" if path.is_dir() else path
    if not manifest.is_file():
        raise FileNotFoundError(f"{path}: no manifest.parquet (not a built corpus?)")
    return pd.read_parquet(manifest), manifest.parent
