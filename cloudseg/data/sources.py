"""Where a run's data comes from: the config's ``data`` word as a folder, its split, its folds, its suspect labels.

Everything that needs a data folder, a split, folds or the suspect list asks this module (training, sweeps, the
benchmarks, the audit, the notebooks); it imports neither MLflow nor Optuna.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cloudseg.config import Config, config_bands
from cloudseg.data.splits import exclude_from_training, fold_split, location_folds, read_id_list
from cloudseg.data.io import BANDS, ChipReadError, load_metadata
from cloudseg.data.validate import DatasetError, ValidatedSplit, validate_split
from cloudseg.paths import REPO_ROOT, real_data_dir

SUSPECT_LIST = Path("reference") / "suspect_label_ids.txt"  # beside the splits of the real sample
IN_MEMORY_BYTES = 1 << 30  # in_memory=auto holds a split whose arrays fit in this
MIXED_PREFIX = "syn_"  # ids and locations of synthetic chips mixed into a real split (config key mix_synthetic)


def resolve_data(data: str | Path | None, synthetic_n: int | None = None) -> Path:
    """The folder the config's ``data`` key names.

    ``synthetic`` (or None): ``data/synthetic``, generated on first use; ``real``: the real sample
    (``$CLOUDSEG_REAL_DATA`` or ``../shared/data/oncloudn``); anything else: a folder, relative to the repository
    root when it does not exist relative to the current directory.

    Raises:
        FileNotFoundError: the folder (or the real sample) is not there.
    """
    if data is None or str(data) == "synthetic":
        from cloudseg.data.synthetic import ensure_synthetic_default

        return ensure_synthetic_default() if synthetic_n is None else ensure_synthetic_default(n=synthetic_n)
    if str(data) == "real":
        root = real_data_dir()
        if not (root / "train_metadata.csv").is_file():
            raise FileNotFoundError(f"real sample not found at {root}; set CLOUDSEG_REAL_DATA")
        return root
    path = Path(data).expanduser()
    if not path.is_absolute() and not path.exists():
        path = REPO_ROOT / path
    if not path.is_dir():
        raise FileNotFoundError(f"data folder {data} does not exist")
    return path.resolve()


def suspect_list(root: Path | str) -> Path:
    """Where a data folder keeps its suspect-label ids (``reference/suspect_label_ids.txt``; may be absent)."""
    return Path(root) / SUSPECT_LIST


def suspect_ids(cfg: Config | str, root: Path | str) -> set[str]:
    """Chip ids scored apart as suspect labels: config key ``suspect_ids`` ("auto" = the data folder's own list
    when it has one, "" = none, else a file of ids)."""
    value = cfg.suspect_ids if isinstance(cfg, Config) else cfg
    if value == "":
        return set()
    if value == "auto":
        path = suspect_list(root)
        return read_id_list(path) if path.is_file() else set()
    return read_id_list(value)


def hold_in_memory(cfg: Config, n_chips: int) -> bool:
    """Config key ``in_memory``: auto holds a split whose arrays fit in ``IN_MEMORY_BYTES`` (each chip is then
    decoded once per run), else chips are read from disk when drawn (memory O(batch))."""
    if cfg.in_memory == "auto":
        per_chip = 512 * 512 * (2 * len(config_bands(cfg)) + 1)  # uint16 bands and a uint8 label
        return n_chips * per_chip <= IN_MEMORY_BYTES
    return cfg.in_memory == "true"


def load_split(cfg: Config) -> tuple[Path, ValidatedSplit]:
    """The config's training split, validated, with ``mix_synthetic`` synthetic chips merged in: decoded into
    memory when small (``hold_in_memory``), else checked by headers (cached) and read on demand."""
    root = resolve_data(cfg.data, cfg.synthetic_n)
    try:
        n = len(load_metadata(root, "train")) + cfg.mix_synthetic
    except ChipReadError as exc:
        raise DatasetError(root, "train", [str(exc)]) from None
    load = hold_in_memory(cfg, n)
    bands = config_bands(cfg)
    print(f"data: {root} ({n} chips, bands {','.join(bands)}, "
          f"{'held in memory' if load else 'read from disk on demand'})", flush=True)
    split = validate_split(root, "train", labels=True, load=load, deep=load, bands=bands)
    if cfg.mix_synthetic:
        from cloudseg.data.mixing import merge_splits

        syn_root = resolve_data("synthetic", cfg.synthetic_n)
        if syn_root == root:
            raise ValueError(f"mix_synthetic={cfg.mix_synthetic}: the data already is the synthetic default; "
                             "mixing is for real data")
        if bands != BANDS:
            raise ValueError(f"mix_synthetic={cfg.mix_synthetic}: synthetic chips have only {','.join(BANDS)}, "
                             f"not bands={cfg.bands}")
        syn = validate_split(syn_root, "train", labels=True, load=load, deep=load)
        if cfg.mix_synthetic > len(syn.ids):
            raise ValueError(f"mix_synthetic={cfg.mix_synthetic} but {syn_root} has {len(syn.ids)} chips")
        split, mixed = merge_splits(split, syn, cfg.mix_synthetic, prefix=MIXED_PREFIX, seed=cfg.seed)
        print(f"mixing {len(mixed)} synthetic chips from {syn_root} into every fold's training", flush=True)
    return root, split


def own_metadata(split: ValidatedSplit) -> pd.DataFrame:
    """The split's own chips' metadata, one row per chip with a ``chip_id`` column (folds are made over these;
    merged-in chips only ever train)."""
    return split.metadata.drop(index=split.mixed_ids).reset_index()


def n_folds(cfg: Config, split: ValidatedSplit) -> int:
    """How many folds the config makes of the split's own chips (one per location for ``n_folds=0``)."""
    return len(location_folds(own_metadata(split), cfg.n_folds, cfg.seed))


def fold_ids(cfg: Config, split: ValidatedSplit, fold: int | None = None) -> tuple[list[str], list[str]]:
    """(training ids, validation ids) of ``fold`` (default ``cfg.fold``): location-grouped over the split's own
    chips, ``exclude_ids`` left out of training only, merged-in chips added to training only."""
    train, val = fold_split(own_metadata(split), cfg.n_folds, cfg.fold if fold is None else fold, cfg.seed)
    if cfg.exclude_ids:
        train = exclude_from_training(train, read_id_list(cfg.exclude_ids))
    return train + list(split.mixed_ids), val
