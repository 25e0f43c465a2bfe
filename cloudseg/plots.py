"""Figures of chips, labels, predictions and runs, drawn without pyplot so no global state leaks.

Functions that build a figure return the ``matplotlib.figure.Figure`` and save it too when given a ``path``;
the older ``chip_gallery``, ``learning_curve`` and ``prediction_overlays`` save a PNG and return its path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from cloudseg.metrics import ThresholdSweep

REFLECTANCE_SCALE = 10_000.0  # chips hold reflectance x 10,000
CLOUD_COLOR = "#1f77b4"
CLEAR_COLOR = "#ff7f0e"


def _save(fig: Figure, path: Path | str | None, dpi: int = 100) -> Figure:
    """Write ``fig`` to ``path`` (parents created) when a path is given; return the figure."""
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
    return fig


def rgb_preview(
    image: np.ndarray,
    bands: tuple[int, int, int] = (2, 1, 0),
    percentiles: tuple[float, float] | None = (2, 98),
    value_range: tuple[float, float] | None = None,
    min_range: float = 1500.0,
) -> np.ndarray:
    """A displayable colour composite of a chip.

    One stretch is shared by the three bands, so clouds stay white and hues are not shifted.

    Args:
        image: Chip in the order B02, B03, B04, B08 (reflectance x 10,000). Shape: (4, H, W).
        bands: Indices shown as red, green, blue; the default is natural colour (B04, B03, B02).
        percentiles: Low and high percentiles of the three bands mapped to 0 and 1.
        value_range: Fixed ``(low, high)`` in the image's units instead of percentiles, so chips compare.
        min_range: Smallest ``high - low`` a percentile stretch may use, so a nearly uniform chip (overcast,
            say) is not blown up into noise and false colour.

    Returns:
        Float32 array in [0, 1]. Shape: (H, W, 3).
    """
    image = np.asarray(image)
    if image.ndim != 3 or max(bands) >= image.shape[0]:
        raise ValueError(
            f"expected a (bands, H, W) chip with at least {max(bands) + 1} bands, got {image.shape}"
        )
    rgb = np.stack([image[b] for b in bands], axis=-1).astype(np.float32)
    if value_range is not None:
        lo, hi = value_range
    elif percentiles is not None:
        lo, hi = (float(v) for v in np.percentile(rgb, percentiles))
        if hi - lo < min_range:
            mid = (hi + lo) / 2
            lo, hi = max(0.0, mid - min_range / 2), max(0.0, mid - min_range / 2) + min_range
    else:
        lo, hi = float(rgb.min()), float(rgb.max())
    if hi <= lo:  # a constant chip (all no-data, say): show it mid-grey rather than dividing by zero
        return np.full(rgb.shape, 0.5, dtype=np.float32)
    return np.clip((rgb - lo) / (hi - lo), 0, 1)


def false_color(image: np.ndarray, percentiles: tuple[float, float] | None = (2, 98)) -> np.ndarray:
    """NIR-red-green composite (vegetation red, water black, clouds white). Shape: (H, W, 3)."""
    return rgb_preview(image, bands=(3, 2, 1), percentiles=percentiles)


def gallery_figure(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray | None],
    titles: Sequence[str],
    ncols: int = 6,
    panel_inches: float = 2.6,
    value_range: tuple[float, float] | None = None,
) -> Figure:
    """A grid of chips in natural colour with the cloud label outlined and lightly tinted.

    Args:
        images: Chips, each (4, H, W) in the order B02, B03, B04, B08.
        labels: Masks (1 = cloud), each (H, W), or None for a chip shown without a label.
        titles: One caption per chip.
        ncols: Panels per row.
        panel_inches: Size of each panel.
        value_range: Fixed stretch for all chips; per-chip 2-98 percentiles when None.
    """
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    if not (len(images) == len(labels) == len(titles)):
        raise ValueError(
            f"got {len(images)} images, {len(labels)} labels and {len(titles)} titles; need as many of each"
        )
    if not images:
        raise ValueError("chip_gallery needs at least one chip")
    ncols = max(1, min(ncols, len(images)))
    nrows = -(-len(images) // ncols)
    fig = Figure(figsize=(ncols * panel_inches, nrows * (panel_inches + 0.25)), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    # clear pixels transparent, cloud translucent magenta
    tint = ListedColormap([(0, 0, 0, 0), (1.0, 0.15, 0.6, 0.22)])
    for ax, image, label, title in zip(axes.flat, images, labels, titles):
        ax.imshow(rgb_preview(image, value_range=value_range), interpolation="nearest")
        if label is not None:
            label = np.asarray(label)
            ax.imshow(label, cmap=tint, vmin=0, vmax=1, interpolation="nearest")
            if label.min() != label.max():  # contour needs both classes present
                ax.contour(label, levels=[0.5], colors=["#ff2a9d"], linewidths=0.7)
        ax.set_title(title, fontsize=7)
        ax.set_axis_off()
    for ax in axes.flat[len(images) :]:
        ax.set_axis_off()
    return fig


def chip_gallery(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray | None],
    titles: Sequence[str],
    path: Path | str,
    ncols: int = 6,
    panel_inches: float = 2.6,
    value_range: tuple[float, float] | None = None,
) -> Path:
    """Save ``gallery_figure`` of the chips as a PNG (parent folders are created) and return the path."""
    fig = gallery_figure(images, labels, titles, ncols, panel_inches, value_range)
    path = Path(path)
    _save(fig, path, dpi=100)
    return path


def learning_curve(history: Sequence[dict], path: Path | str) -> Path:
    """Save train loss and validation Jaccard against epoch (two panels) as a PNG.

    Args:
        history: One dict per epoch with ``epoch``, ``train_loss`` and ``val_jaccard`` (``lr`` optional).
        path: Output PNG.
    """
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(8, 3), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(epochs, [h["train_loss"] for h in history], marker="o", color="#1f77b4")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("train loss")
    ax1.grid(alpha=0.3)
    validated = [h for h in history if "val_jaccard" in h]  # val_every > 1 skips some epochs
    ax2.plot([h["epoch"] for h in validated], [h["val_jaccard"] for h in validated], marker="o", color="#d62728")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation Jaccard")
    ax2.grid(alpha=0.3)
    if validated:
        best = max(validated, key=lambda h: h["val_jaccard"])
        ax2.axvline(best["epoch"], color="grey", ls="--", lw=0.8)
        ax2.set_title(f"best {best['val_jaccard']:.4f} at epoch {best['epoch']}", fontsize=9)
    fig.savefig(path, dpi=100)
    return path


def error_overlay(pred: np.ndarray, label: np.ndarray) -> np.ndarray:
    """RGBA layer: true positives green, false positives red, false negatives blue. Shape: (H, W, 4)."""
    p, t = np.asarray(pred).astype(bool), np.asarray(label).astype(bool)
    out = np.zeros(p.shape + (4,), dtype=np.float32)
    out[p & t] = (0.1, 0.8, 0.2, 0.35)
    out[p & ~t] = (1.0, 0.1, 0.1, 0.55)
    out[~p & t] = (0.1, 0.3, 1.0, 0.55)
    return out


def overlays_figure(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    probs: Sequence[np.ndarray],
    threshold: float,
    titles: Sequence[str],
) -> Figure:
    """One row per chip: RGB, RGB with label, RGB with prediction errors (TP green, FP red, FN blue).

    Binary predictions work too: pass them as ``probs`` with ``threshold=0.5``.
    Shape: images (4, H, W), labels and probs (H, W) each.
    """
    from matplotlib.figure import Figure

    from cloudseg.metrics import intersection_union

    n = max(1, len(images))
    fig = Figure(figsize=(7.5, 2.6 * n), layout="constrained")
    axes = fig.subplots(n, 3, squeeze=False)
    for row, image, label, prob, title in zip(axes, images, labels, probs, titles):
        rgb = rgb_preview(image)
        pred = np.asarray(prob) >= threshold
        inter, union = intersection_union(pred, label)
        score = f"J={inter / union:.3f}" if union else "J=n/a (no cloud)"
        row[0].imshow(rgb)
        row[0].set_title(title, fontsize=8)
        row[1].imshow(rgb)
        row[1].imshow(np.where(np.asarray(label)[..., None] > 0, [1.0, 0.15, 0.6, 0.45], [0, 0, 0, 0]))
        row[1].set_title("label", fontsize=8)
        row[2].imshow(rgb)
        row[2].imshow(error_overlay(pred, label))
        row[2].set_title(f"prediction @ {threshold:.2f}: {score}", fontsize=8)
        for ax in row:
            ax.set_axis_off()
    if not images:
        axes[0][0].text(0.5, 0.5, "no validation chips", ha="center")
    return fig


def prediction_overlays(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    probs: Sequence[np.ndarray],
    threshold: float,
    titles: Sequence[str],
    path: Path | str,
) -> Path:
    """Save ``overlays_figure`` (RGB, label, TP/FP/FN errors per chip) as a PNG and return the path.

    Shape: images (4, H, W), labels and probs (H, W) each.
    """
    fig = overlays_figure(images, labels, probs, threshold, titles)
    path = Path(path)
    _save(fig, path, dpi=80)
    return path


def label_pairs(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    titles: Sequence[str],
    path: Path | str | None = None,
    panel_inches: float = 2.4,
) -> Figure:
    """One row per chip: natural colour, false colour (NIR-red-green) and the label beside them.

    Meant for judging labels by eye: the label is drawn on its own (white = cloud) rather than over the chip.
    Shape: images (4, H, W), labels (H, W) each.
    """
    from matplotlib.figure import Figure

    if not (len(images) == len(labels) == len(titles)):
        raise ValueError(
            f"got {len(images)} images, {len(labels)} labels and {len(titles)} titles; need as many of each"
        )
    if not images:
        raise ValueError("label_pairs needs at least one chip")
    fig = Figure(figsize=(3 * panel_inches, len(images) * (panel_inches + 0.2)), layout="constrained")
    axes = fig.subplots(len(images), 3, squeeze=False)
    for row, image, label, title in zip(axes, images, labels, titles):
        label = np.asarray(label)
        row[0].imshow(rgb_preview(image), interpolation="nearest")
        row[0].set_title(title, fontsize=8)
        row[1].imshow(false_color(image), interpolation="nearest")
        row[1].set_title("false colour (NIR, red, green)", fontsize=8)
        row[2].imshow(label, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        row[2].set_title(f"label: {label.mean():.1%} cloud", fontsize=8)
        for ax in row:
            ax.set_axis_off()
    return _save(fig, path)


def band_histograms(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    band_names: Sequence[str] | None = None,
    bins: int = 60,
    max_reflectance: float = 1.0,
    share: bool = True,
    path: Path | str | None = None,
) -> Figure:
    """Per band, histograms of the reflectance of cloud and of clear pixels (one panel per band).

    No-data pixels (all bands 0) are left out; reflectance above ``max_reflectance`` is counted in the last
    bin, so saturated cloud tops stay visible instead of falling off the axis.

    Args:
        images: Chips, each (bands, H, W) in reflectance x 10,000.
        masks: Labels (1 = cloud), each (H, W).
        band_names: Panel titles, one per band; default ``cloudseg.data.io.BANDS``.
        bins: Bins between 0 and ``max_reflectance``.
        max_reflectance: Right edge of the x axis (reflectance, not DN).
        share: Plot each class's share of its pixels per bin (the classes compare whatever their sizes);
            False plots pixel counts.
        path: Also save the figure there.

    Returns:
        The figure: one axes per band, each with a cloud and a clear ``StepPatch`` whose values are the
        counts (or shares) per bin.
    """
    from matplotlib.figure import Figure

    from cloudseg.data.io import BANDS

    band_names = BANDS if band_names is None else tuple(band_names)
    if len(images) != len(masks):
        raise ValueError(f"got {len(images)} images and {len(masks)} masks; need one mask per image")
    if not images:
        raise ValueError("band_histograms needs at least one chip")
    n_bands = len(band_names)
    edges = np.linspace(0.0, max_reflectance, bins + 1)
    counts = np.zeros((2, n_bands, bins), dtype=np.int64)  # [clear, cloud]
    for image, mask in zip(images, masks):
        image = np.asarray(image)
        mask = np.asarray(mask).astype(bool)
        if image.ndim != 3 or image.shape[0] < n_bands or image.shape[1:] != mask.shape:
            raise ValueError(f"image {image.shape} and mask {mask.shape} do not match {n_bands} band names")
        valid = np.any(image[:n_bands] > 0, axis=0)
        for cls, sel in enumerate((valid & ~mask, valid & mask)):
            for b in range(n_bands):
                refl = np.minimum(image[b][sel] / REFLECTANCE_SCALE, max_reflectance)
                counts[cls, b] += np.histogram(refl, bins=edges)[0]
    fig = Figure(figsize=(3.2 * n_bands, 2.8), layout="constrained")
    axes = fig.subplots(1, n_bands, squeeze=False)[0]
    totals = counts.sum(axis=2)  # pixels per class and band
    for b, ax in enumerate(axes):
        for cls, (name, color) in enumerate((("clear", CLEAR_COLOR), ("cloud", CLOUD_COLOR))):
            values = counts[cls, b].astype(float)
            if share and totals[cls, b]:
                values = values / totals[cls, b]
            ax.stairs(values, edges, color=color, label=f"{name} ({totals[cls, b]:,} px)", linewidth=1.3)
        ax.set_title(band_names[b], fontsize=10)
        ax.set_xlabel("reflectance")
        ax.set_xlim(0, max_reflectance)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("share of the class's pixels" if share else "pixels")
    axes[-1].legend(fontsize=7)
    return _save(fig, path)


def cloud_fraction_distribution(
    fractions: Sequence[float] | np.ndarray | pd.Series,
    bins: int = 10,
    groups: Sequence[str] | None = None,
    path: Path | str | None = None,
) -> Figure:
    """Histogram of per-chip cloud fractions in [0, 1], stacked by group (e.g. location) when given.

    The last bin includes 1.0 (fully cloudy chips); fully clear chips fall in the first bin. The title counts
    chips that are exactly 0 and exactly 1.

    Returns:
        The figure: one axes whose bars (one container per group) hold the chip counts per bin.
    """
    from matplotlib.figure import Figure

    f = np.asarray(fractions, dtype=float)
    if f.size == 0:
        raise ValueError("cloud_fraction_distribution needs at least one fraction")
    if np.any((f < 0) | (f > 1)) or np.any(np.isnan(f)):
        raise ValueError(f"cloud fractions must lie in [0, 1], got min {np.nanmin(f)}, max {np.nanmax(f)}")
    edges = np.linspace(0.0, 1.0, bins + 1)
    fig = Figure(figsize=(6, 3.2), layout="constrained")
    ax = fig.subplots()
    if groups is None:
        ax.hist(f, bins=edges, color=CLOUD_COLOR, edgecolor="white")
    else:
        groups = np.asarray(groups, dtype=str)
        if groups.shape != f.shape:
            raise ValueError(f"got {f.size} fractions and {groups.size} groups; need one group per fraction")
        names = sorted(set(groups.tolist()))
        ax.hist([f[groups == g] for g in names], bins=edges, stacked=True, label=names, edgecolor="white")
        ax.legend(fontsize=7, ncols=2 if len(names) > 6 else 1)
    ax.set_xlabel("cloud fraction of the chip")
    ax.set_ylabel("chips")
    ax.set_xlim(0, 1)
    ax.set_title(f"{f.size} chips: mean {f.mean():.2f}, median {np.median(f):.2f}, "
                 f"{int((f == 0).sum())} clear (0), {int((f == 1).sum())} fully cloudy (1)", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def jaccard_vs_threshold(
    source: ThresholdSweep | Sequence[float] | np.ndarray,
    jaccards: Sequence[float] | np.ndarray | None = None,
    chosen: float | None = None,
    path: Path | str | None = None,
) -> Figure:
    """Pooled Jaccard against the decision threshold, with the best threshold marked.

    Args:
        source: A ``cloudseg.metrics.ThresholdSweep``, or the thresholds (then ``jaccards`` is required).
        jaccards: Pooled Jaccard at each threshold (NaN where undefined).
        chosen: A threshold to mark with a dashed line (e.g. the checkpoint's).
        path: Also save the figure there.

    Returns:
        The figure: one axes, the curve as its first line, the best point as its second.
    """
    from matplotlib.figure import Figure

    if hasattr(source, "thresholds") and hasattr(source, "jaccards"):
        t, j = np.asarray(source.thresholds(), dtype=float), np.asarray(source.jaccards(), dtype=float)
    else:
        if jaccards is None:
            raise ValueError("jaccard_vs_threshold: pass a ThresholdSweep, or thresholds and jaccards")
        t, j = np.asarray(source, dtype=float), np.asarray(jaccards, dtype=float)
    if t.shape != j.shape or t.ndim != 1:
        raise ValueError(f"thresholds {t.shape} and jaccards {j.shape} must be 1-D and of the same length")
    fig = Figure(figsize=(5.5, 3.2), layout="constrained")
    ax = fig.subplots()
    ax.plot(t, j, color="#d62728", lw=1.5, label="pooled Jaccard")
    if np.any(~np.isnan(j)):
        i = int(np.nanargmax(j))
        ax.plot([t[i]], [j[i]], "o", color="black", label=f"best {j[i]:.4f} at {t[i]:.2f}")
    else:
        ax.text(0.5, 0.5, "undefined: no cloud in any label or prediction", ha="center",
                transform=ax.transAxes)
    if chosen is not None:
        k = int(np.argmin(np.abs(t - chosen))) if t.size else 0
        at = f" ({j[k]:.4f})" if t.size and not np.isnan(j[k]) else ""
        ax.axvline(chosen, color="grey", ls="--", lw=0.9, label=f"chosen {chosen:.2f}{at}")
    ax.set_xlabel("threshold on the cloud probability")
    ax.set_ylabel("pooled Jaccard")
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower center")
    return _save(fig, path)


def _column(df: pd.DataFrame, name: str, prefix: str) -> str:
    """``name`` itself or ``<prefix>.<name>`` (as ``mlflow.search_runs`` names columns)."""
    for col in (name, f"{prefix}.{name}"):
        if col in df.columns:
            return col
    raise KeyError(f"no column {name!r} or '{prefix}.{name}' among {sorted(df.columns)[:30]}")


def metric_vs_params(
    runs: pd.DataFrame,
    metric: str,
    params: Sequence[str],
    ncols: int = 3,
    log_ratio: float = 20.0,
    path: Path | str | None = None,
) -> Figure:
    """One scatter panel per parameter: the metric of each run against that parameter's value.

    Numeric parameters (MLflow logs them as strings; they are parsed) go on a linear axis, or a log axis when
    all are positive and span more than ``log_ratio``; others are categories along x.

    Args:
        runs: One row per run, e.g. ``mlflow.search_runs`` output; columns are found as given or with the
            ``metrics.`` / ``params.`` prefix.
        metric: Metric column (y).
        params: Parameter columns, one panel each.

    Returns:
        The figure: exactly one axes per parameter, each with one scatter collection of the runs that have
        the metric.
    """
    from matplotlib.figure import Figure

    if not params:
        raise ValueError("metric_vs_params needs at least one parameter")
    mcol = _column(runs, metric, "metrics")
    pcols = [_column(runs, p, "params") for p in params]
    df = runs[runs[mcol].notna()]
    ncols = max(1, min(ncols, len(params)))
    nrows = -(-len(params) // ncols)
    fig = Figure(figsize=(3.4 * ncols, 2.9 * nrows), layout="constrained")
    axes = list(fig.subplots(nrows, ncols, squeeze=False).flat)
    y = df[mcol].to_numpy(dtype=float)
    for ax, name, col in zip(axes, params, pcols):
        numeric = pd.to_numeric(df[col], errors="coerce")
        if len(df) and numeric.notna().all():
            x = numeric.to_numpy(dtype=float)
            ax.scatter(x, y, s=22, alpha=0.8, color=CLOUD_COLOR)
            if x.min() > 0 and x.max() / x.min() > log_ratio:
                ax.set_xscale("log")
        else:
            values = df[col].astype(str).to_numpy()
            cats = sorted(set(values.tolist()))
            ax.scatter([cats.index(v) for v in values], y, s=22, alpha=0.8, color=CLOUD_COLOR)
            ax.set_xticks(range(len(cats)), cats, rotation=20, fontsize=7, ha="right")
            ax.set_xlim(-0.5, len(cats) - 0.5)
        ax.set_xlabel(name, fontsize=9)
        ax.set_ylabel(metric, fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[len(params):]:  # the unused panels of the last row
        ax.remove()
    return _save(fig, path)


def _steps_frame(curve: pd.DataFrame | Sequence[Mapping]) -> pd.DataFrame:
    df = curve if isinstance(curve, pd.DataFrame) else pd.DataFrame(list(curve))
    if "step" not in df.columns:
        if "epoch" not in df.columns:
            raise KeyError(f"a learning curve needs a 'step' or 'epoch' column, got {list(df.columns)}")
        df = df.rename(columns={"epoch": "step"})
    return df.sort_values("step")


def learning_curves(
    curves: Mapping[str, pd.DataFrame | Sequence[Mapping]],
    metrics: Sequence[str] = ("train_loss", "val_jaccard"),
    path: Path | str | None = None,
) -> Figure:
    """Learning curves of several runs on shared axes: one panel per metric, one line per run.

    Args:
        curves: Run label -> its history: a DataFrame or records with ``step`` (or ``epoch``) and the metric
            columns; a run lacking a metric is left out of that panel.
        metrics: Metric names, one panel each.

    Returns:
        The figure: one axes per metric, each with one line per run having that metric.
    """
    from matplotlib.figure import Figure

    if not metrics:
        raise ValueError("learning_curves needs at least one metric")
    fig = Figure(figsize=(4.2 * len(metrics), 3.2), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    frames = {label: _steps_frame(c) for label, c in curves.items()}
    for ax, metric in zip(axes, metrics):
        for label, df in frames.items():
            if metric in df.columns and df[metric].notna().any():
                d = df[df[metric].notna()]
                ax.plot(d["step"], d[metric], marker="o", ms=3, lw=1.2, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    if frames:
        axes[-1].legend(fontsize=7)
    return _save(fig, path)


def per_location_bars(
    values: Mapping[str, float] | pd.Series,
    ylabel: str = "pooled Jaccard",
    annotations: Mapping[str, str] | None = None,
    sort: bool = True,
    ylim: tuple[float, float] | None = None,
    path: Path | str | None = None,
) -> Figure:
    """A bar per location (or any category); NaN values get no bar and an "n/a" note.

    Args:
        values: Location -> value, e.g. the ``jaccard`` column of ``JaccardAccumulator.by_location`` indexed
            by location.
        ylabel: Axis label.
        annotations: Location -> text written above its bar (e.g. the chip count).
        sort: Order bars by value, lowest first (NaN last); else keep the given order.
        ylim: Y limits; default from 0 to the largest value.

    Returns:
        The figure: one axes whose bar container has one bar per location (height 0 for NaN).
    """
    from matplotlib.figure import Figure

    series = pd.Series(values, dtype=float)
    if series.empty:
        raise ValueError("per_location_bars needs at least one value")
    if sort:
        series = series.sort_values(na_position="last")
    names = [str(k) for k in series.index]
    heights = series.to_numpy(dtype=float)
    fig = Figure(figsize=(max(4.0, 0.6 * len(names) + 1.5), 3.2), layout="constrained")
    ax = fig.subplots()
    bars = ax.bar(range(len(names)), np.nan_to_num(heights, nan=0.0), color=CLOUD_COLOR)
    top = float(np.nanmax(heights)) if np.any(~np.isnan(heights)) else 1.0
    for bar, key, h in zip(bars, series.index, heights):
        note = (annotations or {}).get(key, "")
        if np.isnan(h):
            note = (note + " n/a").strip()
        if note:
            y = 0 if np.isnan(h) else h
            ax.text(bar.get_x() + bar.get_width() / 2, y, note, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_ylim(*(ylim or (0, top * 1.12 if top > 0 else 1.0)))
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)
