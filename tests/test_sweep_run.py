"""A sweep worker's run reads like its best trial: the varied params are the best trial's, written once as the
run ends; the search space is kept; a resumed study's new run names the study's best, old or new. Pruned trials
end FINISHED (tag cloudseg.pruned=true); failures FAILED; interruptions KILLED."""

from __future__ import annotations

import json

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from cloudseg import tracking
from cloudseg.config import Config, apply_overrides
from cloudseg.tracking import sweep_run
from cloudseg.tracking.runs import start_run

SPACE = {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
         "loss": {"type": "categorical", "choices": ["bce", "0.5*bce+0.5*dice"]}}
DISTS = {"lr": FloatDistribution(1e-4, 1e-2, log=True), "loss": CategoricalDistribution(["bce", "0.5*bce+0.5*dice"])}
BASE = {"experiment": "sweeps", "lr": 0.003, "loss": "0.5*bce+0.5*dice"}


@pytest.fixture
def study(mlflow_tmp, tmp_path):
    return optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}", direction="maximize")


def _trial(study, parent, lr, loss, value, state=TrialState.COMPLETE):
    """A finished trial as sweep.py leaves it: its own run (params from its config) and the Optuna record."""
    cfg = apply_overrides(Config(), {**BASE, "lr": lr, "loss": loss}, "test")
    run_id = start_run(cfg, "trial", {"cloudseg.study": "s", "cloudseg.trial": str(len(study.trials))}, parent)
    MlflowClient().set_terminated(run_id, "FINISHED")
    study.add_trial(create_trial(params={"lr": lr, "loss": loss}, distributions=DISTS,
                                 value=value if state == TrialState.COMPLETE else None, state=state,
                                 user_attrs={"mlflow_run_id": run_id}))
    return run_id


def _parent(name="s-worker0"):
    return sweep_run.start(apply_overrides(Config(), BASE, "test"), SPACE, {"cloudseg.study": "s"}, name)


def _row(run_id):
    run = MlflowClient().get_run(run_id)
    return run.data.params, run.data.metrics, run.data.tags


def test_sweep_row_shows_the_best_trials_recipe_as_it_changes_and_after_a_resume(study):
    client = MlflowClient()
    parent = _parent()
    params, _, _ = _row(parent)
    assert "lr" not in params and "loss" not in params  # never the base config's value beside the best score
    assert params["encoder"] == Config().encoder  # keys the study does not vary: the base config's
    assert json.loads(params["search_space"]) == SPACE
    with tracking.scratch_dir() as tmp:
        assert json.loads(open(tracking.download(parent, "search_space.json", tmp)).read()) == SPACE

    first = _trial(study, parent, 0.0011, "bce", 0.50)
    sweep_run.follow_best(study, parent, client)
    params, metrics, tags = _row(parent)
    assert metrics["best_val_jaccard"] == 0.50 and tags["cloudseg.best_trial"] == "0"
    assert tags["cloudseg.best_run"] == first and tags["best.lr"] == "0.0011"
    assert "lr" not in params  # while the worker runs: empty, not a value that may stop being the best's

    _trial(study, parent, 0.0052, "0.5*bce+0.5*dice", 0.70)  # a better trial takes over
    _trial(study, parent, 0.0090, "bce", 0.60)
    _trial(study, parent, 0.0001, "bce", None, state=TrialState.PRUNED)
    sweep_run.follow_best(study, parent, client)
    assert _row(parent)[2]["cloudseg.best_trial"] == "1"
    best = sweep_run.settle(study, parent, SPACE, client)
    params, metrics, tags = _row(parent)
    assert best.number == 1 and tags[sweep_run.SETTLED_TAG] == "1"
    best_run = client.get_run(tags["cloudseg.best_run"])
    assert best_run.data.tags["cloudseg.trial"] == "1"
    assert {k: params[k] for k in SPACE} == {k: best_run.data.params[k] for k in SPACE} == \
        {"lr": "0.0052", "loss": "0.5*bce+0.5*dice"}
    assert metrics["best_val_jaccard"] == 0.70
    history = client.get_metric_history(parent, "best_val_jaccard")
    assert [(m.step, m.value) for m in history] == [(1, 0.50), (4, 0.70), (4, 0.70)]

    # written once: a later better trial moves neither the params (MLflow cannot) nor the figure beside them
    _trial(study, parent, 0.0033, "bce", 0.90)
    assert sweep_run.settle(study, parent, SPACE, client) is None
    params, metrics, tags = _row(parent)
    assert (params["lr"], metrics["best_val_jaccard"], tags["cloudseg.best_trial"]) == ("0.0052", 0.70, "1")

    # the study resumed: the new worker's run names the study's best, here a trial of the earlier run
    again = _parent("s-worker0-again")
    _trial(study, again, 0.0099, "bce", 0.10)
    sweep_run.settle(study, again, SPACE, client)
    params, metrics, tags = _row(again)
    assert (params["lr"], params["loss"], metrics["best_val_jaccard"], tags["cloudseg.best_trial"]) == \
        ("0.0033", "bce", 0.90, "4")


def test_a_sweep_without_a_complete_trial_leaves_the_varied_params_empty(study):
    parent = _parent()
    _trial(study, parent, 0.002, "bce", None, state=TrialState.PRUNED)
    assert sweep_run.settle(study, parent, SPACE, MlflowClient()) is None
    params, metrics, tags = _row(parent)
    assert "lr" not in params and "best_val_jaccard" not in metrics and sweep_run.SETTLED_TAG not in tags


@pytest.mark.parametrize("raised, status", [(optuna.TrialPruned, "FINISHED"), (RuntimeError, "FAILED"),
                                            (KeyboardInterrupt, "KILLED")])
def test_pruned_runs_finish_failures_fail_interruptions_are_killed(mlflow_tmp, raised, status):
    run_id = start_run(apply_overrides(Config(), {"experiment": "status"}, "test"), "trial")
    with pytest.raises(raised):
        with tracking.run_status(run_id, pruned=(optuna.TrialPruned,)):
            raise raised("pruned after epoch 1 (val_jaccard=0.1000)")
    run = MlflowClient().get_run(run_id)
    assert run.info.status == status
    assert (run.data.tags.get("cloudseg.pruned") == "true") == (status == "FINISHED")
    if status == "FINISHED":
        assert run.data.tags["cloudseg.pruned_why"].startswith("pruned after epoch 1")
