"""A torch Dataset over validated chips: held in memory where the split was loaded, else read from disk on demand
(one chip at a time, in the DataLoader's workers), so memory stays O(batch) whatever the split's size."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, get_worker_info

from cloudseg.data.transforms import Normalization, apply_transform, worker_seed
from cloudseg.data.validate import ValidatedSplit, validate_split


class ChipDataset(Dataset):
    """Samples ``{"chip_id": str, "image": float32 (4, H, W), "mask": float32 (1, H, W)}``; no mask without labels.

    Args:
        split: A ``ValidatedSplit``: loaded (``load=True``, arrays shared by every fold) or not (chips read from
            disk each time they are drawn).
        ids: The chip ids this dataset serves (defaults to all of the split).
        transform: albumentations transform applied to image and mask together (before normalisation).
        normalization: uint16 -> float32 mapping.
        augment_seed: ``(config seed, rank)``. In a DataLoader worker, given ``(index, epoch)`` pairs (an
            ``EpochSampler``), the transform is reseeded from (seed, rank, epoch, worker id) at the worker's first
            chip of each epoch. In the main process the transform keeps drawing from its own generators.
    """

    def __init__(
        self,
        split: ValidatedSplit,
        ids: list[str] | None = None,
        transform: Callable | None = None,
        normalization: Normalization | None = None,
        augment_seed: tuple[int, int] | None = None,
    ):
        self.split = split
        self.ids = list(split.ids if ids is None else ids)
        known = set(split.ids)
        unknown = [c for c in self.ids if c not in known]
        if unknown:
            raise KeyError(f"chip ids not in {split.root} ({split.split}): {unknown[:10]}")
        self.transform = transform
        self.normalization = normalization or Normalization()
        self.augment_seed = augment_seed
        self._seeded: tuple[int, int] | None = None  # (epoch, worker id) the transform was last seeded for

    @classmethod
    def from_folder(cls, root: Path | str, split: str = "train", **kwargs) -> "ChipDataset":
        """Validate and load ``root``'s ``split`` in the competition layout."""
        return cls(validate_split(root, split, load=True), **kwargs)

    @property
    def has_labels(self) -> bool:
        return self.split.has_labels

    def __len__(self) -> int:
        return len(self.ids)

    def _seed_worker(self, epoch: int) -> None:
        info = get_worker_info()
        if info is None or self.transform is None or self.augment_seed is None:
            return
        if self._seeded != (epoch, info.id):
            self.transform.set_random_seed(worker_seed(*self.augment_seed, epoch, info.id))
            self._seeded = (epoch, info.id)

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        if isinstance(index, tuple):  # (index, epoch) from an EpochSampler
            index, epoch = index
            self._seed_worker(epoch)
        chip_id = self.ids[index]
        image = self.split.image(chip_id)
        mask = self.split.mask(chip_id) if self.has_labels else None
        if self.transform is not None:
            image, mask = apply_transform(self.transform, image, mask)
        sample = {"chip_id": chip_id, "image": torch.from_numpy(self.normalization(image))}
        if mask is not None:
            sample["mask"] = torch.from_numpy(mask.astype(np.float32)[None])
        return sample


class EpochSampler(Sampler):
    """Another sampler's indices, each paired with the epoch: ``(index, epoch)``. The epoch travels with every
    index into the DataLoader's workers (persistent ones included), where ``ChipDataset`` reseeds its
    augmentation for it; no state is shared between processes."""

    def __init__(self, base: Sampler):
        self.base, self.epoch = base, 0

    def set_epoch(self, epoch: int) -> None:
        """Call before iterating an epoch's loader."""
        self.epoch = epoch

    def __iter__(self):
        epoch = self.epoch
        for index in self.base:
            yield index, epoch

    def __len__(self) -> int:
        return len(self.base)
