"""One typed config: every default in one dataclass, YAML files as partial overrides, ``--set key=value``.

A ``Config`` checks its types and values when it is made (``__post_init__``), so every path that builds one (a
YAML file, ``--set``, a logged ``config.json``, a sweep's trial) gets the same errors, raised before anything runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override names an unknown key or gives a value of the wrong type."""


@dataclass
class Config:
    # --- tracking
    experiment: str = "cloudseg"  # MLflow experiment name
    run_name: str = ""  # MLflow run name ("" = generated)
    # --- data
    data: str = "synthetic"  # folder in the competition layout; "synthetic" = data/synthetic, "real" = the real sample
    mix_synthetic: int = 0  # synthetic-default chips added to every fold's training side (never validated on)
    exclude_ids: str = ""  # file of chip ids left out of training (never out of validation); "" = none
    suspect_ids: str = "auto"  # ids scored apart as suspect labels; "auto" = <data>/reference/suspect_label_ids.txt
    n_folds: int = 4  # location-grouped folds; 0 = leave-one-location-out
    fold: int = 0  # which fold validates this run
    cv: bool = False  # train every fold under one parent run and log the pooled out-of-fold cv_jaccard
    bands: str = "B02,B03,B04,B08"  # the model's input bands, in order; others are added with `cloudseg add-bands`
    in_memory: str = "auto"  # hold the split's arrays: auto = when they fit in 1 GB (~420 chips), else read on demand
    # --- model
    arch: str = "Unet"  # smp architecture (see cloudseg.models.ARCHITECTURES)
    encoder: str = "timm-mobilenetv3_large_100"  # smp encoder; light, and promotable to the runtime's smp 0.2.1
    encoder_weights: str = ""  # "" = random init (no download); "imagenet" for machines with network
    init_from: str = ""  # start from these weights: a checkpoint file, an MLflow run id, a YAML config (its run),
    # or ukis-csmask[:l2a|l1c] (that package's Unet+efficientnet-b4 weights; cloudseg.pretrained)
    # --- optimisation
    loss: str = "0.5*bce+0.5*dice"  # loss names with weights, see cloudseg.losses
    epochs: int = 8  # maximum epochs
    batch_size: int = 8  # training batch (chips or crops); under torchrun the global batch, split over the ranks
    val_batch_size: int = 4  # validation batch (full chips)
    crop_size: int = 256  # random training crop; 0 = full 512 chips
    aug_strength: float = 0.0  # 0 = flips/rotations/crop only; up to 1 adds affine warps, blur, brightness gain
    lr: float = 2e-3  # peak learning rate (AdamW)
    weight_decay: float = 1e-4  # AdamW weight decay
    scheduler: str = "cosine"  # cosine (linear warm-up then cosine) | onecycle | constant
    warmup_epochs: float = 0.5  # linear warm-up length for cosine
    grad_clip: float = 1.0  # max gradient norm; 0 = off
    steps_per_epoch: int = 0  # optimiser steps per epoch; 0 = one pass over the training chips
    val_every: int = 1  # validate every this many epochs, and always after the last (sweeps' pruners need 1)
    early_stopping: int = 0  # stop after this many epochs without a better val_jaccard; 0 = never
    keep: str = "best"  # checkpoint kept: best (by val_jaccard on the fold) or last (no choice made on val labels)
    # --- numerics and speed
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto = fp16 AMP on CUDA, bf16 autocast on CPUs with native bf16 (else fp32)
    channels_last: str = "auto"  # NHWC memory format: auto = on CUDA and with CPU bf16; off for fp32 on CPU (slower)
    num_threads: int = 0  # torch intra-op threads; 0 = leave torch's default (all cores)
    num_workers: int = 0  # DataLoader workers (per rank); 0 is fastest on 2 cores with chips in memory
    sync_bn: bool = False  # under torchrun: BatchNorm statistics over every rank's batch (SyncBatchNorm)
    seed: int = 0  # seeds python, numpy and torch; also shuffles which locations share a fold
    # --- sweeps (experiments/sweep.py)
    pruner: str = "median"  # median | hyperband | none; fed with val_jaccard after each epoch
    pruner_warmup_epochs: int = 1  # epochs a trial always runs before it may be pruned
    # --- decision
    threshold: float = 0.5  # decision threshold on the cloud probability
    tune_threshold: bool = True  # pick the threshold maximising val_jaccard at the end (stored in the checkpoint)
    # --- outputs
    plot_chips: int = 6  # validation chips drawn in the predictions figure
    synthetic_n: int = 96  # chips in the synthetic default's training split (made on first use)

    def __post_init__(self) -> None:
        types = _field_types()
        for f in fields(self):
            value = getattr(self, f.name)
            want = types[f.name]
            ok = isinstance(value, want) and not (want is not bool and isinstance(value, bool))
            if want is float and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))
                ok = True
            if not ok:
                raise ConfigError(f"'{f.name}' must be {want.__name__}, got {value!r} ({type(value).__name__})")
        validate_config(self)

    # ------------------------------------------------------------------ helpers
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def _coerce(key: str, value: Any, target_type: type, source: str) -> Any:
    """Convert ``value`` to ``target_type`` or raise a ConfigError naming the key and the source."""
    if target_type is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif target_type is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif target_type is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif target_type is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{source}: '{key}' must be {target_type.__name__}, got {value!r} ({type(value).__name__})")


_TYPES = {"bool": bool, "int": int, "float": float, "str": str}


def _field_types() -> dict[str, type]:
    return {f.name: _TYPES[f.type] if isinstance(f.type, str) else f.type for f in fields(Config)}


def apply_overrides(cfg: Config, overrides: dict[str, Any], source: str) -> Config:
    """Return a copy of ``cfg`` with ``overrides`` applied; keys must exist and values keep their type."""
    types = _field_types()
    unknown = sorted(set(overrides) - set(types))
    if unknown:
        raise ConfigError(
            f"{source}: unknown config key(s) {unknown}. Valid keys: {', '.join(sorted(types))}"
        )
    changes = {k: _coerce(k, v, types[k], source) for k, v in overrides.items()}
    try:
        return dataclasses.replace(cfg, **changes)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def parse_set(items: list[str] | None) -> dict[str, str]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}``; values stay strings until typed against the dataclass."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def load_config(path: Path | str | None = None, sets: list[str] | None = None, **extra: Any) -> Config:
    """Defaults <- YAML file (partial override) <- ``--set`` items <- ``extra`` (e.g. ``data`` from ``--data``)."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of key: value, got {type(raw).__name__}")
        cfg = apply_overrides(cfg, raw, str(path))
    cfg = apply_overrides(cfg, parse_set(sets), "--set")
    extra = {k: v for k, v in extra.items() if v is not None}
    if extra:
        cfg = apply_overrides(cfg, extra, "command line")
    check_model(cfg)
    return cfg


def check_model(cfg: Config) -> None:
    """The architecture and encoder exist in the installed smp (imports torch and smp, so entry points call this
    once, not every ``Config``)."""
    from cloudseg.models import canonical_arch, check_encoder

    try:
        canonical_arch(cfg.arch)
        check_encoder(cfg.encoder)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def validate_config(cfg: Config) -> None:
    """Value checks that types alone cannot express."""
    finite = all(math.isfinite(getattr(cfg, f.name)) for f in fields(cfg) if isinstance(getattr(cfg, f.name), float))
    checks = [
        (finite, "every float key must be finite: " + ", ".join(
            f"{f.name}={getattr(cfg, f.name)}" for f in fields(cfg)
            if isinstance(getattr(cfg, f.name), float) and not math.isfinite(getattr(cfg, f.name)))),
        (cfg.epochs >= 1, f"epochs={cfg.epochs} must be >= 1"),
        (cfg.batch_size >= 1, f"batch_size={cfg.batch_size} must be >= 1"),
        (cfg.val_batch_size >= 1, f"val_batch_size={cfg.val_batch_size} must be >= 1"),
        (cfg.crop_size == 0 or 32 <= cfg.crop_size <= 512 and cfg.crop_size % 32 == 0,
         f"crop_size={cfg.crop_size} must be 0 (full chip) or a multiple of 32 in 32..512"),
        (cfg.lr > 0, f"lr={cfg.lr} must be > 0"),
        (cfg.weight_decay >= 0, f"weight_decay={cfg.weight_decay} must be >= 0"),
        (cfg.steps_per_epoch >= 0, f"steps_per_epoch={cfg.steps_per_epoch} must be >= 0 (0 = one pass)"),
        (cfg.early_stopping >= 0, f"early_stopping={cfg.early_stopping} must be >= 0"),
        (cfg.num_threads >= 0 and cfg.num_workers >= 0, "num_threads and num_workers must be >= 0"),
        (cfg.fold >= 0, f"fold={cfg.fold} must be >= 0"),
        (cfg.synthetic_n >= 1, f"synthetic_n={cfg.synthetic_n} must be >= 1"),
        (cfg.warmup_epochs >= 0 and cfg.grad_clip >= 0, "warmup_epochs and grad_clip must be >= 0"),
        (cfg.val_every >= 1, f"val_every={cfg.val_every} must be >= 1"),
        (cfg.mix_synthetic >= 0, f"mix_synthetic={cfg.mix_synthetic} must be >= 0"),
        (0 < cfg.threshold < 1, f"threshold={cfg.threshold} must be in (0, 1)"),
        (cfg.scheduler in ("cosine", "onecycle", "constant"),
         f"scheduler={cfg.scheduler!r} must be one of cosine, onecycle, constant"),
        (cfg.precision in ("auto", "bf16", "fp16", "fp32"),
         f"precision={cfg.precision!r} must be one of auto, bf16, fp16, fp32"),
        (cfg.channels_last in ("auto", "true", "false"),
         f"channels_last={cfg.channels_last!r} must be auto, true or false"),
        (cfg.pruner in ("median", "hyperband", "none"), f"pruner={cfg.pruner!r} must be median, hyperband or none"),
        (cfg.in_memory in ("auto", "true", "false"), f"in_memory={cfg.in_memory!r} must be auto, true or false"),
        (cfg.keep in ("best", "last"), f"keep={cfg.keep!r} must be best or last"),
        (cfg.device in ("auto", "cpu", "cuda"), f"device={cfg.device!r} must be auto, cpu or cuda"),
        (cfg.n_folds == 0 or cfg.n_folds >= 2, f"n_folds={cfg.n_folds} must be 0 (leave-one-location-out) or >= 2"),
        (0 <= cfg.aug_strength <= 1, f"aug_strength={cfg.aug_strength} must be in [0, 1]"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    from cloudseg.data.bands import parse_bands

    try:
        parse_bands(cfg.bands)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def config_bands(cfg: Config) -> tuple[str, ...]:
    """The config's ``bands`` as a tuple of band names, in the model's input order."""
    from cloudseg.data.bands import parse_bands

    return parse_bands(cfg.bands)
