"""What the notebooks share: a sample of chips, cloud fractions, band statistics, false-positive classes.

Figures live in ``cloudseg.plots``; MLflow stays in ``cloudseg.tracking`` and the notebooks themselves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cloudseg.data.io import BANDS, features_dir, labels_dir, read_chip, read_label
from cloudseg.data.sources import SUSPECT_LIST, resolve_data, suspect_list
from cloudseg.data.splits import read_id_list

FP_CLASSES: tuple[str, ...] = ("bright ground", "water", "haze/other")
# MLflow metrics renamed so that no metric shares a name with a param: new name -> the name runs logged before
RENAMED_METRICS: dict[str, str] = {"lr_now": "lr", "threshold_tuned": "threshold"}


def run_metric(metrics: Mapping[str, float], name: str) -> float | None:
    """A run's metric ``name`` (``run.data.metrics``), read under its old name for runs logged before a rename
    (``RENAMED_METRICS``); None when the run has neither."""
    if name in metrics:
        return float(metrics[name])
    old = RENAMED_METRICS.get(name)
    return float(metrics[old]) if old is not None and old in metrics else None


def metric_column(runs: pd.DataFrame, name: str) -> pd.Series | None:
    """Column ``metrics.<name>`` of ``mlflow.search_runs``'s table, filled from the old name's column for runs
    logged before a rename (``RENAMED_METRICS``); None when the table has neither."""
    new, old = f"metrics.{name}", f"metrics.{RENAMED_METRICS.get(name, name)}"
    if new in runs.columns and old in runs.columns and old != new:
        return runs[new].fillna(runs[old]).rename(new)
    for col in (new, old):
        if col in runs.columns:
            return runs[col].rename(new)
    return None


def show(fig, dpi: int = 90) -> None:
    """Display a matplotlib Figure in Jupyter as a PNG.

    Figures built with ``matplotlib.figure.Figure`` are not known to pyplot, so Jupyter would print their repr
    instead of drawing them whatever the backend; a PNG shows everywhere, including nbclient runs.
    """
    import io

    from IPython.display import Image, display

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    display(Image(data=buf.getvalue(), format="png"))


def data_root(data: str | Path | None) -> Path:
    """A data folder from the words the config's ``data`` key takes (``cloudseg.data.sources.resolve_data``)."""
    return resolve_data(data)


def sample_ids(ids: Sequence[str], max_chips: int, seed: int = 0) -> list[str]:
    """At most ``max_chips`` of ``ids`` (a seeded random choice when there are more), in their given order."""
    ids = list(ids)
    if max_chips <= 0 or len(ids) <= max_chips:
        return ids
    keep = np.random.default_rng(seed).choice(len(ids), size=max_chips, replace=False)
    return [ids[i] for i in sorted(keep)]


def load_chips(
    root: Path | str, split: str, ids: Sequence[str], labels: bool = True
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Read chips (and their labels) of ``<root>/<split>_features``.

    Returns:
        (images, masks): id -> (4, H, W) uint16 and id -> (H, W) uint8; ``masks`` is empty without labels.

    Raises:
        cloudseg.data.io.ChipReadError: a missing or unreadable file, named in the message.
    """
    images = {c: read_chip(features_dir(root, split) / c) for c in ids}
    masks = {c: read_label(labels_dir(root, split) / f"{c}.tif") for c in ids} if labels else {}
    return images, masks


def cloud_fractions(masks: Mapping[str, np.ndarray]) -> pd.Series:
    """Share of cloud pixels per chip, indexed by chip id."""
    fractions = {c: float(np.asarray(m).astype(bool).mean()) for c, m in masks.items()}
    return pd.Series(fractions, name="cloud_fraction", dtype=float)


def spread_ids(values: pd.Series, k: int) -> list[str]:
    """``k`` ids whose values are spread evenly from the lowest to the highest (e.g. a gallery from clear to
    overcast)."""
    ordered = values.sort_values(kind="stable")
    if k >= len(ordered):
        return list(ordered.index)
    picks = np.unique(np.round(np.linspace(0, len(ordered) - 1, k)).astype(int))
    return [ordered.index[i] for i in picks]


def chips_per_location_date(metadata: pd.DataFrame) -> pd.DataFrame:
    """Chips per location (rows) and acquisition date (columns) plus a ``total`` column, largest first."""
    if "datetime" in metadata:
        dates = metadata["datetime"].astype(str).str[:10]
    else:
        dates = pd.Series("?", index=metadata.index)
    table = pd.crosstab(metadata["location"], dates.rename("date"))
    table["total"] = table.sum(axis=1)
    return table.sort_values("total", ascending=False)


def band_statistics(
    images: Sequence[np.ndarray], masks: Sequence[np.ndarray], band_names: Sequence[str] = BANDS
) -> pd.DataFrame:
    """Reflectance statistics of cloud and of clear pixels per band (no-data pixels, all bands 0, left out).

    Exact: each band's uint16 values are counted per class, so medians and percentiles need no pixel copies.

    Returns:
        One row per (band, class) with ``pixels``, ``mean``, ``p05``, ``median``, ``p95`` in reflectance
        (DN / 10,000); NaN for a class without pixels.
    """
    if len(images) != len(masks):
        raise ValueError(f"got {len(images)} images and {len(masks)} masks; need one mask per image")
    n = len(band_names)
    counts = np.zeros((2, n, 65536), dtype=np.int64)  # [clear, cloud] x band x DN
    for image, mask in zip(images, masks):
        image, mask = np.asarray(image), np.asarray(mask).astype(bool)
        valid = np.any(image[:n] > 0, axis=0)
        for cls, sel in enumerate((valid & ~mask, valid & mask)):
            for b in range(n):
                counts[cls, b] += np.bincount(image[b][sel].astype(np.int64), minlength=65536)
    rows = []
    dn = np.arange(65536, dtype=np.float64)
    for b, band in enumerate(band_names):
        for cls, name in ((1, "cloud"), (0, "clear")):
            c = counts[cls, b]
            total = int(c.sum())
            row = {"band": band, "class": name, "pixels": total}
            if total:
                cum = np.cumsum(c)
                q = {k: float(np.searchsorted(cum, p * total, side="left")) for k, p in
                     (("p05", 0.05), ("median", 0.5), ("p95", 0.95))}
                row.update(mean=float((c * dn).sum() / total) / 1e4, **{k: v / 1e4 for k, v in q.items()})
            else:
                row.update(mean=np.nan, p05=np.nan, median=np.nan, p95=np.nan)
            rows.append(row)
    return pd.DataFrame(rows, columns=["band", "class", "pixels", "mean", "p05", "median", "p95"])


def label_consistency(
    image: np.ndarray, mask: np.ndarray, dark_dn: float = 1000.0, bright_dn: float = 3000.0
) -> dict[str, float]:
    """Crude checks of a label against the pixels under it (no-data pixels, all bands 0, left out).

    - ``cloud_but_dark``: share of cloud-labeled pixels dark in blue (B02 < ``dark_dn``); clouds thick enough
      to label are bright in blue, so a large share points at a wrong label (or at shadow labeled cloud);
    - ``clear_but_bright``: share of clear-labeled pixels bright in every visible band (min of B02, B03, B04
      >= ``bright_dn``): unlabeled cloud, or bright ground.

    Shape: image (4, H, W) reflectance x 10,000; mask (H, W). Returns NaN for a class without pixels.
    """
    image, mask = np.asarray(image), np.asarray(mask).astype(bool)
    valid = np.any(image > 0, axis=0)
    cloud, clear = valid & mask, valid & ~mask
    dark = image[0] < dark_dn
    bright = image[:3].min(axis=0) >= bright_dn
    return {
        "cloud_but_dark": float((dark & cloud).sum() / cloud.sum()) if cloud.any() else float("nan"),
        "clear_but_bright": float((bright & clear).sum() / clear.sum()) if clear.any() else float("nan"),
    }


def suspect_ids(root: Path | str) -> set[str] | None:
    """Ids of ``<root>/reference/suspect_label_ids.txt`` (the real sample has it), or None where absent."""
    path = suspect_list(root)
    return read_id_list(path) if path.is_file() else None


def classify_false_positives(
    image: np.ndarray,
    pred: np.ndarray,
    label: np.ndarray,
    bright_dn: float = 2000.0,
    water_nir_dn: float = 1000.0,
) -> dict[str, int]:
    """Count false-positive pixels (predicted cloud, labeled clear) by a simple spectral rule.

    - water: NIR below red and dark in NIR (``B08 < B04`` and ``B08 < water_nir_dn``);
    - bright ground: otherwise, bright in the visible (mean of B02, B03, B04 >= ``bright_dn``) with red at
      least blue, as sand, rock, salt and concrete are (clouds are flat or bluish);
    - haze/other: the rest (thin cloud or haze left unlabeled, shadows, label edges).

    Args:
        image: Chip in the order B02, B03, B04, B08 (reflectance x 10,000). Shape: (4, H, W).
        pred: Predicted mask. Shape: (H, W), values {0, 1}.
        label: Label. Shape: (H, W), values {0, 1}.

    Returns:
        Pixel count per class of ``FP_CLASSES``.
    """
    image = np.asarray(image).astype(np.float32)
    pred, label = np.asarray(pred).astype(bool), np.asarray(label).astype(bool)
    if image.ndim != 3 or image.shape[0] < 4 or image.shape[1:] != pred.shape or pred.shape != label.shape:
        raise ValueError(f"image {image.shape}, prediction {pred.shape} and label {label.shape} do not match")
    fp = pred & ~label
    blue, _green, red, nir = image[:4]
    water = fp & (nir < red) & (nir < water_nir_dn)
    bright = fp & ~water & (image[:3].mean(axis=0) >= bright_dn) & (red >= blue)
    other = fp & ~water & ~bright
    return {"bright ground": int(bright.sum()), "water": int(water.sum()), "haze/other": int(other.sum())}


def false_positive_table(
    images: Mapping[str, np.ndarray], preds: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray]
) -> pd.DataFrame:
    """``classify_false_positives`` per chip: one row per chip id with a count column per class and ``fp``."""
    rows = {c: classify_false_positives(images[c], preds[c], masks[c]) for c in preds}
    df = pd.DataFrame.from_dict(rows, orient="index", columns=list(FP_CLASSES)).fillna(0).astype(int)
    df.index.name = "chip_id"
    df["fp"] = df[list(FP_CLASSES)].sum(axis=1)
    return df


def worst_chips(per_chip: pd.DataFrame, k: int) -> pd.DataFrame:
    """The ``k`` chips that cost the pooled Jaccard most: largest ``union - intersection`` (error pixels).

    A chip with a tiny cloud can score J = 0 yet barely move the pooled figure; error pixels rank by impact.
    """
    df = per_chip.assign(errors=per_chip["union"] - per_chip["intersection"])
    return df.sort_values(["errors", "chip_id"], ascending=[False, True]).head(k)


def varying_params(
    runs: pd.DataFrame, ignore: Sequence[str] = ("run_name", "experiment", "data")
) -> list[str]:
    """Parameter names (without the ``params.`` prefix) whose logged values differ among ``runs``."""
    out = []
    for col in runs.columns:
        if not col.startswith("params."):
            continue
        name = col[len("params."):]
        if name not in ignore and runs[col].astype(str).nunique(dropna=False) > 1:
            out.append(name)
    return sorted(out)


def resolve_experiment(client, name: str | None, kinds: Sequence[str] = ("train", "trial")):
    """The MLflow experiment called ``name``; when None, the one holding the newest FINISHED run of ``kinds``
    (so notebook defaults follow ``make demo`` as well as ``experiments/train.py``).

    Args:
        client: An ``mlflow.tracking.MlflowClient`` (passed in: this module imports no MLflow).
        name: Experiment name, or None.
        kinds: ``cloudseg.kind`` tags that count as a run to analyse.

    Raises:
        ValueError: no such experiment, or no finished run anywhere; the message lists what the store has.
    """
    if name is not None:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            names = sorted(e.name for e in client.search_experiments())
            raise ValueError(f"no experiment {name!r} in this MLflow store; it has {names}")
        return exp
    experiments = client.search_experiments()
    newest, newest_start = None, -1
    for exp in experiments:
        for run in client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'",
                                      order_by=["attributes.start_time DESC"], max_results=200):
            if run.data.tags.get("cloudseg.kind") in kinds:
                if run.info.start_time > newest_start:
                    newest, newest_start = exp, run.info.start_time
                break
    if newest is None:
        names = sorted(e.name for e in experiments)
        raise ValueError(f"no finished {'/'.join(kinds)} run in any experiment of this MLflow store "
                         f"({names}): run `make demo` or experiments/train.py first, or set the tracking URI")
    return newest
