"""Reference predictors for the real-sample benchmark: all-cloud, a visible-brightness threshold, and the peer
``ukis-csmask`` (imported lazily; it lives in the ``bench`` extra only, never in the runtime).

Every predictor maps a chip (4, H, W) uint16 in the order B02, B03, B04, B08 (reflectance x 10,000) to a binary
cloud mask (H, W) uint8.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np

from cloudseg.metrics import JaccardAccumulator

# ukis-csmask's classes (v1.x, 4-band and 6-band models): 0 = clear background, 1 = cloud, 2 = cloud shadow.
# Only clouds count as cloud for the competition label; shadow is clear ground darkened, so it maps to 0.
UKIS_CLASSES = {0: "clear", 1: "cloud", 2: "cloud shadow"}
UKIS_CLOUD_CLASSES = (1,)
UKIS_BAND_ORDER = ("blue", "green", "red", "nir")  # our B02, B03, B04, B08
UKIS_LEVELS = ("l2a", "l1c")
UKIS_RESOLUTIONS = (10, 30)  # metres; the chips are 10 m, ukis recommends about 30 m


def all_cloud(image: np.ndarray) -> np.ndarray:
    """Predict cloud everywhere. Shape: (4, H, W) -> (H, W) uint8."""
    return np.ones(image.shape[-2:], dtype=np.uint8)


def visible_brightness(image: np.ndarray) -> np.ndarray:
    """Mean of the blue, green and red reflectances (0-1 scale). Shape: (4, H, W) uint16 -> (H, W) float32."""
    return image[:3].astype(np.float32).mean(axis=0) / 10000.0


@dataclass(frozen=True)
class BrightnessThreshold:
    """Cloud where the visible brightness is at least ``threshold`` (reflectance, 0-1 scale)."""

    threshold: float

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Shape: (4, H, W) uint16 -> (H, W) uint8."""
        return (visible_brightness(image) >= self.threshold).astype(np.uint8)


def fit_brightness_threshold(images: Iterable[np.ndarray], labels: Iterable[np.ndarray],
                             candidates: np.ndarray | None = None) -> BrightnessThreshold:
    """Choose the brightness threshold with the best pooled Jaccard on the given (training) chips.

    Args:
        images: Training chips. Shape: (4, H, W) uint16 each.
        labels: Their masks. Shape: (H, W) each, 1 = cloud.
        candidates: Thresholds tried (reflectance); default 0.02 to 1.0 in steps of 0.02.

    Raises:
        ValueError: no chips, or no cloud in the labels and none predicted at any candidate.
    """
    cand = np.round(np.arange(0.02, 1.0001, 0.02), 4) if candidates is None else np.asarray(candidates, float)
    inter = np.zeros(len(cand), dtype=np.int64)
    union = np.zeros(len(cand), dtype=np.int64)
    n = 0
    for image, label in zip(images, labels):
        b = visible_brightness(image).ravel()
        t = np.asarray(label).ravel().astype(bool)
        # cumulative histograms give every candidate's counts in one pass over the pixels
        idx = np.searchsorted(cand, b, side="right")  # pixel is predicted cloud for candidates[:idx]
        pos_all = np.bincount(idx, minlength=len(cand) + 1)
        pos_cloud = np.bincount(idx[t], minlength=len(cand) + 1)
        pred_all = np.cumsum(pos_all[::-1])[::-1][1:]  # pixels with idx > k, i.e. b >= cand[k]
        pred_cloud = np.cumsum(pos_cloud[::-1])[::-1][1:]
        n_true = int(t.sum())
        inter += pred_cloud
        union += pred_all + n_true - pred_cloud
        n += 1
    if n == 0:
        raise ValueError("fit_brightness_threshold: no training chips given")
    if not union.any():
        raise ValueError("fit_brightness_threshold: no cloud in the labels and none predicted at any threshold")
    scores = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    return BrightnessThreshold(float(cand[int(np.argmax(scores))]))


def score_predictor(predict, images: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray],
                    ids: Iterable[str] | None = None) -> JaccardAccumulator:
    """Per-chip intersection/union counts of a mask predictor on ``ids`` (default: every labeled chip)."""
    acc = JaccardAccumulator()
    for chip_id in (list(labels) if ids is None else ids):
        acc.add(chip_id, predict(images[chip_id]), labels[chip_id])
    return acc


# ---------------------------------------------------------------------------------------------- ukis-csmask
def ukis_available() -> bool:
    """True when ``ukis_csmask`` and its onnxruntime can be imported (``pip install ukis-csmask[cpu]``)."""
    try:
        import ukis_csmask.mask  # noqa: F401
    except ImportError:
        return False
    return True


def _resize(x: np.ndarray, size: int, mode: str) -> np.ndarray:
    """Resize a (C, H, W) array to (C, size, size); ``area`` averages (downsampling), ``nearest`` copies."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None]
    return torch.nn.functional.interpolate(t, size=(size, size), mode=mode)[0].numpy()


class UkisPeer:
    """``ukis-csmask``'s 4-band model as a cloud-mask predictor.

    Args:
        level: ``l2a`` or ``l1c`` (which of its models; the On Cloud N chips are L2A).
        resolution_m: 10 runs on the chip as it is; 30 averages 3x3 pixels first (its recommended input, 171 px
            for a 512 px chip) and upsamples the class map back with nearest neighbour.
        threads: onnxruntime intra-op threads.
    """

    def __init__(self, level: str = "l2a", resolution_m: int = 30, threads: int = 1):
        if level not in UKIS_LEVELS:
            raise ValueError(f"ukis level {level!r} must be one of {UKIS_LEVELS}")
        if resolution_m not in UKIS_RESOLUTIONS:
            raise ValueError(f"ukis resolution {resolution_m} m must be one of {UKIS_RESOLUTIONS}")
        if not ukis_available():
            raise ImportError("ukis-csmask is not installed: pip install 'ukis-csmask[cpu]' (the bench extra)")
        self.level, self.resolution_m, self.threads = level, resolution_m, threads

    @property
    def name(self) -> str:
        return f"ukis_{self.level}_{self.resolution_m}m"

    def classes(self, image: np.ndarray) -> np.ndarray:
        """ukis class map (0 clear, 1 cloud, 2 shadow) at the chip's size. Shape: (4, H, W) uint16 -> (H, W)."""
        from ukis_csmask.mask import CSmask

        h, w = image.shape[-2:]
        refl = np.clip(image.astype(np.float32) / 10000.0, 0.0, 1.0)  # ukis wants reflectance in [0, 1]
        if self.resolution_m != 10:
            refl = _resize(refl, int(round(h * 10 / self.resolution_m)), "area")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "smaller than the tiling size": it pads, that is fine
            csm = CSmask(np.ascontiguousarray(refl.transpose(1, 2, 0)), band_order=list(UKIS_BAND_ORDER),
                         product_level=self.level, invalid_buffer=0, intra_op_num_threads=self.threads,
                         inter_op_num_threads=1, providers=["CPUExecutionProvider"]).csm[..., 0]
        if csm.shape != (h, w):
            csm = _resize(csm[None].astype(np.float32), h, "nearest")[0].astype(np.uint8)
        return csm.astype(np.uint8)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Shape: (4, H, W) uint16 -> (H, W) uint8, 1 = ukis cloud class."""
        return np.isin(self.classes(image), UKIS_CLOUD_CLASSES).astype(np.uint8)
