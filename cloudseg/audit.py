"""Label audit: rank labeled chips by how much their label disagrees with an out-of-fold prediction.

A model that never saw a chip (its location was held out) and still disagrees with the label over most of the
chip points at either a hard chip or a wrong label; the ranking puts both in front of a reviewer, worst first.
Out-of-fold probabilities come from the benchmark's saved ``oof_probs.npz``, from fold checkpoints (each predicts
the chips its own config held out), or from training the recipe's leave-one-location-out folds here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pandas as pd

AUDIT_COLUMNS = ("rank", "chip_id", "location", "disagreement", "mismatch_fraction", "label_cloud_fraction",
                 "pred_cloud_fraction", "jaccard", "suspect")


def disagreement_table(probs: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray], threshold: float = 0.5,
                       locations: Mapping[str, str] | None = None,
                       suspects: Iterable[str] | None = None) -> pd.DataFrame:
    """One row per chip with a prediction and a label, ranked by disagreement (worst first).

    ``disagreement`` is the mean absolute difference between the cloud probability and the label (soft, so a
    confident wrong prediction counts more than a hesitant one); ``mismatch_fraction`` is the share of pixels
    where the thresholded prediction differs from the label; ``jaccard`` is the chip's own score (nan when both
    are empty). Ties keep chip-id order.

    Shape: probs and labels (H, W) per chip.
    """
    sus = set(suspects or [])
    rows = []
    for chip_id in sorted(set(probs) & set(labels)):
        p = np.asarray(probs[chip_id], dtype=np.float32)
        t = np.asarray(labels[chip_id]).astype(bool)
        if p.shape != t.shape:
            raise ValueError(f"chip {chip_id}: prediction shape {p.shape} differs from label shape {t.shape}")
        pred = p >= threshold
        union = int((pred | t).sum())
        rows.append({
            "chip_id": chip_id,
            "location": (locations or {}).get(chip_id, ""),
            "disagreement": float(np.abs(p - t).mean()),
            "mismatch_fraction": float((pred != t).mean()),
            "label_cloud_fraction": float(t.mean()),
            "pred_cloud_fraction": float(pred.mean()),
            "jaccard": int((pred & t).sum()) / union if union else float("nan"),
            "suspect": chip_id in sus,
        })
    if not rows:
        raise ValueError("disagreement_table: no chip has both a prediction and a label")
    df = pd.DataFrame(rows).sort_values(["disagreement", "chip_id"], ascending=[False, True], kind="stable")
    df.insert(0, "rank", np.arange(1, len(df) + 1))
    return df.reset_index(drop=True)[list(AUDIT_COLUMNS)]


def precision_at_k(ranked_ids: list[str], relevant: Iterable[str], k: int) -> float:
    """Share of the first ``k`` ranked ids that are in ``relevant``."""
    if k < 1:
        raise ValueError(f"precision_at_k: k={k} must be >= 1")
    top = ranked_ids[:k]
    rel = set(relevant)
    return sum(c in rel for c in top) / len(top) if top else float("nan")


def write_exclusion(ids: Iterable[str], path: Path | str, comment: str = "") -> Path:
    """Write chip ids one per line (the format of config key ``exclude_ids`` / ``splits.read_id_list``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    head = f"# {comment}\n" if comment else ""
    path.write_text(head + "".join(f"{c}\n" for c in ids))
    return path


def review_montage(table: pd.DataFrame, images: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray],
                   probs: Mapping[str, np.ndarray], threshold: float, path: Path | str, top: int = 10) -> Path:
    """PNG with one row per chip, worst first: RGB, RGB with label, RGB with prediction errors.

    Shape: images (4, H, W), labels and probs (H, W) per chip.
    """
    from cloudseg.plots import prediction_overlays

    rows = table.head(top)
    ids = list(rows["chip_id"])
    titles = [f"#{r.rank} {r.chip_id} ({r.location}) disagreement {r.disagreement:.2f}"
              + (" [suspect]" if r.suspect else "") for r in rows.itertuples()]
    return prediction_overlays([images[c] for c in ids], [labels[c] for c in ids],
                               [np.asarray(probs[c], dtype=np.float32) for c in ids], threshold, titles, path)


def load_probs(path: Path | str) -> dict[str, np.ndarray]:
    """Chip id -> (H, W) probabilities from an ``.npz`` (as written by experiments/bench_quality.py)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"probabilities file {path} does not exist")
    with np.load(path) as z:
        return {k: z[k].astype(np.float32) for k in z.files}


def probs_from_checkpoints(checkpoints: Iterable[Path | str], split, batch_size: int = 4) -> dict[str, np.ndarray]:
    """Out-of-fold probabilities from fold checkpoints: each predicts the chips its stored config held out.

    Raises:
        ValueError: two checkpoints hold out the same chip (not one set of folds).
    """
    from cloudseg.checkpoint import load_checkpoint
    from cloudseg.data.dataset import ChipDataset
    from cloudseg.data.splits import fold_split
    from cloudseg.training import predict_probs

    out: dict[str, np.ndarray] = {}
    meta = split.metadata.reset_index()
    for ck in checkpoints:
        cfg = load_checkpoint(ck)["config"]
        _, val = fold_split(meta, int(cfg["n_folds"]), int(cfg["fold"]), int(cfg["seed"]))
        twice = sorted(set(val) & set(out))
        if twice:
            raise ValueError(f"checkpoint {ck} holds out chips another checkpoint already predicted: {twice[:5]}")
        out.update(predict_probs(ck, ChipDataset(split, val), batch_size=batch_size))
    return out


def probs_from_recipe(cfg, split, threads: int = 2) -> dict[str, np.ndarray]:
    """Train the recipe's location folds (``cfg.n_folds``) here and return every chip's out-of-fold probability.

    Each fold keeps its last epoch and never sees its held-out chips' labels. Not tracked in MLflow (the
    benchmark tracks the same training); states go to a temporary folder.
    """
    import tempfile

    import torch

    from cloudseg.config import apply_overrides
    from cloudseg.data import sources
    from cloudseg.training import Trainer

    torch.set_num_threads(threads)
    cfg = apply_overrides(cfg, {"keep": "last", "tune_threshold": False, "plot_chips": 10_000,
                                "num_threads": threads}, "audit")
    out: dict[str, np.ndarray] = {}
    for k in range(sources.n_folds(cfg, split)):
        train, val = sources.fold_ids(cfg, split, k)
        with tempfile.TemporaryDirectory() as tmp:
            res = Trainer(cfg, split, train, val, Path(tmp)).fit()
        out.update({c: np.asarray(p, dtype=np.float32) for c, p in res.fixed_eval.probs.items()})
        print(f"audit fold {k}: {len(train)} training / {len(val)} held-out chips", flush=True)
    return out
