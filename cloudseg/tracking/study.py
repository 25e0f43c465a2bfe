"""Optuna studies: search spaces from YAML, storages, pruners, trial accounting and the study's figures."""

from __future__ import annotations

import json
import random
import re
import time
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


class SurplusTrial(RuntimeError):
    """Another worker already started the last trial the study needs."""


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


def open_study(name: str, storage: RDBStorage, space: dict, cfg: Config, seed: int) -> optuna.Study:
    """Create or resume ``name``; refuse when the stored search space differs from ``space``."""
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=4)
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize", sampler=sampler,
                                pruner=make_pruner(cfg), load_if_exists=True)
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
    import warnings

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
                    study_name: str, n_trials: int | None = None):
    """The objective of ``experiments/sweep.py``: one nested MLflow training run per trial.

    Each epoch's ``val_jaccard`` goes to the pruner; a pruned trial raises ``optuna.TrialPruned`` and its run ends
    KILLED with ``cloudseg.pruned=true``; a trial that raises keeps its error in the user attribute ``error``.
    With ``n_trials``, a trial started when the study already has that many raises ``SurplusTrial``.
    Returns the trial's ``best_val_jaccard``.
    """
    from mlflow.tracking import MlflowClient

    from cloudseg.config import apply_overrides, validate_config
    from cloudseg.tracking.runs import train_fold

    client = MlflowClient()

    def objective(trial: optuna.Trial) -> float:
        if n_trials is not None and in_flight_before(study, trial.number) >= n_trials:
            trial.set_user_attr("surplus", True)
            raise SurplusTrial(f"trial {trial.number}: the study already has {n_trials} trials")
        params = suggest(trial, space)
        tcfg = apply_overrides(cfg, params, "search space")
        validate_config(tcfg)

        def report(epoch: int, metrics: dict) -> None:
            if "val_jaccard" not in metrics:  # an epoch without validation (val_every > 1)
                return
            trial.report(metrics["val_jaccard"], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch} (val_jaccard={metrics['val_jaccard']:.4f})")

        tags = {"cloudseg.study": study_name, "cloudseg.trial": str(trial.number)}
        try:
            out = train_fold(tcfg, root, split, "trial", tags, parent, [report], killed=(optuna.TrialPruned,),
                             on_start=lambda run_id: trial.set_user_attr("mlflow_run_id", run_id))
        except optuna.TrialPruned:
            client.set_tag(trial.user_attrs["mlflow_run_id"], "cloudseg.pruned", "true")
            raise
        except Exception as exc:
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:2000])
            raise
        return out.metrics["best_val_jaccard"]

    return objective
