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


STAT_CHIPS = 64  # chips whose pixels give a supplementary band's mean and std (evenly spaced over the ids)
STAT_STRIDE = 4  # every 4th pixel in each direction: 16,384 pixels per chip


def fit_normalization(split, ids: list[str], bands: tuple[str, ...], core: tuple[str, ...],
                      divisor: float = 10000.0, clip: float = 2.0) -> Normalization:
    """The normalisation of a model whose input is ``bands``: the competition's bands (``core``) keep mean 0 and
    std 1 (reflectance as it is, as every 4-band model was trained); each supplementary band gets the mean and
    std of ``clip(x / divisor, 0, clip)`` over the valid pixels (any core band > 0) of up to ``STAT_CHIPS``
    training chips, so a class band such as SCL (0..11) and a reflectance band such as B11 both reach the model
    at unit scale. Computed from the training ids only; the checkpoint stores the result.

    Args:
        split: a ``ValidatedSplit`` read with ``bands`` (``split.image`` returns them in this order).
        ids: the training chips.
    """
    extra = [i for i, b in enumerate(bands) if b not in core]
    mean, std = [0.0] * len(bands), [1.0] * len(bands)
    if extra and ids:
        picks = [ids[int(k)] for k in np.unique(np.linspace(0, len(ids) - 1, min(STAT_CHIPS, len(ids))).round())]
        core_idx = [i for i, b in enumerate(bands) if b in core]
        sums = np.zeros((len(extra), 2), dtype=np.float64)
        count = 0
        for chip_id in picks:
            image = split.image(chip_id)[:, ::STAT_STRIDE, ::STAT_STRIDE]
            valid = np.any(image[core_idx] > 0, axis=0) if core_idx else np.ones(image.shape[1:], bool)
            x = np.clip(image[extra][:, valid].astype(np.float64) / divisor, 0.0, clip)
            sums[:, 0] += x.sum(axis=1)
            sums[:, 1] += np.square(x).sum(axis=1)
            count += x.shape[1]
        if count:
            m = sums[:, 0] / count
            sd = np.sqrt(np.maximum(sums[:, 1] / count - m ** 2, 0.0))
            for j, i in enumerate(extra):
                mean[i] = float(m[j])
                std[i] = float(sd[j]) if sd[j] > 1e-8 else 1.0  # a constant band: centred, not scaled
    return Normalization(divisor, clip, tuple(mean), tuple(std))


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


def worker_seed(seed: int, rank: int, epoch: int, worker: int) -> int:
    """The augmentation seed of one DataLoader worker in one epoch: distinct for every (config seed, rank, epoch,
    worker id), the same on a re-run. Without it each worker replays a copy of the parent's generator, so with
    two workers 8 draws of one chip are 4 distinct images."""
    entropy = [seed % 2**64, rank, epoch, worker]  # SeedSequence mixes the four into well-separated streams
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])


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
