"""`sonodistill corpus ...`: build, check-leakage, pack and summary.

    sonodistill corpus build SOURCES.yaml --out DIR [--workers 2] [--frames.max_per_clip 32] ...
    sonodistill corpus check-leakage CORPUS --against BUSI=PATH [--against DDTI=PATH] ...
    sonodistill corpus pack CORPUS --out PACK_DIR [--size 256]
    sonodistill corpus summary CORPUS

Build settings come from the dataclass `BuildSettings`: defaults, then the `settings:` section of
SOURCES.yaml, then the command-line flags (`sonodistill corpus build --help` lists them).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import yaml

USAGE = """usage: sonodistill corpus COMMAND ...

commands:
  build           SOURCES.yaml --out DIR: videos, volumes, DICOM, images -> a clean frame corpus
  check-leakage   CORPUS --against NAME=PATH ...: exact/near duplicates with evaluation sets
  pack            CORPUS --out DIR --size N: kept frames as a memory-mapped uint8 array
  summary         CORPUS: counts per dataset, kind and drop reason
"""


def _logging(quiet: bool = False) -> None:
    logger = logging.getLogger("sonodistill.corpus")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)


def build_main(argv: list[str]) -> int:
    from sonodistill.config import parse_config
    from sonodistill.data.corpus import build_corpus
    from sonodistill.data.sources import BuildSettings, load_sources

    parser = argparse.ArgumentParser(
        prog="sonodistill corpus build",
        description="Build a 2D grey frame corpus from the sources listed in SOURCES.yaml; "
        "other flags (--workers, --frames.FIELD, ...) are BuildSettings fields, shown with "
        "`--help-settings`.",
    )
    parser.add_argument("sources", help="SOURCES.yaml")
    parser.add_argument("--out", required=True, help="corpus folder (created, resumable)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    parser.add_argument("--help-settings", action="store_true", help="list the settings flags")
    args, rest = parser.parse_known_args(argv)
    if args.help_settings:
        parse_config(BuildSettings, ["--help"], prog="sonodistill corpus build")
    path = Path(args.sources)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        print(f"sonodistill corpus build: cannot read {path}: {exc}", file=sys.stderr)
        return 2
    settings_yaml = (raw.get("settings") if isinstance(raw, dict) else None) or {}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
        yaml.safe_dump(settings_yaml, fh)
    try:
        settings = parse_config(
            BuildSettings, ["--config", fh.name, *rest], prog="sonodistill corpus build"
        )
    finally:
        Path(fh.name).unlink(missing_ok=True)
    _logging(args.quiet)
    try:
        spec = load_sources(path, settings)
    except ValueError as exc:
        print(f"sonodistill corpus build: {exc}", file=sys.stderr)
        return 2
    try:
        result = build_corpus(spec, args.out, progress=not args.quiet)
    except FileNotFoundError as exc:
        print(f"sonodistill corpus build: {exc}", file=sys.stderr)
        return 2
    s = result.summary
    fps = s["frames_seen"] / result.seconds if result.seconds else 0.0
    print(
        f"{s['frames_kept']} frames kept of {s['frames_seen']} seen from {s['files']} files "
        f"({s['files_unreadable']} unreadable, {result.files_read} read this run) in "
        f"{result.seconds:.1f} s ({fps:.0f} frames/s) -> {result.out}"
    )
    print((Path(args.out) / "summary.md").read_text())
    return 0


def leakage_main(argv: list[str]) -> int:
    from sonodistill.data.leakage import check_leakage

    parser = argparse.ArgumentParser(
        prog="sonodistill corpus check-leakage",
        description="Exact and near duplicates between a corpus (built folder, manifest, or "
        "image folder) and evaluation sets, and inside each evaluation set. Exit code 1 when a "
        "corpus frame matches an evaluation image.",
    )
    parser.add_argument("corpus", help="corpus folder, manifest.parquet, or folder of images")
    parser.add_argument(
        "--against",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="an evaluation set (repeatable)",
    )
    parser.add_argument("--threshold", type=int, default=4, help="phash bits for a near match")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--report", help="write the pairs as CSV here")
    args = parser.parse_args(argv)
    against = {}
    for item in args.against:
        if "=" not in item:
            parser.error(f"--against expects NAME=PATH, got {item!r}")
        name, p = item.split("=", 1)
        if not Path(p).exists():
            parser.error(f"--against {name}: {p} does not exist")
        against[name] = p
    _logging()
    report = check_leakage(args.corpus, against, args.threshold, args.workers)
    if args.report:
        report.to_csv(args.report, index=False)
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
        print(f"  {r.set:<8} {r.scope:<6} {r.match:<5} d={r.distance:<2} {r.a}  <->  {r.b}")
    return 1 if len(leaks) else 0


def pack_main(argv: list[str]) -> int:
    from sonodistill.data.pack import pack_corpus

    parser = argparse.ArgumentParser(
        prog="sonodistill corpus pack",
        description="Kept frames of a corpus, plain-resized to SIZE x SIZE, as PACK_DIR/frames.u8 "
        "(uint8 memmap N,H,W) + index.parquet + pack.json.",
    )
    parser.add_argument("corpus", help="corpus folder or its manifest.parquet")
    parser.add_argument("--out", required=True, help="pack folder")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    try:
        out = pack_corpus(args.corpus, args.out, args.size, progress=not args.quiet)
    except (FileNotFoundError, ValueError) as exc:
        print(f"sonodistill corpus pack: {exc}", file=sys.stderr)
        return 2
    print(f"packed -> {out} ({(out / 'pack.json').read_text().strip()})")
    return 0


def summary_main(argv: list[str]) -> int:
    from sonodistill.data.manifest import load_manifest
    from sonodistill.data.summary import write_summary

    parser = argparse.ArgumentParser(prog="sonodistill corpus summary")
    parser.add_argument("corpus", help="corpus folder")
    args = parser.parse_args(argv)
    manifest, root = load_manifest(args.corpus)
    previous = root / "summary.json"
    timing = json.loads(previous.read_text()) if previous.is_file() else {}
    write_summary(manifest, root, timing.get("seconds", 0.0), timing.get("files_read", 0))
    print((root / "summary.md").read_text())
    return 0


COMMANDS = {
    "build": build_main,
    "check-leakage": leakage_main,
    "pack": pack_main,
    "summary": summary_main,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] not in COMMANDS:
        print(f"sonodistill corpus: unknown command {argv[0]!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
