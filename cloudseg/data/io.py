"""Reading and writing chips in the competition layout.

Layout (training release and runtime alike)::

    <split>_features/<chip_id>/B02.tif B03.tif B04.tif B08.tif   512x512 uint16, reflectance x 10,000
    <split>_labels/<chip_id>.tif                                 512x512 uint8, 1 = cloud
    <split>_metadata.csv                                         chip_id,location,datetime,cloudpath
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import rasterio
from affine import Affine
from rasterio.errors import NotGeoreferencedWarning

from cloudseg.data.bands import BANDS, band_dtypes, parse_bands  # noqa: F401 (re-exported)

# GDAL lists a file's folder on every open to look for sidecar files (.aux.xml, .ovr) that chips never have: a
# fifth of the time of reading a chip's four bands. Users who rely on sidecars can set the variable themselves.
os.environ.setdefault("GDAL_DISABLE_READDIR_ON_OPEN", "EMPTY_DIR")
CHIP_SIZE = 512
METADATA_COLUMNS = ("chip_id", "location", "datetime", "cloudpath")


class ChipReadError(RuntimeError):
    """A chip or label file is missing, unreadable or malformed. The message names the file."""


def features_dir(root: Path | str, split: str) -> Path:
    return Path(root) / f"{split}_features"


def labels_dir(root: Path | str, split: str) -> Path:
    return Path(root) / f"{split}_labels"


def metadata_path(root: Path | str, split: str) -> Path:
    return Path(root) / f"{split}_metadata.csv"


def chip_folders(features: Path | str) -> list[str]:
    """Chip ids under a features folder, sorted. Entries starting with '.' and plain files are not chips."""
    features = Path(features)
    return sorted(p.name for p in features.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_band(path: Path | str) -> np.ndarray:
    """Read a single-band GeoTIFF fully.

    Raises:
        ChipReadError: missing, unreadable or truncated file, or more than one band.
    """
    path = Path(path)
    if not path.is_file():
        raise ChipReadError(f"{path}: file is missing")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)  # predictions written by PIL carry no CRS
            src = rasterio.open(path)
        with src:
            if src.count != 1:
                raise ChipReadError(f"{path}: expected 1 band, found {src.count}")
            return src.read(1)
    except ChipReadError:
        raise
    except Exception as exc:  # rasterio raises several types for truncated or corrupt files
        raise ChipReadError(f"{path}: unreadable or truncated TIF ({exc})") from exc


def read_chip(folder: Path | str, bands: tuple[str, ...] = BANDS) -> np.ndarray:
    """Read a chip's bands.

    Returns:
        Array of the raw uint16 reflectance x 10,000. Shape: (len(bands), H, W).
    """
    folder = Path(folder)
    arrays = [read_band(folder / f"{b}.tif") for b in bands]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ChipReadError(f"{folder}: bands have different shapes {sorted(shapes)}")
    return np.stack(arrays).astype(np.uint16, copy=False)  # a uint8 class band (SCL) joins as uint16


def read_label(path: Path | str) -> np.ndarray:
    """Read a label (1 = cloud). Shape: (H, W), uint8."""
    return read_band(path)


def load_metadata(root: Path | str, split: str) -> pd.DataFrame:
    """Read ``<split>_metadata.csv`` (chip_id, location, datetime, ...) as strings."""
    path = metadata_path(root, split)
    if not path.is_file():
        raise ChipReadError(f"{path}: metadata file is missing")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except pd.errors.EmptyDataError:
        raise ChipReadError(f"{path}: metadata file is empty; expected a header {list(METADATA_COLUMNS)} and a "
                            "row per chip") from None
    except UnicodeDecodeError as exc:
        raise ChipReadError(f"{path}: metadata file is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except pd.errors.ParserError as exc:
        raise ChipReadError(f"{path}: not a readable CSV ({' '.join(str(exc).split())})") from None
    missing = [c for c in ("chip_id", "location") if c not in df.columns]
    if missing:
        raise ChipReadError(f"{path}: missing column(s) {missing}; expected {list(METADATA_COLUMNS)}")
    return df


def write_tif(path: Path | str, array: np.ndarray, transform=None, crs: str | None = "EPSG:32736") -> None:
    """Write one band as a tiled, deflate-compressed GeoTIFF (as the competition's files are)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if transform is None:
        transform = Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 9000000.0)  # 10 m pixels, north up
    profile = dict(
        driver="GTiff", height=array.shape[0], width=array.shape[1], count=1, dtype=array.dtype.name,
        crs=crs, transform=transform, compress="deflate",
    )
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array, 1)
