"""A compact B-mode ultrasound simulator: the embedded default corpus of `sonodistill demo`.

What it models, in the order the signal sees it (all in the beam grid: rows = depth, columns =
scan lines; a convex/sector probe is scan-converted at the end):

1. Tissue: an echogenicity map (mean backscatter power) made of anatomical-like layers with wavy
   boundaries (skin line, fat, muscle with fibre striations, parenchyma) plus at most one lesion:
   hypoechoic solid (darker, attenuating -> posterior acoustic shadow), hyperechoic (brighter) or
   cyst (anechoic, weakly attenuating -> posterior acoustic enhancement). Bright specular
   reflections at layer interfaces.
2. Speckle: many random sub-resolution scatterers per resolution cell, i.e. circular complex
   Gaussian reflectivity scaled by sqrt(echogenicity), convolved with the point spread function
   (PSF): Gaussian in the axial direction (pulse length) and laterally (beam width, narrowest at
   the focal depth). The envelope |.| of fully developed speckle is Rayleigh distributed
   (mean/std = 1.913); its log-compressed std is 5.57 dB.
3. Attenuation: round-trip exp(-2 * cumulative alpha) along each scan line, where alpha is a
   per-pixel map (the lesion's own attenuation is what shadows or enhances what lies below), and
   time-gain compensation (TGC) that undoes the nominal background attenuation with a small
   random gain error. Additive electronic noise floor.
4. Log compression into a display dynamic range (dB), then scan conversion for convex probes
   (a fan of scan lines, black outside the sector).

Everything is deterministic from the seed. `simulate_frame` returns the image, the lesion mask
and the tissue-layer map (both scan-converted with the same map as the image, so they align) and
the pre-log envelope.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from sonodistill.io import write_bytes, write_text

LESIONS = ("none", "hypoechoic", "hyperechoic", "cyst")

# Anatomical-like presets: one per "dataset" of the simulated corpus (the t-SNE colours).
# layers: (relative thickness, echogenicity, striated); geometry: linear or convex.
PRESETS: dict[str, dict] = {
    "breast": {
        "geometry": "linear",
        "layers": [(0.04, 3.0, False), (0.22, 0.35, False), (0.45, 1.3, False), (0.29, 0.8, True)],
    },
    "thyroid": {
        "geometry": "linear",
        "layers": [(0.05, 3.0, False), (0.20, 0.6, True), (0.55, 1.6, False), (0.20, 0.5, False)],
    },
    "muscle": {
        "geometry": "linear",
        "layers": [(0.04, 3.0, False), (0.12, 0.4, False), (0.60, 0.9, True), (0.24, 2.0, False)],
    },
    "abdomen": {
        "geometry": "convex",
        "layers": [(0.05, 2.5, False), (0.10, 0.4, False), (0.08, 0.9, True), (0.77, 1.0, False)],
    },
}


@dataclass
class SimConfig:
    """Acquisition and display parameters (defaults: a generic 5-10 MHz clinical scanner)."""

    size: int = 96
    """Output image side in pixels (square)."""
    psf_axial: float = 0.7
    """Axial PSF standard deviation in pixels (pulse length)."""
    psf_lateral: float = 1.4
    """Lateral PSF standard deviation at the focus in pixels (beam width)."""
    focus: float = 0.45
    """Focal depth as a fraction of the image depth; the beam widens away from it."""
    attenuation_db: float = 30.0
    """Nominal round-trip attenuation from top to bottom of the image, in dB."""
    tgc_error_db: float = 3.0
    """Maximal TGC mismatch at the bottom of the image, in dB (random sign/size per frame)."""
    dynamic_range_db: float = 50.0
    """Log-compression dynamic range in dB."""
    noise_db: float = -40.0
    """Electronic noise floor relative to unit-echogenicity speckle, in dB."""
    fan_deg: float = 60.0
    """Opening angle of the convex probe's sector, in degrees."""
    homogeneous: bool = False
    """A uniform phantom (no layers, lesion, attenuation, noise): for speckle statistics."""


@dataclass
class Frame:
    image: np.ndarray
    """(size, size) float32 in [0, 1]: the displayed B-mode frame."""
    mask: np.ndarray
    """(size, size) uint8 in {0, 1}: the lesion (all zero when lesion == 'none')."""
    envelope: np.ndarray
    """Beam-grid envelope before log compression (after TGC)."""
    lesion: str
    preset: str
    geometry: str
    info: dict = field(default_factory=dict)
    layers: np.ndarray | None = None
    """(size, size) uint8: the preset's tissue layer at each pixel (0 = the skin line, then
    deeper; the lesion does not change it), OUTSIDE beyond a convex probe's sector."""


OUTSIDE = 255
"""`Frame.layers` value outside a convex probe's sector."""


def simulate_frame(
    seed: int,
    preset: str | None = None,
    lesion: str | None = None,
    cfg: SimConfig | None = None,
    shadow: bool | None = None,
) -> Frame:
    """One deterministic frame. preset/lesion: None draws them from the seed.

    shadow: whether a hypoechoic lesion attenuates strongly (posterior shadow); default random.
    """
    cfg = cfg or SimConfig()
    rng = np.random.default_rng(seed)
    preset = preset or str(rng.choice(list(PRESETS)))
    lesion = lesion or str(rng.choice(LESIONS))
    if preset not in PRESETS or lesion not in LESIONS:
        raise ValueError(f"preset {preset!r} / lesion {lesion!r}: use {list(PRESETS)} / {LESIONS}")
    geometry = PRESETS[preset]["geometry"]
    n = cfg.size if geometry == "linear" else int(cfg.size * 1.25)  # convex: oversample the fan
    depth = np.linspace(0.0, 1.0, n, dtype=np.float32)[:, None] * np.ones((1, n), np.float32)

    layers = np.zeros((n, n), np.uint8)
    if cfg.homogeneous:
        echo, alpha, lesion_mask = np.ones((n, n), np.float32), np.zeros((n, n), np.float32), None
        lesion = "none"
    else:
        echo, alpha, lesion_mask, info = _tissue(rng, n, preset, lesion, cfg, shadow, layers)
    field_ = _speckle(rng, echo, cfg)
    if not cfg.homogeneous:
        # Round trip: the echo from depth z went down and back through all tissue above it.
        path = np.cumsum(alpha, axis=0) / n
        tgc_error = rng.uniform(-1, 1) * cfg.tgc_error_db
        gain_db = -2 * path * 20 / np.log(10) + (cfg.attenuation_db + tgc_error) * depth
        field_ = field_ * 10 ** (gain_db / 20)
        noise = rng.standard_normal((2, n, n)).astype(np.float32) * 10 ** (cfg.noise_db / 20)
        field_ = field_ + (noise[0] + 1j * noise[1]) / np.sqrt(2)
    envelope = np.abs(field_).astype(np.float32)
    image = log_compress(envelope, cfg.dynamic_range_db)
    mask = lesion_mask if lesion_mask is not None else np.zeros((n, n), np.uint8)
    if geometry == "convex":
        image, mask = scan_convert(image, mask, cfg.size, cfg.fan_deg)
        layers = _fan(layers, cfg.size, cfg.fan_deg, cv2.INTER_NEAREST, OUTSIDE)
    info = {} if cfg.homogeneous else info
    return Frame(image, mask, envelope, lesion, preset, geometry, info, layers)


def log_compress(envelope: np.ndarray, dynamic_range_db: float) -> np.ndarray:
    """20 log10 of the envelope; unit-echogenicity speckle at ~0.7 grey; clipped to [0, 1]."""
    mean_unit = np.sqrt(np.pi) / 2  # mean of a Rayleigh envelope of unit power
    db = 20 * np.log10(np.maximum(envelope, 1e-6) / mean_unit)
    return np.clip(0.7 + db / dynamic_range_db, 0.0, 1.0).astype(np.float32)


def _speckle(rng: np.random.Generator, echo: np.ndarray, cfg: SimConfig) -> np.ndarray:
    """Complex Gaussian scatterers * sqrt(echogenicity), convolved with a depth-dependent PSF."""
    n = echo.shape[0]
    scat = rng.standard_normal((2, n, n)).astype(np.float32) * np.sqrt(echo / 2)
    # The lateral beam width grows away from the focus: blend a focused and a defocused PSF.
    depth = np.linspace(0, 1, n, dtype=np.float32)[:, None]
    w = np.clip(np.abs(depth - cfg.focus) / max(cfg.focus, 1 - cfg.focus), 0, 1)
    parts = []
    for part in scat:
        sharp = _blur(part, cfg.psf_lateral, cfg.psf_axial)
        wide = _blur(part, cfg.psf_lateral * 2.0, cfg.psf_axial)
        parts.append((1 - w) * sharp + w * wide)
    out = parts[0] + 1j * parts[1]
    # Normalise so that unit echogenicity gives unit mean power at every depth: each blurred
    # white field has power = kernel energy, and the two blends are correlated by rho.
    e_sharp = _kernel_energy(cfg.psf_lateral) * _kernel_energy(cfg.psf_axial)
    e_wide = _kernel_energy(cfg.psf_lateral * 2.0) * _kernel_energy(cfg.psf_axial)
    cov = _kernel_overlap(cfg.psf_lateral, cfg.psf_lateral * 2.0) * _kernel_energy(cfg.psf_axial)
    power = (1 - w) ** 2 * e_sharp + w**2 * e_wide + 2 * w * (1 - w) * cov
    return out / np.sqrt(power)


def _kernel(sigma: float) -> np.ndarray:
    # The kernel cv2.GaussianBlur uses for float images with ksize (0, 0).
    ksize = int(round(sigma * 8 + 1)) | 1
    return cv2.getGaussianKernel(ksize, sigma, cv2.CV_64F)[:, 0]


def _kernel_energy(sigma: float) -> float:
    return float(np.sum(_kernel(sigma) ** 2))


def _kernel_overlap(sigma_a: float, sigma_b: float) -> float:
    a, b = _kernel(sigma_a), _kernel(sigma_b)
    pad = (len(b) - len(a)) // 2
    return float(np.sum(np.pad(a, pad) * b))


def _blur(x: np.ndarray, sigma_lateral: float, sigma_axial: float) -> np.ndarray:
    return cv2.GaussianBlur(
        x, (0, 0), sigmaX=sigma_lateral, sigmaY=sigma_axial, borderType=cv2.BORDER_REFLECT
    )


def _tissue(
    rng: np.random.Generator,
    n: int,
    preset: str,
    lesion: str,
    cfg: SimConfig,
    shadow: bool | None,
    layer_map: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, dict]:
    """Echogenicity and attenuation maps of layered tissue with at most one lesion; each
    pixel's layer index is written into `layer_map` (no random draw: frames stay as they were)."""
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
    echo = np.zeros((n, n), np.float32)
    top = np.zeros(n, np.float32)
    layers = PRESETS[preset]["layers"]
    phase = rng.uniform(0, 2 * np.pi)
    for i, (thickness, level, striated) in enumerate(layers):
        # Wavy boundaries, thicknesses jittered per frame: no two frames alike.
        t = thickness * rng.uniform(0.75, 1.25)
        wave = 0.02 * np.sin(2 * np.pi * xx[0] * rng.uniform(0.5, 2.0) + phase + i)
        bottom = top + t + wave if i < len(layers) - 1 else np.full(n, 2.0, np.float32)
        inside = (yy >= top[None, :]) & (yy < bottom[None, :])
        value = level * rng.uniform(0.8, 1.25)
        if striated:  # muscle fibres: oblique bands of varying backscatter
            angle = rng.uniform(-0.4, 0.4)
            value = value * (1 + 0.6 * np.sin(2 * np.pi * 14 * (yy + angle * xx)))
        echo = np.where(inside, value, echo)
        layer_map[inside] = i
        if i > 0:  # specular reflection at the interface
            echo = echo + 2.5 * np.exp(-(((yy - top[None, :]) * n) ** 2) / 1.5)
        top = bottom
    echo = echo.astype(np.float32)
    alpha_nominal = cfg.attenuation_db / 2 / (20 / np.log(10))  # nepers per image depth, one way
    alpha = np.full((n, n), alpha_nominal, np.float32)
    info: dict = {}
    if lesion == "none":
        return echo, alpha, None, info
    mask = _lesion_mask(rng, n, lesion, yy, xx)
    background = float(np.median(echo[mask > 0]))
    if lesion == "hypoechoic":
        factor = rng.uniform(0.08, 0.25)
        shadow = bool(rng.random() < 0.6) if shadow is None else shadow
        lesion_alpha = alpha_nominal * (4.0 if shadow else 1.0)
    elif lesion == "hyperechoic":
        factor, lesion_alpha, shadow = rng.uniform(2.5, 4.0), alpha_nominal, False
    else:  # cyst: fluid scatters and attenuates almost nothing -> posterior enhancement
        factor, lesion_alpha, shadow = 0.002, alpha_nominal * 0.05, False
    # The lesion replaces tissue: its echogenicity is relative to the local background.
    echo = np.where(mask > 0, background * factor, echo).astype(np.float32)
    alpha = np.where(mask > 0, lesion_alpha, alpha).astype(np.float32)
    info.update(factor=float(factor), shadow=bool(shadow))
    return echo, alpha, mask, info


def _lesion_mask(
    rng: np.random.Generator, n: int, lesion: str, yy: np.ndarray, xx: np.ndarray
) -> np.ndarray:
    """An ellipse (cyst: smooth; solid: lobulated boundary) in the lower-middle of the frame."""
    cy, cx = rng.uniform(0.4, 0.7), rng.uniform(0.3, 0.7)
    ry, rx = rng.uniform(0.07, 0.15), rng.uniform(0.09, 0.2)
    theta = rng.uniform(-0.5, 0.5)
    dy, dx = yy - cy, xx - cx
    u = (dx * np.cos(theta) + dy * np.sin(theta)) / rx
    v = (-dx * np.sin(theta) + dy * np.cos(theta)) / ry
    r = np.sqrt(u**2 + v**2)
    if lesion != "cyst":
        ang = np.arctan2(v, u)
        k, amp = rng.integers(3, 7), rng.uniform(0.05, 0.15)
        r = r / (1 + amp * np.sin(k * ang + rng.uniform(0, 2 * np.pi)))
    return (r <= 1).astype(np.uint8)


def scan_convert(
    beam: np.ndarray, mask: np.ndarray, size: int, fan_deg: float
) -> tuple[np.ndarray, np.ndarray]:
    """Beam grid (depth x angle) -> Cartesian fan of a convex probe; black outside the sector."""
    image = _fan(beam, size, fan_deg, cv2.INTER_LINEAR, 0)
    out_mask = _fan(mask, size, fan_deg, cv2.INTER_NEAREST, 0)
    return image.astype(np.float32), out_mask.astype(np.uint8)


def _fan(beam: np.ndarray, size: int, fan_deg: float, interpolation: int, outside) -> np.ndarray:
    """One beam-grid map scan-converted into the fan; `outside` beyond the sector."""
    n_r, n_t = beam.shape
    half = np.deg2rad(fan_deg) / 2
    r0 = 0.35  # virtual apex above the skin line: the convex footprint's radius
    r_max = r0 + 1.0
    width = 2 * r_max * np.sin(half)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    x = (xs / (size - 1) - 0.5) * width
    y = r0 * np.cos(half) + ys / (size - 1) * (r_max - r0 * np.cos(half))
    r = np.sqrt(x**2 + y**2)
    t = np.arctan2(x, y)
    map_r = ((r - r0) / (r_max - r0) * (n_r - 1)).astype(np.float32)
    map_t = ((t + half) / (2 * half) * (n_t - 1)).astype(np.float32)
    return cv2.remap(
        beam, map_t, map_r, interpolation, borderMode=cv2.BORDER_CONSTANT, borderValue=outside
    )


# --- datasets on disk -----------------------------------------------------------------------------


def write_png(path: Path, array: np.ndarray) -> None:
    if array.dtype != np.uint8:
        array = np.clip(array * 255 + 0.5, 0, 255).astype(np.uint8)
    write_bytes(path, cv2.imencode(".png", array)[1].tobytes())


def write_corpus(out: Path, n: int, size: int = 96, seed: int = 0, progress=None) -> Path:
    """Unlabeled corpus: out/<preset>/<preset>_<i>.png (the folder names the 'dataset')."""
    out = Path(out)
    cfg = SimConfig(size=size)
    for i in range(n):
        preset = list(PRESETS)[i % len(PRESETS)]
        frame = simulate_frame(seed * 1_000_003 + i, preset=preset, cfg=cfg)
        write_png(out / preset / f"{preset}_{i:05d}.png", frame.image)
        if progress:
            progress()
    return out


def write_labelled(
    out: Path,
    n: int,
    size: int = 96,
    seed: int = 1,
    progress=None,
    presets: list[str] | None = None,
) -> Path:
    """Labelled set: out/seg/{images,masks}/<i>.png (masks 0/255) and out/cls/<lesion>/<i>.png.

    The same frames serve both tasks: segment the lesion, classify its type (4 balanced classes).
    presets: the anatomies to draw from, in turn, each with the four lesion types (None: drawn
    from each frame's seed). labels.csv lists file, preset, lesion, shadow.
    """
    out = Path(out)
    cfg = SimConfig(size=size)
    rows = ["file,preset,lesion,shadow"]
    for i in range(n):
        lesion = LESIONS[i % len(LESIONS)]
        preset = presets[(i // len(LESIONS)) % len(presets)] if presets else None
        frame = simulate_frame(seed * 1_000_003 + 7919 * i, preset, lesion, cfg)
        name = f"{i:05d}.png"
        write_png(out / "seg" / "images" / name, frame.image)
        write_png(out / "seg" / "masks" / name, frame.mask * 255)
        write_png(out / "cls" / lesion / name, frame.image)
        rows.append(f"{name},{frame.preset},{lesion},{frame.info.get('shadow', False)}")
        if progress:
            progress()
    write_text(out / "labels.csv", "\n".join(rows) + "\n")
    return out
