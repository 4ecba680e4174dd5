"""The data layer's constants that configs and `--help` need, in a light module (no numpy,
pandas or OpenCV): near-duplicate thresholds, the mask threshold and outline policy, the file
kinds the readers know. The modules that use them re-export them where they were."""

from __future__ import annotations

from typing import Literal

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
KINDS = ("image", "video", "dicom", "nifti", "itk")
"""The file kinds `sonodistill.data.readers` reads."""
