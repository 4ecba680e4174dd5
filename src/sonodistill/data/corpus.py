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
import json
import logging
import os
import time
from concurrent.futures import as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from sonodistill.config import save_config
from sonodistill.data import frames as fr
from sonodistill.data import hashing
from sonodistill.data.files import list_files, worker_pool
from sonodistill.data.leakage import exclude_matches
from sonodistill.data.manifest import (
    MANIFEST,
    file_key,
    safe_name,
    short_hash,
    typed,
    unreadable_row,
)
from sonodistill.data.readers import ReadError, detect_kind, read_frames
from sonodistill.data.sources import CorpusSpec, Source
from sonodistill.data.summary import contact_sheet, write_summary
from sonodistill.progress import progress_bar

log = logging.getLogger("sonodistill.corpus")


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
    rel_dir = Path("frames") / safe_name(task.dataset) / key
    out_dir = Path(task.out) / rel_dir
    kind = detect_kind(path) if task.kind == "auto" else task.kind
    rows: list[dict] = []
    base = {"dataset": task.dataset, "anatomy": task.anatomy, "source": str(path), "kind": kind}
    select = fr.FrameSelector(s)
    try:
        for index, frame in read_frames(path, kind, s.layout, s.volume_axis):
            d = select(index, frame)
            row = {
                **base,
                "id": f"{safe_name(task.dataset)}/{key}/{index:06d}",
                "frame": index,
                "kept": d.keep,
                "reason": d.reason,
                "phash": d.phash or None,
                "sha1": d.sha1 or None,
                "orig_height": d.orig_shape[0],
                "orig_width": d.orig_shape[1],
            }
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
        rows.append(unreadable_row(task.dataset, task.anatomy, str(path), str(exc), kind))
    except Exception as exc:  # a decoder or library failure on odd input: report, go on
        log.exception("unexpected error on %s", path)
        reason = f"unexpected {type(exc).__name__}: {exc}"
        rows.append(unreadable_row(task.dataset, task.anatomy, str(path), reason, kind))
    df = typed(pd.DataFrame(rows))
    Path(task.part).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(task.part).with_suffix(".tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, task.part)
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
    digest = short_hash(src.dataset, src.anatomy, src.path, src.kind, frames)
    return f"{safe_name(src.dataset)}-{digest}"


def build_corpus(spec: CorpusSpec, out: str | Path, progress: bool = True) -> BuildResult:
    """Build (or resume) a corpus into `out`; see the module docstring."""
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
            tasks.append(
                FileTask(src.dataset, src.anatomy, str(f), src.kind, frames, str(out), str(part))
            )
        markers.append((marker, [str(f) for f in files]))
    return tasks, parts, markers


def _run_tasks(tasks: list[FileTask], workers: int, progress: bool) -> tuple[int, list[dict]]:
    """Run the file tasks; returns how many ran and a row for each whose worker crashed."""
    failed: list[dict] = []
    if not tasks:
        return 0, failed
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
                    reason = f"worker failed: {exc!r}"
                    row = unreadable_row(task.dataset, task.anatomy, task.file, reason)
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
        frames_list.append(pd.DataFrame(list(failed)))
    if not frames_list:
        raise RuntimeError(f"no file could be processed into {out}")
    df = pd.concat(frames_list, ignore_index=True)
    # Parts hold per-file decisions only: corpus-level ones are recomputed on every build.
    df = typed(df)
    dedup_corpus(df, spec.settings.corpus_dup_threshold)
    if spec.exclude:
        exclude_matches(
            df, spec.exclude, spec.settings.exclude_threshold, workers=spec.settings.workers
        )
    df.loc[~df.kept, "path"] = None
    keep_paths = set(df.loc[df.kept, "path"])
    frames_dir = out / "frames"
    for png in frames_dir.rglob("*.png") if frames_dir.is_dir() else []:
        if png.relative_to(out).as_posix() not in keep_paths:
            png.unlink()  # excluded, duplicate or stale frames never stay in the corpus folder
    tmp = out / f"{MANIFEST}.tmp"
    df.to_parquet(tmp, index=False)
    os.replace(tmp, out / MANIFEST)
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
