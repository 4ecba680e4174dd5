"""The options of `sonodistill evaluate` (and `evaluate audit`), `embed` and `analyze`, the
evaluation registries and the commands' run-folder layouts, in a light module: `--help` and
the configs read it without torch, timm or scikit-learn.

Registries (`sonodistill registry KIND` lists them; plugins add entries, see
`sonodistill.registry`):
- PROTOCOLS: how a run treats its encoder (`linear`: frozen, a linear layer on its features;
  `finetune`: trained end to end). Records declared here;
- SEG_DECODERS: fine-tuned segmentation decoders (`unet`, `light`), the model classes in
  `sonodistill.evaluate.heads`;
- DATASET_FORMATS: dataset layouts (`busi`, `ddti`, `seg_folder`, `cls_folder`), the loaders in
  `sonodistill.evaluate.datasets`.

Every field has a type that checks it (`sonodistill.utils.fields`, a Literal or a registry's
name) and help text; `DatasetSpec` entries of a suite are built by `config.checked` (an unknown
key is one line with its close match). Renamed options (`train.seg_size` -> `train.seg_image_size`,
`train.cls_size` -> `train.cls_image_size`, precision `32` -> `fp32`, `audit_loose` ->
`audit_near_duplicate`) are accepted until 0.3 (`config.Renamed`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from sonodistill.config import Renamed
from sonodistill.data.config import LOOSE, MASK_THRESHOLD, THRESHOLD, Outline
from sonodistill.models.specs import DEFAULT_STUDENT
from sonodistill.registry import Registry
from sonodistill.utils.fields import (
    Device,
    ImageSize,
    LeftOpenUnitInterval,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Precision,
    registered,
    restricted_number_type,
)
from sonodistill.utils.rundir import Layout

TaskType = Literal["seg", "cls"]
"""What a task predicts: a segmentation mask or a class label (a task's *name* is its key in a
suite, e.g. busi_seg)."""

# ---------------------------------------------------------------- registries


@dataclass(frozen=True)
class Protocol:
    """How a downstream run treats its encoder (paper Sec. 4.3)."""

    frozen: bool
    """The encoder stays frozen and a linear layer learns on its features (a probe); else the
    encoder is fine-tuned with the task's decoder or classifier."""
    title: str


PROTOCOLS: Registry[Protocol] = Registry("protocol", key="protocols")
"""Evaluation protocols: name -> `Protocol`."""
PROTOCOLS.register("linear", Protocol(True, "linear probe on the frozen encoder (Table 2)"))
PROTOCOLS.register("finetune", Protocol(False, "full fine-tuning (Tables 3 and 4)"))
ProtocolName = registered(PROTOCOLS, name="ProtocolName")

SEG_DECODERS: Registry = Registry(
    "segmentation decoder", key="seg_decoders", modules=("sonodistill.evaluate.heads",)
)
"""Fine-tuned segmentation decoders: name -> model class taking (encoder, num_classes)."""
SegDecoderName = registered(SEG_DECODERS, extra=("auto",), name="SegDecoderName")


@dataclass(frozen=True)
class DatasetFormat:
    """A dataset layout: the loader that indexes it and the task types it holds."""

    load: Callable
    """(spec: DatasetSpec, task name or None) -> the dataset's `evaluate.datasets.DatasetIndex`
    (records, classes, groups)."""
    task_types: tuple[str, ...]
    title: str


DATASET_FORMATS: Registry[DatasetFormat] = Registry(
    "dataset format", key="dataset_formats", modules=("sonodistill.evaluate.datasets",)
)
"""Dataset layouts: name -> `DatasetFormat`."""
DatasetFormatName = registered(DATASET_FORMATS, name="DatasetFormatName")

# ---------------------------------------------------------------- number types

Folds = restricted_number_type(
    "Folds", int, [("==", 0), (">=", 2)], join="or", docstring="0 or an int >= 2"
)
MaskThreshold = restricted_number_type(
    "MaskThreshold", int, [(">=", 0), ("<=", 254)], docstring="grey value 0-254"
)
TsneSteps = restricted_number_type("TsneSteps", int, (">=", 250), docstring="int >= 250")
AtLeastTwo = restricted_number_type("AtLeastTwo", int, (">=", 2), docstring="int >= 2")

# ---------------------------------------------------------------- evaluate


SplitName = Literal["train", "val", "test"]
GROUP_RULES = ("folder", "clip", "sequence", "sequence:N", "regex:PATTERN")
"""The `group_by` rules (`evaluate.datasets.group_of`)."""


@dataclass
class FolderPair:
    """One images folder of a dataset and where its masks are: a release's train/, val/, test/."""

    images: str
    """Images folder under root; a glob (`*/images`) takes every folder it matches."""
    masks: str = ""
    """Masks folder under root, "" (or the images folder) for masks beside their images with a
    suffix; each `*` is the text the images glob matched there (`*/masks`)."""
    split: SplitName | None = None
    """With the dataset's `split: folders`: the split (train, val, test) its images go to."""


@dataclass
class DatasetSpec:
    """A dataset of a suite: a built-in layout (busi, ddti) or a user's folders."""

    format: DatasetFormatName = "seg_folder"
    """The folder layout: busi, ddti (their published layouts), seg_folder (images/ + masks/,
    or masks beside their images), cls_folder (one sub-folder per class); plugins add others."""
    root: str = ""
    """The dataset's folder."""
    task_type: TaskType = "seg"
    """seg or cls (BUSI has both; cls_folder is cls only, ddti and seg_folder seg only)."""
    classes: list[str] | None = None
    """seg_folder: class names by mask value (default binary)."""
    groups_csv: str | None = None
    """CSV with columns `id,group` (e.g. patient): a group never spans two splits."""
    group_by: str | None = None
    """Group rule (images of a group share a split): `folder` (the image's folder: frames
    extracted one folder per clip), `clip` (CLIP_0012.png, clip7-frame3.png: the name before
    its trailing frame number; numeric names such as 0007.png have no clip name and are
    refused), `sequence` or `sequence:N` (numbered frames in one folder whose numbers are
    consecutive, or within N, are one clip), or `regex:PATTERN` (on the path under root: the
    named group `group`, else group 1, else the match; e.g. `regex:^(\\d+)_` for patients
    012_a.png, 012_b.png). Frames read from a video file always share the video's group."""
    images: str = "images"
    """seg_folder: the images folder under root."""
    masks: str = "masks"
    """seg_folder: the masks folder; the images folder itself (or "") for masks beside their
    images with a suffix (`NAME_mask.png`, `NAME_Annotation.png`, ...; see data.masks)."""
    folders: list[FolderPair] | None = None
    """seg_folder: several image/mask folder pairs under root instead of `images`/`masks`
    (a release's train/val/test folders; globs allowed); ids are then FOLDER/NAME."""
    split: Literal["grouped", "folders"] = "grouped"
    """grouped: the tool's own split (groups and near duplicates never straddle it); folders:
    the release's own split, each of `folders` naming its `split` (the audit still reports
    pairs and groups across it)."""
    mask_threshold: MaskThreshold = MASK_THRESHOLD
    """Binary masks: foreground where the value exceeds this (index masks 0/1: where 1)."""
    outline: Outline = "fill"
    """Masks drawn as closed outlines: fill them, or refuse the dataset."""
    frames_per_video: PositiveInt = 8
    """cls_folder with videos: evenly spaced frames taken from each clip."""


@dataclass
class SplitConfig:
    """How a task's images are split: groups and near duplicates never straddle splits."""

    seed: NonNegativeInt = 0
    """Seed of the split (the same seed and images give the same split)."""
    near_duplicate: PositiveFloat = THRESHOLD
    """Similarity (data.neardup, 0-1) from which two images are near duplicates and share a
    split; above 1: exact copies only."""
    label_conflicts: Literal["drop", "keep"] = "drop"
    """Classification: images of a duplicate group with different labels are left out (drop)
    or kept (keep: one image, two labels, possibly in train and test)."""
    seg_counts: list[NonNegativeInt] | None = None
    """Segmentation (train, val, test) proportions as counts; default DDTI's 445/127/65, which
    a 637-image set gets exactly and other sets get scaled to their size."""
    proportions: list[NonNegativeFloat] | None = None
    """(train, val, test) proportions; overrides the defaults above."""


@dataclass
class TrainSettings:
    """The paper's recipe (Sec. 4.3); lower sizes, epochs and subset for CPU smoke runs."""

    seg_image_size: ImageSize = 256
    """Side of the square input of segmentation tasks, in pixels."""
    cls_image_size: ImageSize = 224
    """Side of the square input of classification tasks, in pixels."""
    epochs: PositiveInt = 50
    """Training epochs; the epoch with the best validation score is tested."""
    seg_batch: PositiveInt = 32
    """Batch size of segmentation runs."""
    cls_batch: PositiveInt = 16
    """Batch size of classification runs."""
    lr: PositiveFloat = 1e-4
    """AdamW learning rate."""
    weight_decay: NonNegativeFloat = 0.01
    """AdamW weight decay."""
    restart_epochs: PositiveInt = 10
    """Cosine annealing with warm restarts: epochs per cycle (T_0)."""
    subset: PositiveInt | None = None
    """Use at most this many images per split (evenly spaced, so classes stay mixed)."""
    hflip: bool = False
    """Random horizontal flips while training (the paper states no downstream augmentation)."""
    seg_decoder: SegDecoderName = "auto"
    """Fine-tuned segmentation decoder: unet (smp's U-Net on the encoder's pyramid), light (a
    light head on the last map), or auto: the family's default (light for plain ViTs, as the
    paper's DINOv3 reference; unet otherwise)."""
    metric_resolution: Literal["original", "train"] = "original"
    """Segmentation metrics on the original image (predicted logits resized back, bilinear)
    or at the training size (`seg_image_size` squared, masks resized nearest)."""
    empty_mask: Literal["one", "ignore"] = "one"
    """Empty ground truth: `one` scores 1 when the prediction is empty too, 0 otherwise;
    `ignore` leaves such images out of the mean (MONAI's ignore_empty)."""
    feature_cache: bool = True
    """Linear probes: encode each image once (per encoder, dataset and size) and train the head
    on the cached features; the same results. false: recompute them every epoch."""
    precision: Precision = "auto"
    """auto: bf16 autocast on a GPU (losses in fp32), fp32 on a CPU; or fp32, bf16."""
    device: Device = "auto"
    """Where runs train: auto (a GPU when there is one), cpu, cuda, cuda:N or mps."""
    num_workers: NonNegativeInt | None = None
    """DataLoader workers (persistent, pinned batches on a GPU); default: 4 on a GPU, 0 on a CPU,
    where the cores are busy with the model."""

    deprecated: ClassVar = (
        Renamed("seg_size", "seg_image_size"),
        Renamed("cls_size", "cls_image_size"),
        Renamed("precision", values={"32": "fp32", 32: "fp32"}),
    )


@dataclass
class SuiteConfig:
    """Downstream evaluation suite (paper Sec. 4-5): every combination is one run."""

    out: str = "runs/evaluate"
    """Output folder: suite.yaml, runs/ (one JSON per run), splits/, tables/, models/."""
    data_root: str = "../shared/data"
    """Folder holding busi/ and ddti/ (the built-in tasks ddti_seg, busi_seg, busi_cls)."""
    encoders: list[str | dict] = field(default_factory=lambda: [f"random:{DEFAULT_STUDENT}"])
    """Shorthand (`random:resnet18`, `student:RUN_DIR@R18-Distill`, `teacher:W.pth`) or
    EncoderSpec fields as a mapping."""
    tasks: list[str] = field(default_factory=lambda: ["ddti_seg", "busi_seg", "busi_cls"])
    """Tasks to run: the built-in ddti_seg, busi_seg, busi_cls, or names under `datasets`."""
    datasets: dict[str, DatasetSpec] = field(default_factory=dict)
    """Your own tasks: name -> dataset (format, root, task_type, images, masks, folders, split,
    group_by, groups_csv, ...; `--datasets.help DatasetSpec` lists every key)."""
    protocols: list[ProtocolName] = field(default_factory=lambda: ["linear", "finetune"])
    """linear: a linear layer on the frozen encoder (Table 2); finetune: the encoder trained
    with a decoder or classifier (Table 3)."""
    fractions: list[LeftOpenUnitInterval] = field(default_factory=lambda: [1.0])
    """Label fractions of the training split (nested subsets): 1.0, 0.5, 0.2, 0.1, 0.05."""
    fraction_protocols: list[ProtocolName] = field(default_factory=lambda: ["finetune"])
    """Protocols run at fractions below 1 (the paper's Table 4 is fine-tuning only)."""
    seeds: list[NonNegativeInt] = field(default_factory=lambda: [0, 1, 2])
    """Training seeds: every run is repeated per seed (tables: mean ± std over them)."""
    folds: Folds = 0
    """0: the paper's fixed train/val/test split; K >= 2: group K-fold cross-validation (every
    image tested once per seed; val carved from the training folds)."""
    reference: str | None = None
    """Encoder label the others are compared with in comparisons.md (default: the first)."""
    ablation: list[dict] = field(default_factory=list)
    """Table 6 rows: {encoder: LABEL, augmentation: Default|US-aware, mixup: bool}; checked
    against each run's config.yaml (the table's columns are read from the configs)."""
    split: SplitConfig = field(default_factory=SplitConfig)
    train: TrainSettings = field(default_factory=TrainSettings)
    accept_leaks: bool = False
    """Start even when the audit finds near-duplicate pairs or groups across splits."""
    audit_near_duplicate: PositiveFloat = LOOSE
    """The audit's looser similarity: pairs listed for a look, not grouped."""
    tables_only: bool = False
    """Only rebuild the tables from the run JSONs already in `out` and its shards."""
    shard: str = ""
    """I/N: do only the I-th of N shares of the runs (every N-th in the plan's order, from the
    I-th), in OUT/shards/I-of-N with its own lock: N jobs on N GPUs or nodes (an sbatch array,
    docs/evaluate.md). `--tables_only true` on OUT then makes the tables of all shards."""
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

    deprecated: ClassVar = (Renamed("audit_loose", "audit_near_duplicate"),)


SUITE = Layout(
    "evaluate",
    owned=("suite.yaml", "runs", "splits", "tables", "models", "shards"),
    markers=("suite.yaml", "runs"),  # splits alone may be copied there to be reused
    config="suite.yaml",
    free_on_resume=(
        "data_root",  # the split files check that the same images are there
        "encoders",
        "tasks",
        "datasets",  # compared as checked specs (suite.dataset_changes)
        "protocols",
        "fractions",
        "fraction_protocols",
        "seeds",
        "reference",
        "ablation",
        "accept_leaks",
        "audit_near_duplicate",
        "tables_only",
        "shard",  # which runs a folder does, like seeds; older suites have none
        "save_models",
        "train.device",
        "train.num_workers",
        "train.feature_cache",
    ),
    resumable=True,
)
"""An evaluation suite's folder. The free `train.*` options change how fast a run goes, not
its results: run keys leave them out too."""
AUDIT = Layout("evaluate audit", owned=("splits",), config=None)
"""`evaluate audit` locks a suite's folder while it writes the splits and their audits."""

# ---------------------------------------------------------------- embed and analyze


@dataclass
class EmbedConfig:
    """Embeddings of frames from folders, videos or a corpus manifest, for several encoders:
    OUT/metadata.parquet (one row per frame), LABEL.npy per encoder (LABEL.cls.npy where the
    family has a CLS vector), embeddings.json and config.yaml; `sonodistill analyze` maps them.
    Example: sonodistill embed --sources+ busi=../shared/data/busi --encoders+
    student:runs/distill@R50-Distill."""

    sources: list[str] = field(default_factory=list)
    """`NAME=PATH` or `PATH` (folder, image, video, or a .parquet corpus manifest)."""
    encoders: list[str | dict] = field(default_factory=lambda: [f"random:{DEFAULT_STUDENT}"])
    """Encoder specs: random:ARCH, student:RUN_DIR, timm:ARCH=FILE, dinov3:FILE, teacher:FILE,
    dinov3-convnext:ARCH=FILE, sam2:ARCH=FILE, vit:ARCH=FILE (`@LABEL`), or EncoderSpec fields
    as a mapping (options, model_kwargs)."""
    out: str = "runs/embed"
    """Output folder: metadata.parquet, LABEL.npy (and LABEL.cls.npy) per encoder,
    embeddings.json, config.yaml."""
    image_size: ImageSize = 224
    """Frames are resized (bilinear) to image_size x image_size grey, as in distillation."""
    batch_size: PositiveInt = 32
    """Frames per forward pass."""
    max_per_source: PositiveInt | None = 500
    """Frames kept per source (random, seeded) so that no dataset swamps the plots."""
    frames_per_video: PositiveInt = 8
    """Evenly spaced frames taken from each video."""
    label_component: NonNegativeInt | None = None
    """Append this path component (under the source folder) to the dataset label."""
    anatomy: list[str] = field(default_factory=list)
    """`DATASET=ANATOMY` pairs, e.g. busi=breast ddti=thyroid lung=lung."""
    seed: NonNegativeInt = 0
    """Seed of the frame sampling and of randomly initialised encoders."""
    device: Device = "auto"
    """Where the encoders run: auto (a GPU when there is one), cpu, cuda, cuda:N or mps."""
    overwrite: bool = False
    """Replace the embeddings in OUT (config, metadata and arrays) by new ones."""


EMBED = Layout("embed", owned=("config.yaml", "metadata.parquet", "embeddings.json", "*.npy"))


@dataclass
class AnalyzeConfig:
    """2-D maps and separation metrics of the embeddings written by `sonodistill embed` (paper
    Fig. 2): OUT/tsne.png (or umap.png), one panel per model coloured by dataset;
    metrics.md|csv|json, per model the silhouette of the dataset labels and the k-NN dataset-ID
    accuracy (frames of one file in one fold) beside chance; projection.parquet."""

    embeddings: str = "runs/embed"
    """An `embed` output folder."""
    out: str | None = None
    """Output folder (default: <embeddings>/analysis): the figure, metrics.md|csv|json,
    projection.parquet, config.yaml."""
    models: list[str] = field(default_factory=list)
    """Model labels, in panel order (default: all; a teacher's CLS token is `LABEL.cls`)."""
    method: Literal["tsne", "umap"] = "tsne"
    """The 2-D projection; UMAP needs the optional extra: pip install 'sonodistill[umap]'."""
    color_by: str = "dataset"
    """Metadata column that colours the points and labels the metrics (dataset, anatomy)."""
    top_k: PositiveInt = 10
    """Datasets named in the legend; the others are drawn in grey as 'other'."""
    perplexity: PositiveFloat = 30.0
    """t-SNE perplexity (lowered for small sets: t-SNE needs more points than 3x this)."""
    tsne_iter: TsneSteps = 1000
    """t-SNE optimisation steps (at least 250)."""
    pca_dim: PositiveInt = 50
    """PCA before t-SNE/UMAP (standard practice: denoises and speeds up)."""
    knn_k: PositiveInt = 5
    """Neighbours of the k-NN dataset-ID accuracy."""
    folds: AtLeastTwo = 5
    """Folds of the k-NN cross-validation (frames of one file in one fold; fewer folds when a
    dataset has fewer files)."""
    max_points: PositiveInt | None = 5000
    """Random subset for the projection (t-SNE is quadratic); metrics use all points."""
    seed: NonNegativeInt = 0
    """Seed of the subset, the projection and the folds."""
    threads: PositiveInt | None = None
    """BLAS/OpenMP threads for PCA, t-SNE and k-NN (1 is much faster on a busy machine)."""
    overwrite: bool = False
    """Replace the analysis in OUT (figure, metrics, projection, config) by a new one."""


ANALYZE = Layout(
    "analyze",
    owned=(
        "config.yaml",
        "tsne.png",
        "umap.png",
        "metrics.md",
        "metrics.csv",
        "metrics.json",
        "projection.parquet",
    ),
)
