"""Corpus build: heterogeneous ultrasound downloads -> a clean, deduplicated 2D grey corpus.

    sources (SOURCES.yaml) -> files -> per-file tasks in a process pool (read, clean, select,
    write PNGs, write a per-file manifest part) -> corpus-wide dedup and evaluation-set exclusion
    -> manifest.parquet, summary.json/.md, contact_sheet.png

Output folder:
    frames/<dataset>/<file_key>/<frame:06d>.png    the kept frames (grey), and only those
    manifest.parquet                                one row per frame seen (kept or not) and one
                                                    row (frame -1) per unreadable or truncated
                                                    file
    neardup.parquet                                 the kept frames' near-duplicate fingerprints
    summary.json, summary.md, contact_sheet.png, corpus.yaml (resolved sources and settings),
    build.log, parts/ (per-file results: what makes the build resumable)

The folder belongs to one build (locked while it runs; `data.config.CORPUS` lists what it owns);
building into a folder that holds a corpus needs --resume (the same sources and settings; more
workers, a different contact sheet and sources appended at the end are fine) or --overwrite. A
resumed build reads only the files without a part; a killed build redoes only the files in
flight.

Failures are the build's or the source's. A file that cannot be read is the source's: a row
with the reason, and the build goes on. A file that ends before its declared frames (a cut
download: `readers.TruncatedFile`) keeps the frames read before the cut, selected like any
others, and gets a row `truncated: ends after N of M frames (...)`; one that ends before its first
frame is unreadable. A frame or part that cannot be written (a full disk),
or a file whose worker dies twice (killed, out of memory, a crash in a decoder; the first time
the file is retried alone in a fresh worker), is the build's: it stops with a message and a
non-zero exit, and `--resume` continues once the cause is fixed. A corpus that keeps no frame
is an error too.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from sonodistill.config import check_fields, to_dict
from sonodistill.data import frames as fr
from sonodistill.data import neardup as nd
from sonodistill.data.config import CORPUS, MANIFEST, NEARDUP_FILE, CorpusSpec, Source
from sonodistill.data.files import list_files, worker_pool
from sonodistill.data.leakage import exclude_matches
from sonodistill.data.manifest import file_key, safe_name, short_hash, typed, unreadable_row
from sonodistill.data.readers import ReadError, TruncatedFile, detect_kind, read_frames
from sonodistill.data.summary import contact_sheet, write_summary
from sonodistill.errors import UserError
from sonodistill.io import sync_files, write_bytes, write_parquet
from sonodistill.progress import progress_bar
from sonodistill.utils.rundir import RunDir

log = logging.getLogger("sonodistill.corpus")


class WriteError(UserError):
    """The corpus folder could not be written: the build's failure, never the source's."""


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
    Never raises for bad input (an unreadable file becomes a row with its reason); raises
    UserError when the output cannot be written."""
    cv2.setNumThreads(1)
    s = fr.FrameSettings(**task.settings)
    path = Path(task.file)
    key = file_key(path)
    rel_dir = Path("frames") / safe_name(task.dataset) / key
    kind = detect_kind(path) if task.kind == "auto" else task.kind
    rows: list[dict] = []
    kept_greys: list[np.ndarray] = []
    base = {"dataset": task.dataset, "anatomy": task.anatomy, "source": str(path), "kind": kind}
    select = fr.FrameSelector(s)
    written: list[Path] = []
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
                rel = rel_dir / f"{index:06d}.png"
                written.append(write_frame(Path(task.out) / rel, d.grey))
                row.update(path=rel.as_posix(), height=d.grey.shape[0], width=d.grey.shape[1])
                kept_greys.append(d.grey)
            rows.append(row)
    except UserError:
        raise  # the output's problem, not the file's: no part, the build stops
    except TruncatedFile as exc:  # the frames before the cut are whole: they stay selected
        status = fr.TRUNCATED if rows else fr.UNREADABLE
        rows.append(unreadable_row(task.dataset, task.anatomy, str(path), exc.what, kind, status))
    except (ReadError, OSError, ValueError, MemoryError) as exc:
        rows.append(unreadable_row(task.dataset, task.anatomy, str(path), str(exc), kind))
    except Exception as exc:  # a decoder or library failure on odd input: report, go on
        log.exception("unexpected error on %s", path)
        reason = f"unexpected {type(exc).__name__}: {exc}"
        rows.append(unreadable_row(task.dataset, task.anatomy, str(path), reason, kind))
    df = with_fingerprints(typed(pd.DataFrame(rows)), kept_greys)
    sync_files(written)  # the frames are on disk before the part that lists them
    write_parquet(task.part, df)
    return df


def write_frame(path: Path, grey: np.ndarray) -> Path:
    """A kept frame as a PNG, renamed into place whole (synced with the file's other frames,
    before its part); WriteError (a UserError) when it cannot be written."""
    ok, png = cv2.imencode(".png", grey)
    if not ok:
        raise WriteError(f"cannot encode {path} as PNG")
    try:
        return write_bytes(path, png.tobytes(), durable=False)
    except OSError as err:
        raise WriteError(f"cannot write {path} ({err.strerror or err}): the corpus folder") from err


FINGERPRINT_COLUMNS = ["nd_sha1", "nd_simhash0", "nd_simhash1", "nd_thumbs"]


def with_fingerprints(df: pd.DataFrame, kept_greys: list[np.ndarray]) -> pd.DataFrame:
    """A manifest part with the near-duplicate fingerprints of its kept frames (nd_* columns,
    None for the others): the corpus-wide dedup and the exclusion need no PNG read back."""
    table = nd.fingerprint_batch(kept_greys).to_frame().add_prefix("nd_")
    for col in FINGERPRINT_COLUMNS:
        df[col] = None
    if len(table):
        df.loc[df.kept.to_numpy(), FINGERPRINT_COLUMNS] = table[FINGERPRINT_COLUMNS].to_numpy()
    return df


def kept_fingerprints(df: pd.DataFrame) -> nd.Fingerprints:
    """Fingerprints of the kept rows, in order, from the parts (every part used holds them:
    `_part_ok` has a part without them redone)."""
    table = df.loc[df.kept, FINGERPRINT_COLUMNS].rename(columns=lambda c: c[3:])
    return nd.Fingerprints.from_frame(table.reset_index(drop=True))


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


def build_corpus(
    spec: CorpusSpec,
    out: str | Path,
    progress: bool = True,
    resume: bool = False,
    overwrite: bool = False,
) -> BuildResult:
    """Build a corpus into `out` (or continue it with `resume`, or replace the one there with
    `overwrite`); see the module docstring."""
    out = Path(out)
    check_fields(spec.settings)  # a spec built in Python: the checks of the command line
    files = {id(src): _source_files(src, spec) for src in spec.sources}  # none missing
    run = RunDir(out, CORPUS, resume=resume, overwrite=overwrite)
    with run.claim():
        if run.resuming:
            _check_resume(run, spec)
        run.clear()
        handler = logging.FileHandler(out / "build.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        try:
            return _build(spec, run, files, progress)
        finally:
            log.removeHandler(handler)
            handler.close()


def _source_files(src: Source, spec: CorpusSpec) -> list[Path]:
    frames = {**to_dict(spec.settings.frames), **src.frames}
    found = list_files(src.path, frames.get("skip_patterns", []))
    if not found:
        raise UserError(f"source {src.dataset!r}: no file matches {src.path}")
    return found


def _check_resume(run: RunDir, spec: CorpusSpec) -> None:
    """Refuse to continue a corpus with other sources or settings than its corpus.yaml: the
    settings CORPUS does not free and the exclusions must stay, sources may only be appended."""
    old = run.stored_options(CorpusSpec)
    if not old:
        return  # stopped before its spec was written
    new = to_dict(spec)
    before, after = old.get("sources", []), new["sources"]
    derived = {}
    if after[: len(before)] != before:
        i = next(i for i, s in enumerate(before) if i >= len(after) or after[i] != s)
        shown = [f"{s['dataset']}: {s['path']}" if s else None for s in _at(before, after, i)]
        derived[f"source #{i + 1} (appending is fine)"] = tuple(shown)
    run.check_resume(new, derived, cls=CorpusSpec)


def _at(before: list, after: list, i: int) -> tuple[dict | None, dict | None]:
    return (before[i] if i < len(before) else None, after[i] if i < len(after) else None)


def _build(spec: CorpusSpec, run: RunDir, files: dict, progress: bool) -> BuildResult:
    run.save_options(spec)
    out = run.path
    t0 = time.perf_counter()
    settings = spec.settings
    tasks, parts = _plan(spec, out, files)
    done = len(parts) - len(tasks)
    if done:
        log.info(
            "resuming: %d of %d files already built (skipped), %d to read",
            done,
            len(parts),
            len(tasks),
        )
    files_read = _run_tasks(tasks, settings.workers, progress)
    manifest = _finish(spec, out, parts)
    missing = manifest[
        manifest.kept & ~manifest.path.map(lambda p: bool(p) and (out / p).is_file())
    ]
    if len(missing):  # frames removed by an earlier build (e.g. excluded then): redo files
        redo = set(missing.source)
        log.info("re-reading %d files whose kept frames are missing on disk", len(redo))
        redo_tasks = [t for t in _plan(spec, out, files, force=redo)[0] if t.file in redo]
        files_read += _run_tasks(redo_tasks, settings.workers, progress)
        manifest = _finish(spec, out, parts)
    seconds = time.perf_counter() - t0
    summary = write_summary(manifest, out, seconds=seconds, files_read=files_read)
    contact_sheet(manifest, out, settings.contact_sheet, settings.seed)
    if not summary["frames_kept"]:
        reasons = ", ".join(f"{k}: {v}" for k, v in summary["drop_reasons"].items())
        raise UserError(
            f"{out}: no frame kept of {summary['frames_seen']} seen in {summary['files']} files "
            f"({reasons or 'no frame read'}); see {out / 'summary.md'}, then check the sources "
            "or loosen the frame settings"
        )
    return BuildResult(out, manifest, summary, seconds, files_read)


def _plan(spec: CorpusSpec, out: Path, files: dict, force: set[str] = frozenset()):
    """The tasks of the files without a readable part (all with settings.force), and every
    part the manifest is made of."""
    tasks, parts = [], []
    for src in spec.sources:
        frames = {**to_dict(spec.settings.frames), **src.frames}
        part_dir = out / "parts" / _source_key(src, frames)
        for f in files[id(src)]:
            part = part_dir / f"{file_key(f)}.parquet"
            parts.append(part)
            if not spec.settings.force and str(f) not in force and _part_ok(part):
                continue
            tasks.append(
                FileTask(src.dataset, src.anatomy, str(f), src.kind, frames, str(out), str(part))
            )
    return tasks, parts


def _part_ok(part: Path) -> bool:
    """Whether a part file is there, whole and current (an empty or cut file is redone, with a
    warning; one without the fingerprints columns too)."""
    if not part.is_file():
        return False
    import pyarrow.parquet as pq

    try:
        columns = pq.read_schema(part).names
    except Exception as err:  # zero bytes, a cut file: pyarrow says so in its own types
        log.warning("ignoring unreadable part %s (%s): its file is read again", part, err)
        return False
    if FINGERPRINT_COLUMNS[0] not in columns:  # written before parts held the fingerprints
        log.info("part %s has no near-duplicate fingerprints: its file is read again", part)
        return False
    return True


def _run_tasks(tasks: list[FileTask], workers: int, progress: bool) -> int:
    """Run the file tasks, in `workers` processes; returns how many ran.

    A worker that dies takes the files it was reading with it: each of them is retried once,
    alone in a fresh worker. A file that kills its worker again, or an output that cannot be
    written, stops the build (UserError)."""
    if not tasks:
        return 0
    kept = 0
    bar = progress_bar(disable=not progress)

    def report(df: pd.DataFrame, task: FileTask) -> None:
        nonlocal kept
        kept += int(df.kept.sum())
        for reason in df[df.frame < 0].reason:
            if reason.startswith(fr.TRUNCATED):
                frames = df[df.frame >= 0]
                log.warning(
                    "%s %s; its %d frames read are used (%d kept)",
                    task.file,
                    reason,
                    len(frames),
                    frames.kept.sum(),
                )
            else:
                log.warning("skipped %s: %s", task.file, reason)
        bar.update(bar_task, advance=1, info=f"{kept} frames kept")

    with bar:
        bar_task = bar.add_task("corpus build", total=len(tasks), info="")
        if workers <= 1:
            for task in tasks:
                report(process_file(task), task)
            return len(tasks)
        pending = deque(tasks)
        while pending:
            lost = _run_pool(pending, workers, report)
            if lost:
                names = ", ".join(Path(t.file).name for t in lost)
                log.warning("a worker died while reading %s: each retried alone", names)
            for task in lost:
                _retry_alone(task, report)
    return len(tasks)


def _run_pool(pending: deque, workers: int, report) -> list[FileTask]:
    """Run pending tasks, at most `workers` at a time, until done or a worker dies; returns
    the tasks in flight when it died (empty when none did)."""
    with worker_pool(min(workers, len(pending))) as pool:
        running = {}
        try:
            while pending or running:
                while pending and len(running) < workers:
                    task = pending.popleft()
                    running[pool.submit(process_file, task)] = task
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                lost = []
                for future in finished:
                    task = running.pop(future)
                    try:
                        report(future.result(), task)
                    except BrokenProcessPool:
                        lost.append(task)
                if lost:
                    return lost + list(running.values())
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # files in flight finish their parts
            raise
    return []


def _retry_alone(task: FileTask, report) -> None:
    with worker_pool(1) as pool:
        try:
            report(pool.submit(process_file, task).result(), task)
        except BrokenProcessPool:
            raise UserError(
                f"{task.file}: its worker died twice (killed, out of memory, or a crash in a "
                "decoder); skip the file (frames.skip_patterns) or give the build more memory "
                "(fewer --workers), then --resume true"
            ) from None


def _finish(spec: CorpusSpec, out: Path, parts: list[Path]) -> pd.DataFrame:
    frames_list = [pd.read_parquet(p) for p in parts if p.is_file()]
    if not frames_list:
        raise UserError(f"no file could be processed into {out}")
    df = pd.concat(frames_list, ignore_index=True)
    # Parts hold per-file decisions only: corpus-level ones are recomputed on every build.
    fps = kept_fingerprints(df)
    df = typed(df)
    kept_rows = df.index[df.kept].to_numpy()  # the rows of fps, in order
    settings = spec.settings
    dedup_corpus(df, settings.near_duplicate, fps)
    if spec.exclude:
        alive = np.flatnonzero(df.kept.to_numpy()[kept_rows])
        exclude_matches(
            df, fps.take(alive), spec.exclude, settings.exclude_near_duplicate, settings.workers
        )
    final = np.flatnonzero(df.kept.to_numpy()[kept_rows])
    table = fps.take(final).to_frame()
    table.insert(0, "id", df.id.to_numpy()[kept_rows[final]])
    write_parquet(out / NEARDUP_FILE, table)
    df.loc[~df.kept, "path"] = None
    keep_paths = set(df.loc[df.kept, "path"])
    frames_dir = out / "frames"
    for png in frames_dir.rglob("*.png") if frames_dir.is_dir() else []:
        if png.relative_to(out).as_posix() not in keep_paths:
            png.unlink()  # excluded, duplicate or stale frames never stay in the corpus folder
    write_parquet(out / MANIFEST, df)
    return df


def dedup_corpus(
    df: pd.DataFrame, threshold: float, fingerprints: nd.Fingerprints | None = None
) -> None:
    """Across files: drop later exact copies (same pixels) and, given the kept frames'
    fingerprints (in manifest order) and a threshold <= 1, later frames at least `threshold`
    similar (data.neardup, the project's one near-duplicate notion) to an earlier kept frame of
    another file (in manifest order)."""
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
    if fingerprints is None or threshold > 1:
        return
    alive_pos = np.flatnonzero(df.kept.to_numpy()[kept])
    if len(alive_pos) < 2:
        return
    rows = kept[alive_pos]
    pairs = nd.near_duplicates(fingerprints.take(alive_pos), None, threshold)
    sources = df.loc[rows, "source"].to_numpy()
    partners: dict[int, list[int]] = {}
    for i, j in zip(pairs.i.tolist(), pairs.j.tolist(), strict=True):
        if sources[i] != sources[j]:  # within a file the clip filter already decided
            partners.setdefault(j, []).append(i)
    alive = np.ones(len(rows), dtype=bool)
    for j in sorted(partners):
        alive_partners = sorted(i for i in partners[j] if alive[i])
        if alive_partners:
            alive[j] = False
            row = rows[j]
            df.at[row, "kept"] = False
            df.at[row, "reason"] = fr.CORPUS_DUP
            df.at[row, "duplicate_of"] = df.at[rows[alive_partners[0]], "id"]
