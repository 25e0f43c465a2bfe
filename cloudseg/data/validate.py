"""Check a split before any training starts, and report every problem at once, naming each file."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cloudseg.data.io import (
    BANDS,
    CHIP_SIZE,
    ChipReadError,
    chip_folders,
    features_dir,
    labels_dir,
    load_metadata,
    read_band,
)


class DatasetError(ValueError):
    """A split failed validation. ``problems`` lists each one; the message shows them all."""

    def __init__(self, root: Path, split: str, problems: list[str]):
        self.root, self.split, self.problems = Path(root), split, list(problems)
        shown = "\n  - ".join(self.problems[:200])
        more = f"\n  ... and {len(self.problems) - 200} more" if len(self.problems) > 200 else ""
        super().__init__(
            f"{len(self.problems)} problem(s) in split '{split}' of {root}:\n  - {shown}{more}\n"
            "Fix or remove the files named above (or drop their ids from the metadata) and run again."
        )


@dataclass
class ValidatedSplit:
    """The chips of a split that passed validation, and optionally their decoded arrays."""

    root: Path
    split: str
    metadata: pd.DataFrame  # indexed by chip_id, ordered like ``ids``
    ids: list[str]
    has_labels: bool
    images: dict[str, np.ndarray] = field(default_factory=dict)  # id -> (4, H, W) uint16
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # id -> (H, W) uint8
    mixed_ids: list[str] = field(default_factory=list)  # chips merged in from another dataset, for training only

    @property
    def own_ids(self) -> list[str]:
        """The split's own chips (``ids`` without those merged in from another dataset)."""
        mixed = set(self.mixed_ids)
        return [c for c in self.ids if c not in mixed]


def _check_array(path: Path, arr: np.ndarray, dtype: str, size: int, problems: list[str]) -> bool:
    ok = True
    if arr.shape != (size, size):
        problems.append(f"{path}: wrong shape {arr.shape[0]}x{arr.shape[1]}, expected {size}x{size}")
        ok = False
    if arr.dtype != np.dtype(dtype):
        problems.append(f"{path}: wrong dtype {arr.dtype}, expected {dtype}")
        ok = False
    return ok


def validate_split(
    root: Path | str,
    split: str = "train",
    labels: bool | None = None,
    load: bool = False,
    size: int = CHIP_SIZE,
) -> ValidatedSplit:
    """Validate ``<split>_features``, ``<split>_labels`` and ``<split>_metadata.csv`` under ``root``.

    Every file is decoded, so truncated TIFs are caught here rather than in the middle of an epoch.

    Args:
        root: Folder holding the competition layout.
        split: ``train`` or ``test`` (any prefix works).
        labels: Require labels (True), forbid checking them (False) or use them when the folder exists (None).
        load: Keep the decoded arrays in the result, so a run decodes each chip once.
        size: Expected chip height and width.

    Raises:
        DatasetError: listing every problem found.
    """
    root = Path(root)
    problems: list[str] = []
    feats = features_dir(root, split)
    labs = labels_dir(root, split)
    if not root.is_dir():
        raise DatasetError(root, split, [f"{root}: data folder does not exist"])
    try:
        meta = load_metadata(root, split)
    except ChipReadError as exc:
        raise DatasetError(root, split, [str(exc)]) from exc
    if not feats.is_dir():
        raise DatasetError(root, split, [f"{feats}: features folder is missing"])
    has_labels = labs.is_dir() if labels is None else labels
    if has_labels and not labs.is_dir():
        raise DatasetError(root, split, [f"{labs}: labels folder is missing"])

    meta_ids = list(meta["chip_id"])
    for chip_id, n in sorted(Counter(meta_ids).items()):
        if n > 1:
            problems.append(f"{root / f'{split}_metadata.csv'}: chip id '{chip_id}' appears {n} times")
    folders = set(chip_folders(feats))
    for chip_id in sorted(set(meta_ids) - folders):
        problems.append(f"{feats / chip_id}: metadata row without a chip folder")
    for chip_id in sorted(folders - set(meta_ids)):
        problems.append(f"{feats / chip_id}: chip folder without a metadata row")
    if has_labels:
        label_files = {p.stem for p in labs.glob("*.tif") if not p.name.startswith(".")}
        for chip_id in sorted(label_files - set(meta_ids)):
            problems.append(f"{labs / (chip_id + '.tif')}: label without a metadata row")

    ids = [c for c in dict.fromkeys(meta_ids) if c in folders]
    out = ValidatedSplit(root, split, meta.drop_duplicates("chip_id").set_index("chip_id").loc[ids], ids, has_labels)
    for chip_id in ids:
        bands = []
        for band in BANDS:
            path = feats / chip_id / f"{band}.tif"
            try:
                arr = read_band(path)
            except ChipReadError as exc:
                problems.append(str(exc))
                continue
            if _check_array(path, arr, "uint16", size, problems):
                bands.append(arr)
        if load and len(bands) == len(BANDS):
            out.images[chip_id] = np.stack(bands)
        if has_labels:
            path = labs / f"{chip_id}.tif"
            try:
                lab = read_band(path)
            except ChipReadError as exc:
                problems.append(str(exc).replace("file is missing", "label file is missing"))
                continue
            if _check_array(path, lab, "uint8", size, problems):
                bad = np.setdiff1d(np.unique(lab), [0, 1])
                if bad.size:
                    problems.append(f"{path}: label is not binary, found values {bad[:10].tolist()} besides 0/1")
                elif load:
                    out.masks[chip_id] = lab
    if problems:
        raise DatasetError(root, split, problems)
    return out
