"""The competition metric: sum of intersections over sum of unions over all chips (not a mean of per-chip scores)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


class EmptyUnionError(ValueError):
    """Raised when predictions and labels are empty everywhere: the metric is undefined (0/0)."""


class ScoreError(ValueError):
    """A prediction or label folder cannot be scored; the message names the file and the problem."""


def intersection_union(pred: np.ndarray, label: np.ndarray) -> tuple[int, int]:
    """Pixel counts |pred AND label| and |pred OR label| of one chip. Shape: (H, W) each, values {0, 1}."""
    if pred.shape != label.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from label shape {label.shape}")
    p, t = pred.astype(bool), label.astype(bool)
    return int(np.logical_and(p, t).sum()), int(np.logical_or(p, t).sum())


def pooled_jaccard(intersections, unions) -> float:
    """Sum of intersections over sum of unions. Raises EmptyUnionError when the total union is 0."""
    inter, union = int(np.sum(intersections)), int(np.sum(unions))
    if union == 0:
        raise EmptyUnionError(
            "the total union is 0 (no cloud in any prediction or label): the Jaccard index is undefined"
        )
    return inter / union


class JaccardAccumulator:
    """Collects per-chip intersections and unions; scores pooled, per chip and per location."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, int, int]] = []

    def add(self, chip_id: str, pred: np.ndarray, label: np.ndarray) -> None:
        self.rows.append((chip_id, *intersection_union(pred, label)))

    def add_counts(self, chip_id: str, intersection: int, union: int) -> None:
        self.rows.append((chip_id, int(intersection), int(union)))

    def __len__(self) -> int:
        return len(self.rows)

    def score(self, ids: set[str] | None = None) -> float:
        rows = [r for r in self.rows if ids is None or r[0] in ids]
        return pooled_jaccard([r[1] for r in rows], [r[2] for r in rows])

    def per_chip(self) -> pd.DataFrame:
        """One row per chip: chip_id, intersection, union, jaccard (NaN when that chip's union is 0)."""
        df = pd.DataFrame(self.rows, columns=["chip_id", "intersection", "union"])
        df["jaccard"] = (df["intersection"] / df["union"].where(df["union"] > 0)).astype(float)
        return df

    def by_location(self, metadata: pd.DataFrame) -> pd.DataFrame:
        """Pooled Jaccard per location. ``metadata`` maps chip_id (column or index) to location."""
        meta = metadata.set_index("chip_id") if "chip_id" in metadata.columns else metadata
        df = self.per_chip()
        unknown = sorted(set(df["chip_id"]) - set(meta.index))
        if unknown:
            raise ValueError(f"chip ids missing from the metadata: {unknown[:10]}")
        df["location"] = meta.loc[df["chip_id"], "location"].to_numpy()
        g = df.groupby("location")[["intersection", "union"]].sum()
        g["chips"] = df.groupby("location").size()
        g["jaccard"] = (g["intersection"] / g["union"].where(g["union"] > 0)).astype(float)
        return g.reset_index()


class ThresholdSweep:
    """Pooled Jaccard for many thresholds at once, from histograms of predicted probabilities.

    Each pixel's probability is binned once; a threshold t counts pixels with p >= t as cloud.
    """

    def __init__(self, bins: int = 100) -> None:
        self.bins = bins
        self.pos = np.zeros(bins + 1, dtype=np.int64)  # labelled cloud
        self.neg = np.zeros(bins + 1, dtype=np.int64)  # labelled clear

    def update(self, probs: np.ndarray, labels: np.ndarray) -> None:
        """Shape: probs and labels of the same shape; probs in [0, 1], labels {0, 1}."""
        idx = np.clip(np.floor(np.asarray(probs, dtype=np.float64) * self.bins), 0, self.bins).astype(np.int64)
        lab = np.asarray(labels).astype(bool)
        self.pos += np.bincount(idx[lab], minlength=self.bins + 1)
        self.neg += np.bincount(idx[~lab], minlength=self.bins + 1)

    def thresholds(self) -> np.ndarray:
        return np.arange(1, self.bins) / self.bins

    def jaccards(self) -> np.ndarray:
        """Pooled Jaccard at each of ``thresholds()`` (NaN where the union is 0)."""
        pos_at_or_above = np.cumsum(self.pos[::-1])[::-1]
        neg_at_or_above = np.cumsum(self.neg[::-1])[::-1]
        k = np.arange(1, self.bins)
        inter = pos_at_or_above[k]
        union = self.pos.sum() + neg_at_or_above[k]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, inter / np.maximum(union, 1), np.nan)

    def best(self) -> tuple[float, float]:
        """(threshold, jaccard) maximising the pooled Jaccard; ties go to the threshold closest to 0.5."""
        j = self.jaccards()
        if np.all(np.isnan(j)):
            raise EmptyUnionError("no cloud in any label or prediction: no threshold can be chosen")
        t = self.thresholds()
        best = np.nanmax(j)
        cands = np.flatnonzero(j >= best - 1e-12)
        i = cands[np.argmin(np.abs(t[cands] - 0.5))]
        return float(t[i]), float(j[i])


def _nodata(path: Path) -> float | None:
    import rasterio

    try:
        with rasterio.open(path) as src:
            return src.nodata
    except Exception:  # read_band opened it a moment ago; a nodata note is only a hint
        return None


def score_folders(pred_dir: Path | str, label_dir: Path | str) -> JaccardAccumulator:
    """Score ``<pred_dir>/<id>.tif`` against ``<label_dir>/<id>.tif`` for every label.

    Raises:
        ScoreError: a folder missing or without labels, a prediction missing, a file unreadable (truncated, more
            than one band), shapes that differ, or values other than 0/1 in a prediction or a label (a label's
            nodata value included: the competition metric counts every pixel). The message names the file.
    """
    from cloudseg.data.io import ChipReadError, read_band

    pred_dir, label_dir = Path(pred_dir), Path(label_dir)
    for what, folder in (("prediction", pred_dir), ("label", label_dir)):
        if not folder.is_dir():
            raise ScoreError(f"{folder}: {what} folder does not exist" if not folder.exists()
                             else f"{folder}: not a folder (give the {what} folder)")
    labels = sorted(p for p in label_dir.glob("*.tif") if not p.name.startswith("."))
    if not labels:
        raise ScoreError(f"{label_dir}: no label .tif files in it")
    missing = [p.name for p in labels if not (pred_dir / p.name).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more of {len(labels)})" if len(missing) > 1 else ""
        raise ScoreError(f"{pred_dir / missing[0]}: prediction missing{more}")
    acc = JaccardAccumulator()
    for lab_path in labels:
        pred_path = pred_dir / lab_path.name
        try:
            pred, label = read_band(pred_path), read_band(lab_path)
        except ChipReadError as exc:
            raise ScoreError(str(exc)) from exc
        if pred.shape != label.shape:
            raise ScoreError(f"{pred_path}: shape {pred.shape} differs from its label's {label.shape} ({lab_path})")
        for path, arr, what in ((pred_path, pred, "prediction"), (lab_path, label, "label")):
            bad = np.setdiff1d(np.unique(arr), [0, 1])
            if bad.size:
                nodata = _nodata(path)
                note = ""
                if nodata is not None and np.isin(bad, [nodata]).any():
                    note = (f" ({nodata:g} is the file's nodata: the competition metric counts every pixel, so "
                            "fill those pixels or leave the chip out)")
                raise ScoreError(f"{path}: {what} values {bad[:5].tolist()} are not 0/1{note}")
        acc.add(lab_path.stem, pred, label)
    return acc
