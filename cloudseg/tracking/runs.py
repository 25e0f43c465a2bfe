"""A training run (or a cross-validation of folds) as MLflow runs: params, tags, per-epoch metrics, artifacts.

Used by ``experiments/train.py`` and by every trial of ``experiments/sweep.py``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cloudseg import tracking
from cloudseg.config import Config, apply_overrides
from cloudseg.data.splits import exclude_from_training, fold_split, location_folds, read_id_list
from cloudseg.data.validate import ValidatedSplit, validate_split
from cloudseg.metrics import JaccardAccumulator
from cloudseg.paths import REPO_ROOT, real_data_dir
from cloudseg.training import FitResult, Trainer


@dataclass
class RunOutcome:
    run_id: str
    result: FitResult | None  # None for a cv parent
    metrics: dict


def state_root() -> Path:
    """Local resumable training states (``<root>/<run_id>/last.pt``)."""
    return Path(os.environ.get("CLOUDSEG_STATE_ROOT", REPO_ROOT / ".cache" / "runs"))


def has_checkpoint(client: MlflowClient, run_id: str) -> bool:
    """Whether the run logged a model checkpoint (artifact ``checkpoint/best.pt``)."""
    return any(a.path == "checkpoint/best.pt" for a in client.list_artifacts(run_id, "checkpoint"))


# keys that do not change what a run learns: a finished run that differs only in these is the same pretraining
_NOT_LEARNED = {"experiment", "run_name", "plot_chips", "num_threads", "num_workers", "device"}
_pretrained: dict[str, str] = {}  # config path and text -> run id, found or trained in this process


def config_path(value: str) -> Path | None:
    """``value`` as a YAML config file: as given, else relative to the repository root; None if not YAML."""
    if not value.endswith((".yaml", ".yml")):
        return None
    for path in (Path(value).expanduser(), REPO_ROOT / value):
        if path.is_file():
            return path.resolve()
    raise FileNotFoundError(f"init_from: config {value} does not exist (nor under {REPO_ROOT})")


def pretrained_run(path: Path) -> str:
    """The run id of a FINISHED run of config ``path`` on its data (same learned settings, same data
    fingerprint, a checkpoint); trained here first when there is none."""
    from cloudseg.config import load_config

    key = f"{path}\n{path.read_text()}"  # an edited config is another pretraining
    if key in _pretrained:
        return _pretrained[key]
    cfg = load_config(path)
    if cfg.cv or cfg.init_from:
        raise ValueError(f"init_from: {path} must train one model from scratch (cv and init_from unset)")
    root, split = load_split(cfg)
    fp = tracking.data_fingerprint(root, "train", split.own_ids)
    want = {k: str(v) for k, v in cfg.to_dict().items() if k not in _NOT_LEARNED}
    client = MlflowClient()
    exp = client.get_experiment_by_name(cfg.experiment)
    found = None
    if exp is not None:
        runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED' and tags.`cloudseg.kind` = "
                                  f"'train' and tags.`cloudseg.data_fingerprint` = '{fp}'", max_results=1000)
        for r in runs:  # newest first
            if all(r.data.params.get(k) == v for k, v in want.items()) and has_checkpoint(client, r.info.run_id):
                found = r.info.run_id
                break
    if found:
        print(f"init_from {path.name}: finished run {found} (experiment {cfg.experiment})", flush=True)
    else:
        print(f"init_from {path.name}: no finished run of it on {root}; training it first", flush=True)
        found = train_fold(cfg, root, split, tags={"cloudseg.pretrain": "true"}).run_id
    _pretrained[key] = found
    return found


def resolve_init(value: str) -> Path | None:
    """The local checkpoint file config key ``init_from`` names: a path as it is; an MLflow run id, whose
    ``checkpoint/best.pt`` is downloaded once into the state root; or a YAML config, whose finished run on its
    data is that run id (trained first when there is none: a recipe can name its own pretraining)."""
    if not value:
        return None
    cfg_path = config_path(value)
    if cfg_path is not None:
        value = pretrained_run(cfg_path)
    path = Path(value).expanduser()
    if path.is_file():
        return path
    if not re.fullmatch(r"[0-9a-f]{32}", value):
        raise FileNotFoundError(f"init_from: {value!r} is neither a checkpoint file, an MLflow run id nor a "
                                "YAML config")
    cached = state_root() / "init" / value / "checkpoint" / "best.pt"
    if cached.is_file():
        return cached
    client = MlflowClient()
    try:
        run = client.get_run(value)
    except MlflowException as exc:
        raise ValueError(f"init_from: no MLflow run {value} in {tracking.tracking_uri()}") from exc
    if not has_checkpoint(client, value):
        raise ValueError(f"init_from: run {value} ({run.info.run_name}) has no checkpoint/best.pt artifact")
    return tracking.download(value, "checkpoint/best.pt", cached.parent.parent)


def resolve_data(data: str, synthetic_n: int | None = None) -> Path:
    """``synthetic`` -> data/synthetic (generated on first use); ``real`` -> the real sample; else a folder."""
    if data == "synthetic":
        from cloudseg.data.synthetic import ensure_synthetic_default

        return ensure_synthetic_default() if synthetic_n is None else ensure_synthetic_default(n=synthetic_n)
    if data == "real":
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


def suspect_ids(cfg: Config, root: Path) -> set[str]:
    if cfg.suspect_ids == "":
        return set()
    if cfg.suspect_ids == "auto":
        path = root / "reference" / "suspect_label_ids.txt"
        return read_id_list(path) if path.is_file() else set()
    return read_id_list(cfg.suspect_ids)


def load_split(cfg: Config) -> tuple[Path, ValidatedSplit]:
    """The config's training split, validated and decoded, with ``mix_synthetic`` synthetic chips merged in."""
    root = resolve_data(cfg.data, cfg.synthetic_n)
    print(f"data: {root}", flush=True)
    split = validate_split(root, "train", labels=True, load=True)
    if cfg.mix_synthetic:
        from cloudseg.data.mixing import merge_splits

        syn_root = resolve_data("synthetic", cfg.synthetic_n)
        if syn_root == root:
            raise ValueError(f"mix_synthetic={cfg.mix_synthetic}: the data already is the synthetic default; "
                             "mixing is for real data")
        syn = validate_split(syn_root, "train", labels=True, load=True)
        if cfg.mix_synthetic > len(syn.ids):
            raise ValueError(f"mix_synthetic={cfg.mix_synthetic} but {syn_root} has {len(syn.ids)} chips")
        split, mixed = merge_splits(split, syn, cfg.mix_synthetic, prefix="syn_", seed=cfg.seed)
        print(f"mixing {len(mixed)} synthetic chips from {syn_root} into every fold's training", flush=True)
    return root, split


def own_metadata(split: ValidatedSplit) -> pd.DataFrame:
    """The split's own chips' metadata (folds are made over these; merged-in chips only ever train)."""
    return split.metadata.drop(index=split.mixed_ids).reset_index()


def fold_ids(cfg: Config, split: ValidatedSplit, fold: int) -> tuple[list[str], list[str]]:
    train, val = fold_split(own_metadata(split), cfg.n_folds, fold, cfg.seed)
    if cfg.exclude_ids:
        train = exclude_from_training(train, read_id_list(cfg.exclude_ids))
    return train + list(split.mixed_ids), val


def _log_fit(run_id: str, cfg: Config, split: ValidatedSplit, result: FitResult) -> dict:
    from cloudseg import plots

    client = MlflowClient()
    metrics = {"best_val_jaccard": result.best_val_jaccard, "threshold": result.threshold,
               "epochs_run": result.epochs_run, "best_epoch": result.best_epoch, "wall_s": result.wall_s,
               "val_jaccard_at_threshold": result.final_eval.jaccard}
    for k, v in metrics.items():
        client.log_metric(run_id, k, float(v))
    client.log_artifact(run_id, str(result.checkpoint), "checkpoint")
    with tracking.scratch_dir() as tmp:
        tmp = Path(tmp)
        per = result.final_eval.per_chip.per_chip()
        fixed = result.fixed_eval.per_chip.per_chip().set_index("chip_id")
        per["intersection_fixed"] = fixed.loc[per["chip_id"], "intersection"].to_numpy()
        per["union_fixed"] = fixed.loc[per["chip_id"], "union"].to_numpy()
        per["location"] = split.metadata.loc[per["chip_id"], "location"].to_numpy()
        per.to_csv(tmp / "per_chip_jaccard.csv", index=False)
        client.log_artifact(run_id, str(tmp / "per_chip_jaccard.csv"))
        plots.learning_curve(result.history, tmp / "learning_curve.png")
        ids = list(result.final_eval.probs)
        plots.prediction_overlays([split.images[c] for c in ids], [split.masks[c] for c in ids],
                                  [result.final_eval.probs[c] for c in ids], result.threshold, ids,
                                  tmp / "predictions.png")
        client.log_artifact(run_id, str(tmp / "learning_curve.png"), "plots")
        client.log_artifact(run_id, str(tmp / "predictions.png"), "plots")
    return metrics


def start_run(cfg: Config, kind: str, tags: dict | None = None, parent_run_id: str | None = None,
              run_name: str | None = None) -> str:
    """Create an MLflow run with the standard tags, every config value as a param and ``config.json``."""
    exp_id = tracking.setup(cfg.experiment)
    all_tags = tracking.base_tags(kind)
    all_tags.update(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    client = MlflowClient()
    # our own name: MLflow's generated ones repeat within a process because training reseeds `random`
    name = run_name or cfg.run_name or f"{kind}-{time.strftime('%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    if not (run_name or cfg.run_name) and "cloudseg.trial" in all_tags:
        name = f"{all_tags.get('cloudseg.study', 'study')}-trial{all_tags['cloudseg.trial']}"
    run = client.create_run(exp_id, tags=all_tags, run_name=name)
    run_id = run.info.run_id
    tracking.log_params(run_id, cfg.to_dict())
    tracking.log_json(run_id, cfg.to_dict(), "config.json")
    return run_id


def train_fold(cfg: Config, root: Path, split: ValidatedSplit, kind: str = "train", tags: dict | None = None,
               parent_run_id: str | None = None, callbacks: list | None = None,
               resume_run_id: str | None = None, killed: tuple[type[BaseException], ...] = (),
               on_start=None) -> RunOutcome:
    """Train ``cfg.fold`` as one MLflow run. ``resume_run_id`` continues that run from its last state."""
    client = MlflowClient()
    train_ids, val_ids = fold_ids(cfg, split, cfg.fold)
    if resume_run_id:
        run_id = resume_run_id
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, "cloudseg.proc", tracking.process_tag())
    else:
        fp = tracking.data_fingerprint(root, "train", split.own_ids)
        run_tags = {"cloudseg.data_fingerprint": fp, "cloudseg.fold": str(cfg.fold), "cloudseg.data": str(root)}
        run_tags.update(tags or {})
        run_id = start_run(cfg, kind, run_tags, parent_run_id)
    import torch

    client.set_tag(run_id, "cloudseg.device", "cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
    print(f"run {run_id}: fold {cfg.fold} with {len(train_ids)} training / {len(val_ids)} validation chips",
          flush=True)
    if on_start is not None:
        on_start(run_id)
    with tracking.run_status(run_id, killed):
        trainer = Trainer(cfg, split, train_ids, val_ids, state_root() / run_id,
                          [tracking.EpochLogger(run_id), *(callbacks or [])], init_weights=resolve_init(cfg.init_from))
        result = trainer.fit()
        metrics = _log_fit(run_id, cfg, split, result)
    return RunOutcome(run_id, result, metrics)


def cross_validate(cfg: Config, root: Path, split: ValidatedSplit, resume_run_id: str | None = None) -> RunOutcome:
    """Train every fold as a child of one ``cv`` parent run; log pooled out-of-fold ``cv_jaccard``.

    The pooled figure uses each fold's kept model at the configured threshold: with ``keep=last`` and
    ``tune_threshold=false`` nothing in it was chosen with the held-out labels.
    """
    client = MlflowClient()
    n = len(location_folds(own_metadata(split), cfg.n_folds, cfg.seed))
    done: dict[int, str] = {}
    if resume_run_id:
        parent = resume_run_id
        client.update_run(parent, status="RUNNING")
        exp = client.get_run(parent).info.experiment_id
        for r in client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'"):
            if r.info.status == "FINISHED":
                done[int(r.data.tags["cloudseg.fold"])] = r.info.run_id
    else:
        parent = start_run(cfg, "cv", {"cloudseg.data": str(root),
                                       "cloudseg.data_fingerprint": tracking.data_fingerprint(root, "train",
                                                                                               split.own_ids)})
    t0 = time.time()
    with tracking.run_status(parent):
        rows = []
        for fold in range(n):
            if fold in done:
                run_id = done[fold]
                with tracking.scratch_dir() as tmp:
                    per = pd.read_csv(tracking.download(run_id, "per_chip_jaccard.csv", tmp), dtype={"chip_id": str})
            else:
                fold_cfg = apply_overrides(cfg, {"fold": fold, "cv": False}, "cv")
                out = train_fold(fold_cfg, root, split, "train", {"cloudseg.cv_parent": parent}, parent)
                fixed = out.result.fixed_eval.per_chip.per_chip()
                per = fixed.rename(columns={"intersection": "intersection_fixed", "union": "union_fixed"})
            per["fold"] = fold
            rows.append(per)
        oof = pd.concat(rows, ignore_index=True)
        acc = JaccardAccumulator()
        for r in oof.itertuples():
            acc.add_counts(r.chip_id, r.intersection_fixed, r.union_fixed)
        suspects = suspect_ids(cfg, root)
        clean = set(oof["chip_id"]) - suspects
        metrics = {"cv_jaccard": acc.score(), "cv_jaccard_clean": acc.score(clean) if clean else float("nan"),
                   "cv_folds": n, "wall_s": time.time() - t0, "cv_clean_chips": len(clean)}
        for k, v in metrics.items():
            client.log_metric(parent, k, float(v))
        with tracking.scratch_dir() as tmp:
            loc = acc.by_location(own_metadata(split))
            loc.to_csv(Path(tmp) / "cv_by_location.csv", index=False)
            oof.to_csv(Path(tmp) / "cv_per_chip.csv", index=False)
            client.log_artifact(parent, str(Path(tmp) / "cv_by_location.csv"))
            client.log_artifact(parent, str(Path(tmp) / "cv_per_chip.csv"))
    print(json.dumps({"cv_run_id": parent, **metrics}, indent=2), flush=True)
    return RunOutcome(parent, None, metrics)
