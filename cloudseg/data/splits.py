"""Location-grouped folds: chips of one location never sit on both sides of a split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupKFold, LeaveOneGroupOut

LEAVE_ONE_LOCATION_OUT = 0  # ``n_folds`` value that asks for one fold per location


def location_folds(metadata: pd.DataFrame, n_folds: int, seed: int = 0) -> list[tuple[list[str], list[str]]]:
    """Split chips into folds grouped by location.

    Args:
        metadata: One row per chip with a ``location`` column; chip ids in the index or a ``chip_id`` column.
        n_folds: Number of folds, or 0 for leave-one-location-out (one fold per location, sorted by name).
        seed: Shuffles which locations land in which fold; same seed, same folds.

    Returns:
        ``[(train_ids, val_ids), ...]``, one pair per fold, ids sorted.
    """
    ids = np.asarray(metadata["chip_id"] if "chip_id" in metadata.columns else metadata.index, dtype=str)
    groups = np.asarray(metadata["location"], dtype=str)
    n_locations = len(set(groups))
    if n_folds == LEAVE_ONE_LOCATION_OUT:
        splitter = LeaveOneGroupOut()
    else:
        if n_folds < 2:
            raise ValueError(f"n_folds={n_folds}: use 0 (leave-one-location-out) or at least 2")
        if n_folds > n_locations:
            raise ValueError(
                f"n_folds={n_folds} but the data has only {n_locations} locations; "
                f"use n_folds <= {n_locations} or 0 for leave-one-location-out"
            )
        splitter = GroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds = []
    for train_idx, val_idx in splitter.split(ids, groups=groups):
        folds.append((sorted(ids[train_idx].tolist()), sorted(ids[val_idx].tolist())))
    if n_folds == LEAVE_ONE_LOCATION_OUT:  # LeaveOneGroupOut orders by group label; make it explicit
        order = np.argsort([groups[ids == f[1][0]][0] for f in folds], kind="stable")
        folds = [folds[i] for i in order]
    return folds


def fold_split(metadata: pd.DataFrame, n_folds: int, fold: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """The (train_ids, val_ids) of one fold, with a clear error for a fold out of range."""
    folds = location_folds(metadata, n_folds, seed)
    if not 0 <= fold < len(folds):
        raise ValueError(f"fold={fold} is out of range: this split has folds 0..{len(folds) - 1}")
    return folds[fold]


def read_id_list(path: Path | str) -> set[str]:
    """Chip ids from a text file, one per line; blank lines and '#' comments ignored."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exclusion file {path} does not exist")
    ids = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and line != "chip_id":
            ids.add(line.split(",")[0].strip())
    return ids


def exclude_from_training(train_ids: list[str], excluded: set[str]) -> list[str]:
    """Drop excluded ids from the training side only; validation keeps every chip so scores stay comparable."""
    kept = [c for c in train_ids if c not in excluded]
    if not kept:
        raise ValueError("every training chip of this fold is in the exclusion list; nothing is left to train on")
    return kept
