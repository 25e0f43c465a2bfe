"""Check a split before any training starts, and report every problem at once, naming each file."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cloudseg.data.io import (
    BANDS,
    CHIP_SIZE,
    band_dtypes,
    ChipReadError,
    chip_folders,
    features_dir,
    labels_dir,
    load_metadata,
    read_band,
    read_chip,
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
    images: dict[str, np.ndarray] = field(default_factory=dict)  # id -> (len(bands), H, W) uint16
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # id -> (H, W) uint8
    mixed_ids: list[str] = field(default_factory=list)  # chips merged in from another dataset, for training only
    origin: dict[str, tuple[Path, str, str]] = field(default_factory=dict)  # merged id -> (root, split, own id)
    bands: tuple[str, ...] = BANDS  # the band files read for each chip, in this order

    @property
    def in_memory(self) -> bool:
        """Whether every chip's arrays are held (``load=True``) rather than read from disk on demand."""
        return len(self.images) == len(self.ids)

    def paths(self, chip_id: str) -> tuple[Path, Path]:
        """(features folder, label file) of a chip, wherever it came from."""
        root, split, own = self.origin.get(chip_id, (self.root, self.split, chip_id))
        return features_dir(root, split) / own, labels_dir(root, split) / f"{own}.tif"

    def image(self, chip_id: str) -> np.ndarray:
        """The chip's bands, from memory or read now. Shape: (len(bands), H, W), uint16."""
        if chip_id in self.images:
            return self.images[chip_id]
        return read_chip(self.paths(chip_id)[0], self.bands)

    def mask(self, chip_id: str) -> np.ndarray:
        """The chip's label, from memory or read now (refused unless binary). Shape: (H, W), uint8."""
        if chip_id in self.masks:
            return self.masks[chip_id]
        path = self.paths(chip_id)[1]
        lab = read_band(path)
        if lab.max(initial=0) > 1:
            raise ChipReadError(f"{path}: label is not binary (found {int(lab.max())})")
        return lab

    @property
    def own_ids(self) -> list[str]:
        """The split's own chips (``ids`` without those merged in from another dataset)."""
        mixed = set(self.mixed_ids)
        return [c for c in self.ids if c not in mixed]


def _check_array(path: Path, arr: np.ndarray, dtypes: tuple[str, ...], size: int, problems: list[str]) -> bool:
    ok = True
    if arr.shape != (size, size):
        problems.append(f"{path}: wrong shape {arr.shape[0]}x{arr.shape[1]}, expected {size}x{size}")
        ok = False
    if arr.dtype.name not in dtypes:
        problems.append(f"{path}: wrong dtype {arr.dtype}, expected {' or '.join(dtypes)}")
        ok = False
    return ok


def check_tif(path: Path, dtypes: tuple[str, ...], size: int = CHIP_SIZE) -> list[str]:
    """Problems of one single-band TIF from its header (band count, shape, dtype one of ``dtypes``), plus its last
    pixel (a truncated file fails to decode it); [] for a complete file."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning
    from rasterio.windows import Window
    import warnings

    if not path.is_file():
        return [f"{path}: {'label file' if dtypes == ('uint8',) else 'file'} is missing"]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                problems = []
                if src.count != 1:
                    problems.append(f"{path}: expected 1 band, found {src.count}")
                if (src.height, src.width) != (size, size):
                    problems.append(f"{path}: wrong shape {src.height}x{src.width}, expected {size}x{size}")
                if src.dtypes[0] not in dtypes:
                    problems.append(f"{path}: wrong dtype {src.dtypes[0]}, expected {' or '.join(dtypes)}")
                if not problems:
                    src.read(1, window=Window(src.width - 1, src.height - 1, 1, 1))
                return problems
    except Exception as exc:  # rasterio raises several types for truncated or corrupt files
        return [f"{path}: unreadable or truncated TIF ({exc})"]


def _files(feats: Path, labs: Path, ids: list[str], has_labels: bool,
           bands: tuple[str, ...] = BANDS) -> list[tuple[Path, tuple[str, ...]]]:
    out = [(feats / c / f"{b}.tif", band_dtypes(b)) for c in ids for b in bands]
    if has_labels:
        out += [(labs / f"{c}.tif", ("uint8",)) for c in ids]
    return out


def _missing_band_hint(root: Path, split: str, ids: list[str], bands: tuple[str, ...]) -> list[str]:
    """One more line where supplementary band files are missing: the command that fetches them."""
    extra = [b for b in bands if b not in BANDS]
    feats = features_dir(root, split)
    missing = [(c, b) for c in ids for b in extra if not (feats / c / f"{b}.tif").is_file()]
    if not missing:
        return []
    lacking = ",".join(b for b in extra if b in {b for _, b in missing})
    return [f"{len({c for c, _ in missing})} chip(s) lack supplementary band(s) {lacking}: "
            f"`cloudseg add-bands --data {root} --bands {lacking} --split {split}` fetches them from a STAC API"]


def _stat_key(root: Path, split: str, files: list[tuple[Path, tuple[str, ...]]], size: int) -> str:
    """What a header check depends on: the files' chip folders and names, sizes and modification times, and the
    chip size (a renamed chip is another split)."""
    h = hashlib.sha256(f"{root.resolve()}:{split}:{size}".encode())
    for path, _ in files:
        try:
            st = path.stat()
            h.update(f"{path.parent.name}/{path.name}:{st.st_size}:{st.st_mtime_ns};".encode())
        except OSError:
            h.update(f"{path.parent.name}/{path.name}:missing;".encode())
    return h.hexdigest()[:24]


def _header_cache() -> Path:
    from cloudseg.paths import REPO_ROOT

    return Path(os.environ.get("CLOUDSEG_CACHE", REPO_ROOT / ".cache")) / "validated"


def check_headers(root: Path, split: str, ids: list[str], has_labels: bool, size: int = CHIP_SIZE,
                  workers: int = 16, bands: tuple[str, ...] = BANDS) -> list[str]:
    """Every band and label file's header (names, sizes, shapes, dtypes) and last pixel, read in parallel; a
    split that passed is remembered by its files' sizes and times, so the next run start checks nothing."""
    files = _files(features_dir(root, split), labels_dir(root, split), ids, has_labels, bands)
    key = _stat_key(root, split, files, size)
    marker = _header_cache() / f"{key}.json"
    if marker.is_file():
        return []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        problems = [p for ps in pool.map(lambda f: check_tif(f[0], f[1], size), files) for p in ps]
    if not problems:
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps({"root": str(root), "split": split, "chips": len(ids)}))
        except OSError:  # a read-only checkout: no cache, same result
            pass
    return problems


def validate_split(
    root: Path | str,
    split: str = "train",
    labels: bool | None = None,
    load: bool = False,
    size: int = CHIP_SIZE,
    deep: bool = True,
    bands: tuple[str, ...] = BANDS,
) -> ValidatedSplit:
    """Validate ``<split>_features``, ``<split>_labels`` and ``<split>_metadata.csv`` under ``root``.

    ``deep`` (or ``load``) decodes every file, so truncated TIFs and non-binary labels are caught here rather than
    in the middle of an epoch; ``deep=False`` checks each file's header and last pixel in parallel (``check_headers``,
    cached), which is what a run start on the full dataset can afford.

    Args:
        root: Folder holding the competition layout.
        split: ``train`` or ``test`` (any prefix works).
        labels: Require labels (True), forbid checking them (False) or use them when the folder exists (None).
        load: Keep the decoded arrays in the result, so a run decodes each chip once.
        size: Expected chip height and width.
        deep: Decode every pixel (else headers only).
        bands: The band files every chip must have (supplementary ones: ``cloudseg add-bands``).

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
    if not meta_ids:
        problems.append(f"{root / f'{split}_metadata.csv'}: no chips (the metadata has a header and no rows)")
    bands = tuple(bands)
    out = ValidatedSplit(root, split, meta.drop_duplicates("chip_id").set_index("chip_id").loc[ids], ids, has_labels,
                         bands=bands)
    if not (deep or load):
        problems += check_headers(root, split, ids, has_labels, size, bands=bands)
        if problems:
            raise DatasetError(root, split, problems + _missing_band_hint(root, split, ids, bands))
        return out
    for chip_id in ids:
        arrays = []
        for band in bands:
            path = feats / chip_id / f"{band}.tif"
            try:
                arr = read_band(path)
            except ChipReadError as exc:
                problems.append(str(exc))
                continue
            if _check_array(path, arr, band_dtypes(band), size, problems):
                arrays.append(arr)
        if load and len(arrays) == len(bands):
            out.images[chip_id] = np.stack(arrays).astype(np.uint16, copy=False)
        if has_labels:
            path = labs / f"{chip_id}.tif"
            try:
                lab = read_band(path)
            except ChipReadError as exc:
                problems.append(str(exc).replace("file is missing", "label file is missing"))
                continue
            if _check_array(path, lab, ("uint8",), size, problems):
                bad = np.setdiff1d(np.unique(lab), [0, 1])
                if bad.size:
                    problems.append(f"{path}: label is not binary, found values {bad[:10].tolist()} besides 0/1")
                elif load:
                    out.masks[chip_id] = lab
    if problems:
        raise DatasetError(root, split, problems + _missing_band_hint(root, split, ids, bands))
    return out
