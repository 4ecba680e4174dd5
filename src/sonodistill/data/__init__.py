"""Unlabeled ultrasound corpus and the readers every stage shares.

config     light: the settings, SOURCES.yaml entries, corpus commands' options, run folders
readers    one reader per file kind (image, video, DICOM, NIfTI, ITK), frames streamed
frames     cleaning and selection of a file's frames (FrameSelector)
hashing    exact and perceptual fingerprints
files      the files of a source (file, folder, glob); the worker pool
sources    SOURCES.yaml: sources, evaluation sets to exclude, build settings
manifest   the corpus manifest: columns, ids, reading, kept frames
corpus     the build (per-file work, corpus-wide dedup) -> summary (summary.md, sheet)
leakage    exact/near duplicates with evaluation sets
pack       the memory-mapped training cache
images     training datasets for distillation (folder, corpus or pack), their identity
listing    frames of folders, videos and corpora to embed or check (FrameRef)
masks      where an image's masks are and how they are read
simulator  the demo's B-mode simulator
"""
