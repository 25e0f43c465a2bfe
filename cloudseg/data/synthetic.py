"""Synthetic Sentinel-2 L2A chips with cloud labels, written in the competition layout.

The generator is built from physical knowledge only, never from statistics of the real sample (that sample
measures how well training on synthetic chips transfers, so it must stay unseen):

- Ground: land-cover patches from smooth random fields, each class with a two-endmember spectrum in the
  usual ranges of surface reflectance (vegetation dark in blue/red and bright in NIR, water dark in NIR, soil
  and sand rising with wavelength, flat grey urban, bright flat salt pans and rock that are *not* cloud),
  field parcels, urban blocks, roads, rivers, terrain shading, fine texture and a 10 m point-spread blur.
- Clouds: an optical-thickness field ``tau`` (scattered cumulus puffs, decks, streaky cirrus, or cumulus
  under a cirrus veil), rendered with the two-stream albedo ``R = (1-g) tau / (2 + (1-g) tau)`` (g = 0.85)
  over seen-through ground ``T^2 rho / (1 - R rho)``; nearly white, slightly bluer than flat; tops shaded
  away from the sun.
- Shadows: the same ``tau`` field displaced along a per-scene sun direction cuts the direct beam; what is
  left is the diffuse sky light, bluer than red/NIR.
- Scene: illumination gain, a little residual haze (blue most), sensor noise growing with signal, rare
  no-data swath edges (zeros), values clipped to 0..18,000.

Label rule: a pixel is cloud (1) when the total optical thickness ``tau >= 2`` (cloud albedo about 0.13: a
layer that visibly whitens dark ground). Thinner cloud and haze are rendered but left unlabeled; the mask is
smoothed over about 5 px, as an annotator's outline would be.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.fft
from scipy import ndimage
from threadpoolctl import threadpool_limits

from cloudseg.data.io import BANDS, features_dir, labels_dir, metadata_path, write_tif

# asymmetry factor of cloud droplets: forward scattering makes clouds less reflective per unit of thickness
G_ASYM = 0.85
LABEL_TAU = 2.0  # optical thickness from which a pixel is labeled cloud (see module docstring)
MAX_DN = 18_000  # competition value range of reflectance x 10,000
MARKER = "synthetic.json"  # written last into a generated folder; its presence means the folder is complete
GENERATOR_VERSION = 1  # bump when the pixels a seed produces change

# Land-cover classes. The first seven are "natural" covers mixed by a landscape's proportions; urban and water
# are placed by their own fields.
CLASSES = ("bright", "sand", "soil", "shrub", "crop", "grass", "forest", "urban", "water")
BRIGHT, SAND, SOIL, SHRUB, CROP, GRASS, FOREST, URBAN, WATER = range(len(CLASSES))

# Two endmember spectra per class, each given as (low, high) reflectance for B02, B03, B04, B08. A chip
# draws one spectrum inside each range; pixels mix the two endmembers along a smooth field (or per parcel or
# block).
ENDMEMBERS: dict[int, tuple[tuple[tuple[float, ...], tuple[float, ...]], ...]] = {
    # salt pan, bright rock, bare concrete: flat and very bright, slightly rising to red (clouds peak in blue)
    BRIGHT: (
        ((0.30, 0.33, 0.35, 0.36), (0.42, 0.45, 0.48, 0.50)),
        ((0.42, 0.46, 0.49, 0.50), (0.56, 0.59, 0.61, 0.62)),
    ),
    SAND: (
        ((0.14, 0.20, 0.26, 0.30), (0.20, 0.28, 0.36, 0.40)),
        ((0.20, 0.28, 0.35, 0.40), (0.28, 0.36, 0.45, 0.50)),
    ),
    SOIL: (
        ((0.04, 0.06, 0.08, 0.12), (0.07, 0.10, 0.13, 0.20)),
        ((0.08, 0.12, 0.17, 0.22), (0.12, 0.17, 0.25, 0.32)),
    ),
    # dry grass / shrubland (weak red edge) and sparse green shrubs
    SHRUB: (
        ((0.05, 0.08, 0.09, 0.18), (0.08, 0.11, 0.14, 0.26)),
        ((0.04, 0.07, 0.06, 0.20), (0.06, 0.09, 0.09, 0.28)),
    ),
    # green crop and bare tilled soil: parcels pick a point between them
    CROP: (
        ((0.025, 0.05, 0.025, 0.30), (0.045, 0.085, 0.05, 0.50)),
        ((0.06, 0.09, 0.12, 0.17), (0.10, 0.14, 0.19, 0.26)),
    ),
    # green and senescent grass
    GRASS: (
        ((0.03, 0.06, 0.03, 0.28), (0.05, 0.09, 0.06, 0.45)),
        ((0.05, 0.08, 0.09, 0.22), (0.07, 0.10, 0.12, 0.30)),
    ),
    # dark conifer and brighter broadleaf canopy
    FOREST: (
        ((0.010, 0.025, 0.012, 0.18), (0.02, 0.04, 0.02, 0.28)),
        ((0.02, 0.05, 0.025, 0.30), (0.035, 0.07, 0.04, 0.42)),
    ),
    # asphalt / dark roofs and concrete / bright roofs
    URBAN: (
        ((0.05, 0.06, 0.065, 0.08), (0.08, 0.09, 0.10, 0.13)),
        ((0.12, 0.13, 0.14, 0.17), (0.22, 0.24, 0.26, 0.30)),
    ),
    # clear deep water and turbid water; NIR always very low
    WATER: (
        ((0.02, 0.025, 0.01, 0.005), (0.05, 0.05, 0.03, 0.02)),
        ((0.05, 0.07, 0.05, 0.015), (0.08, 0.11, 0.09, 0.035)),
    ),
}
# How strongly terrain shading and texture modulate each class (water is flat and smooth).
TEXTURE = np.array([0.6, 0.5, 1.0, 1.0, 0.8, 1.0, 1.3, 1.2, 0.08], dtype=np.float32)


@dataclass(frozen=True)
class Landscape:
    """Proportions that make a kind of scene. ``cover`` weighs the seven natural classes, bright to forest."""

    cover: tuple[float, float, float, float, float, float, float]
    water: tuple[float, float]  # range of the lake/sea fraction
    urban: tuple[float, float]  # range of the built-up fraction
    relief: tuple[float, float]  # range of terrain-shading strength
    rivers: float  # chance of a river network
    sea: bool = False  # water gathers on one side (a coast) instead of in lowland lakes


LANDSCAPES: dict[str, Landscape] = {
    "forest": Landscape((0, 0, 0.04, 0.04, 0.07, 0.2, 0.65), (0.02, 0.15), (0, 0.03), (0.1, 0.5), 0.6),
    "cropland": Landscape((0, 0, 0.08, 0.04, 0.6, 0.18, 0.1), (0, 0.05), (0.02, 0.1), (0, 0.15), 0.4),
    "savanna": Landscape((0, 0.02, 0.22, 0.45, 0.04, 0.17, 0.1), (0, 0.03), (0, 0.03), (0, 0.3), 0.3),
    "arid": Landscape((0.06, 0.42, 0.3, 0.17, 0.02, 0.03, 0), (0, 0.02), (0, 0.05), (0.1, 0.6), 0.1),
    "coastal": Landscape(
        (0, 0.12, 0.08, 0.15, 0.15, 0.25, 0.25), (0.25, 0.6), (0.02, 0.1), (0, 0.2), 0.3, sea=True
    ),
    "urban": Landscape((0, 0, 0.15, 0.1, 0.1, 0.35, 0.3), (0, 0.1), (0.35, 0.65), (0, 0.15), 0.3),
    "mountain": Landscape((0.04, 0.03, 0.3, 0.2, 0, 0.15, 0.22), (0, 0.05), (0, 0.02), (0.6, 1.2), 0.3),
    "saltflat": Landscape((0.45, 0.2, 0.2, 0.1, 0, 0.05, 0), (0, 0.05), (0, 0.02), (0, 0.2), 0.0),
}
LANDSCAPE_NAMES = tuple(LANDSCAPES)
LANDSCAPE_WEIGHTS = np.array([0.17, 0.17, 0.14, 0.14, 0.1, 0.08, 0.12, 0.08])

CLOUD_KINDS = ("cumulus", "deck", "cirrus", "mixed")


# ------------------------------------------------------------------------------------------------------------
# Random fields


def _white_spectrum(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Complex white noise with unit-variance real and imaginary parts.

    Uniform rather than Gaussian draws: four times cheaper, and a field summing many of them is Gaussian
    anyway.
    """
    u = rng.random((*shape, 2), dtype=np.float32)
    u -= np.float32(0.5)
    u *= np.float32(12**0.5)
    return u.view(np.complex64)[..., 0]


@lru_cache(maxsize=16)
def _freq_grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Frequencies (cycles per field width) of an rfft2 half-spectrum of an n x n field."""
    fy = (np.fft.fftfreq(n) * n).astype(np.float32)[:, None]
    fx = (np.fft.rfftfreq(n) * n).astype(np.float32)[None, :]
    return fy, fx


def _spectral_field(
    rng: np.random.Generator,
    n: int,
    beta: float,
    f_lo: float,
    f_hi: float,
    stretch: tuple[float, float] | None = None,
    count: int = 1,
) -> np.ndarray:
    """Periodic Gaussian random fields with a power-law spectrum, standardised to zero mean and unit variance.

    Args:
        rng: Source of randomness.
        n: Field width and height in pixels.
        beta: Spectral slope (power ~ f^-beta): larger is smoother.
        f_lo: Frequency (cycles per field) below which the spectrum flattens, i.e. the largest feature size.
        f_hi: Gaussian cut-off frequency, i.e. the smallest feature size.
        stretch: ``(angle, ratio)`` for anisotropic fields: features ``ratio`` times longer along ``angle``.
        count: Number of independent fields.

    Returns:
        Float32 array. Shape: (count, n, n).
    """
    fy, fx = _freq_grid(n)
    if stretch is None:
        f2 = fy * fy + fx * fx
    else:
        angle, ratio = stretch
        fu = fx * np.float32(np.cos(angle)) + fy * np.float32(np.sin(angle))
        fv = -fx * np.float32(np.sin(angle)) + fy * np.float32(np.cos(angle))
        f2 = (fu * np.float32(ratio)) ** 2 + fv * fv
    amp = (f2 + np.float32(f_lo * f_lo)) ** np.float32(-beta / 4) * np.exp(-f2 / np.float32(f_hi * f_hi))
    amp[0, 0] = 0.0  # zero mean
    spec = _white_spectrum(rng, (count, n, n // 2 + 1)) * amp
    field = scipy.fft.irfft2(spec, s=(n, n), workers=1).astype(np.float32, copy=False)
    field /= field.std(axis=(1, 2), keepdims=True) + np.float32(1e-12)
    return field


@lru_cache(maxsize=32)
def _interp_matrix(n_out: int, n_in: int, start: int, stop: int) -> np.ndarray:
    """Catmull-Rom weights that upsample a periodic n_in grid to rows ``start:stop`` of an n_out grid."""
    j = np.arange(start, stop)
    x = (j + 0.5) * n_in / n_out - 0.5
    i0 = np.floor(x).astype(int)
    t = x - i0
    weights = (
        (-(t**3) + 2 * t**2 - t) / 2,
        (3 * t**3 - 5 * t**2 + 2) / 2,
        (-3 * t**3 + 4 * t**2 + t) / 2,
        (t**3 - t**2) / 2,
    )
    m = np.zeros((stop - start, n_in), dtype=np.float32)
    rows = np.arange(stop - start)
    for k, w in enumerate(weights):
        np.add.at(m, (rows, (i0 + k - 1) % n_in), w)
    m.setflags(write=False)
    return m


@lru_cache(maxsize=32)
def _interp_matrix_t(n_out: int, n_in: int, start: int, stop: int) -> np.ndarray:
    m = np.ascontiguousarray(_interp_matrix(n_out, n_in, start, stop).T)  # BLAS is much faster on contiguous
    m.setflags(write=False)
    return m


def _smooth_fields(
    rng: np.random.Generator,
    n: int,
    grid: int,
    specs: list[tuple[float, float, float]],
    start: int,
    stop: int,
) -> np.ndarray:
    """Smooth fields made on a coarse periodic grid and upsampled, cheaper than full-size FFTs.

    Args:
        n: Size of the full (padded) field the coarse grid spans.
        grid: Coarse grid size; ``specs`` frequencies are in cycles per field and must stay below grid / 2.
        specs: ``(beta, f_lo, f_hi)`` of each field.
        start, stop: Window of the full field to return (rows and columns alike).

    Returns:
        Float32 array. Shape: (len(specs), stop - start, stop - start).
    """
    coarse = np.concatenate([_spectral_field(rng, grid, *spec) for spec in specs])
    return _interp_matrix(n, grid, start, stop) @ coarse @ _interp_matrix_t(n, grid, start, stop)


def _blur3(x: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur over the last two axes: the sensor's point-spread function, ~10 m."""
    quarter = np.float32(0.25)
    y = x * np.float32(0.5)
    y[..., 1:, :] += quarter * x[..., :-1, :]
    y[..., :-1, :] += quarter * x[..., 1:, :]
    z = y * np.float32(0.5)
    z[..., 1:] += quarter * y[..., :-1]
    z[..., :-1] += quarter * y[..., 1:]
    return z


@lru_cache(maxsize=8)
def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.indices((size, size), dtype=np.float32)
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def _tiling(
    rng: np.random.Generator,
    index: np.ndarray,
    size: int,
    cell: tuple[float, float],
    angle: float,
    tiles: int = 4096,
) -> tuple[np.ndarray, np.ndarray]:
    """A rotated, row-staggered tiling (field parcels, city blocks), evaluated at some pixels only.

    Args:
        index: Flat indices of the pixels wanted in a (size, size) chip.
        cell: Tile width and height in pixels.
        angle: Rotation of the tiling in radians.
        tiles: Tile numbers are folded into ``[0, tiles)`` for lookup tables.

    Returns:
        (tile number of each pixel, distance in pixels to the nearest tile edge). Shapes: like ``index``.
    """
    yy, xx = np.divmod(index, size)
    yy, xx = yy.astype(np.float32), xx.astype(np.float32)
    c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    u = (xx * c + yy * s) / np.float32(cell[0])
    fu = np.floor(u)
    iu = fu.astype(np.int64)
    stagger = rng.random(512).astype(np.float32)  # each strip of tiles is shifted so the edges do not line up
    v = (-xx * s + yy * c) / np.float32(cell[1]) + stagger[iu % 512]
    fv = np.floor(v)
    tile = ((iu * 73856093) ^ (fv.astype(np.int64) * 19349663)) % tiles
    du, dv = u - fu, v - fv
    edge = np.minimum(
        np.minimum(du, 1 - du) * np.float32(cell[0]), np.minimum(dv, 1 - dv) * np.float32(cell[1])
    )
    return tile, edge


# ------------------------------------------------------------------------------------------------------------
# One chip


def _draw_landscape(rng: np.random.Generator) -> str:
    """The first draw of every chip, so a writer can learn a chip's landscape before generating it."""
    return LANDSCAPE_NAMES[int(rng.choice(len(LANDSCAPE_NAMES), p=LANDSCAPE_WEIGHTS))]


def _class_spectra(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-chip endmember spectra. Returns (A, B - A), each of shape (4, n_classes)."""
    a = np.zeros((4, len(CLASSES)), dtype=np.float32)
    b = np.zeros_like(a)
    for k in range(len(CLASSES)):
        for out, (lo, hi) in zip((a, b), ENDMEMBERS[k]):
            # one brightness draw for the whole spectrum keeps its shape; a small per-band jitter varies it
            u = np.clip(rng.random() + 0.12 * rng.standard_normal(4), 0, 1)
            out[:, k] = np.asarray(lo) + (np.asarray(hi) - np.asarray(lo)) * u
    return a, b - a


def _terrain_and_texture(
    rng: np.random.Generator, size: int, sun: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Terrain shading and fine texture, both standardised. Shapes: (size, size).

    The shading is the slope of a rough elevation (power ~ f^-3.5) toward the sun, taken in the Fourier
    domain, so both fields cost one inverse FFT.
    """
    fy, fx = _freq_grid(size)
    f2 = fy * fy + fx * fx
    amp_t = (f2 + np.float32(9.0)) ** np.float32(-3.5 / 4)
    amp_x = (f2 + np.float32(400.0)) ** np.float32(-1.4 / 4) * np.exp(-f2 / np.float32(size * size / 9))
    amp_t[0, 0] = amp_x[0, 0] = 0
    slope = np.float32(2 * np.pi / size) * (fx * np.float32(sun[1]) + fy * np.float32(sun[0]))
    spec = _white_spectrum(rng, (2, size, size // 2 + 1))
    spec[0] *= amp_t * slope * 1j
    spec[1] *= amp_x
    shade, tex = scipy.fft.irfft2(spec, s=(size, size), workers=1)
    return shade / (shade.std() + np.float32(1e-12)), tex / (tex.std() + np.float32(1e-12))


def _balance(scores: np.ndarray, weights: np.ndarray, steps: int = 25) -> np.ndarray:
    """Offsets that make ``argmax(scores + offset)`` pick each class about ``weights`` of the time."""
    offset = np.zeros(len(weights), dtype=np.float32)
    target = np.log(weights + 1e-3)
    for _ in range(steps):
        frac = np.bincount(np.argmax(scores + offset[:, None, None], axis=0).ravel(), minlength=len(weights))
        offset += np.float32(0.5) * (target - np.log(frac / frac.sum() + 1e-3)).astype(np.float32)
    return offset


def _argmax(cover: list[tuple[np.ndarray, np.float32]], tex: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Index of the largest ``field + jitter * tex + offset`` over the ``(field, jitter)`` pairs, as int8.

    A running maximum, cheaper than stacking the scores for ``np.argmax``.
    """
    best = cover[0][0] + (cover[0][1] * tex + offset[0])
    index = np.zeros(best.shape, dtype=np.int8)
    for k in range(1, len(cover)):
        candidate = cover[k][0] + (cover[k][1] * tex + offset[k])
        index[candidate > best] = k
        np.maximum(best, candidate, out=best)
    return index


def _ground(
    rng: np.random.Generator, size: int, pad: int, kind: Landscape, sun: tuple[float, float]
) -> np.ndarray:
    """Surface reflectance of a clear scene. Shape: (4, size, size), float32."""
    n = size + 2 * pad
    scale = size / 512
    # elevation (lakes, coast), river network, built-up potential, endmember mixing, then one field per
    # natural cover class: the class whose field is highest wins, so any two classes can share a border
    fields = _smooth_fields(
        rng,
        n,
        n // 8,
        [(3.0, 2.0, 10.0), (3.0, 2.0, 8.0), (2.6, 4.0, 22.0), (2.2, 4.0, 34.0)] + [(2.6, 3.0, 30.0)] * 7,
        pad,
        pad + size,
    )
    e, r, u, m = fields[:4]
    shade, tex = _terrain_and_texture(rng, size, sun)
    yy, xx = _coords(size)
    water_frac = rng.uniform(*kind.water)
    urban_frac = rng.uniform(*kind.urban)
    if kind.sea:
        angle = rng.uniform(0, 2 * np.pi)
        ramp = (xx * np.float32(np.cos(angle)) + yy * np.float32(np.sin(angle))) / np.float32(size)
        e = e + np.float32(5.0) * (ramp - ramp.mean())
    sub = (slice(None, None, 8), slice(None, None, 8))  # quantiles on a subsample are plenty and much cheaper
    water = e < np.quantile(e[sub], water_frac) if water_frac > 0 else np.zeros((size, size), bool)
    if rng.random() < kind.rivers:
        gy, gx = np.gradient(r)
        width = rng.uniform(1.0, 4.0) * scale  # half-width in pixels
        valley = e < np.quantile(e[sub], rng.uniform(0.4, 0.8))
        water |= (np.abs(r) < width * np.hypot(gy, gx)) & valley

    weights = np.asarray(kind.cover) * rng.gamma(4.0, 0.25, size=7)  # each chip varies its landscape's mix
    jitter = rng.uniform(-0.3, 0.3, size=7).astype(np.float32)  # texture rags the class borders differently
    present = np.flatnonzero(weights > 0.005 * weights.sum())
    cover = [(fields[4 + k], jitter[k]) for k in present]
    offset = _balance(
        np.stack([f[sub] + j * tex[sub] for f, j in cover]), weights[present] / weights[present].sum()
    )
    cls = present[_argmax(cover, tex, offset)]

    mix = 1 / (1 + np.exp(-1.6 * m))  # between the two endmembers; per parcel for crops, per block for towns
    flat_cls, flat_mix = cls.reshape(-1), mix.reshape(-1)  # views: tilings are evaluated only where needed
    if urban_frac > 0:
        built = np.flatnonzero((u > np.quantile(u[sub], 1 - urban_frac)) & ~water)
        cell = (rng.uniform(6, 14) * scale, rng.uniform(6, 14) * scale)
        tile, edge = _tiling(rng, built, size, cell, rng.uniform(0, np.pi))
        roofs = rng.beta(2.0, 2.0, 4096).astype(np.float32)
        gardens = rng.random(4096) < rng.uniform(0.05, 0.3)
        street = edge < np.float32(rng.uniform(0.4, 1.0) * scale)
        garden = gardens[tile] & ~street
        flat_cls[built[garden]] = GRASS  # parks and gardens
        flat_cls[built[~garden]] = URBAN
        # roofs differ from building to building and within one (courtyards, trees, shadows between houses)
        roof = roofs[tile] + np.float32(0.35) * tex.reshape(-1)[built]
        flat_mix[built[~garden]] = np.where(street, np.float32(0.05), roof)[~garden]
    cls[water] = WATER
    crop = np.flatnonzero(flat_cls == CROP)
    if crop.size:
        green = rng.uniform(0.3, 0.8)  # share of parcels under green crop
        values = np.where(rng.random(4096) < green, rng.uniform(0, 0.35, 4096), rng.uniform(0.55, 1.0, 4096))
        cell = (rng.uniform(14, 50) * scale, rng.uniform(14, 50) * scale)
        tile, edge = _tiling(rng, crop, size, cell, rng.uniform(0, np.pi))
        hedge = edge < np.float32(0.8 * scale)  # hedges, tracks and margins between parcels
        parcel = np.where(hedge, np.float32(0.5), values.astype(np.float32)[tile])
        flat_mix[crop] = parcel + np.float32(0.1) * m.reshape(-1)[crop]
    mix = np.clip(mix, 0, 1)
    a, d = _class_spectra(rng)
    index = cls.astype(np.intp)  # band by band with native indices: twice as fast as np.take over (4, C)
    ground = np.empty((4, size, size), dtype=np.float32)
    for b in range(4):
        ground[b] = a[b][index] + d[b][index] * mix

    # terrain shading and fine texture modulate brightness (little over smooth water)
    relief = np.float32(0.35 * rng.uniform(*kind.relief))
    grain = np.float32(rng.uniform(0.04, 0.10))
    factor = 1 + TEXTURE[cls] * (relief * shade + grain * tex)
    ground *= np.clip(factor, 0.3, 1.8)[None]

    # a few straight roads (anti-aliased lines), not across water
    for _ in range(rng.poisson(1.2 if kind is not LANDSCAPES["saltflat"] else 0.3)):
        angle = rng.uniform(0, np.pi)
        x0, y0 = rng.uniform(0, size, 2)
        dist = np.abs(
            (xx - np.float32(x0)) * np.float32(np.sin(angle))
            - (yy - np.float32(y0)) * np.float32(np.cos(angle))
        )
        alpha = np.clip(np.float32(rng.uniform(0.6, 1.5) * scale + 0.5) - dist, 0, 1) * ~water
        road = a[:, URBAN] + d[:, URBAN] * rng.uniform(0.2, 0.8)
        ground += alpha[None] * (road[:, None, None] - ground)
    return _blur3(ground)


def _cirrus_field(rng: np.random.Generator, n: int, env: np.ndarray) -> np.ndarray:
    """Fibrous streaks along one direction, gathered into patches by the envelope."""
    angle = rng.uniform(0, np.pi)
    fibres = _spectral_field(rng, n, 2.8, 3.0, n / 6, stretch=(angle, rng.uniform(2.0, 5.0)))[0]
    return fibres + rng.uniform(0.6, 1.2) * env


def _puffs(rng: np.random.Generator, n: int, scale: float, env: np.ndarray) -> np.ndarray:
    """Cumulus: Gaussian puffs with smaller bumps on them (cauliflower tops), standardised. Shape: (n, n).

    Puffs are scattered where the envelope is high, so they gather in fields and streets as real cumulus do.
    """
    radius = rng.uniform(8, 40) * scale  # 80-400 m: small to medium fair-weather cumulus
    count = int(rng.uniform(0.3, 1.5) * n * n / (np.pi * radius**2)) + 1
    ys, xs = rng.integers(0, n, size=(2, 4 * count))
    keep = rng.random(4 * count) < 1 / (1 + np.exp(-2.5 * env[ys, xs]))  # candidates thinned by the envelope
    ys, xs = ys[keep][:count], xs[keep][:count]
    big = np.zeros((n, n), dtype=np.float32)
    np.add.at(big, (ys, xs), rng.lognormal(0, 0.4, ys.size).astype(np.float32))
    bumps = np.zeros_like(big)
    k = 3 * ys.size
    src = rng.integers(0, max(ys.size, 1), k)
    if ys.size:
        offset = rng.normal(0, 0.8 * radius, size=(2, k))
        np.add.at(
            bumps,
            ((ys[src] + offset[0]).astype(int) % n, (xs[src] + offset[1]).astype(int) % n),
            rng.lognormal(-0.5, 0.4, k).astype(np.float32),
        )
    fy, fx = _freq_grid(n)
    f2 = (fy * fy + fx * fx) / np.float32(n * n)  # (cycles per pixel)^2
    small = radius * rng.uniform(0.3, 0.5)
    spec = scipy.fft.rfft2(np.stack([big, bumps]), workers=1)
    spec = spec[0] * np.exp(-2 * np.pi**2 * radius**2 * f2) + spec[1] * np.exp(-2 * np.pi**2 * small**2 * f2)
    field = scipy.fft.irfft2(spec, s=(n, n), workers=1).astype(np.float32)
    field -= field.mean()
    return field / (field.std() + np.float32(1e-12))


def _cloud_tau(
    rng: np.random.Generator, size: int, pad: int, cloud_fraction: float
) -> tuple[np.ndarray, str]:
    """Cloud optical thickness over the padded field, and the kind of cloud. Shape: (size + 2 pad,) * 2.

    A kind-specific random field is cut at the quantile that makes the wanted fraction of the chip reach
    ``LABEL_TAU``; above the cut thickness rises toward a drawn peak (steeply for cumulus, so their edges are
    crisp), below it a fringe of thinner, unlabeled cloud fades out (wide for cirrus).
    """
    n = size + 2 * pad
    env, haze_field = _smooth_fields(rng, n, n // 8, [(3.0, 1.5, 6.0), (3.0, 2.0, 8.0)], 0, n)
    kind = CLOUD_KINDS[int(rng.choice(4, p=[0.35, 0.25, 0.2, 0.2]))]
    if cloud_fraction >= 0.97 and kind in ("cumulus", "mixed"):
        kind = "deck"  # a chip covered wall to wall is overcast (stratus), not fair-weather cumulus
    tau = np.zeros((n, n), dtype=np.float32)
    if cloud_fraction > 0:
        if kind == "cirrus":
            field = _cirrus_field(rng, n, env)
            peak, fringe, gamma = rng.uniform(3, 12), rng.uniform(0.3, 1.0), 1.0
        elif kind == "deck":
            detail = _spectral_field(rng, n, 2.6, 6.0, n / 6)[0]
            field = env + rng.uniform(0.15, 0.35) * detail
            peak, fringe, gamma = rng.uniform(8, 40), rng.uniform(0.02, 0.08), 0.7
        else:  # rounded puffs, clustered by the envelope; a little fine detail rags their edges
            ragged = _spectral_field(rng, n, 2.5, 20.0, n / 10)[0]
            field = _puffs(rng, n, size / 512, env) + np.float32(0.08) * ragged
            peak, fringe, gamma = rng.uniform(30, 100), rng.uniform(0.03, 0.1), 0.5
        inner = field[pad : pad + size : 4, pad : pad + size : 4]
        if cloud_fraction >= 1:
            cut = float(field.min()) - 1e-3
        else:
            cut = float(np.quantile(inner, 1 - cloud_fraction))
        excess = field - np.float32(cut)
        above = excess[::4, ::4]
        above = above[above > 0]
        reach = float(np.quantile(above, 0.95)) if above.size >= 10 else 1.0  # scale thickness to the cloud
        rise = (np.maximum(excess, 0) / np.float32(reach)) ** np.float32(gamma)
        core = LABEL_TAU + (peak - LABEL_TAU) * rise
        edge = LABEL_TAU * np.maximum(1 + excess / np.float32(fringe), 0)
        tau = np.where(excess >= 0, core, edge).astype(np.float32)
        if kind == "mixed":  # cumulus under a thin cirrus veil
            veil = _cirrus_field(rng, n, env)
            tau += np.minimum(rng.uniform(0.5, 2.0) * np.maximum(veil - rng.uniform(0.5, 2.0), 0), 4.0)
    if rng.random() < 0.3:  # unlabeled haze: a hard negative, always below the label threshold on its own
        tau += rng.uniform(0.2, 1.5) / (1 + np.exp(-2 * haze_field))
    return np.minimum(tau, 150.0), kind


def _draw_cloud_fraction(rng: np.random.Generator) -> float:
    u = rng.random()
    if u < 0.18:
        return 0.0
    if u < 0.32:
        return 1.0
    return float(np.clip(rng.beta(0.8, 0.8), 0.02, 0.98))


def _generate(
    rng: np.random.Generator, size: int, cloud_fraction: float | None, landscape: str | None
) -> tuple[np.ndarray, np.ndarray, dict]:
    """A chip, its label and what was drawn (landscape, cloud kind, target fraction)."""
    drawn = _draw_landscape(rng)  # always drawn first, so chip i's stream does not depend on the argument
    landscape = landscape or drawn
    if landscape not in LANDSCAPES:
        raise ValueError(f"landscape={landscape!r} is unknown; choose one of {list(LANDSCAPES)}")
    if size < 32 or size % 8:
        raise ValueError(f"size={size}: use a multiple of 8, at least 32")
    if cloud_fraction is not None and not 0 <= cloud_fraction <= 1:
        raise ValueError(f"cloud_fraction={cloud_fraction}: must lie in [0, 1]")
    scale = size / 512
    pad = size // 8  # room for shadows cast by clouds just outside the chip

    sun_azimuth = rng.uniform(0, 2 * np.pi)  # direction the light comes from
    sun = (float(np.sin(sun_azimuth)), float(np.cos(sun_azimuth)))  # (y, x) unit vector toward the sun
    cos_sza = float(np.cos(np.radians(rng.uniform(20, 65))))
    ground = _ground(rng, size, pad, LANDSCAPES[landscape], sun)

    # scene illumination after atmospheric correction: a small gain and residual path radiance (blue most)
    ground *= np.float32(rng.uniform(0.9, 1.1))
    haze = rng.uniform(0, 1) ** 2 * np.array([0.03, 0.02, 0.012, 0.006], dtype=np.float32)
    ground += haze[:, None, None]

    cf = _draw_cloud_fraction(rng) if cloud_fraction is None else float(cloud_fraction)
    tau_full, cloud_kind = _cloud_tau(rng, size, pad, cf)
    tau = tau_full[pad : pad + size, pad : pad + size]

    # shadows: the cloud field displaced away from the sun blocks the direct beam; diffuse sky light is bluer
    length = rng.uniform(0.15, 1.0) * pad
    dy, dx = round(sun[0] * length), round(sun[1] * length)
    tau_shadow = tau_full[pad + dy : pad + dy + size, pad + dx : pad + dx + size]
    direct = np.exp(-(1 - G_ASYM) * tau_shadow / np.float32(cos_sza))
    diffuse = np.array([0.35, 0.28, 0.22, 0.15], dtype=np.float32) * np.float32(rng.uniform(0.8, 1.2))
    ground *= diffuse[:, None, None] + (1 - diffuse[:, None, None]) * direct[None]

    # clouds: two-stream albedo, seen-through ground, tops brighter on the sunlit side
    albedo = (1 - G_ASYM) * tau / (2 + (1 - G_ASYM) * tau)
    spectrum = np.array(
        [1 + rng.uniform(0.01, 0.05), 1.0, rng.uniform(0.98, 1.0), rng.uniform(0.92, 1.0)], dtype=np.float32
    )
    height = np.sqrt(tau)
    step = max(1, round(2 * scale))
    toward = np.roll(height, (-round(sun[0] * step), -round(sun[1] * step)), axis=(0, 1))
    shading = np.clip(1 + np.float32(rng.uniform(0.03, 0.08)) * (height - toward) / scale, 0.75, 1.15)
    trans = 1 - albedo
    image = (albedo * shading)[None] * spectrum[:, None, None] + trans[None] ** 2 * ground / (
        1 - albedo[None] * ground
    )

    # sensor noise grows with signal (shot noise) on top of a floor; uniform with the standard deviation of
    # the Gaussian it stands for, because it is four times cheaper to draw and looks the same at this level
    image *= np.float32(10_000)
    sigma = np.float32(8 * 12**0.5) + np.float32(0.006 * 12**0.5) * image
    image += sigma * (rng.random(image.shape, dtype=np.float32) - np.float32(0.5))

    label = (
        ndimage.uniform_filter((tau >= LABEL_TAU).astype(np.float32), size=max(3, round(5 * scale) | 1))
        >= 0.5
    )
    if rng.random() < 0.03:  # a no-data wedge at a swath edge: zeros in every band, never cloud
        yy, xx = _coords(size)
        angle = rng.uniform(0, 2 * np.pi)
        proj = xx * np.float32(np.cos(angle)) + yy * np.float32(np.sin(angle))
        nodata = proj > np.quantile(proj[::8, ::8], rng.uniform(0.6, 0.95))
        image[:, nodata] = 0
        label &= ~nodata
    bands = np.clip(np.rint(image), 0, MAX_DN).astype(np.uint16)
    info = {"landscape": landscape, "cloud_kind": cloud_kind, "target_cloud_fraction": cf}
    return bands, label.astype(np.uint8), info


def generate_chip(
    rng: np.random.Generator,
    size: int = 512,
    cloud_fraction: float | None = None,
    *,
    landscape: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic Sentinel-2 L2A chip and its cloud label.

    Args:
        rng: Source of randomness; the chip is a pure function of its state.
        size: Height and width in pixels (multiple of 8, at least 32). Spatial scales follow the size, so a
            smaller chip looks like a downsampled 512 px chip.
        cloud_fraction: Target fraction of labeled cloud pixels (0 and 1 are exact, others approximate);
            drawn at random when None, with about 18% clear and 14% fully cloudy chips.
        landscape: One of ``LANDSCAPES``; drawn at random when None.

    Returns:
        ``(bands, label)``: reflectance x 10,000 in the order B02, B03, B04, B08, and 1 = cloud.
        Shapes: (4, size, size) uint16 and (size, size) uint8.
    """
    with threadpool_limits(1):  # BLAS threads fight each other on the small matrix products used here
        bands, label, _ = _generate(rng, size, cloud_fraction, landscape)
    return bands, label


# ------------------------------------------------------------------------------------------------------------
# Writing a dataset

# fmt: off
_SYLLABLES = (
    "ka", "lo", "ma", "ri", "ten", "va", "su", "mer", "do", "ga", "bel", "no", "shi", "ran", "to",
    "kel", "ami", "zu", "por", "lin", "dar", "ve", "olu", "nak", "sa", "ber", "um", "wen", "ti", "ros",
)
# fmt: on
_SPLITS = {"train": 0, "test": 1}


def _place_names(seed: int, count: int) -> list[str]:
    """Distinct invented place names, deterministic per seed."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7001]))
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choice(_SYLLABLES, size=rng.integers(2, 4))).capitalize()
        if rng.random() < 0.2:
            name = f"{rng.choice(['Port', 'San', 'Lake', 'Nova', 'Upper'])} {name}"
        if name not in names:
            names.append(name)
    return names


def _chip_ids(seed: int, counts: dict[str, int]) -> dict[str, list[str]]:
    """Unique 4-letter ids; chip i's id depends only on (seed, split, i) unless an earlier id took it."""
    used: set[str] = set()
    out: dict[str, list[str]] = {}
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    for split, count in counts.items():
        ids = []
        for i in range(count):
            rng = np.random.default_rng(np.random.SeedSequence([seed, 7002, _SPLITS[split], i]))
            while (chip_id := "".join(rng.choice(letters, 4))) in used:
                pass
            used.add(chip_id)
            ids.append(chip_id)
        out[split] = ids
    return out


def _chip_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, _SPLITS[split], index]))


@dataclass(frozen=True)
class _Location:
    name: str
    crs: str
    easting: float
    northing: float
    datetimes: tuple[str, ...]


def _make_location(name: str, seed: int, index: int) -> _Location:
    """A UTM zone and origin, and one to three acquisition times near Sentinel-2's 10:30 local solar time."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7003, index]))
    zone = int(rng.integers(1, 61))
    south = rng.random() < 0.4
    crs = f"EPSG:{(32700 if south else 32600) + zone}"
    easting = float(rng.integers(20, 70) * 10_000)
    northing = float(rng.integers(100, 900) * 10_000)
    longitude = zone * 6 - 183
    utc_hours = (10.5 - longitude / 15) % 24
    year = int(rng.choice([2018, 2019, 2020], p=[0.05, 0.15, 0.8]))
    stamps = []
    for _ in range(int(rng.integers(1, 4))):
        day = datetime(year, 1, 1, tzinfo=UTC) + timedelta(days=int(rng.integers(0, 365)))
        seconds = int(utc_hours * 3600 + rng.integers(-1800, 1800)) % 86400
        stamps.append((day + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ"))
    return _Location(name, crs, easting, northing, tuple(sorted(stamps)))


def _assign_locations(landscapes: list[str], n_locations: int) -> list[int]:
    """Group chips into locations so each location holds chips of similar landscape (as real places do)."""
    order = sorted(range(len(landscapes)), key=lambda i: (LANDSCAPE_NAMES.index(landscapes[i]), i))
    out = [0] * len(landscapes)
    for rank, i in enumerate(order):
        out[i] = rank * n_locations // len(landscapes)
    return out


@dataclass(frozen=True)
class _ChipTask:
    root: Path
    split: str
    chip_id: str
    index: int
    seed: int
    size: int
    crs: str
    origin: tuple[float, float]


def _write_chip(task: _ChipTask) -> float:
    """Generate one chip and write its four bands and label; returns its cloud fraction."""
    from rasterio.transform import Affine

    bands, label, _ = _generate(_chip_rng(task.seed, task.split, task.index), task.size, None, None)
    transform = Affine(10.0, 0.0, task.origin[0], 0.0, -10.0, task.origin[1])  # 10 m pixels, north up
    for b, band in enumerate(BANDS):
        write_tif(
            features_dir(task.root, task.split) / task.chip_id / f"{band}.tif", bands[b], transform, task.crs
        )
    write_tif(labels_dir(task.root, task.split) / f"{task.chip_id}.tif", label, transform, task.crs)
    return float(label.mean())


def _init_worker() -> None:
    threadpool_limits(1)  # one BLAS thread per worker process


def _plan_split(
    root: Path, split: str, ids: list[str], seed: int, size: int, locations: list[_Location]
) -> tuple[list[_ChipTask], pd.DataFrame]:
    """Where each chip goes (location, tile origin, acquisition time), without generating any pixels."""
    landscapes = [_draw_landscape(_chip_rng(seed, split, i)) for i in range(len(ids))]
    where = _assign_locations(landscapes, len(locations))
    tasks, rows = [], []
    seen = [0] * len(locations)
    for i, chip_id in enumerate(ids):
        loc = locations[where[i]]
        k = seen[where[i]]
        seen[where[i]] += 1
        origin = (loc.easting + (k % 8) * size * 10.0, loc.northing - (k // 8) * size * 10.0)  # 8 tiles a row
        tasks.append(_ChipTask(root, split, chip_id, i, seed, size, loc.crs, origin))
        rows.append(
            {
                "chip_id": chip_id,
                "location": loc.name,
                "datetime": loc.datetimes[k % len(loc.datetimes)],
                "cloudpath": f"az://./{split}_features/{chip_id}",
            }
        )
    return tasks, pd.DataFrame(rows, columns=["chip_id", "location", "datetime", "cloudpath"])


def _run_tasks(tasks: list[_ChipTask], workers: int) -> list[float]:
    if workers <= 1 or len(tasks) < 8:
        with threadpool_limits(1):  # BLAS threads fight each other on the small matrix products used here
            return [_write_chip(t) for t in tasks]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: the caller may hold threads (torch, BLAS) that a forked child would inherit half-locked
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker) as pool:
        return list(pool.map(_write_chip, tasks, chunksize=4))


def _summary(fractions: list[float], n_locations: int) -> dict[str, float]:
    frac = np.asarray(fractions)
    return {
        "chips": len(frac),
        "locations": n_locations,
        "mean_cloud_fraction": round(float(frac.mean()), 4) if len(frac) else 0.0,
        "clear_chips": int((frac == 0).sum()),
        "cloudy_chips": int((frac == 1).sum()),
    }


def write_synthetic(
    out: Path,
    n: int,
    seed: int = 0,
    n_test: int = 0,
    n_locations: int | None = None,
    size: int = 512,
    overwrite: bool = False,
    workers: int | None = None,
) -> Path:
    """Write a synthetic dataset in the competition layout, atomically.

    ``train_features/<id>/B0x.tif``, ``train_labels/<id>.tif`` and ``train_metadata.csv`` (and the same for
    ``test_*`` when ``n_test > 0``, from locations not in train), plus ``synthetic.json`` describing what was
    generated. Everything is written into a temporary sibling folder that is renamed into place at the end, so
    a concurrent reader never sees half a dataset. Chips of a location share a landscape kind, a UTM zone and
    one to three acquisition times.

    Args:
        out: Target folder; must not exist, be empty, or ``overwrite`` must be set.
        n: Number of training chips.
        seed: Chip i of a split depends only on (seed, split, i), not on ``n`` or ``workers``.
        n_test: Number of labeled held-out chips.
        n_locations: Training locations; default ``max(2, n // 10)``. Test gets ``max(1, n_test // 10)``.
        size: Chip height and width.
        overwrite: Replace an existing non-empty ``out``.
        workers: Processes generating chips; default 1 (on a shared 2-core machine a second process measured
            slower, so more workers pay only where cores are really free).

    Raises:
        FileExistsError: ``out`` holds files and ``overwrite`` is False.
        ValueError: impossible counts.
    """
    out = Path(out).expanduser().resolve()
    if n < 1 or n_test < 0:
        raise ValueError(f"n={n}, n_test={n_test}: need n >= 1 and n_test >= 0")
    n_locations = min(max(2, n // 10), n) if n_locations is None else n_locations
    if not 1 <= n_locations <= n:
        raise ValueError(f"n_locations={n_locations}: need 1 <= n_locations <= n={n}")
    n_test_locations = min(max(1, n_test // 10), n_test)
    workers = 1 if workers is None else workers
    _refuse_non_empty(out, overwrite)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        names = _place_names(seed, n_locations + n_test_locations)
        locations = [_make_location(name, seed, j) for j, name in enumerate(names)]
        ids = _chip_ids(seed, {"train": n, "test": n_test})
        plans = {"train": _plan_split(tmp, "train", ids["train"], seed, size, locations[:n_locations])}
        if n_test:
            plans["test"] = _plan_split(tmp, "test", ids["test"], seed, size, locations[n_locations:])
        tasks = [t for split_tasks, _ in plans.values() for t in split_tasks]
        fractions = _run_tasks(tasks, workers)
        summary = {}
        for split, (split_tasks, meta) in plans.items():
            meta.to_csv(metadata_path(tmp, split), index=False)
            mine = [f for t, f in zip(tasks, fractions) if t.split == split]
            summary[split] = _summary(mine, meta["location"].nunique())
        marker = {
            "generator": "cloudseg.data.synthetic",
            "version": GENERATOR_VERSION,
            "seed": seed,
            "n": n,
            "n_test": n_test,
            "n_locations": n_locations,
            "size": size,
            "label_tau": LABEL_TAU,
            "splits": summary,
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        _move_into_place(tmp, out, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_summary(path: Path) -> dict:
    """What ``write_synthetic`` recorded about a generated folder (counts, seed, cloud fractions)."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        raise FileNotFoundError(f"{marker} is missing: {path} is not a complete synthetic dataset")
    return json.loads(marker.read_text())


def _refuse_non_empty(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out} already holds files; pass overwrite=True (--overwrite) or choose another folder"
        )


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is moved aside first when overwriting."""
    if overwrite and out.is_dir() and any(out.iterdir()):
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, trash / out.name)
        try:
            os.rename(tmp, out)
        except OSError:
            if not out.exists():  # put the old dataset back rather than lose it
                os.rename(trash / out.name, out)
            raise
        finally:
            shutil.rmtree(trash, ignore_errors=True)
        return
    try:
        os.rename(tmp, out)  # atomic; replaces an empty folder, fails on a non-empty one
    except OSError as exc:
        raise FileExistsError(f"{out} appeared while generating (another process?); not overwritten") from exc


def is_complete(path: Path) -> bool:
    """Whether ``path`` is a finished synthetic dataset (its marker is written last)."""
    return (Path(path) / MARKER).is_file()


DEFAULT_N = 96  # training chips of the synthetic default (config key synthetic_n)
DEFAULT_N_TEST = 20


def ensure_synthetic_default(
    n: int = DEFAULT_N, n_test: int = DEFAULT_N_TEST, seed: int = 0, *, path: Path | None = None, size: int = 512
) -> Path:
    """The default synthetic dataset (``data/synthetic/``), generated on first use.

    The default 96 train chips (9 locations) and 20 test chips (2 other locations) take about 15-30 s of one core
    (generation ~100 ms and writing ~50 ms a chip); an existing complete folder is returned as it is, whatever
    counts it was made with. Every caller uses the same defaults, so which command makes it first does not matter.

    Safe under concurrent callers: each generates into its own temporary folder; whoever loses the rename uses
    the winner's folder.

    Raises:
        FileExistsError: the folder exists but is not a complete synthetic dataset.
    """
    from cloudseg import paths

    target = Path(path) if path is not None else paths.SYNTHETIC_DIR
    if is_complete(target):
        return target
    if target.is_dir() and any(target.iterdir()):
        raise FileExistsError(
            f"{target} exists but has no {MARKER} (an interrupted or foreign folder); delete it to regenerate"
        )
    print(f"[synthetic] generating {n} train + {n_test} test chips (seed {seed}) into {target}", flush=True)
    try:
        write_synthetic(target, n, seed=seed, n_test=n_test, size=size)
    except FileExistsError:
        if is_complete(target):  # another process won the race: use theirs
            return target
        raise
    return target
