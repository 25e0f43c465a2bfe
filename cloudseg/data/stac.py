"""``cloudseg add-bands``: write supplementary bands (``<chip>/<band>.tif``) beside a split's four, from a STAC API.

The search, the choice of item and the windowed read live in ``cloudseg/submission/stac_bands.py``, the same file
a submission's ``main.py`` uses at inference, so training and the runtime see the same pixels for a chip.

Parallel (threads: the work is waiting on HTTP and GDAL, which release the GIL) and resumable: a chip whose band
file passes validation's header check (one 512 x 512 band of an allowed dtype, last pixel decodable) is skipped; files are written under a temporary name and renamed,
so an interrupted run leaves no half-written band. Chips that could not be done are listed, with the reason, in
``<data>/add_bands_<split>_failed.csv``; the command then fails naming how many and where the list is.
"""

from __future__ import annotations

import csv
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cloudseg.data.bands import BANDS, band_dtypes, parse_bands
from cloudseg.data.io import ChipReadError, chip_folders, features_dir, load_metadata
from cloudseg.data.validate import check_tif
from cloudseg.submission.stac_bands import (
    DEFAULT_COLLECTION,
    PLANETARY_COMPUTER,
    ChipGrid,
    FetchError,
    StacBands,
    chip_grid,
    parse_time,
)


class AddBandsError(RuntimeError):
    """Bad arguments or data for add-bands (the message names the value or file)."""


@dataclass
class AddBandsResult:
    done: list[str] = field(default_factory=list)  # chips whose bands were written now
    skipped: list[str] = field(default_factory=list)  # chips that already had every band
    failed: dict[str, str] = field(default_factory=dict)  # chip -> reason
    items: dict[str, str] = field(default_factory=dict)  # chip -> STAC item id used
    seconds: float = 0.0
    report: Path | None = None

    @property
    def seconds_per_chip(self) -> float:
        return self.seconds / max(len(self.done), 1)


def report_path(root: Path, split: str) -> Path:
    return Path(root) / f"add_bands_{split}_failed.csv"


def write_band(path: Path, array: np.ndarray, grid: ChipGrid) -> None:
    """Write ``array`` on the chip's grid (its CRS and transform), atomically."""
    import rasterio

    if array.dtype.name not in band_dtypes(path.stem):
        raise FetchError(f"asset dtype {array.dtype} is neither uint16 (reflectance) nor uint8 (classes)")
    tmp = path.with_name(path.name + ".partial")
    profile = dict(driver="GTiff", height=array.shape[0], width=array.shape[1], count=1, dtype=array.dtype.name,
                   crs=grid.crs, transform=grid.transform, compress="deflate", tiled=True, blockxsize=256,
                   blockysize=256)
    with rasterio.open(tmp, "w", **profile) as dst:
        dst.write(array, 1)
    tmp.replace(path)


def add_bands(root: Path | str, bands: str | list[str], split: str = "train", stac: str = PLANETARY_COMPUTER,
              collection: str = DEFAULT_COLLECTION, workers: int = 8, timeout_s: float | None = None,
              progress: bool = True) -> AddBandsResult:
    """Fetch ``bands`` for every chip of ``root``'s ``split`` (see the module docstring).

    Raises:
        AddBandsError: no such split, a band that is one of the four, or a chip without a datetime.
    """
    root = Path(root)
    wanted = parse_bands(bands) if isinstance(bands, str) else tuple(bands)
    core = [b for b in wanted if b in BANDS]
    if core:
        raise AddBandsError(f"--bands {','.join(wanted)}: {core} are already in every chip; name supplementary "
                            "bands only (e.g. B11,SCL)")
    feats = features_dir(root, split)
    if not feats.is_dir():
        raise AddBandsError(f"{feats}: features folder is missing (is --data the folder holding {split}_features?)")
    try:
        meta = load_metadata(root, split)
    except ChipReadError as exc:
        raise AddBandsError(str(exc)) from None
    if "datetime" not in meta.columns:
        raise AddBandsError(f"{root / f'{split}_metadata.csv'}: no datetime column, so no acquisition can be "
                            "matched")
    when = dict(zip(meta["chip_id"], meta["datetime"]))
    chips = [c for c in chip_folders(feats) if c in when]
    fetcher = StacBands(stac, collection, **({"timeout_s": timeout_s} if timeout_s else {}))
    result = AddBandsResult()

    def one(chip: str) -> tuple[str, str, str]:
        folder = feats / chip
        todo = [b for b in wanted if check_tif(folder / f"{b}.tif", band_dtypes(b))]
        if not todo:
            return chip, "skipped", ""
        try:
            grid = chip_grid(folder / f"{BANDS[0]}.tif")
            arrays, item = fetcher.fetch(grid, parse_time(when[chip]), todo)
            for band, array in arrays.items():
                write_band(folder / f"{band}.tif", array, grid)
            return chip, "done", item
        except FetchError as exc:
            return chip, "failed", str(exc)
        except Exception as exc:  # an unreadable chip file, a full disk: listed like a fetch failure
            return chip, "failed", f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"

    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max(1, int(workers)), thread_name_prefix="add-bands") as pool:
        bar = tqdm(pool.map(one, chips), total=len(chips), desc=f"add-bands {','.join(wanted)}", unit="chip",
                   disable=not progress)
        for chip, status, detail in bar:
            if status == "done":
                result.done.append(chip)
                result.items[chip] = detail
            elif status == "skipped":
                result.skipped.append(chip)
            else:
                result.failed[chip] = detail
    result.seconds = time.perf_counter() - t0

    report = report_path(root, split)
    if result.failed:
        with open(report, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["chip_id", "bands", "reason"])
            for chip in sorted(result.failed):
                w.writerow([chip, ",".join(wanted), result.failed[chip]])
        result.report = report
    elif report.is_file():
        report.unlink()  # an earlier run's failures are all done now
    _record(root, split, wanted, stac, collection, result)
    return result


def _record(root: Path, split: str, bands: tuple[str, ...], stac: str, collection: str,
            result: AddBandsResult) -> None:
    """Where each split's supplementary bands came from, in ``<data>/add_bands.json``."""
    path = root / "add_bands.json"
    try:
        record = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        record = {}
    entry = record.setdefault(split, {})
    for band in bands:
        entry[band] = {"stac": stac, "collection": collection,
                       "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "chips_written": len(result.done), "chips_failed": len(result.failed)}
    try:
        path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    except OSError:
        pass
