"""A sweep worker's own MLflow run (``cloudseg.kind=sweep``): its row in the runs table reads like the recipe that
earned its score.

Its params are the base config's, except the keys the study varies: those hold the best trial's values. MLflow
params cannot change once logged while the best trial can change until the worker ends, so the varied keys are
written once, as the run ends (``settle``), from the study's best trial at that moment, together with the metric
``best_val_jaccard`` and the tag ``cloudseg.best_trial`` that name it; after that the run follows no other trial.
While the worker runs, ``follow_best`` keeps the metric ``best_val_jaccard`` (one step per trial), the tags
``cloudseg.best_trial``, ``cloudseg.best_run`` and ``best.<key>`` on the study's best trial, and the varied keys'
params stay empty: never a value that contradicts the figure beside it. The search space is the param
``search_space`` (compact JSON) and the artifact ``search_space.json``.

    parent = start(cfg, space, tags, "s1-worker0")
    follow_best(study, parent, client)       # after each trial
    settle(study, parent, space, client)     # as the worker ends, however it ends
"""

from __future__ import annotations

import json

import optuna
from mlflow.exceptions import MlflowException
from optuna.trial import FrozenTrial, TrialState

from cloudseg import tracking
from cloudseg.config import Config

SPACE_PARAM = "search_space"
SETTLED_TAG = "cloudseg.params_trial"  # the trial whose values the varied params hold, once written


def start(cfg: Config, space: dict, tags: dict, run_name: str) -> str:
    """Open a worker's sweep run: the base config's params without the keys ``space`` varies, and the space."""
    from cloudseg.tracking.runs import start_run

    parent = start_run(cfg, "sweep", tags, run_name=run_name, left_out=set(space))
    tracking.log_params(parent, {SPACE_PARAM: json.dumps(space, sort_keys=True, separators=(",", ":"))})
    tracking.log_json(parent, space, "search_space.json")
    return parent


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The study's best complete trial, or None before the first one."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    return study.best_trial


def follow_best(study: optuna.Study, parent: str, client) -> FrozenTrial | None:
    """Point the sweep run's metric ``best_val_jaccard`` (and ``best_value``) and its best-trial tags at the
    study's best trial now. A run whose varied params are written already (``settle``) is left as it is, so its
    figure and its recipe keep naming the same trial. Returns the trial it points at, or None."""
    tags = client.get_run(parent).data.tags
    if SETTLED_TAG in tags:
        return None
    best = best_trial(study)
    if best is None:
        return None
    step = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
    for name in ("best_val_jaccard", "best_value"):
        client.log_metric(parent, name, float(best.value), step=step)
    client.set_tag(parent, "cloudseg.best_trial", str(best.number))
    client.set_tag(parent, "cloudseg.best_run", str(best.user_attrs.get("mlflow_run_id", "")))
    for key, value in best.params.items():
        client.set_tag(parent, f"best.{key}", str(value))
    return best


def best_params(best: FrozenTrial, space: dict, client) -> dict[str, str]:
    """The best trial's value of each key of ``space``, as the trial's own run logged it (the very strings its row
    shows); Optuna's value where that run cannot be read."""
    logged: dict[str, str] = {}
    run_id = best.user_attrs.get("mlflow_run_id")
    if run_id:
        try:
            logged = client.get_run(run_id).data.params
        except MlflowException:  # the trial's run was deleted: Optuna still knows its values
            logged = {}
    return {k: logged[k] if k in logged else str(best.params[k]) for k in space if k in logged or k in best.params}


def settle(study: optuna.Study, parent: str, space: dict, client) -> FrozenTrial | None:
    """Write the varied keys' params from the study's best trial, once, with the best-trial metric and tags of the
    same moment (``follow_best``); a second call changes nothing. Returns the trial, or None when the study has no
    complete trial yet (then the varied params stay empty)."""
    best = follow_best(study, parent, client)
    if best is None:
        return None
    params = best_params(best, space, client)
    tracking.log_params(parent, params)
    client.set_tag(parent, SETTLED_TAG, str(best.number))
    return best
