"""A torch Dataset over validated chips: held in memory where the split was loaded, else read from disk on demand
(one chip at a time, in the DataLoader's workers), so memory stays O(batch) whatever the split's size."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from cloudseg.data.transforms import Normalization, apply_transform
from cloudseg.data.validate import ValidatedSplit, validate_split


class ChipDataset(Dataset):
    """Samples ``{"chip_id": str, "image": float32 (4, H, W), "mask": float32 (1, H, W)}``; no mask without labels.

    Args:
        split: A ``ValidatedSplit``: loaded (``load=True``, arrays shared by every fold) or not (chips read from
            disk each time they are drawn).
        ids: The chip ids this dataset serves (defaults to all of the split).
        transform: albumentations transform applied to image and mask together (before normalisation).
        normalization: uint16 -> float32 mapping.
    """

    def __init__(
        self,
        split: ValidatedSplit,
        ids: list[str] | None = None,
        transform: Callable | None = None,
        normalization: Normalization | None = None,
    ):
        self.split = split
        self.ids = list(split.ids if ids is None else ids)
        known = set(split.ids)
        unknown = [c for c in self.ids if c not in known]
        if unknown:
            raise KeyError(f"chip ids not in {split.root} ({split.split}): {unknown[:10]}")
        self.transform = transform
        self.normalization = normalization or Normalization()

    @classmethod
    def from_folder(cls, root: Path | str, split: str = "train", **kwargs) -> "ChipDataset":
        """Validate and load ``root``'s ``split`` in the competition layout."""
        return cls(validate_split(root, split, load=True), **kwargs)

    @property
    def has_labels(self) -> bool:
        return self.split.has_labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        chip_id = self.ids[index]
        image = self.split.image(chip_id)
        mask = self.split.mask(chip_id) if self.has_labels else None
        if self.transform is not None:
            image, mask = apply_transform(self.transform, image, mask)
        sample = {"chip_id": chip_id, "image": torch.from_numpy(self.normalization(image))}
        if mask is not None:
            sample["mask"] = torch.from_numpy(mask.astype(np.float32)[None])
        return sample
