"""Optuna studies: search spaces from YAML, storages, pruners, trial accounting, a sweep worker's loop, and the
study's figures. A sweep trial is ``trial_objective``: one nested MLflow training run (``runs.train_fold``)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import re
import socket
import sys
import time
import warnings
import zlib
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.storages import RDBStorage
from optuna.trial import TrialState
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url as sa_make_url

from cloudseg.config import Config

HEARTBEAT_S = 5  # a trial whose worker stops beating for GRACE_S is failed and retried
GRACE_S = 20
MAX_RETRY = 2
CONNECT_TIMEOUT_S = 15  # database connection attempts (PostgreSQL)
CREATE_ATTEMPTS = 5  # opening a storage whose tables another worker is creating right now


class StudyError(ValueError):
    """The study cannot be opened as asked (bad URL, unreachable database, different search space)."""


CLAIMED = "cloudseg:claimed"  # system attribute of a waiting trial a worker has reserved (claim_trial)


class SurplusTrial(RuntimeError):
    """Another worker already started the last trial the study needs (only where the storage has no lock to
    claim trials with; see ``claim_trial``)."""


def load_space(path: Path | str) -> dict[str, dict]:
    """Read a search space: ``key: {type: float|int, low, high, log?, step?}`` or ``{type: categorical,
    choices: [...]}``; every key must be a config key."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"search space {path} does not exist")
    space = yaml.safe_load(path.read_text()) or {}
    keys = set(Config.keys())
    problems = []
    for name, spec in space.items():
        if name not in keys:
            problems.append(f"'{name}' is not a config key")
            continue
        if not isinstance(spec, dict) or spec.get("type") not in ("float", "int", "categorical"):
            problems.append(f"'{name}': needs type float, int or categorical")
        elif spec["type"] == "categorical" and not spec.get("choices"):
            problems.append(f"'{name}': categorical needs a non-empty choices list")
        elif spec["type"] in ("float", "int") and not ("low" in spec and "high" in spec):
            problems.append(f"'{name}': {spec['type']} needs low and high")
    if problems:
        raise StudyError(f"{path}: " + "; ".join(problems))
    return space


def space_beside(config_path: Path | str | None) -> Path:
    """``<config>-space.yaml`` beside the config, else ``space.yaml`` in the same folder."""
    from cloudseg.paths import CONFIGS_DIR

    if config_path is None:
        return CONFIGS_DIR / "space.yaml"
    config_path = Path(config_path)
    own = config_path.with_name(config_path.stem + "-space.yaml")
    return own if own.is_file() else config_path.with_name("space.yaml")


def suggest(trial: optuna.Trial, space: dict[str, dict]) -> dict[str, Any]:
    out = {}
    for name, spec in space.items():
        t = spec["type"]
        if t == "float":
            out[name] = trial.suggest_float(name, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log")))
        elif t == "int":
            out[name] = trial.suggest_int(name, int(spec["low"]), int(spec["high"]), log=bool(spec.get("log")),
                                          step=int(spec.get("step", 1)))
        else:
            out[name] = trial.suggest_categorical(name, list(spec["choices"]))
    return out


def make_pruner(cfg: Config) -> optuna.pruners.BasePruner:
    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=cfg.pruner_warmup_epochs)
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, cfg.pruner_warmup_epochs), max_resource=cfg.epochs)
    return optuna.pruners.NopPruner()


def display_url(url: str) -> str:
    """``url`` with its password masked, for messages and logs."""
    try:
        return sa_make_url(url).render_as_string(hide_password=True)
    except Exception:  # not parseable: mask anything between "user:" and "@"
        return re.sub(r"(//[^/:@]*:)[^/@]*@", r"\1***@", url)


def _storage_problem(exc: Exception, url: str) -> str:
    """What went wrong opening a storage, in words, with the database's own message (no SQLAlchemy boilerplate)."""
    detail = str(getattr(exc, "orig", None) or exc).strip()
    if isinstance(exc, (sa_exc.NoSuchModuleError, sa_exc.ArgumentError)):
        return (f"not a usable SQLAlchemy URL ({detail}); PostgreSQL is "
                "postgresql+psycopg://USER[:PASSWORD]@HOST[:PORT]/DATABASE")
    if isinstance(exc, ImportError):
        return f"its database driver is not installed ({detail}); for PostgreSQL: pip install 'psycopg[binary]'"
    if isinstance(exc, sa_exc.OperationalError) and url.startswith("sqlite"):
        return f"the database file cannot be opened: {detail}"
    if isinstance(exc, sa_exc.OperationalError):
        return (f"the database is unreachable or refused the connection: {detail}\n  check that the server runs, "
                "listens on that address and port, lets this host in (pg_hba.conf), and that the database exists")
    return f"{type(exc).__name__}: {detail}"


def make_storage(url: str) -> RDBStorage:
    """An RDB storage with heartbeats, so trials of killed workers are failed and retried."""
    if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):  # optuna >= 4.9
        retry = {"heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(MAX_RETRY)}
    else:
        retry = {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(MAX_RETRY)}
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith(("postgresql://", "postgresql+psycopg")):  # libpq: a silent host fails in seconds, not minutes
        engine_kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    for attempt in range(CREATE_ATTEMPTS):
        try:
            return RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                              engine_kwargs=engine_kwargs, **retry)
        except (sa_exc.IntegrityError, sa_exc.ProgrammingError) as exc:
            # workers on other hosts starting at the same moment on an empty database race to create Optuna's
            # tables; the loser finds them there on the next try
            if attempt + 1 == CREATE_ATTEMPTS:
                raise StudyError(f"cannot open the Optuna storage {display_url(url)!r}: "
                                 f"{_storage_problem(exc, url)}") from exc
            time.sleep(1 + random.random())
        except Exception as exc:  # bad URL, driver missing, database unreachable
            raise StudyError(f"cannot open the Optuna storage {display_url(url)!r}: "
                             f"{_storage_problem(exc, url)}") from exc


def sampler_seed(cfg: Config, worker_index: int, trials_before: int) -> int:
    """The TPE sampler's seed: the config's seed and the worker's index (so one worker on a fresh study always
    proposes the same trials), this host's name (workers 0 of two hosts differ) and the study's trials so far (a
    worker restarted on a study in progress does not replay the first draws)."""
    return zlib.crc32(f"{cfg.seed}:{worker_index}:{socket.gethostname()}:{trials_before}".encode())


def open_study(name: str, storage: RDBStorage, space: dict, cfg: Config, worker_index: int = 0,
               seed: int | None = None) -> optuna.Study:
    """Create or resume ``name``; refuse when the stored search space differs from ``space``. The sampler is
    seeded by ``sampler_seed`` unless ``seed`` is given."""
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize", pruner=make_pruner(cfg),
                                load_if_exists=True)
    if seed is None:
        seed = sampler_seed(cfg, worker_index, len(study.get_trials(deepcopy=False)))
    study.sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=4)
    stored = study.user_attrs.get("space")
    mine = json.loads(json.dumps(space))
    if stored is None:
        study.set_user_attr("space", mine)
        study.set_user_attr("base_config", json.loads(cfg.to_json()))
    elif stored != mine:
        raise StudyError(
            f"study '{name}' was created with a different search space:\n  stored: {stored}\n  given:  {mine}\n"
            "use another --study name, or the search space the study was created with"
        )
    return study


def counted(study: optuna.Study) -> int:
    """Trials that count towards --n-trials: complete, pruned, and failed by an error (not a killed worker,
    whose trial is retried, nor a surplus trial)."""
    n = 0
    for t in study.get_trials(deepcopy=False):
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            n += 1
        elif t.state == TrialState.FAIL and "error" in t.user_attrs:
            n += 1
    return n


def in_flight(study: optuna.Study) -> int:
    """Counted trials plus the running and waiting ones: what the study has or will have."""
    return in_flight_before(study, sys.maxsize)


@contextlib.contextmanager
def _slot_lock(storage_url: str):
    """A lock shared by every worker of the storage: PostgreSQL's advisory lock (any host), a file lock beside a
    sqlite file (this host); elsewhere none (yields False)."""
    if storage_url.startswith("sqlite:///") and storage_url != "sqlite:///:memory:":
        with open(storage_url[len("sqlite:///"):] + ".slots.lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield True
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
    elif storage_url.startswith("postgresql"):
        import sqlalchemy

        engine = sqlalchemy.create_engine(storage_url, poolclass=sqlalchemy.pool.NullPool)
        key = zlib.crc32(b"cloudseg-trial-slots")
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield True
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        engine.dispose()
    else:
        yield False


def claim_trial(study: optuna.Study, storage_url: str, n_trials: int) -> bool:
    """Reserve the study's next trial for this worker, or say there is none left to run.

    Under the storage's lock: trials of dead workers are failed first (their retries wait in the study); a waiting
    trial no worker has claimed is claimed; else, while the study has fewer than ``n_trials`` trials counted,
    running or waiting, a new waiting trial is enqueued and claimed (its parameters still come from the sampler)
    for ``optimize`` to take. Workers that finish together therefore never start a trial the study does not need.
    """
    with _slot_lock(storage_url) as locked:
        if not locked:
            return in_flight(study) < n_trials
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        waiting = _unclaimed(study)
        if not waiting:
            if in_flight(study) >= n_trials:
                return False
            study.enqueue_trial({})
            waiting = _unclaimed(study)
        study._storage.set_trial_system_attr(waiting[0]._trial_id, CLAIMED, waiting[0].number)
        return True


def _unclaimed(study: optuna.Study) -> list:
    # a retry of a failed trial copies its system attributes, the claim among them: a claim names its own trial
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
            if t.system_attrs.get(CLAIMED) != t.number]


def in_flight_before(study: optuna.Study, number: int) -> int:
    """Counted trials plus running/waiting ones numbered before ``number``."""
    n = 0
    for t in study.get_trials(deepcopy=False):
        if t.number >= number:
            continue
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING):
            n += 1
        elif t.state == TrialState.FAIL and "error" in t.user_attrs:
            n += 1
    return n


def figures(study: optuna.Study, out_dir: Path) -> dict[str, str]:
    """Optuna's matplotlib figures as PNGs. Returns name -> path, or name -> reason where a figure cannot be drawn
    (e.g. importances need two complete trials)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    out_dir.mkdir(parents=True, exist_ok=True)
    makers = {
        "history": ovm.plot_optimization_history,
        "param_importances": ovm.plot_param_importances,
        "parallel_coordinate": ovm.plot_parallel_coordinate,
        "intermediate_values": ovm.plot_intermediate_values,
    }
    done = {}

    for name, fn in makers.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = fn(study)
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.tight_layout()
            path = out_dir / f"{name}.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            done[name] = str(path)
        except Exception as exc:  # not enough trials for this figure
            done[name] = f"not drawn: {type(exc).__name__}: {exc}"
    return done


def trial_objective(study: optuna.Study, cfg: Config, space: dict, root: Path, split, parent: str | None,
                    study_name: str, n_trials: int | None = None, init_weights: Path | None = None):
    """The objective of ``experiments/sweep.py``: one nested MLflow training run per trial.

    Each epoch's ``val_jaccard`` goes to the pruner; a pruned trial raises ``optuna.TrialPruned`` and its run ends
    FINISHED with ``cloudseg.pruned=true``; a trial that raises keeps its error in the user attribute ``error``
    (its run ends FAILED), and an interrupted one ends KILLED.
    With ``n_trials``, a trial started when the study already has that many raises ``SurplusTrial``.
    Returns the trial's ``best_val_jaccard``.
    """
    from cloudseg.config import apply_overrides
    from cloudseg.tracking.runs import train_fold

    def objective(trial: optuna.Trial) -> float:
        if n_trials is not None and in_flight_before(study, trial.number) >= n_trials:
            trial.set_user_attr("surplus", True)
            raise SurplusTrial(f"trial {trial.number}: the study already has {n_trials} trials")
        params = suggest(trial, space)
        tcfg = apply_overrides(cfg, params, "search space")

        def report(epoch: int, metrics: dict) -> None:
            if "val_jaccard" not in metrics:  # an epoch without validation (val_every > 1)
                return
            trial.report(metrics["val_jaccard"], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch} (val_jaccard={metrics['val_jaccard']:.4f})")

        tags = {"cloudseg.study": study_name, "cloudseg.trial": str(trial.number)}
        try:
            out = train_fold(tcfg, root, split, "trial", tags, parent, [report], pruned=(optuna.TrialPruned,),
                             on_start=lambda run_id: trial.set_user_attr("mlflow_run_id", run_id),
                             init_weights=init_weights)
        except optuna.TrialPruned:  # not an error: its run ended FINISHED, tagged pruned
            raise
        except Exception as exc:
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:2000])
            raise
        return out.metrics["best_val_jaccard"]

    return objective


# ---------------------------------------------------------------------- a sweep worker
def reconcile(study: optuna.Study, client, current_parent: str | None = None) -> None:
    """Close the MLflow runs of trials that Optuna failed because their worker died (heartbeat), and that dead
    worker's sweep run wherever it ran."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        run_id = t.user_attrs.get("mlflow_run_id")
        if not run_id or "error" in t.user_attrs:
            continue
        try:
            run = client.get_run(run_id)
        except Exception:
            continue
        if run.info.status == "RUNNING":
            client.set_tag(run_id, "cloudseg.closed_by", "sweep: trial failed by Optuna heartbeat (worker died)")
            client.set_terminated(run_id, "KILLED")
            print(f"closed run {run_id} of trial {t.number} (its worker died)", flush=True)
        parent = run.data.tags.get("mlflow.parentRunId")
        if parent:
            try:
                prun = client.get_run(parent)
            except Exception:
                continue
            if prun.info.status == "RUNNING" and parent != current_parent:
                client.set_tag(parent, "cloudseg.closed_by", "sweep: its worker died (trial heartbeat failed)")
                client.set_terminated(parent, "KILLED")


def finish_parent(study: optuna.Study, parent: str, client) -> None:
    """Log the study's state on a worker's sweep run: trials counted, the best trial (metrics ``best_val_jaccard``
    and ``best_value``, tags ``cloudseg.best_trial`` and ``best.<key>``, the varied keys' params with its values:
    ``sweep_run.settle``), and Optuna's figures."""
    from cloudseg import tracking
    from cloudseg.tracking import sweep_run

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    client.log_metric(parent, "trials_counted", float(len(complete)))
    best = sweep_run.settle(study, parent, study.user_attrs["space"], client)
    if best is not None:
        tracking.log_json(parent, {"number": best.number, "value": best.value, "params": best.params,
                                   "mlflow_run_id": best.user_attrs.get("mlflow_run_id")}, "best_trial.json")
    with tracking.scratch_dir() as tmp:
        drawn = figures(study, Path(tmp) / "optuna")
        for name, path in drawn.items():
            if path.endswith(".png"):
                client.log_artifact(parent, path, "optuna")
            else:
                client.set_tag(parent, f"optuna.{name}", path[:500])


def run_worker(study: optuna.Study, cfg: Config, study_name: str, storage_url: str, n_trials: int,
               timeout: float | None = None, worker_index: int = 0, init_weights: Path | None = None) -> None:
    """One sweep worker on an opened study (``open_study``): trials until the study has ``n_trials`` (counted
    across every worker), each a nested MLflow run under this worker's ``sweep`` run, which ends FINISHED with
    the study's best (``sweep_run``: its row shows the best trial's figure and recipe)."""
    from mlflow.tracking import MlflowClient

    from cloudseg import tracking
    from cloudseg.data.sources import load_split
    from cloudseg.tracking import sweep_run

    space = study.user_attrs["space"]
    print(f"[worker {worker_index}] study '{study_name}' on {display_url(storage_url)}: "
          f"{counted(study)}/{n_trials} trials done", flush=True)
    tracking.check_store()
    exp_id = tracking.setup(cfg.experiment)
    client = MlflowClient()
    tracking.close_stale_runs([exp_id])
    reconcile(study, client)
    root, split = load_split(cfg)
    parent = sweep_run.start(cfg, space, {"cloudseg.study": study_name, "cloudseg.worker": str(worker_index),
                                          "cloudseg.storage": storage_url.split("@")[-1]},
                             run_name=f"{study_name}-worker{worker_index}")
    deadline = time.time() + timeout if timeout else None
    objective = trial_objective(study, cfg, space, root, split, parent, study_name, n_trials, init_weights)
    with tracking.run_status(parent):
        try:
            while (deadline is None or time.time() < deadline) and claim_trial(study, storage_url, n_trials):
                study.optimize(objective, n_trials=1, catch=(Exception,))
                reconcile(study, client, parent)
                sweep_run.follow_best(study, parent, client)
                client.set_tag(parent, "cloudseg.heartbeat", str(int(time.time())))
                if study.trials[-1].user_attrs.get("surplus"):
                    break
        except BaseException:  # Ctrl-C, SIGTERM: the row still gets its best trial's recipe before it ends KILLED
            with contextlib.suppress(Exception):
                sweep_run.settle(study, parent, space, client)
            raise
        finish_parent(study, parent, client)


def summary(study: optuna.Study) -> dict[str, int]:
    """Trials per state, by name."""
    return {s.name: len(study.get_trials(deepcopy=False, states=(s,))) for s in TrialState}
