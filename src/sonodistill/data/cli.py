"""`sonodistill corpus ...`: build, check-leakage, pack and summary.

    sonodistill corpus build SOURCES.yaml --out DIR [--workers 2] [--frames.max_per_clip 32] ...
    sonodistill corpus check-leakage CORPUS --against+ BUSI=PATH [--against+ DDTI=PATH] ...
    sonodistill corpus pack CORPUS --out PACK_DIR [--size 256]
    sonodistill corpus summary CORPUS

Build settings are the fields of `BuildSettings`: defaults, then the `settings:` section of
SOURCES.yaml, then the command-line flags (`sonodistill corpus build --help` lists them).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from sonodistill.config import (
    ImageSize,
    PositiveFloat,
    PositiveInt,
    config_parser,
    from_dict,
    parse_args,
    parse_config,
)
from sonodistill.data.config import THRESHOLD
from sonodistill.errors import UserError, unknown_name
from sonodistill.io import write_csv

USAGE = """usage: sonodistill corpus COMMAND ...

commands:
  build           SOURCES.yaml --out DIR: videos, volumes, DICOM, images -> a clean frame corpus
  check-leakage   CORPUS --against+ NAME=PATH ...: exact/near duplicates with evaluation sets
  pack            CORPUS --out DIR --size N: kept frames as a memory-mapped uint8 array
  summary         CORPUS: counts per dataset, kind and drop reason
"""


@dataclass
class BuildCommand:
    """Build a 2D grey frame corpus from the sources listed in SOURCES.yaml; the other flags are
    the build settings (they override the file's `settings:`)."""

    sources: str = ""
    out: str = ""
    """Corpus folder (created; a build into it resumes)."""
    quiet: bool = False
    """No progress bar, warnings only."""
    resume: bool = False
    """Continue the corpus in OUT: the same sources and settings (more workers, another
    contact sheet, sources appended at the end are fine); only files without a part are read."""
    overwrite: bool = False
    """Replace the corpus in OUT by a new build."""


@dataclass
class LeakageCommand:
    """Exact and near duplicates between a corpus (built folder, manifest, or image folder) and
    evaluation sets, and inside each evaluation set. Exit code 1 when a corpus frame matches an
    evaluation image."""

    corpus: str = ""
    against: list[str] = field(default_factory=list)
    """Evaluation sets as NAME=PATH (repeat --against+ NAME=PATH)."""
    similarity: PositiveFloat = THRESHOLD
    """Similarity (data.neardup, 0-1) from which a pair is a near match: the project's one
    near-duplicate notion (docs/near_duplicates.md)."""
    workers: PositiveInt = 2
    report: str | None = None
    """Write the pairs as CSV here."""


@dataclass
class PackCommand:
    """Kept frames of a corpus, plain-resized to SIZE x SIZE, as PACK_DIR/frames.u8 (uint8
    memmap N,H,W) + index.parquet + pack.json."""

    corpus: str = ""
    out: str = ""
    """Pack folder."""
    size: ImageSize = 256
    quiet: bool = False
    overwrite: bool = False
    """Replace a pack already in OUT."""


@dataclass
class SummaryCommand:
    """Rewrite and print the summary (counts per dataset, kind and drop reason) of a corpus."""

    corpus: str = ""


CORPUS = {"corpus": "corpus folder (or its manifest.parquet)"}


def _log_level(quiet: bool) -> None:
    logging.getLogger("sonodistill.corpus").setLevel(logging.WARNING if quiet else logging.INFO)


def _error(command: str, message: object) -> int:
    print(f"sonodistill corpus {command}: {message}", file=sys.stderr)
    return 2


def build_main(argv: list[str]) -> int:
    from sonodistill.data.corpus import build_corpus
    from sonodistill.data.sources import BuildSettings, load_sources, read_sources_yaml

    prog = "sonodistill corpus build"
    parser = config_parser(BuildCommand, prog, BuildCommand.__doc__, {"sources": "SOURCES.yaml"})
    parser.add_class_arguments(BuildSettings, nested_key=None, fail_untyped=True)
    given = parse_args(parser, argv, defaults=False).as_dict()  # only what the user wrote
    given.pop("config", None)
    names = [f.name for f in dataclasses.fields(BuildCommand)]
    own = {k: given.pop(k) for k in names if k in given}
    command = from_dict(BuildCommand, own)
    if not command.out:
        raise UserError("--out: give the corpus folder")
    from_file = read_sources_yaml(command.sources).get("settings") or {}
    values = dataclasses.asdict(BuildSettings())
    for layer in (from_file, given):  # defaults < SOURCES.yaml settings < flags
        values = _merge(values, layer)
    settings = from_dict(BuildSettings, values)
    spec = load_sources(command.sources, settings)
    _log_level(command.quiet)
    result = build_corpus(
        spec, command.out, not command.quiet, resume=command.resume, overwrite=command.overwrite
    )
    s = result.summary
    fps = s["frames_seen"] / result.seconds if result.seconds else 0.0
    print(
        f"{s['frames_kept']} frames kept of {s['frames_seen']} seen from {s['files']} files "
        f"({s['files_unreadable']} unreadable and {s['files_truncated']} truncated sources, "
        f"{result.files_read} read this run) in "
        f"{result.seconds:.1f} s ({fps:.0f} frames/s) -> {result.out}"
    )
    print((Path(command.out) / "summary.md").read_text())
    return 0


def _merge(base: dict, update: dict) -> dict:
    """`update` over `base`, nested mappings merged key by key."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def leakage_main(argv: list[str]) -> int:
    from sonodistill.data.leakage import check_leakage

    prog = "sonodistill corpus check-leakage"
    cmd = parse_config(LeakageCommand, argv, prog, LeakageCommand.__doc__, CORPUS)
    against = {}
    for item in cmd.against:
        name, sep, path = item.partition("=")
        if not sep:
            return _error("check-leakage", f"--against expects NAME=PATH, got {item!r}")
        if not Path(path).exists():
            return _error("check-leakage", f"--against {name}: {path} does not exist")
        against[name] = path
    if not against:
        return _error("check-leakage", "give at least one evaluation set: --against+ NAME=PATH")
    _log_level(False)
    report = check_leakage(cmd.corpus, against, cmd.similarity, cmd.workers)
    if cmd.report:
        write_csv(cmd.report, report)
    leaks = report[report.scope == "corpus"]
    for name in against:
        mine = report[report.set == name]
        cross, within = mine[mine.scope == "corpus"], mine[mine.scope == "within"]
        n_cross, n_within = (cross.match == "exact").sum(), (within.match == "exact").sum()
        print(
            f"{name}: {len(cross)} corpus matches ({n_cross} exact), "
            f"{len(within)} pairs inside {name} ({n_within} exact)"
        )
    for r in report.itertuples():
        print(f"  {r.set:<8} {r.scope:<6} {r.match:<5} s={r.similarity:.3f} {r.a}  <->  {r.b}")
    return 1 if len(leaks) else 0


def pack_main(argv: list[str]) -> int:
    from sonodistill.data.pack import pack_corpus

    cmd = parse_config(PackCommand, argv, "sonodistill corpus pack", PackCommand.__doc__, CORPUS)
    if not cmd.out:
        raise UserError("--out: give the pack folder")
    out = pack_corpus(cmd.corpus, cmd.out, cmd.size, not cmd.quiet, overwrite=cmd.overwrite)
    print(f"packed -> {out} ({(out / 'pack.json').read_text().strip()})")
    return 0


def summary_main(argv: list[str]) -> int:
    from sonodistill.data.manifest import load_manifest
    from sonodistill.data.summary import write_summary

    prog = "sonodistill corpus summary"
    cmd = parse_config(SummaryCommand, argv, prog, SummaryCommand.__doc__, CORPUS)
    manifest, root = load_manifest(cmd.corpus)
    previous = root / "summary.json"
    timing = json.loads(previous.read_text()) if previous.is_file() else {}
    write_summary(manifest, root, timing.get("seconds", 0.0), timing.get("files_read", 0))
    print((root / "summary.md").read_text())
    return 0


SUBCOMMANDS = {
    "build": build_main,
    "check-leakage": leakage_main,
    "pack": pack_main,
    "summary": summary_main,
}


def corpus_main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] not in SUBCOMMANDS:
        raise unknown_name("command", argv[0], SUBCOMMANDS, see="see sonodistill corpus --help")
    return SUBCOMMANDS[argv[0]](argv[1:])
