"""Pictures of chips: colour composites and galleries, drawn without pyplot so no global state leaks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


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


def chip_gallery(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray | None],
    titles: Sequence[str],
    path: Path | str,
    ncols: int = 6,
    panel_inches: float = 2.6,
    value_range: tuple[float, float] | None = None,
) -> Path:
    """Save a PNG grid of chips in natural colour with the cloud label outlined and lightly tinted.

    Args:
        images: Chips, each (4, H, W) in the order B02, B03, B04, B08.
        labels: Masks (1 = cloud), each (H, W), or None for a chip shown without a label.
        titles: One caption per chip.
        path: Output PNG; parent folders are created.
        ncols: Panels per row.
        panel_inches: Size of each panel.
        value_range: Fixed stretch for all chips; per-chip 2-98 percentiles when None.

    Returns:
        The path written.
    """
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    if not (len(images) == len(labels) == len(titles)):
        raise ValueError(
            f"got {len(images)} images, {len(labels)} labels and {len(titles)} titles; need as many of each"
        )
    if not images:
        raise ValueError("chip_gallery needs at least one chip")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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
    fig.savefig(path, dpi=100)
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
    ax2.plot(epochs, [h["val_jaccard"] for h in history], marker="o", color="#d62728")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation Jaccard")
    ax2.grid(alpha=0.3)
    if history:
        best = max(history, key=lambda h: h["val_jaccard"])
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


def prediction_overlays(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    probs: Sequence[np.ndarray],
    threshold: float,
    titles: Sequence[str],
    path: Path | str,
) -> Path:
    """Save one row per chip: RGB, RGB with label, RGB with prediction errors (TP green, FP red, FN blue).

    Shape: images (4, H, W), labels and probs (H, W) each.
    """
    from matplotlib.figure import Figure

    from cloudseg.metrics import intersection_union

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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
    fig.savefig(path, dpi=80)
    return path
