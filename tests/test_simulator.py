"""The B-mode simulator: speckle statistics, lesion contrast as configured, mask alignment."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from sonodistill.data.simulator import (
    LESIONS,
    PRESETS,
    SimConfig,
    simulate_frame,
    write_corpus,
    write_labelled,
)

RAYLEIGH_SNR = np.sqrt(np.pi / (4 - np.pi))  # mean/std of a Rayleigh variable: 1.913
RAYLEIGH_LOG_STD_DB = 5.57  # std of 20 log10 of a Rayleigh variable, independent of its scale


@pytest.fixture(scope="module")
def phantom() -> np.ndarray:
    """Envelope of a homogeneous phantom (fully developed speckle), pooled over a few seeds."""
    cfg = SimConfig(size=160, homogeneous=True)
    return np.stack([simulate_frame(s, preset="thyroid", cfg=cfg).envelope for s in range(4)])


def test_speckle_snr_is_rayleigh(phantom: np.ndarray) -> None:
    snr = phantom.mean() / phantom.std()
    assert snr == pytest.approx(RAYLEIGH_SNR, abs=0.05)
    log_std = (20 * np.log10(phantom)).std()
    assert log_std == pytest.approx(RAYLEIGH_LOG_STD_DB, abs=0.25)


def test_speckle_distribution_ks(phantom: np.ndarray) -> None:
    # Subsample beyond the PSF's correlation length so that samples are nearly independent.
    samples = phantom[:, ::4, ::8].ravel()
    scale = np.sqrt(np.mean(samples**2) / 2)
    d, _ = stats.kstest(samples, "rayleigh", args=(0, scale))
    assert d < 0.03
    # The same samples are far from, e.g., a Gaussian of the same mean and std (the test bites).
    d_gauss, _ = stats.kstest(samples, "norm", args=(samples.mean(), samples.std()))
    assert d_gauss > 2 * d


def test_deterministic_from_seed() -> None:
    a, b = simulate_frame(7), simulate_frame(7)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert not np.array_equal(a.image, simulate_frame(8).image)


def _ring(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels left and right of the lesion, at its depth (not above/below: shadow, enhancement)."""
    rows = np.flatnonzero(mask.any(axis=1))
    ring = np.zeros_like(mask, dtype=bool)
    for r in rows:
        cols = np.flatnonzero(mask[r])
        ring[r, max(cols[0] - width, 0) : max(cols[0] - 2, 0)] = True
        ring[r, cols[-1] + 3 : cols[-1] + width + 1] = True
    return ring


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("lesion", ["hypoechoic", "hyperechoic", "cyst"])
def test_lesion_contrast_as_configured(preset: str, lesion: str) -> None:
    for seed in range(3):
        f = simulate_frame(seed, preset=preset, lesion=lesion, cfg=SimConfig(size=96))
        assert f.mask.sum() > 30, "lesion visible in the frame"
        inside = f.image[f.mask > 0].mean()
        outside = f.image[_ring(f.mask, 8) & (f.image > 0)].mean()
        if lesion == "hyperechoic":
            assert inside > outside + 0.05, (seed, inside, outside)
        else:
            assert inside < outside - 0.08, (seed, inside, outside)


def test_no_lesion_means_empty_mask() -> None:
    assert simulate_frame(3, lesion="none").mask.sum() == 0


def _below(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Columns under the lesion vs. columns beside it, in the band just below it."""
    rows, cols = np.nonzero(mask)
    bottom, lo, hi = rows.max(), cols.min(), cols.max()
    band = slice(bottom + 3, min(bottom + 15, mask.shape[0]))
    w = hi - lo + 1
    under = (band, slice(lo + w // 4, hi - w // 4 + 1))
    beside = np.zeros(mask.shape, bool)
    beside[band, max(lo - w, 0) : max(lo - 3, 0)] = True
    beside[band, hi + 4 : hi + w + 1] = True
    return under, beside


def test_posterior_shadow_and_enhancement() -> None:
    # Linear probe: depth is the row axis, so "below" is simply the next rows.
    cfg = SimConfig(size=96)
    diffs = {}
    for kind, kwargs in {
        "shadow": dict(lesion="hypoechoic", shadow=True),
        "enhancement": dict(lesion="cyst"),
    }.items():
        d = []
        for seed in range(4):
            f = simulate_frame(seed, preset="thyroid", cfg=cfg, **kwargs)
            under, beside = _below(f.mask)
            d.append(f.image[under].mean() - f.image[beside].mean())
        diffs[kind] = float(np.mean(d))
    assert diffs["shadow"] < -0.1
    assert diffs["enhancement"] > 0.03


@pytest.mark.parametrize("preset", ["thyroid", "abdomen"])  # linear and convex (scan-converted)
def test_mask_aligns_with_visible_lesion(preset: str) -> None:
    """The lesion/background contrast measured with the mask peaks when the mask is not shifted."""
    for seed in range(3):
        f = simulate_frame(seed, preset=preset, lesion="cyst", cfg=SimConfig(size=96))
        contrast = {}
        for dy in range(-4, 5, 2):
            for dx in range(-4, 5, 2):
                m = np.roll(f.mask, (dy, dx), axis=(0, 1)) > 0
                contrast[(dy, dx)] = f.image[~m & (f.image > 0)].mean() - f.image[m].mean()
        assert max(contrast, key=contrast.get) == (0, 0), contrast


def test_write_sets(tmp_path) -> None:
    corpus = write_corpus(tmp_path / "corpus", n=8, size=64, seed=0)
    assert sorted(p.name for p in corpus.iterdir()) == sorted(PRESETS)
    assert len(list(corpus.rglob("*.png"))) == 8
    lab = write_labelled(tmp_path / "lab", n=8, size=64)
    assert len(list((lab / "seg" / "images").glob("*.png"))) == 8
    assert len(list((lab / "seg" / "masks").glob("*.png"))) == 8
    assert {p.name for p in (lab / "cls").iterdir()} == set(LESIONS)
    assert (lab / "labels.csv").read_text().count("\n") == 9


def test_labelled_set_of_chosen_presets_keeps_lesion_types_balanced(tmp_path) -> None:
    lab = write_labelled(tmp_path / "lab", n=16, size=32, presets=["breast", "thyroid"])
    rows = [line.split(",") for line in (lab / "labels.csv").read_text().splitlines()[1:]]
    for preset in ("breast", "thyroid"):
        assert sorted(r[2] for r in rows if r[1] == preset) == sorted(LESIONS * 2)
