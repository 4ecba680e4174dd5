"""`sonodistill corpus ...`: build, check-leakage, pack and summary (one `cli.COMMANDS` record
each; their configs live in the light `data.config`).

    sonodistill corpus build SOURCES.yaml --out DIR [--workers 2] [--frames.max_per_clip 32] ...
    sonodistill corpus check-leakage CORPUS --against+ BUSI=PATH [--against+ DDTI=PATH] ...
    sonodistill corpus pack CORPUS --out PACK_DIR [--image_size 256]
    sonodistill corpus summary CORPUS

Build settings are the fields of `BuildSettings`: defaults, then the `settings:` section of
SOURCES.yaml, then the command-line flags (`sonodistill corpus build --help` lists them).
The heavy modules (pandas, OpenCV) are imported by the runners only.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from sonodistill.data.config import BuildConfig, LeakageConfig, PackConfig, SummaryConfig
from sonodistill.errors import UserError

SOURCES_HELP = "SOURCES.yaml: the sources, the evaluation sets to exclude, the build settings"
CORPUS_HELP = "corpus folder (or its manifest.parquet)"


def _log_level(quiet: bool) -> None:
    logging.getLogger("sonodistill.corpus").setLevel(logging.WARNING if quiet else logging.INFO)


def parse_build(argv: list[str], prog: str) -> BuildConfig:
    """The build's options: defaults < the SOURCES.yaml `settings:` < the flags given (help
    printed and SystemExit before anything is read)."""
    from sonodistill.config import config_parser, from_dict, parse_args, rename_argv, to_dict
    from sonodistill.data.sources import read_sources_yaml

    parser = config_parser(BuildConfig, prog, BuildConfig.__doc__, {"sources": SOURCES_HELP})
    if any(arg in ("-h", "--help") for arg in argv):
        print(parser.format_help())
        raise SystemExit(0)
    argv = rename_argv(BuildConfig, argv)
    given = parse_args(parser, argv, defaults=False, cls=BuildConfig).as_dict()  # what was typed
    given.pop("config", None)
    from_file = read_sources_yaml(given["sources"])["settings"]  # checked, renames upgraded
    values = to_dict(BuildConfig())
    for layer in (from_file, given):
        values = _merge(values, layer)
    return from_dict(BuildConfig, values)


def _merge(base: dict, update: dict) -> dict:
    """`update` over `base`, nested mappings merged key by key."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def build(cfg: BuildConfig) -> int:
    from sonodistill.data.corpus import build_corpus
    from sonodistill.data.sources import load_sources

    if not cfg.out:
        raise UserError("--out: give the corpus folder")
    spec = load_sources(cfg.sources, cfg.settings())
    _log_level(cfg.quiet)
    result = build_corpus(spec, cfg.out, not cfg.quiet, resume=cfg.resume, overwrite=cfg.overwrite)
    s = result.summary
    fps = s["frames_seen"] / result.seconds if result.seconds else 0.0
    print(
        f"{s['frames_kept']} frames kept of {s['frames_seen']} seen from {s['files']} files "
        f"({s['files_unreadable']} unreadable and {s['files_truncated']} truncated sources, "
        f"{result.files_read} read this run) in "
        f"{result.seconds:.1f} s ({fps:.0f} frames/s) -> {result.out}"
    )
    print((Path(cfg.out) / "summary.md").read_text())
    return 0


def check_leakage(cfg: LeakageConfig) -> int:
    """Exit code 1 when a corpus frame matches an evaluation image."""
    from sonodistill.data.leakage import check_leakage as check
    from sonodistill.io import write_csv

    against = {}
    for item in cfg.against:
        name, sep, path = item.partition("=")
        if not sep:
            raise UserError(f"--against expects NAME=PATH, got {item!r}")
        if not Path(path).exists():
            raise UserError(f"--against {name}: {path} does not exist")
        against[name] = path
    if not against:
        raise UserError("--against: give at least one evaluation set: --against+ NAME=PATH")
    _log_level(False)
    report = check(cfg.corpus, against, cfg.near_duplicate, cfg.workers)
    if cfg.report:
        write_csv(cfg.report, report)
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


def pack(cfg: PackConfig) -> int:
    from sonodistill.data.pack import pack_corpus

    if not cfg.out:
        raise UserError("--out: give the pack folder")
    out = pack_corpus(cfg.corpus, cfg.out, cfg.image_size, not cfg.quiet, overwrite=cfg.overwrite)
    print(f"packed -> {out} ({(out / 'pack.json').read_text().strip()})")
    return 0


def summary(cfg: SummaryConfig) -> int:
    from sonodistill.data.manifest import load_manifest
    from sonodistill.data.summary import write_summary

    manifest, root = load_manifest(cfg.corpus)
    previous = root / "summary.json"
    timing = json.loads(previous.read_text()) if previous.is_file() else {}
    write_summary(manifest, root, timing.get("seconds", 0.0), timing.get("files_read", 0))
    print((root / "summary.md").read_text())
    return 0
