"""A suite: encoders x tasks x protocols x label fractions x seeds -> one JSON per run -> tables.

The output folder belongs to one suite (locked while it runs). Every option and dataset is
checked before anything is written. A folder that holds a suite needs --resume (the training
and split settings stay; encoders, tasks, protocols, fractions and seeds may be added) or
--overwrite. Resumed, a run whose JSON exists with the same fingerprint (task, protocol,
encoder spec and the SHA-256 of its weights file, fraction, seed, training settings, split) is
skipped, and the progress says how many were; a file replaced under the same name (a distill
run redone into the same folder) invalidates its runs; an empty or cut JSON (a full disk, a
kill in an older version) is run again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sonodistill.config import config_changes, describe_changes, save_config, to_dict
from sonodistill.distill.run import load_encoder, resolve_encoder
from sonodistill.errors import UserError, check, check_positive, unknown_name
from sonodistill.evaluate.datasets import (
    DatasetIndex,
    DatasetSpec,
    builtin_datasets,
    load_dataset,
)
from sonodistill.evaluate.head_checkpoint import save_evaluate_head
from sonodistill.evaluate.probe_cache import FeatureCache
from sonodistill.evaluate.splits import (
    FRACTIONS,
    SplitConfig,
    image_hashes,
    make_splits,
    read_splits,
)
from sonodistill.evaluate.tables import paper_tables
from sonodistill.evaluate.train import TrainSettings, run_one, trivial_baselines
from sonodistill.io import claim_run_dir, read_json, remove_owned, write_json, write_table
from sonodistill.models.encoders import RANDOM, EncoderSpec, family_of, parse_spec
from sonodistill.models.student import StudentConfig
from sonodistill.progress import progress_bar


@dataclass
class SuiteConfig:
    """Downstream evaluation suite (paper Sec. 4-5): every combination is one run."""

    out: str = "runs/evaluate"
    data_root: str = "../shared/data"
    """Folder holding busi/ and ddti/ (the built-in tasks ddti_seg, busi_seg, busi_cls)."""
    encoders: list[str | dict] = field(default_factory=lambda: [f"random:{StudentConfig.name}"])
    """Shorthand (`random:resnet18`, `student:RUN_DIR@R18-Distill`, `teacher:W.pth`) or
    EncoderSpec fields as a mapping."""
    tasks: list[str] = field(default_factory=lambda: ["ddti_seg", "busi_seg", "busi_cls"])
    datasets: dict[str, dict] = field(default_factory=dict)
    """Your own tasks: name -> DatasetSpec fields (kind seg_folder|cls_folder|busi|ddti, root)."""
    protocols: list[str] = field(default_factory=lambda: ["linear", "finetune"])
    fractions: list[float] = field(default_factory=lambda: [1.0])
    """Label fractions of the training split (nested subsets): 1.0, 0.5, 0.2, 0.1, 0.05."""
    fraction_protocols: list[str] = field(default_factory=lambda: ["finetune"])
    """Protocols run at fractions below 1 (the paper's Table 4 is fine-tuning only)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    ablation: list[dict] = field(default_factory=list)
    """Table 6 rows: {encoder: LABEL, augmentation: Default|US-aware, mixup: bool}."""
    split: SplitConfig = field(default_factory=SplitConfig)
    train: TrainSettings = field(default_factory=TrainSettings)
    tables_only: bool = False
    """Only rebuild the tables from the run JSONs already in `out`."""
    save_models: bool = False
    """Keep each run's selected model as OUT/models/RUN_ID (for `sonodistill export --head`)."""
    dry_run: bool = False
    """Only print how many runs the suite holds and an estimate of their time; nothing runs or
    is written (sonodistill.evaluate.estimate.dry_run)."""
    resume: bool = False
    """Continue the suite in OUT: its finished runs are kept and skipped. Training and split
    settings must stay; encoders, tasks, protocols, fractions and seeds may change."""
    overwrite: bool = False
    """Replace the suite in OUT (its runs, splits, tables and models) by a new one."""


MARKERS = ("suite.yaml", "runs")
"""What shows a suite in a folder (splits alone may be copied there to be reused)."""
OWNED = ("suite.yaml", "runs", "splits", "tables", "models")
"""What `--overwrite` removes, and nothing else."""
FREE_ON_RESUME = (
    "out",
    "data_root",  # the split files check that the same images are there
    "encoders",
    "tasks",
    "protocols",
    "fractions",
    "fraction_protocols",
    "seeds",
    "ablation",
    "tables_only",
    "save_models",
    "resume",
    "overwrite",
    "train.device",
    "train.num_workers",
    "train.feature_cache",
)


PROTOCOLS = ("linear", "finetune")


@dataclass
class Run:
    task: str
    protocol: str
    encoder: EncoderSpec
    label: str
    fraction: float
    seed: int

    @property
    def id(self) -> str:
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", self.label)
        return f"{self.task}__{self.protocol}__{slug}__f{self.fraction:g}__s{self.seed}"


def encoder_spec(item: str | dict) -> EncoderSpec:
    if isinstance(item, str):
        return parse_spec(item)
    return EncoderSpec(**item)


def encoder_label(spec: EncoderSpec) -> str:
    """Display name: the spec's label, else the architecture and where its weights come from."""
    if spec.label:
        return spec.label
    if spec.family == "student":
        return f"{Path(spec.weights or 'student').name}-distill"
    name = spec.name or family_of(spec).default_name
    if spec.weights == RANDOM:
        return f"{name}-rand"
    return f"{name}-{Path(spec.weights or spec.family).stem}"


def plan(cfg: SuiteConfig) -> list[Run]:
    specs = [encoder_spec(e) for e in cfg.encoders]
    labels = [encoder_label(s) for s in specs]
    if len(set(labels)) != len(labels):
        raise UserError(f"--encoders: labels must be unique (add @LABEL): {labels}")
    runs = []
    for task in cfg.tasks:
        for protocol in cfg.protocols:
            if protocol not in PROTOCOLS:
                raise unknown_name("protocol", protocol, PROTOCOLS, "--protocols")
            fractions = cfg.fractions if protocol in cfg.fraction_protocols else [1.0]
            for fraction in sorted(set(fractions), reverse=True):
                for spec, label in zip(specs, labels, strict=True):
                    for seed in cfg.seeds:
                        runs.append(Run(task, protocol, spec, label, float(fraction), seed))
    return runs


def task_specs(cfg: SuiteConfig) -> dict[str, DatasetSpec]:
    specs = builtin_datasets(cfg.data_root)
    specs.update({name: DatasetSpec(**d) for name, d in cfg.datasets.items()})
    for task in cfg.tasks:
        if task not in specs:
            err = unknown_name("task", task, specs, "--tasks")
            raise UserError(f"{err} (define your own under `datasets`)")
    return specs


def weights_file(spec: EncoderSpec) -> Path | None:
    """The file (or folder) an encoder's weights are read from, `student:RUN_DIR` resolved;
    None for a random initialisation."""
    spec = resolve_encoder(spec)
    weights = spec.weights if spec.weights is not None else family_of(spec).default_weights(spec)
    return None if not weights or weights == RANDOM else Path(weights)


_DIGESTS: dict[tuple, str] = {}


def weights_digest(spec: EncoderSpec) -> str | None:
    """SHA-256 (16 hex digits) of an encoder's weights file, or of every file of a weights
    folder; None for a random initialisation, "missing" when the file is gone. Cached by path,
    size and modification time, so that a suite hashes each file once."""
    path = weights_file(spec)
    if path is None:
        return None
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        return "missing"
    key = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        for f in files:
            digest.update(f.relative_to(path).as_posix().encode() if path.is_dir() else b"")
            with f.open("rb") as fh:
                for block in iter(lambda fh=fh: fh.read(2**20), b""):
                    digest.update(block)
        _DIGESTS[key] = digest.hexdigest()[:16]
    return _DIGESTS[key]


# Settings that change how fast a run goes, not its results.
SPEED_ONLY = ("device", "num_workers", "feature_cache")


def check_suite(cfg: SuiteConfig) -> tuple[list[Run], _Data]:
    """Every option, encoder and dataset, before anything is written: the runs to do and the
    datasets (indexed, not read), or a UserError naming the first bad option or file."""
    t = cfg.train
    check_positive(
        {
            "--train.epochs": t.epochs,
            "--train.seg_size": t.seg_size,
            "--train.cls_size": t.cls_size,
            "--train.seg_batch": t.seg_batch,
            "--train.cls_batch": t.cls_batch,
            "--train.lr": t.lr,
            "--train.restart_epochs": t.restart_epochs,
            "--train.subset": t.subset,
        }
    )
    check_positive(
        {"--train.weight_decay": t.weight_decay, "--train.num_workers": t.num_workers},
        allow_zero=True,
    )
    for fraction in cfg.fractions:
        check(0 < fraction <= 1, "--fractions", fraction, "must be in (0, 1]")
    check(bool(cfg.seeds), "--seeds", cfg.seeds, "give at least one seed")
    for protocol in cfg.fraction_protocols:
        if protocol not in PROTOCOLS:
            raise unknown_name("protocol", protocol, PROTOCOLS, "--fraction_protocols")
    runs = plan(cfg)
    data = _Data(cfg, Path(cfg.out))
    if not cfg.tables_only:
        check_encoders(cfg, runs, data.specs)
        for task in cfg.tasks:  # every image read once (hashed for the splits) or listed
            data.get(task)
    return runs, data


def fingerprint(run: Run, cfg: SuiteConfig) -> str:
    train = {k: v for k, v in dataclasses.asdict(cfg.train).items() if k not in SPEED_ONLY}
    key = [
        run.task,
        run.protocol,
        dataclasses.asdict(run.encoder),
        weights_digest(run.encoder),
        run.fraction,
        run.seed,
        train,
        dataclasses.asdict(cfg.split),
    ]
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Data:
    """Datasets and their splits, loaded once per suite; images hashed once per dataset root.
    New splits are kept in memory until `writable` (the folder claimed), then saved."""

    def __init__(self, cfg: SuiteConfig, out: Path):
        self.cfg, self.out, self.specs = cfg, out, task_specs(cfg)
        self._index: dict[str, DatasetIndex] = {}
        self._splits: dict[str, dict] = {}
        self._hashes: dict[str, dict] = {}
        self._unsaved: dict[Path, dict] = {}
        self.writable = False

    def index(self, task: str) -> DatasetIndex:
        if task not in self._index:
            self._index[task] = load_dataset(self.specs[task], task)
        return self._index[task]

    def get(self, task: str) -> tuple[DatasetIndex, dict]:
        if task not in self._splits:
            spec, index = self.specs[task], self.index(task)
            path = self.out / "splits" / f"{task}.json"
            splits = read_splits(index, path, self.cfg.split)
            if splits is None:
                hashes = self._hashes.setdefault(spec.root, image_hashes(index))
                fractions = sorted(set(FRACTIONS) | {f for f in self.cfg.fractions if f < 1})
                splits = make_splits(index, self.cfg.split, hashes=hashes, fractions=fractions)
                self._unsaved[path] = splits
            self._splits[task] = splits
        self.save()
        return self._index[task], self._splits[task]

    def save(self) -> None:
        while self.writable and self._unsaved:
            path, splits = self._unsaved.popitem()
            write_json(path, splits, indent=1)


def check_encoders(cfg: SuiteConfig, runs: list[Run], specs: dict[str, DatasetSpec]) -> None:
    """Build each encoder once (its weights file must load) and check that it takes the image
    sizes of the suite, so that a bad file or size stops the suite before anything is written."""
    sizes = {
        ("--train.seg_size", cfg.train.seg_size)
        if specs[t].task_type == "seg"
        else ("--train.cls_size", cfg.train.cls_size)
        for t in cfg.tasks
    }
    for spec in {
        json.dumps(dataclasses.asdict(r.encoder), sort_keys=True): r.encoder for r in runs
    }.values():
        encoder = load_encoder(spec)
        for option, size in sorted(sizes):
            encoder.check_input_size(size, size, option)


def run_suite(cfg: SuiteConfig) -> list[Path]:
    """Run what is not done yet, then write the tables; returns the table files."""
    if cfg.dry_run:
        raise ValueError("dry_run: call sonodistill.evaluate.estimate.dry_run(cfg) instead")
    out = Path(cfg.out)
    runs, data = check_suite(cfg)
    with claim_run_dir(out, "evaluate", MARKERS, cfg.resume, cfg.overwrite) as resuming:
        if resuming:
            _check_resume(cfg, out)
        if cfg.overwrite:
            remove_owned(out, OWNED)
        save_config(cfg, out / "suite.yaml")
        data.writable = True
        data.save()
        return _run_suite(cfg, out, runs, data)


def _check_resume(cfg: SuiteConfig, out: Path) -> None:
    try:
        old = yaml.safe_load((out / "suite.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return  # nothing to compare: every run's fingerprint still guards its results
    changes = {
        k: v
        for k, v in config_changes(old, to_dict(cfg)).items()
        if k not in FREE_ON_RESUME and k.split(".")[0] not in FREE_ON_RESUME
    }
    if changes:
        raise UserError(
            f"{out}: --resume with settings that change its runs: {describe_changes(changes)}; "
            "keep them, or start a new suite (--overwrite true or another --out)"
        )


def _run_suite(cfg: SuiteConfig, out: Path, runs: list[Run], data: _Data) -> list[Path]:
    done_runs = {r.id: d for r in runs if (d := _finished(out, r, cfg)) is not None}
    if done_runs:
        print(
            f"resuming {out}: {len(done_runs)} of {len(runs)} runs already done (skipped), "
            f"{len(runs) - len(done_runs)} to run"
        )
    results = []
    cache = FeatureCache()  # linear probes: features once per encoder and dataset
    with progress_bar() as bar:
        suite_task = bar.add_task("evaluate", total=len(runs), info="")
        epoch_task = bar.add_task("  epochs", total=cfg.train.epochs, info="")
        for run in runs:
            path = out / "runs" / f"{run.id}.json"
            fp = fingerprint(run, cfg)
            done = done_runs.get(run.id)
            if done is None:
                if cfg.tables_only:
                    bar.advance(suite_task)
                    continue
                bar.update(suite_task, info=run.id)
                bar.reset(epoch_task, total=cfg.train.epochs)
                index, splits = data.get(run.task)

                def on_epoch(epoch: int, row: dict, _task=epoch_task, _id=run.id) -> None:
                    shown = {k: round(v, 4) for k, v in row.items() if k != "epoch"}
                    bar.update(_task, completed=epoch, info=str(shown))
                    if not bar.console.is_terminal:  # logs (nohup, CI) get one line per epoch
                        bar.console.print(f"{_id} epoch {epoch}: {shown}")

                result = run_one(
                    index,
                    splits,
                    run.encoder,
                    run.protocol,
                    run.fraction,
                    run.seed,
                    cfg.train,
                    on_epoch,
                    on_end=_model_saver(run, index, out) if cfg.save_models else None,
                    cache=cache,
                )
                done = {
                    "id": run.id,
                    "task": run.task,
                    "task_type": index.task_type,
                    "dataset": index.name,
                    "protocol": run.protocol,
                    "encoder": run.label,
                    "encoder_spec": dataclasses.asdict(run.encoder),
                    "encoder_weights": {
                        "file": str(weights_file(run.encoder) or "random"),
                        "sha256": weights_digest(run.encoder),
                    },
                    "fraction": run.fraction,
                    "seed": run.seed,
                    "settings": dataclasses.asdict(cfg.train),
                    "split_file": str(out / "splits" / f"{run.task}.json"),
                    "fingerprint": fp,
                    **result,
                }
                write_json(path, done, indent=1)
            results.append(done)
            bar.advance(suite_task)
    types = {t: data.specs[t].task_type for t in cfg.tasks}
    labels = list(dict.fromkeys(r.label for r in runs))
    tables = paper_tables(results, labels, types, out / "tables", table_note(cfg), cfg.ablation)
    if not cfg.tables_only and any(v == "seg" for v in types.values()):
        tables.append(write_baselines(cfg, data, types, out / "tables"))
    return tables


def _finished(out: Path, run: Run, cfg: SuiteConfig) -> dict | None:
    """The result of a finished run with this run's fingerprint, else None."""
    done = read_json(out / "runs" / f"{run.id}.json", "run result")
    ok = isinstance(done, dict) and done.get("fingerprint") == fingerprint(run, cfg)
    return done if ok else None


def _model_saver(run: Run, index: DatasetIndex, out: Path):
    def save(model) -> None:
        save_evaluate_head(
            model,
            index.task_type,
            run.protocol,
            index.num_classes,
            out / "models" / run.id,
            index.classes,
        )

    return save


def write_baselines(cfg: SuiteConfig, data: _Data, types: dict[str, str], out: Path) -> Path:
    """All-background / all-foreground test scores per segmentation task, beside the tables."""
    scores, rows = {}, []
    for task in (t for t, kind in types.items() if kind == "seg"):
        index, splits = data.get(task)
        scores[task] = trivial_baselines(index, splits, cfg.train)
        for name, s in scores[task].items():
            rows.append({"Task": task, "Predictor": name, "Dice": s["dice"], "IoU": s["iou"]})
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "baselines.json", scores, indent=1)
    title = "Trivial predictors on the same test splits"
    note = f"Segmentation at {cfg.train.seg_size} px; per-image Dice/IoU, both empty = 1."
    return write_table(rows, out / "baselines", title, note)


def table_note(cfg: SuiteConfig) -> str:
    t = cfg.train
    seeds = ", ".join(map(str, cfg.seeds))
    subset = f"; at most {t.subset} images per split (smoke run)" if t.subset else ""
    return (
        f"Image size: segmentation {t.seg_size} px, classification {t.cls_size} px; "
        f"{t.epochs} epochs; batch {t.seg_batch}/{t.cls_batch}; AdamW lr {t.lr:g}; "
        f"seeds {seeds} (mean ± sample std over {len(cfg.seeds)}){subset}. "
        "Dice/IoU: per image, foreground, averaged over the test split (both empty = 1). "
        "Test scores of the best-validation epoch."
    )
