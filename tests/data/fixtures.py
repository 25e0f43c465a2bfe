"""Tiny seeded chips in the competition layout, written by committed code (never downloaded).

Cloud pixels are bright in all four bands, clear ground dark in the visible and brighter in NIR, so a model
can learn something in one epoch; labels are exact.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cloudseg.data.io import BANDS, write_tif


def make_chip(rng: np.random.Generator, size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """One chip: (4, size, size) uint16 and its (size, size) uint8 label, a few elliptical clouds."""
    yy, xx = np.mgrid[0:size, 0:size]
    label = np.zeros((size, size), dtype=bool)
    for _ in range(rng.integers(0, 4)):
        cy, cx = rng.uniform(0, size, 2)
        ry, rx = rng.uniform(size / 12, size / 4, 2)
        label |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    ground = np.array([400, 700, 600, 2800], dtype=np.float32)[:, None, None]
    cloud = np.array([6000, 5800, 5600, 6200], dtype=np.float32)[:, None, None]
    img = np.where(label[None], cloud, ground) + rng.normal(0, 150, (4, size, size))
    return np.clip(img, 0, 18000).astype(np.uint16), label.astype(np.uint8)


def make_dataset(
    root: Path | str,
    n_chips: int = 6,
    locations: tuple[str, ...] = ("Alpha", "Beta", "Gamma"),
    seed: int = 0,
    split: str = "train",
    labels: bool = True,
    size: int = 512,
) -> Path:
    """Write ``n_chips`` chips spread round-robin over ``locations``; returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_chips):
        chip_id = f"{split[:2]}{i:02d}"
        img, lab = make_chip(rng, size)
        for band, arr in zip(BANDS, img):
            write_tif(root / f"{split}_features" / chip_id / f"{band}.tif", arr)
        if labels:
            write_tif(root / f"{split}_labels" / f"{chip_id}.tif", lab)
        rows.append((chip_id, locations[i % len(locations)], f"2020-0{1 + i % 9}-01T10:00:00Z",
                     f"az://./{split}_features/{chip_id}"))
    pd.DataFrame(rows, columns=["chip_id", "location", "datetime", "cloudpath"]).to_csv(
        root / f"{split}_metadata.csv", index=False
    )
    return root
