"""A suite: encoders x tasks x protocols x label fractions x seeds (x folds) -> one JSON per run
-> tables.

Before any training, every task's splits are made (or read) and audited (`evaluate.audit`,
written beside the split files); the suite refuses to start while near-duplicate pairs or
groups straddle splits, unless `accept_leaks` is set. Encoders named like `R18-Distill-US`,
and the `ablation:` rows, are checked against each student run's config.yaml: a label that
says something the run did not do is an error.

The output folder belongs to one suite (locked while it runs). Every option and dataset is
checked before anything is written. A folder that holds a suite needs --resume (the training
and split settings stay; encoders, tasks, protocols, fractions and seeds may be added) or
--overwrite. Resumed, a run whose JSON exists with the same fingerprint (task, protocol,
encoder spec and the SHA-256 of its weights file, fraction, seed, fold, training settings,
split) is skipped, and the progress says how many were; a file replaced under the same name
(a distill run redone into the same folder) invalidates its runs; an empty or cut JSON (a full
disk, a kill in an older version) is run again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from sonodistill.config import check_fields, to_dict
from sonodistill.data.neardup import Fingerprints
from sonodistill.errors import UserError, check, unknown_name
from sonodistill.evaluate.audit import (
    LeakError,
    audit_report,
    leak_summary,
    summary_line,
    write_audit,
)
from sonodistill.evaluate.config import AUDIT, SUITE, DatasetSpec, SuiteConfig, TrainSettings
from sonodistill.evaluate.datasets import (
    DatasetIndex,
    builtin_datasets,
    check_dataset,
    load_dataset,
)
from sonodistill.evaluate.head_checkpoint import save_evaluate_head
from sonodistill.evaluate.metrics import EMPTY_RULES
from sonodistill.evaluate.probe_cache import FeatureCache
from sonodistill.evaluate.splits import (
    DDTI_COUNTS,
    FRACTIONS,
    fold_path,
    image_fingerprints,
    make_folds,
    make_splits,
    read_splits,
)
from sonodistill.evaluate.tables import cell_key, paper_tables
from sonodistill.evaluate.train import run_one
from sonodistill.io import read_json, write_json
from sonodistill.models.encoders import (
    EncoderSpec,
    build_encoder,
    encoder_label,
    encoder_recipe,
    weights_file,
)
from sonodistill.models.specs import AUGMENT_TITLES
from sonodistill.progress import progress_bar
from sonodistill.utils.rundir import RunDir

SPEED_ONLY = tuple(k.removeprefix("train.") for k in SUITE.free_on_resume if k.startswith("train."))
"""Training settings that change how fast a run goes, not its results (left out of run keys)."""
RUN_KEY_NAMES = {"seg_image_size": "seg_size", "cls_image_size": "cls_size"}
RUN_KEY_VALUES = {"precision": {"fp32": "32"}}
"""The 0.1 names and values of training settings renamed since: run keys hash the settings as
0.1 named them, so that runs finished by 0.1 stay valid."""


@dataclass
class Run:
    task: str
    protocol: str
    encoder: EncoderSpec
    label: str
    fraction: float
    seed: int
    fold: int | None = None
    folds: int = 0

    @property
    def id(self) -> str:
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", self.label)
        cv = f"__cv{self.folds}-{self.fold}" if self.fold is not None else ""
        return f"{self.task}__{self.protocol}__{slug}__f{self.fraction:g}__s{self.seed}{cv}"

    @property
    def cell(self) -> tuple:
        return cell_key(self.task, self.protocol, self.label, self.fraction)


_ARCH = {"r18": "resnet18", "r34": "resnet34", "r50": "resnet50", "r101": "resnet101"}


def label_claims(label: str) -> dict:
    """What an encoder label like `R18-Distill-US-NoMixup` says about the run."""
    tokens = [t for t in re.split(r"[-_ ]+", label.lower()) if t]
    claims: dict = {}
    for t in tokens:
        if t in _ARCH:
            claims["student"] = _ARCH[t]
        elif t in ("rand", "random"):
            claims["init"] = "random"
        elif t == "distill":
            claims["init"] = "distilled"
        elif t == "us":
            claims["augmentation"] = AUGMENT_TITLES["us"]
        elif t == "default":
            claims["augmentation"] = AUGMENT_TITLES["default"]
        elif t == "nomixup":
            claims["mixup"] = False
        elif t == "mixup":
            claims["mixup"] = True
    if "convnext" in tokens and "tiny" in tokens:
        claims["student"] = "convnext_tiny"
    return claims


def check_labels(specs: list[EncoderSpec], labels: list[str], ablation: list[dict]) -> dict:
    """{label: recipe}; a UserError when a label or an ablation row contradicts the run."""
    recipes = {label: encoder_recipe(s) for s, label in zip(specs, labels, strict=True)}
    for spec, label in zip(specs, labels, strict=True):
        where = f"{spec.weights}/config.yaml" if spec.family == "student" else "its spec"
        for key, value in label_claims(label).items():
            if key in recipes[label] and recipes[label][key] != value:
                raise UserError(
                    f"encoder {label!r} says {key} {value!r} but {where} has "
                    f"{recipes[label][key]!r}: fix the label or the run"
                )
    for row in ablation:
        label = row.get("encoder")
        if label not in recipes:
            raise UserError(f"ablation row {row}: no encoder labelled {label!r}")
        for key in ("augmentation", "mixup"):
            if key in row and recipes[label].get(key) != row[key]:
                raise UserError(
                    f"ablation row {label!r} says {key} {row[key]!r} but the run's config.yaml "
                    f"has {recipes[label].get(key)!r}"
                )
    return recipes


def plan(cfg: SuiteConfig) -> list[Run]:
    """Every run of the suite, in the order they are done."""
    specs = [EncoderSpec.parse(e, "--encoders") for e in cfg.encoders]
    labels = [encoder_label(s) for s in specs]
    if len(set(labels)) != len(labels):
        raise UserError(f"--encoders: labels must be unique (add @LABEL): {labels}")
    folds = list(range(cfg.folds)) if cfg.folds else [None]
    runs = []
    for task in cfg.tasks:
        for protocol in cfg.protocols:
            fractions = cfg.fractions if protocol in cfg.fraction_protocols else [1.0]
            for fraction in sorted(set(fractions), reverse=True):
                for spec, label in zip(specs, labels, strict=True):
                    for seed in cfg.seeds:
                        for fold in folds:
                            run = Run(task, protocol, spec, label, float(fraction), seed)
                            runs.append(dataclasses.replace(run, fold=fold, folds=cfg.folds))
    return runs


def task_specs(cfg: SuiteConfig) -> dict[str, DatasetSpec]:
    """The datasets of the suite's tasks by name (built-in and `datasets`), each checked."""
    specs = builtin_datasets(cfg.data_root)
    specs.update({name: check_dataset(d, name) for name, d in cfg.datasets.items()})
    for task in cfg.tasks:
        if task not in specs:
            err = unknown_name("task", task, specs, "--tasks")
            raise UserError(f"{err} (define your own under `datasets`)")
    return specs


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


def check_options(cfg: SuiteConfig) -> list[Run]:
    """The suite's options (not its encoders or datasets): the runs to do, or a UserError
    naming the first bad option."""
    check_fields(cfg)
    check(bool(cfg.seeds), "--seeds", cfg.seeds, "give at least one seed")
    parse_shard(cfg.shard)
    return plan(cfg)


def parse_shard(shard: str) -> tuple[int, int] | None:
    """`--shard I/N` -> (I, N), 1 <= I <= N; "" -> None."""
    if not shard:
        return None
    i, _, n = shard.partition("/")
    ok = i.isdigit() and n.isdigit() and 1 <= int(i) <= int(n)
    check(ok, "--shard", shard, "must be I/N with 1 <= I <= N, e.g. 1/4")
    return int(i), int(n)


def shard_runs(runs: list[Run], shard: str) -> list[Run]:
    """The runs of shard I/N: every N-th run of the plan from the I-th (tasks, encoders and
    seeds interleave, so shards take about the same time)."""
    parsed = parse_shard(shard)
    return runs if parsed is None else runs[parsed[0] - 1 :: parsed[1]]


def shard_folder(out: str | Path, shard: str) -> Path:
    i, n = parse_shard(shard)
    return Path(out) / "shards" / f"{i}-of-{n}"


def check_suite(cfg: SuiteConfig) -> tuple[list[Run], SuiteData]:
    """Every option, encoder and dataset, before anything is written: the runs to do and the
    datasets (indexed, not read), or a UserError naming the first bad option or file."""
    runs = check_options(cfg)
    suite_dir(cfg).precheck()
    specs = {r.label: r.encoder for r in runs}
    data = SuiteData(cfg, Path(cfg.out))
    data.recipes = check_labels(list(specs.values()), list(specs), cfg.ablation)
    if not cfg.tables_only:
        check_encoders(cfg, runs, data.specs)
        for task in cfg.tasks:  # every image read once (fingerprinted for the splits)
            data.splits(task)
    return runs, data


def settings_key(cfg: SuiteConfig) -> dict:
    """The training settings a run's results depend on, as 0.1 named them (see RUN_KEY_NAMES)."""
    train = {}
    for name, value in to_dict(cfg.train).items():
        if name not in SPEED_ONLY:
            train[RUN_KEY_NAMES.get(name, name)] = RUN_KEY_VALUES.get(name, {}).get(value, value)
    return train


def run_key(run: Run, cfg: SuiteConfig) -> str:
    """The identity of a run's result: task, protocol, encoder spec and the digest of its
    weights, fraction, seed, fold, training settings and split settings. A finished run with
    the same key is not redone."""
    train = settings_key(cfg)
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
    if run.fold is not None:
        key.append([run.fold, run.folds])
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


class SuiteData:
    """Datasets, fingerprints, splits (or folds) and audits, made once per suite; images are
    fingerprinted once per set of image files. New splits are kept in memory until `writable` (the
    folder claimed), then saved."""

    def __init__(self, cfg: SuiteConfig, out: Path):
        self.cfg, self.out, self.specs = cfg, out, task_specs(cfg)
        self._index: dict[str, DatasetIndex] = {}
        self._splits: dict[str, list[dict]] = {}
        self._fps: dict[tuple, Fingerprints] = {}
        self._unsaved: dict[Path, dict] = {}
        self._audits: dict[str, dict] = {}
        self.writable = False
        self.recipes: dict[str, dict] = {}

    def index(self, task: str) -> DatasetIndex:
        if task not in self._index:
            self._index[task] = load_dataset(self.specs[task], task)
        return self._index[task]

    def fingerprints(self, task: str) -> Fingerprints:
        """Keyed by the image files themselves (path and frame of every record), never by a
        dataset's root or name: two datasets under one root with other images get their own."""
        key = tuple((str(r.image), r.frame) for r in self.index(task).records)
        if key not in self._fps:
            self._fps[key] = image_fingerprints(self.index(task))
        return self._fps[key]

    def splits(self, task: str) -> list[dict]:
        """[the fixed split] or the K folds of a task: read, else made (saved once writable)."""
        if task not in self._splits:
            index, folder, k = self.index(task), self.out / "splits", self.cfg.folds
            paths = [fold_path(folder, task, f, k) for f in range(k)] or [folder / f"{task}.json"]
            # --overwrite replaces the suite's splits too: made again, saved after the clear
            stored = [
                None if self.cfg.overwrite else read_splits(index, p, self.cfg.split) for p in paths
            ]
            if any(s is None for s in stored):
                fractions = sorted(set(FRACTIONS) | {f for f in self.cfg.fractions if f < 1})
                kw = {"fingerprints": self.fingerprints(task), "fractions": fractions}
                if k:
                    stored = make_folds(index, k, self.cfg.split, **kw)
                else:
                    stored = [make_splits(index, self.cfg.split, **kw)]
                self._unsaved.update(zip(paths, stored, strict=True))
            self._splits[task] = stored
        self.save()
        return self._splits[task]

    def get(self, task: str, fold: int | None = None) -> tuple[DatasetIndex, dict]:
        return self.index(task), self.splits(task)[fold or 0]

    def save(self) -> None:
        while self.writable and self._unsaved:
            path, splits = self._unsaved.popitem()
            write_json(path, splits, indent=1)

    def audit(self, task: str) -> dict:
        """The task's audit, in memory (`write_audits` writes it once the folder is claimed)."""
        if task not in self._audits:
            self._audits[task] = audit_report(
                self.index(task),
                self.splits(task),
                self.fingerprints(task),
                task,
                self.cfg.split.near_duplicate,
                self.cfg.audit_near_duplicate,
            )
        return self._audits[task]

    def audited(self) -> dict[str, dict]:
        """The audits made so far, by task."""
        return dict(self._audits)

    def write_audits(self) -> None:
        for task, report in self._audits.items():
            write_audit(report, self.index(task), self.out / "splits")


def check_encoders(cfg: SuiteConfig, runs: list[Run], specs: dict[str, DatasetSpec]) -> None:
    """Build each encoder once (its weights file must load) and check that it takes the image
    sizes of the suite, so that a bad file or size stops the suite before anything is written."""
    sizes = {
        ("--train.seg_image_size", cfg.train.seg_image_size)
        if specs[t].task_type == "seg"
        else ("--train.cls_image_size", cfg.train.cls_image_size)
        for t in cfg.tasks
    }
    for spec in {
        json.dumps(dataclasses.asdict(r.encoder), sort_keys=True): r.encoder for r in runs
    }.values():
        encoder = build_encoder(spec)
        for option, size in sorted(sizes):
            encoder.check_input_size(size, size, option)


def audit_suite(cfg: SuiteConfig, data: SuiteData, echo=print) -> list[dict]:
    """Audit every task in memory; LeakError when pairs or groups straddle splits (unless
    accepted), before anything is written."""
    reports = []
    for task in cfg.tasks:
        report = data.audit(task)
        echo(summary_line(report))
        reports.append(report)
    leaking = [r for r in reports if r["leaks"]]
    if leaking and not cfg.accept_leaks:
        names = ", ".join(f"{r['task']} ({r['leaks']})" for r in leaking)
        first = leaking[0]["splits"][0]
        example = (
            "e.g. {} / {} (similarity {:.3f})".format(*first["chosen"]["across_pairs"][0][:3])
            if first["chosen"]["across_pairs"]
            else f"e.g. group {first['groups_across'][0]}"
            if first["groups_across"]
            else ""
        )
        raise LeakError(
            f"near-duplicate pairs or groups straddle the splits of {names}, {example}: "
            f"`sonodistill evaluate audit` writes {data.out / 'splits'}/TASK.audit.md; "
            "--accept_leaks true runs anyway"
        )
    return reports


def run_audit(cfg: SuiteConfig) -> list[dict]:
    """`sonodistill evaluate audit`: every option checked and every task split and audited (in
    memory) before the folder is locked and the splits and reports are written into OUT/splits;
    LeakError (after writing) when pairs or groups straddle splits."""
    check_options(cfg)
    out = Path(cfg.out)
    data = SuiteData(cfg, out)
    reports = [data.audit(task) for task in cfg.tasks]
    with RunDir(out, AUDIT).lock():  # never beside a suite writing its splits
        data.writable = True
        data.save()
        data.write_audits()
    audit_suite(cfg, data)
    return reports


def expected_runs(runs: list[Run]) -> dict[tuple, int]:
    return dict(Counter(r.cell for r in runs))


def run_suite(cfg: SuiteConfig) -> list[Path]:
    """Run what is not done yet, then write the tables; returns the table files."""
    if cfg.dry_run:
        raise ValueError("dry_run: call sonodistill.evaluate.estimate.dry_run(cfg) instead")
    if cfg.shard:  # its own folder and lock below OUT, its share of the runs
        check_options(cfg)
        cfg = dataclasses.replace(cfg, out=str(shard_folder(cfg.out, cfg.shard)))
    out = Path(cfg.out)
    runs, data = check_suite(cfg)
    if not cfg.tables_only:  # a refusal for leaks leaves the folder as it was
        audit_suite(cfg, data)
    runs = shard_runs(runs, cfg.shard)
    with suite_dir(cfg).claim() as run_dir:
        if run_dir.resuming:
            run_dir.check_resume(to_dict(cfg), dataset_changes(run_dir, cfg), SuiteConfig)
        if cfg.tables_only and (
            cfg.overwrite or all(finished_result(out, r, cfg) is None for r in runs)
        ):
            raise UserError(f"{out / 'runs'}: no finished run of this suite to tabulate")
        run_dir.clear()
        run_dir.save_options(cfg)
        data.writable = True
        data.save()
        data.write_audits()
        return _run_suite(cfg, out, runs, data)


def suite_dir(cfg: SuiteConfig) -> RunDir:
    return RunDir(cfg.out, SUITE, resume=cfg.resume, overwrite=cfg.overwrite)


def dataset_changes(run_dir: RunDir, cfg: SuiteConfig) -> dict[str, tuple]:
    """{datasets.NAME.KEY: (stored, now)} for the datasets the stored suite and this one both
    define, compared as checked specs (a key left out is its default, as 0.1 stored them);
    datasets may be added or dropped, like tasks."""
    stored = run_dir.stored_options(SuiteConfig).get("datasets") or {}
    changes = {}
    for name in sorted(set(stored) & set(cfg.datasets)):
        before = to_dict(check_dataset(stored[name], name))
        now = to_dict(check_dataset(cfg.datasets[name], name))
        changes.update({f"datasets.{name}.{k}": (before[k], now[k]) for k in before})
    return changes


def _run_suite(cfg: SuiteConfig, out: Path, runs: list[Run], data: SuiteData) -> list[Path]:
    done_runs = {r.id: d for r in runs if (d := finished_result(out, r, cfg)) is not None}
    leaks = {t: leak_summary(a) for t, a in data.audited().items() if a["leaks"]}
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
            key = run_key(run, cfg)
            done = done_runs.get(run.id)
            if done is None:
                if cfg.tables_only:
                    bar.advance(suite_task)
                    continue
                bar.update(suite_task, info=run.id)
                bar.reset(epoch_task, total=cfg.train.epochs)
                index, splits = data.get(run.task, run.fold)

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
                    on_end=_model_saver(run, index, out, cfg.train) if cfg.save_models else None,
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
                    "encoder_recipe": data.recipes[run.label],
                    "fraction": run.fraction,
                    "seed": run.seed,
                    "fold": run.fold,
                    "folds": run.folds,
                    "settings": dataclasses.asdict(cfg.train),
                    "split_file": str(split_path(out / "splits", run)),
                    "run_key": key,
                    "accepted_leaks": leaks.get(run.task),
                    **result,
                }
                write_json(path, done, indent=1)
            results.append(done)
            bar.advance(suite_task)
    types = {t: data.specs[t].task_type for t in cfg.tasks}
    classes = {t: data.index(t).num_classes for t in cfg.tasks}
    labels = list(dict.fromkeys(r.label for r in runs))
    return paper_tables(
        results,
        labels,
        types,
        out / "tables",
        table_note(cfg, leaks, data.specs),
        cfg.ablation,
        expected=expected_runs(runs),
        num_classes=classes,
        reference=cfg.reference,
    )


def finished_result(out: Path, run: Run, cfg: SuiteConfig) -> dict | None:
    """The result of a finished run with this run's key, in OUT/runs or in the folder of a
    shard (OUT/shards/*/runs), else None (results of 0.1 keep the key under `fingerprint`)."""
    for folder in [out / "runs", *sorted(out.glob("shards/*/runs"))]:
        done = read_json(folder / f"{run.id}.json", "run result")
        if isinstance(done, dict) and done.get("run_key", done.get("fingerprint")) == run_key(
            run, cfg
        ):
            return done
    return None


def _model_saver(run: Run, index: DatasetIndex, out: Path, train: TrainSettings):
    def save(model) -> None:
        save_evaluate_head(
            model,
            index.task_type,
            run.protocol,
            index.num_classes,
            out / "models" / run.id,
            index.classes,
            train.seg_image_size if index.task_type == "seg" else train.cls_image_size,
        )

    return save


def split_path(folder: Path, run: Run) -> Path:
    if run.fold is None:
        return folder / f"{run.task}.json"
    return fold_path(folder, run.task, run.fold, run.folds)


def leak_note(leaks: dict[str, dict]) -> str:
    """The leaks a suite ran with (`accept_leaks: true`), for the note under every table."""
    if not leaks:
        return ""
    parts = [
        f"{task}: {x['pairs_across']} near-duplicate pairs (similarity >= {x['near_duplicate']}) "
        f"and {x['groups_across']} groups across splits"
        for task, x in leaks.items()
    ]
    return (
        " **Leaks accepted (accept_leaks: true)**, so test images have near copies in "
        f"training for {'; '.join(parts)} (see splits/TASK.audit.md)."
    )


def table_note(
    cfg: SuiteConfig,
    leaks: dict[str, dict] | None = None,
    specs: dict[str, DatasetSpec] | None = None,
) -> str:
    t = cfg.train
    seeds = ", ".join(map(str, cfg.seeds))
    subset = f"; at most {t.subset} images per split (smoke run)" if t.subset else ""
    if cfg.folds:
        split = (
            f"group {cfg.folds}-fold cross-validation (every image tested once per seed; "
            f"n = {cfg.folds} folds x {len(cfg.seeds)} seeds)"
        )
    else:
        counts = cfg.split.seg_counts or DDTI_COUNTS
        released = [t for t in cfg.tasks if specs and specs[t].split == "folders"]
        kept = f"; {', '.join(released)}: the release's own split" if released else ""
        split = (
            f"the fixed split (segmentation {'/'.join(map(str, counts))} proportions, "
            f"classification 70/10/20{kept}; n = {len(cfg.seeds)} seeds)"
        )
    other = "ignore" if t.empty_mask == "one" else "one"
    resolution = (
        "at each image's original resolution (predictions resized back)"
        if t.metric_resolution == "original"
        else f"at the training size {t.seg_image_size} px"
    )
    return (
        f"Image size: segmentation {t.seg_image_size} px, classification {t.cls_image_size} px; "
        f"{t.epochs} epochs; batch {t.seg_batch}/{t.cls_batch}; AdamW lr {t.lr:g}; "
        f"seeds {seeds}; {split}{subset}; groups and near duplicates (similarity >= "
        f"{cfg.split.near_duplicate}) "
        + (
            "never straddle splits"
            if not leaks
            else "straddle splits only where the end of this note says"
        )
        + ". Dice/IoU per image, foreground, "
        f"{resolution}, averaged over the test images; empty masks: {EMPTY_RULES[t.empty_mask]} "
        f"(--train.empty_mask {other}: {EMPTY_RULES[other]}). Test scores of the "
        "best-validation epoch."
    ) + leak_note(leaks or {})
