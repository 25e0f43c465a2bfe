"""Normalisation of reflectance and augmentations applied to image and mask together."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import albumentations as A
import numpy as np


@dataclass(frozen=True)
class Normalization:
    """uint16 reflectance x 10,000 -> float32: ``clip(x / divisor, 0, clip) - mean) / std`` per band.

    Stored in every checkpoint so inference applies exactly what training saw.
    """

    divisor: float = 10000.0  # Sentinel-2 L2A scale factor: reflectance = DN / 10,000
    clip: float = 2.0  # reflectance above 2 is saturation or artefact
    mean: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Shape: (C, H, W) uint16 (or float32) -> (C, H, W) float32. In place on one float32 copy: this runs once
        per chip drawn, in the data loader."""
        x = image.astype(np.float32)  # always a copy: the caller's array is never changed
        np.divide(x, np.float32(self.divisor), out=x)
        np.clip(x, 0.0, self.clip, out=x)
        if any(self.mean):
            x -= np.asarray(self.mean, dtype=np.float32)[:, None, None]
        if any(s != 1 for s in self.std):
            x /= np.asarray(self.std, dtype=np.float32)[:, None, None]
        return x

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Normalization":
        return cls(float(d["divisor"]), float(d["clip"]), tuple(d["mean"]), tuple(d["std"]))


def build_train_transform(crop_size: int | None, strength: float = 0.0, seed: int | None = None) -> A.Compose:
    """Random crop, the 8 flips/rotations of the square (D4), and, with ``strength`` > 0, mild affine warps,
    blur and per-chip brightness gain. One call transforms image (H, W, C float32) and mask (H, W) together.

    Albumentations draws from its own generator, not from ``random``/``numpy``/``torch``: without ``seed`` two runs
    with the same config would see different crops and augmentations."""
    ops: list = []
    if crop_size:
        ops.append(A.RandomCrop(crop_size, crop_size))
    ops.append(A.D4())
    if strength > 0:
        s = float(strength)
        ops += [
            A.Affine(scale=(1 - 0.2 * s, 1 + 0.2 * s), rotate=(-30 * s, 30 * s), translate_percent=(-0.1 * s, 0.1 * s),
                     p=0.5 * s),
            A.GaussianBlur(blur_limit=(3, 5), p=0.3 * s),
            A.MultiplicativeNoise(multiplier=(1 - 0.15 * s, 1 + 0.15 * s), per_channel=False, elementwise=False,
                                  p=0.5 * s),
        ]
    return A.Compose(ops, seed=seed)


_PIXEL_EXACT = (A.RandomCrop, A.D4)  # transforms that only move pixels: any dtype, the same values


def apply_transform(transform, image: np.ndarray, mask: np.ndarray | None):
    """Apply an albumentations transform to a (C, H, W) image and (H, W) mask together; returns CHW float32.

    The image is converted to float32 first where the pipeline has more than crops, flips and rotations: some OpenCV
    kernels behind albumentations refuse uint16. Geometric-only pipelines move the uint16 pixels as they are (the
    same values, half the bytes); normalisation makes them float32 afterwards.
    """
    exact = all(type(t) in _PIXEL_EXACT for t in getattr(transform, "transforms", [transform]))
    hwc = image.transpose(1, 2, 0)
    hwc = np.ascontiguousarray(hwc) if exact else np.ascontiguousarray(hwc, dtype=np.float32)
    if mask is None:
        out = transform(image=hwc)
        return np.ascontiguousarray(out["image"].transpose(2, 0, 1)), None
    out = transform(image=hwc, mask=mask)
    return np.ascontiguousarray(out["image"].transpose(2, 0, 1)), np.ascontiguousarray(out["mask"])
