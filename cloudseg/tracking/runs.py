"""A run's lifecycle in MLflow, in one place: find a run's config and weights, resolve ``init_from``, start a run,
train it (one fold, or every fold under a cv parent), log what it produced, end it.

Entry points (``experiments/train.py``, ``sweep.py``, ``promote.py``) call these in this order: ``config_of`` /
``resumable`` or a loaded config; ``ensure_pretraining`` + ``resolve_init`` (before any run of theirs opens);
``train_fold`` or ``cross_validate``, which open the run, train, log and end it FINISHED, FAILED or KILLED.
Where the data come from is ``cloudseg.data.sources``'s business, not this module's.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cloudseg import distributed as dist
from cloudseg import tracking
from cloudseg.config import Config, ConfigError, apply_overrides, load_config
from cloudseg.data import sources
from cloudseg.data.validate import ValidatedSplit
from cloudseg.metrics import JaccardAccumulator
from cloudseg.paths import REPO_ROOT
from cloudseg.training import FitResult, Trainer


class RunError(ValueError):
    """A run id, a resume or an ``init_from`` value that cannot be used; the message says which and why."""


@dataclass
class RunOutcome:
    run_id: str
    result: FitResult | None  # None for a cv parent
    metrics: dict


def state_root() -> Path:
    """Local resumable training states of unfinished runs (``<root>/<run_id>/last.pt``); a run that finishes
    removes its own."""
    return Path(os.environ.get("CLOUDSEG_STATE_ROOT", REPO_ROOT / ".cache" / "runs"))


def has_checkpoint(client: MlflowClient, run_id: str) -> bool:
    """Whether the run logged a model checkpoint (artifact ``checkpoint/best.pt``)."""
    return any(a.path == "checkpoint/best.pt" for a in client.list_artifacts(run_id, "checkpoint"))


# ---------------------------------------------------------------------- a run's config and weights
def get_run(run_id: str):
    """The MLflow run, or a RunError naming the id and the store."""
    try:
        return MlflowClient().get_run(run_id)
    except MlflowException as exc:
        raise RunError(f"no MLflow run {run_id} in {tracking.tracking_uri()}") from exc


def config_of(run_id: str) -> Config:
    """The config a run was trained with: its ``config.json`` artifact over the defaults (keys added since then
    keep their defaults), with ``experiment`` set to the experiment the run is in."""
    run = get_run(run_id)
    with tracking.scratch_dir() as tmp:
        logged = json.loads(Path(tracking.download(run_id, "config.json", tmp)).read_text())
    exp_name = MlflowClient().get_experiment(run.info.experiment_id).name
    try:
        return apply_overrides(Config(), {**logged, "experiment": exp_name}, f"config.json of run {run_id}")
    except ConfigError as exc:
        raise RunError(str(exc)) from exc


def checkpoint_of(run_id: str, dst: Path | str) -> Path:
    """Download a run's ``checkpoint/best.pt`` under ``dst``; RunError when it has none."""
    run = get_run(run_id)
    if not has_checkpoint(MlflowClient(), run_id):
        raise RunError(f"run {run_id} ({run.info.run_name}) has no checkpoint artifact (checkpoint/best.pt)")
    return tracking.download(run_id, "checkpoint/best.pt", dst)


def resumable(run_id: str) -> tuple[Config, str]:
    """(config, kind) of an interrupted run that ``--resume`` may continue; RunError for a FINISHED run."""
    run = get_run(run_id)
    if run.info.status == "FINISHED":
        raise RunError(f"run {run_id} is already FINISHED; nothing to resume")
    return config_of(run_id), run.data.tags.get("cloudseg.kind", "train")


def repeat_seeds(run_id: str) -> list[int]:
    """The seeds a repeat parent runs (its tag ``cloudseg.seeds``)."""
    return [int(s) for s in get_run(run_id).data.tags["cloudseg.seeds"].split(",")]


# ---------------------------------------------------------------------- init_from
# keys that do not change what a run learns: a finished run that differs only in these is the same pretraining
_NOT_LEARNED = {"experiment", "run_name", "plot_chips", "num_threads", "num_workers", "device"}


def config_path(value: str) -> Path | None:
    """``value`` as a YAML config file: as given, else relative to the repository root; None if not YAML."""
    if not value.endswith((".yaml", ".yml")):
        return None
    for path in (Path(value).expanduser(), REPO_ROOT / value):
        if path.is_file():
            return path.resolve()
    raise RunError(f"init_from: config {value} does not exist (nor under {REPO_ROOT})")


def pretraining_config(value: str) -> Config | None:
    """The config ``init_from`` names when it names a YAML file (its pretraining), else None."""
    path = config_path(value) if value else None
    if path is None:
        return None
    cfg = load_config(path)
    if cfg.cv or cfg.init_from:
        raise RunError(f"init_from: {path} must train one model from scratch (cv and init_from unset)")
    return cfg


def find_pretrained(cfg: Config) -> str | None:
    """The newest FINISHED train run of ``cfg`` on its data (same learned settings, same data fingerprint) that
    has a checkpoint, or None."""
    root = sources.resolve_data(cfg.data, cfg.synthetic_n)
    from cloudseg.data.validate import validate_split

    # the ids only: headers (cached) suffice, decoding every pixel of the pretraining data is not needed here
    fp = tracking.data_fingerprint(root, "train", validate_split(root, "train", labels=True, deep=False).ids)
    want = {k: str(v) for k, v in cfg.to_dict().items() if k not in _NOT_LEARNED}
    client = MlflowClient()
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED' and tags.`cloudseg.kind` = "
                              f"'train' and tags.`cloudseg.data_fingerprint` = '{fp}'", max_results=1000)
    for r in runs:  # newest first
        if all(r.data.params.get(k) == v for k, v in want.items()) and has_checkpoint(client, r.info.run_id):
            return r.info.run_id
    return None


def ensure_pretraining(value: str) -> None:
    """When ``init_from`` names a YAML config that has no finished run on its data yet, train it now, as a run of
    its own (tag ``cloudseg.pretrain``). Entry points call this before any run of theirs opens."""
    cfg = pretraining_config(value)
    if cfg is None:
        return
    found = find_pretrained(cfg)
    if found:
        print(f"init_from {value}: finished run {found} (experiment {cfg.experiment})", flush=True)
        return
    print(f"init_from {value}: no finished run of it on its data; training it first", flush=True)
    tracking.setup(cfg.experiment)
    root, split = sources.load_split(cfg)
    train_fold(cfg, root, split, tags={"cloudseg.pretrain": "true"})


def resolve_init(value: str) -> Path | None:
    """The local checkpoint file ``init_from`` names: a path as it is; an MLflow run id, whose
    ``checkpoint/best.pt`` is downloaded once into the state root; a YAML config, its finished run's checkpoint
    (``ensure_pretraining`` trains it first where there is none); ``ukis-csmask[:level]``, that package's weights
    converted once into the state root (``cloudseg.pretrained``). Never starts a run."""
    if not value:
        return None
    from cloudseg import pretrained

    level = pretrained.parse_ukis(value)
    if level is not None:  # ukis-csmask's weights, converted once
        cached = state_root() / "init" / f"{pretrained.UKIS}-{level}" / "best.pt"
        try:
            return pretrained.ukis_cached(level, cached)
        except pretrained.PretrainedError as exc:
            raise RunError(str(exc)) from exc
    pre = pretraining_config(value)
    if pre is not None:
        found = find_pretrained(pre)
        if found is None:
            raise RunError(f"init_from: {value} has no finished run on its data; train it first "
                           f"(experiments/train.py --config {value})")
        value = found
    path = Path(value).expanduser()
    if path.is_file():
        return path
    if not re.fullmatch(r"[0-9a-f]{32}", value):
        raise RunError(f"init_from: {value!r} is neither a checkpoint file, an MLflow run id, a YAML config nor "
                       f"ukis-csmask[:l2a|l1c]")
    cached = state_root() / "init" / value / "checkpoint" / "best.pt"
    if cached.is_file():
        return cached
    return checkpoint_of(value, cached.parent.parent)


def _log_fit(run_id: str, cfg: Config, split: ValidatedSplit, result: FitResult) -> dict:
    from cloudseg import plots

    client = MlflowClient()
    # ``threshold_tuned``, not ``threshold``: that name is the config's param (the threshold asked for)
    metrics = {"best_val_jaccard": result.best_val_jaccard, "threshold_tuned": result.threshold,
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
        plots.prediction_overlays([split.image(c) for c in ids], [split.mask(c) for c in ids],
                                  [result.final_eval.probs[c] for c in ids], result.threshold, ids,
                                  tmp / "predictions.png")
        client.log_artifact(run_id, str(tmp / "learning_curve.png"), "plots")
        client.log_artifact(run_id, str(tmp / "predictions.png"), "plots")
    return metrics


def start_run(cfg: Config, kind: str, tags: dict | None = None, parent_run_id: str | None = None,
              run_name: str | None = None, left_out: Collection[str] = ()) -> str:
    """Create an MLflow run with the standard tags, every config value as a param (but the keys ``left_out``: a
    sweep run writes the keys its study varies later, from its best trial) and ``config.json``."""
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
    tracking.log_params(run_id, {k: v for k, v in cfg.to_dict().items() if k not in left_out})
    tracking.log_json(run_id, cfg.to_dict(), "config.json")
    return run_id


def train_fold(cfg: Config, root: Path, split: ValidatedSplit, kind: str = "train", tags: dict | None = None,
               parent_run_id: str | None = None, callbacks: list | None = None,
               resume_run_id: str | None = None, pruned: tuple[type[BaseException], ...] = (),
               on_start=None, init_weights: Path | None = None) -> RunOutcome:
    """Train ``cfg.fold`` as one MLflow run, from ``init_weights`` (a checkpoint file) when given.
    ``resume_run_id`` continues that run from its last state. An exception of the ``pruned`` types raised by a
    callback (a pruned trial) ends the run FINISHED with ``cloudseg.pruned=true`` (``tracking.run_status``).
    Under torchrun rank 0 owns the run and the other ranks train beside it (``_follow_fold``)."""
    if not dist.is_main():
        return _follow_fold(cfg, split, init_weights)
    client = MlflowClient()
    train_ids, val_ids = sources.fold_ids(cfg, split)
    if resume_run_id:
        run_id = resume_run_id
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, "cloudseg.proc", tracking.process_tag())
    else:
        fp = tracking.data_fingerprint(root, "train", split.own_ids)
        run_tags = {"cloudseg.data_fingerprint": fp, "cloudseg.fold": str(cfg.fold), "cloudseg.data": str(root),
                    "cloudseg.data_mode": "memory" if split.in_memory else "disk"}
        run_tags.update(tags or {})
        run_id = start_run(cfg, kind, run_tags, parent_run_id)
    print(f"run {run_id}: fold {cfg.fold} with {len(train_ids)} training / {len(val_ids)} validation chips",
          flush=True)
    if on_start is not None:
        on_start(run_id)
    dist.broadcast(run_id)
    state_dir = state_root() / run_id
    try:
        with tracking.run_status(run_id, pruned, failure=lambda: _rank_failure(state_dir)), \
                _watch_ranks(run_id, state_dir):
            trainer = Trainer(cfg, split, train_ids, val_ids, state_dir,
                              [tracking.EpochLogger(run_id), *(callbacks or [])], init_weights=init_weights)
            for key, value in trainer.describe().items():  # what device=auto and precision=auto resolved to
                client.set_tag(run_id, key, value)
            result = trainer.fit()
            metrics = _log_fit(run_id, cfg, split, result)
    except pruned:  # a pruned trial is over for good: nothing will resume it
        shutil.rmtree(state_dir, ignore_errors=True)
        raise
    # FINISHED: the model is the run's checkpoint artifact, and a finished run is never resumed, so the local
    # state (last.pt holds the optimiser too: 3x the weights) would only fill the disk, run after run
    shutil.rmtree(state_dir, ignore_errors=True)
    return RunOutcome(run_id, result, metrics)


@contextlib.contextmanager
def _watch_ranks(run_id: str, state_dir: Path, every_s: float = 1.0):
    """Under torchrun, a thread of rank 0 that ends the run FAILED as soon as another rank leaves its error: rank 0
    itself may be waiting inside a collective for the dead rank when torchrun kills it."""
    if not dist.active():
        yield
        return
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(every_s):
            why = _rank_failure(state_dir)
            if why:
                client = MlflowClient()
                client.set_tag(run_id, "cloudseg.error", why[:4000])
                client.set_terminated(run_id, "FAILED")
                return

    thread = threading.Thread(target=watch, name="cloudseg-rank-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)


def _follow_fold(cfg: Config, split: ValidatedSplit, init_weights: Path | None) -> RunOutcome:
    """A rank other than 0: train beside rank 0's run (its id broadcast), never touching MLflow; an error is left
    in the state folder for rank 0 to end the run FAILED with."""
    train_ids, val_ids = sources.fold_ids(cfg, split)
    run_id = dist.broadcast(None)
    state_dir = state_root() / run_id
    try:
        result = Trainer(cfg, split, train_ids, val_ids, state_dir, [], init_weights=init_weights).fit()
    except BaseException as exc:
        state_dir.mkdir(parents=True, exist_ok=True)
        dist.failure_marker(state_dir).write_text(f"rank {dist.rank()}: {type(exc).__name__}: {exc}"[:4000])
        raise
    return RunOutcome(run_id, result, {})


def _rank_failure(state_dir: Path) -> str | None:
    """The error another rank left before torchrun stopped this one, if any."""
    found = sorted(state_dir.glob("rank*.failed")) if state_dir.is_dir() else []
    return found[0].read_text() if found else None


def _reopen(parent: str, key: str) -> dict[int, object]:
    """Mark a parent run RUNNING again and return its children by the integer tag ``key`` (fold or seed)."""
    client = MlflowClient()
    client.update_run(parent, status="RUNNING")
    exp = client.get_run(parent).info.experiment_id
    return {int(r.data.tags[key]): r for r in client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'")
            if key in r.data.tags}


def cross_validate(cfg: Config, root: Path, split: ValidatedSplit, resume_run_id: str | None = None,
                   init_weights: Path | None = None, tags: dict | None = None,
                   parent_run_id: str | None = None) -> RunOutcome:
    """Train every fold as a child of one ``cv`` parent run; log pooled out-of-fold ``cv_jaccard``.

    The pooled figure uses each fold's kept model at the configured threshold: with ``keep=last`` and
    ``tune_threshold=false`` nothing in it was chosen with the held-out labels.
    """
    n = sources.n_folds(cfg, split)
    if not dist.is_main():  # train the folds rank 0 trains, beside it
        skip = dist.broadcast(None)
        for fold in range(n):
            if fold not in skip:
                train_fold(apply_overrides(cfg, {"fold": fold, "cv": False}, "cv"), root, split,
                           init_weights=init_weights)
        return RunOutcome(dist.broadcast(None), None, {})
    client = MlflowClient()
    done: dict[int, str] = {}
    if resume_run_id:
        parent = resume_run_id
        done = {k: r.info.run_id for k, r in _reopen(parent, "cloudseg.fold").items() if r.info.status == "FINISHED"}
    else:
        parent = start_run(cfg, "cv", {"cloudseg.data": str(root),
                                       "cloudseg.data_fingerprint": tracking.data_fingerprint(root, "train",
                                                                                               split.own_ids),
                                       **(tags or {})}, parent_run_id)
    t0 = time.time()
    dist.broadcast(set(done))
    with tracking.run_status(parent):
        rows = []
        for fold in range(n):
            if fold in done:
                run_id = done[fold]
                with tracking.scratch_dir() as tmp:
                    per = pd.read_csv(tracking.download(run_id, "per_chip_jaccard.csv", tmp), dtype={"chip_id": str})
            else:
                fold_cfg = apply_overrides(cfg, {"fold": fold, "cv": False}, "cv")
                out = train_fold(fold_cfg, root, split, "train", {"cloudseg.cv_parent": parent}, parent,
                                 init_weights=init_weights)
                fixed = out.result.fixed_eval.per_chip.per_chip()
                per = fixed.rename(columns={"intersection": "intersection_fixed", "union": "union_fixed"})
            per["fold"] = fold
            rows.append(per)
        oof = pd.concat(rows, ignore_index=True)
        oof["location"] = split.metadata.loc[oof["chip_id"], "location"].to_numpy()
        acc = JaccardAccumulator()
        for r in oof.itertuples():
            acc.add_counts(r.chip_id, r.intersection_fixed, r.union_fixed)
        suspects = sources.suspect_ids(cfg, root)
        clean = set(oof["chip_id"]) - suspects
        metrics = {"cv_jaccard": acc.score(), "cv_jaccard_clean": acc.score(clean) if clean else float("nan"),
                   "cv_folds": n, "wall_s": time.time() - t0, "cv_clean_chips": len(clean)}
        for k, v in metrics.items():
            client.log_metric(parent, k, float(v))
        with tracking.scratch_dir() as tmp:
            loc = acc.by_location(sources.own_metadata(split))
            loc.to_csv(Path(tmp) / "cv_by_location.csv", index=False)
            oof.to_csv(Path(tmp) / "cv_per_chip.csv", index=False)
            client.log_artifact(parent, str(Path(tmp) / "cv_by_location.csv"))
            client.log_artifact(parent, str(Path(tmp) / "cv_per_chip.csv"))
    print(json.dumps({"cv_run_id": parent, **metrics}, indent=2), flush=True)
    dist.broadcast(parent)
    return RunOutcome(parent, None, metrics)


# ---------------------------------------------------------------------- repeats over seeds
REPEATED = ("best_val_jaccard", "cv_jaccard", "cv_jaccard_clean")  # children's figures a repeat parent summarises


def repeat(cfg: Config, root: Path, split: ValidatedSplit, seeds: list[int], resume_run_id: str | None = None,
           init_weights: Path | None = None) -> RunOutcome:
    """The same config once per seed (a cv or a single run each), as children of one ``repeat`` parent, which logs
    ``<metric>_mean``, ``_sd``, ``_ci_low`` and ``_ci_high`` (95% t interval of the mean) of each figure.

    Resuming the parent skips its FINISHED children and resumes the others.
    """
    from cloudseg.stats import mean_sd_ci

    client = MlflowClient()
    children: dict[int, object] = {}
    if resume_run_id:
        parent = resume_run_id
        children = _reopen(parent, "cloudseg.seed")
    else:
        parent = start_run(cfg, "repeat", {"cloudseg.seeds": ",".join(map(str, seeds)), "cloudseg.data": str(root),
                                           "cloudseg.data_fingerprint": tracking.data_fingerprint(
                                               root, "train", split.own_ids)})
    figures: dict[str, list[float]] = {}
    with tracking.run_status(parent):
        for seed in seeds:
            scfg = apply_overrides(cfg, {"seed": seed}, "--seeds")
            if scfg.mix_synthetic:  # which synthetic chips join depends on the seed
                root, split = sources.load_split(scfg)
            old = children.get(seed)
            if old is not None and old.info.status == "FINISHED":
                metrics = old.data.metrics
            else:
                again = old.info.run_id if old is not None else None
                tags = {"cloudseg.seed": str(seed)}
                if cfg.cv:
                    out = cross_validate(scfg, root, split, again, init_weights, tags, parent)
                else:
                    out = train_fold(scfg, root, split, "train", tags, parent, resume_run_id=again,
                                     init_weights=init_weights)
                metrics = out.metrics
                print(f"run_id={out.run_id} seed={seed}", flush=True)
            for name in REPEATED:
                if name in metrics:
                    figures.setdefault(name, []).append(float(metrics[name]))
        summary = {"seeds": float(len(seeds))}
        for name, values in figures.items():
            mean, sd, lo, hi = mean_sd_ci(values)
            summary.update({f"{name}_mean": mean, f"{name}_sd": sd, f"{name}_ci_low": lo, f"{name}_ci_high": hi})
        for k, v in summary.items():
            client.log_metric(parent, k, float(v))
        tracking.log_json(parent, {"seeds": seeds, "figures": figures}, "repeat.json")
    return RunOutcome(parent, None, summary)
