"""SOURCES.yaml: what a corpus is built from, what it must exclude, and the build settings.

    sources:
      - {dataset: covid_blues, anatomy: lung, path: data/covid_blues/lus_videos/*.mp4}
      - {dataset: plus, anatomy: phantom, path: data/plus, frames: {volume_axis: 0}}
    exclude:
      - {name: BUSI, path: data/busi}
    settings: {workers: 2, frames: {max_per_clip: 32}}

Relative paths are resolved against the file's folder. The entries are the light dataclasses
of `sonodistill.data.config` (`Source`, `EvalSet`, `BuildSettings`), each read through
`config.checked`/`check_fields`: a misspelt key is one line with its close match, a value out
of its type's range one line naming it; renamed settings are accepted for one release.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from sonodistill.config import check_fields, checked, from_dict, to_dict, upgrade
from sonodistill.data.config import (  # noqa: F401  (re-exported: where they were)
    BuildSettings,
    CorpusSpec,
    EvalSet,
    FrameSettings,
    Source,
)
from sonodistill.data.files import list_files
from sonodistill.errors import UserError, unknown_name

SECTIONS = ("sources", "exclude", "settings")


def read_sources_yaml(path: str | Path) -> dict:
    """The raw mapping of a SOURCES.yaml, its keys and settings checked (a misspelt `exclud:`
    would silently drop the exclusion); UserError naming the file and the key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"{path}: cannot read sources file: {_collapse(exc)}") from exc
    if not isinstance(raw, dict) or not raw.get("sources"):
        raise UserError(f"{path}: expected a mapping with a non-empty `sources:` list")
    for key in raw:
        if key not in SECTIONS:
            raise unknown_name("key", str(key), SECTIONS, f"{path}:")
    settings = raw.get("settings") or {}
    if not isinstance(settings, dict):
        raise UserError(f"{path}: settings: expected a mapping of build settings")
    # Renamed settings (corpus_near_duplicate) are upgraded, with a deprecation line each.
    settings = upgrade(BuildSettings, settings, record=True, where=f"{path}: settings: ")
    _within(path, "settings", lambda: check_fields(from_dict(BuildSettings, settings), ""))
    return {**raw, "settings": settings}


def load_sources(path: str | Path, overrides: BuildSettings | None = None) -> CorpusSpec:
    """Read SOURCES.yaml; relative paths are resolved against its folder. `overrides` (already
    merged with the file's `settings:` by the CLI) replaces the file's settings when given."""
    path = Path(path)
    raw = read_sources_yaml(path)
    base = path.resolve().parent
    settings = overrides or from_dict(BuildSettings, raw.get("settings") or {})
    sources = []
    for i, item in enumerate(raw["sources"]):
        if not isinstance(item, dict) or "path" not in item or "dataset" not in item:
            raise UserError(f"{path}: source #{i + 1} needs at least `dataset:` and `path:`")
        where = f"source {item['dataset']!r}"
        src = checked(Source, item, f"{path}: {where}")
        src.path = _resolve(base, src.path)
        frames = {**to_dict(settings.frames), **src.frames}
        _within(path, where, lambda f=frames: check_fields(from_dict(FrameSettings, f), "frames."))
        sources.append(src)
    exclude = []
    items = raw.get("exclude") or []
    if isinstance(items, dict):
        items = [{"name": k, "path": v} for k, v in items.items()]
    for item in items:
        if isinstance(item, str) and "=" in item:
            item = dict(zip(("name", "path"), item.split("=", 1), strict=True))
        if not isinstance(item, dict) or "path" not in item or set(item) - {"name", "path"}:
            raise UserError(f"{path}: exclude entries are {{name: NAME, path: PATH}}, got {item!r}")
        eval_set = EvalSet(
            item.get("name") or Path(item["path"]).name, _resolve(base, str(item["path"]))
        )
        if not list_files(eval_set.path):
            raise UserError(f"{path}: exclude {eval_set.name!r}: no file at {eval_set.path}")
        exclude.append(eval_set)
    return CorpusSpec(settings, sources, exclude)


def _within(path: Path, where: str, check) -> None:
    """Run `check`; its UserError names the file and where in it."""
    try:
        check()
    except UserError as err:
        raise UserError(f"{path}: {where}: {err}") from None


def _collapse(err: BaseException) -> str:
    return "; ".join(line.strip() for line in str(err).splitlines() if line.strip())


def _resolve(base: Path, p: str) -> str:
    p = os.path.expanduser(str(p))
    return p if os.path.isabs(p) else str(base / p)
