"""The data layer's configs and constants, in a light module (no numpy, pandas or OpenCV), so
that `sonodistill corpus ... --help` imports nothing heavy:

    FrameSettings, BuildSettings        how frames are cleaned and a corpus is built
    Source, EvalSet, CorpusSpec         the entries of SOURCES.yaml, and a whole build
    BuildConfig, LeakageConfig,         the `sonodistill corpus` commands' options
    PackConfig, SummaryConfig
    CORPUS, PACK                        their run folders (what --overwrite removes, what
                                        --resume may change)

and the near-duplicate thresholds, the mask threshold and outline policy, the file kinds the
readers know. The modules that use them re-export them where they were.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields
from typing import ClassVar, Literal

from sonodistill.config import (
    Axis3D,
    ClosedUnitInterval,
    ImageSize,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Renamed,
)
from sonodistill.utils.rundir import Layout

THRESHOLD = 0.92
"""Default similarity for "near duplicate" (calibrated, see `sonodistill.data.neardup`)."""
CORPUS_THRESHOLD = 0.95
"""Cross-file dedup of a corpus: frames of lung-ultrasound clips (smooth, low-contrast, one
probe layout) of *different* patients reach 0.92 (1,682 of 2,711 cross-file pairs of the
COVID-BLUES clips), none reaches 0.95 (121 pairs, all within one patient's repeated clips)."""
LOOSE = 0.90
"""The audit's looser threshold: pairs between it and THRESHOLD are listed for a look."""
CANDIDATE_BITS = 20
"""SimHash Hamming distance (of 64 bits) under which a pair is compared at all."""
MASK_THRESHOLD = 127
"""A mask pixel above this grey value is foreground."""
Outline = Literal["fill", "refuse"]
"""What to do with an outline-only mask: fill it, or refuse the image."""
SourceKind = Literal["auto", "image", "video", "dicom", "nifti", "itk"]
"""A source's file kind: auto (from each file's extension and header) or one of KINDS."""
KINDS = typing.get_args(SourceKind)[1:]
"""The file kinds `sonodistill.data.readers` reads."""

# ---------------------------------------------------------------- settings of a build


@dataclass
class FrameSettings:
    """How frames are cleaned and selected (per source overridable in SOURCES.yaml). The field
    names and values name a source's part folder: renaming one would rebuild every corpus."""

    frame_step: PositiveInt = 1
    """Look at every n-th frame of a video or sequence."""
    max_per_clip: NonNegativeInt = 64
    """Cap of kept frames per file (0: no cap)."""
    dup_method: Literal["phash", "diff"] = "phash"
    """Near-duplicate test between frames of one file: perceptual hash, or mean absolute
    difference of 32x32 greys."""
    dup_threshold: NonNegativeFloat = 2.0
    """phash: max Hamming bits; diff: max mean abs diff (32x32 grey)."""
    blank_std: NonNegativeFloat = 4.0
    """A frame whose grey standard deviation is below this is blank."""
    min_content: ClosedUnitInterval = 0.05
    """A frame whose share of pixels brighter than 16 is below this is blank."""
    min_entropy: NonNegativeFloat = 2.5
    """A frame whose grey-histogram entropy (bits) is below this has too little information."""
    max_colour: ClosedUnitInterval = 0.03
    """Fraction of non-dark pixels that are coloured above which a frame is colour (Doppler,
    elastography, a colour UI) and dropped."""
    colour_saturation: NonNegativeInt = 40
    """A pixel whose max(R,G,B) - min(R,G,B) exceeds this is coloured."""
    remove_marks: bool = True
    """Inpaint the coloured marks (calipers, arrows, text) of frames kept as B-mode."""
    crop_fov: bool = True
    """Crop to the ultrasound field of view (the largest bright region)."""
    min_size: PositiveInt = 32
    """Frames smaller than this on either side (after the crop) are dropped."""
    volume_axis: Axis3D = 0
    """Volumes: the slice axis of the (z, y, x) array."""
    layout: Literal["auto", "sequence", "volume"] = "auto"
    """3D files: a sequence of frames (cine) or a volume to slice; auto decides per file."""
    skip_patterns: list[str] = field(default_factory=lambda: ["*mask*"])
    """File name patterns of a source to ignore (masks next to images)."""


@dataclass
class BuildSettings:
    """Settings of a corpus build (the `settings:` section of SOURCES.yaml, or flags)."""

    workers: PositiveInt = 2
    """Processes reading files in parallel (1: in this process)."""
    frames: FrameSettings = field(default_factory=FrameSettings)
    near_duplicate: PositiveFloat = CORPUS_THRESHOLD
    """Similarity (data.neardup, 0-1) from which a frame of another file is a duplicate
    (above 1: exact copies only); higher than the evaluation splits' 0.92, where grouping too
    much is safe and dropping frames of other patients is not (docs/near_duplicates.md)."""
    exclude_near_duplicate: PositiveFloat = THRESHOLD
    """Similarity from which a frame matches an evaluation image (`exclude:`)."""
    contact_sheet: NonNegativeInt = 48
    """Random kept frames on contact_sheet.png (0: none)."""
    seed: NonNegativeInt = 0
    """Seed of the contact sheet's draw."""
    force: bool = False
    """Rebuild every source, ignoring finished parts."""

    deprecated: ClassVar = (Renamed("corpus_near_duplicate", "near_duplicate"),)


@dataclass
class Source:
    """One `sources:` entry of SOURCES.yaml."""

    dataset: str = ""
    """Dataset name: the frames' folder and the manifest's `dataset` column."""
    anatomy: str = "unknown"
    """What the frames show (lung, thyroid, phantom, ...): the manifest's `anatomy` column."""
    path: str = ""
    """A file, a folder (read recursively) or a glob; relative to SOURCES.yaml."""
    kind: SourceKind = "auto"
    """The file kind, when the extension does not tell."""
    frames: dict = field(default_factory=dict)
    """FrameSettings overrides for this source."""


@dataclass
class EvalSet:
    """One `exclude:` entry of SOURCES.yaml: an evaluation set no corpus frame may match."""

    name: str = ""
    """Its name in the manifest's `excluded:NAME` reason."""
    path: str = ""
    """Its images: a folder, file or glob; relative to SOURCES.yaml."""


@dataclass
class CorpusSpec:
    """A whole build: what `corpus.yaml` records and a resume compares."""

    settings: BuildSettings
    sources: list[Source]
    exclude: list[EvalSet]


# ---------------------------------------------------------------- the commands


@dataclass
class BuildConfig(BuildSettings):
    """Build a 2D grey frame corpus from the sources listed in SOURCES.yaml. The build
    settings are defaults, then the file's `settings:`, then these flags."""

    sources: str = ""
    """SOURCES.yaml: the sources, the evaluation sets to exclude and the build settings."""
    out: str = ""
    """Corpus folder (created; a build into it resumes)."""
    quiet: bool = False
    """No progress bar, warnings only."""
    resume: bool = False
    """Continue the corpus in OUT: the same sources and settings (more workers, another
    contact sheet, sources appended at the end are fine); only files without a part are read."""
    overwrite: bool = False
    """Replace the corpus in OUT by a new build."""

    def settings(self) -> BuildSettings:
        """The build settings of these options."""
        return BuildSettings(**{f.name: getattr(self, f.name) for f in fields(BuildSettings)})


@dataclass
class LeakageConfig:
    """Exact and near duplicates between a corpus (built folder, manifest, or image folder) and
    evaluation sets, and inside each evaluation set. Exit code 1 when a corpus frame matches an
    evaluation image."""

    corpus: str = ""
    """Corpus folder, its manifest.parquet, or an image folder."""
    against: list[str] = field(default_factory=list)
    """Evaluation sets as NAME=PATH (repeat --against+ NAME=PATH)."""
    near_duplicate: PositiveFloat = THRESHOLD
    """Similarity (data.neardup, 0-1) from which a pair is a near match: the project's one
    near-duplicate notion (docs/near_duplicates.md)."""
    workers: PositiveInt = 2
    """Processes computing fingerprints in parallel."""
    report: str | None = None
    """Write the pairs as CSV here."""

    deprecated: ClassVar = (Renamed("similarity", "near_duplicate"),)


@dataclass
class PackConfig:
    """Kept frames of a corpus, plain-resized to IMAGE_SIZE x IMAGE_SIZE, as PACK_DIR/frames.u8
    (uint8 memmap N,H,W) + index.parquet + pack.json."""

    corpus: str = ""
    """Corpus folder (or its manifest.parquet)."""
    out: str = ""
    """Pack folder."""
    image_size: ImageSize = 256
    """Side of the packed frames in pixels (distill --image_size reads them at any size; the
    same size packs the fastest)."""
    quiet: bool = False
    """No progress bar."""
    overwrite: bool = False
    """Replace a pack already in OUT."""

    deprecated: ClassVar = (Renamed("size", "image_size"),)


@dataclass
class SummaryConfig:
    """Rewrite and print the summary (counts per dataset, kind and drop reason) of a corpus."""

    corpus: str = ""
    """Corpus folder (or its manifest.parquet)."""


SPEC = "corpus.yaml"
"""A corpus folder's resolved sources and settings (`CorpusSpec`)."""
MANIFEST = "manifest.parquet"
"""A corpus's manifest: one row per frame seen (`sonodistill.data.manifest`)."""
NEARDUP_FILE = "neardup.parquet"
"""Fingerprints of a corpus's kept frames (id + data.neardup columns), beside its manifest."""
CORPUS = Layout(
    "corpus build",
    owned=(
        "frames",
        "parts",
        MANIFEST,
        NEARDUP_FILE,
        "summary.json",
        "summary.md",
        "contact_sheet.png",
        SPEC,
        "build.log",
    ),
    config=SPEC,
    # sources: compared by the build itself (appending at the end is fine)
    free_on_resume=("settings.workers", "settings.contact_sheet", "settings.force", "sources"),
    resumable=True,
)
"""A corpus folder."""
PACK = Layout("corpus pack", owned=("frames.u8", "index.parquet", "pack.json"), config=None)
"""A pack folder (not resumable: a pack is written in one go)."""
