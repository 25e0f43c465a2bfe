"""experiments/sweep.py: two workers on one sqlite study, resume, a killed worker, a raising trial."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from cloudseg.paths import REPO_ROOT

SWEEP = str(REPO_ROOT / "experiments" / "sweep.py")
TINY = ["--set", "encoder=resnet18", "--set", "epochs=2", "--set", "batch_size=2", "--set", "crop_size=64",
        "--set", "n_folds=3", "--set", "val_batch_size=3", "--set", "plot_chips=1", "--set", "experiment=sweeps",
        "--set", "steps_per_epoch=1", "--set", "pruner=none"]


@pytest.fixture
def sweep_env(mlflow_tmp, tmp_path, monkeypatch):
    monkeypatch.setenv("CLOUDSEG_STATE_ROOT", str(tmp_path / "state"))
    space = tmp_path / "space.yaml"
    space.write_text("lr: {type: float, low: 0.0001, high: 0.01, log: true}\n"
                     "loss: {type: categorical, choices: [bce, '0.5*bce+0.5*dice']}\n")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    return {"space": space, "storage": storage, "env": env, "tmp": tmp_path}


def _assert_rows_show_their_best_trials_recipe():
    """Every sweep row's varied params (lr, loss) and best_val_jaccard are those of the trial it names."""
    trials = {r.data.tags["cloudseg.trial"]: r for r in _runs("trial")}
    for parent in _runs("sweep"):
        best = trials[parent.data.tags["cloudseg.best_trial"]]
        assert {k: parent.data.params[k] for k in ("lr", "loss")} == {k: best.data.params[k] for k in ("lr", "loss")}
        assert parent.data.metrics["best_val_jaccard"] == best.data.metrics["best_val_jaccard"]


def _sweep(e, data, study, n, *extra, timeout=600):
    cmd = [sys.executable, SWEEP, "--study", study, "--n-trials", str(n), "--storage", e["storage"],
           "--space", str(e["space"]), "--data", str(data), *TINY, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=e["env"], timeout=timeout)


def _runs(kind=None):
    client = MlflowClient()
    exp = client.get_experiment_by_name("sweeps")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in runs if kind is None or r.data.tags.get("cloudseg.kind") == kind]


@pytest.mark.slow
def test_two_workers_then_resume(sweep_env, tiny_data):
    res = _sweep(sweep_env, tiny_data, "two", 4, "--workers", "2")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    study = optuna.load_study(study_name="two", storage=sweep_env["storage"])
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 4
    trials = _runs("trial")
    assert len(trials) == 4
    assert sorted(int(r.data.tags["cloudseg.trial"]) for r in trials) == sorted(t.number for t in complete)
    assert all(r.info.status == "FINISHED" for r in trials)
    parents = _runs("sweep")
    assert len(parents) == 2 and all(r.info.status == "FINISHED" for r in parents)
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} <= {p.info.run_id for p in parents}
    arts = {a.path for p in parents for a in MlflowClient().list_artifacts(p.info.run_id, "optuna")}
    assert "optuna/history.png" in arts
    assert all("best_value" in p.data.metrics for p in parents)
    _assert_rows_show_their_best_trials_recipe()
    # resume: the same command with a larger count adds exactly the missing trials
    res = _sweep(sweep_env, tiny_data, "two", 5)
    assert res.returncode == 0, res.stderr[-3000:]
    study = optuna.load_study(study_name="two", storage=sweep_env["storage"])
    assert len([t for t in study.trials if t.state == TrialState.COMPLETE]) == 5
    assert len(_runs("trial")) == 5
    _assert_rows_show_their_best_trials_recipe()
    # a different search space on the same study is refused
    sweep_env["space"].write_text("lr: {type: float, low: 0.001, high: 0.1, log: true}\n")
    res = _sweep(sweep_env, tiny_data, "two", 6)
    assert res.returncode == 2 and "different search space" in res.stderr


@pytest.mark.slow
def test_raising_trial_fails_and_study_continues(sweep_env, tiny_data):
    sweep_env["space"].write_text("encoder: {type: categorical, choices: [resnet18, not_an_encoder]}\n")
    # the sampler's seed differs per worker process, so queue a failing trial first and a good one second
    # rather than hope the random draws pick each
    queued = optuna.create_study(study_name="raise", storage=sweep_env["storage"], direction="maximize")
    queued.enqueue_trial({"encoder": "not_an_encoder"})
    queued.enqueue_trial({"encoder": "resnet18"})
    res = _sweep(sweep_env, tiny_data, "raise", 4)
    assert res.returncode == 0, res.stderr[-3000:]
    study = optuna.load_study(study_name="raise", storage=sweep_env["storage"])
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert 0 in [t.number for t in failed]
    assert all("not_an_encoder" in t.user_attrs["error"] for t in failed)
    assert study.trials[1].state == TrialState.COMPLETE
    assert len(study.trials) == 4
    runs = {r.data.tags["cloudseg.trial"]: r for r in _runs("trial")}
    for t in failed:
        assert runs[str(t.number)].info.status == "FAILED"


@pytest.mark.slow
def test_sigkill_mid_trial_is_accounted_for(sweep_env, tiny_data):
    """Kill a worker in its first trial; a restarted worker retries that trial and closes the dead runs."""
    cmd = [sys.executable, SWEEP, "--study", "kill", "--n-trials", "2", "--storage", sweep_env["storage"],
           "--space", str(sweep_env["space"]), "--data", str(tiny_data), *TINY, "--set", "epochs=3"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=sweep_env["env"])
    deadline = time.time() + 300
    for line in proc.stdout:
        if line.startswith("epoch 1/3"):
            os.kill(proc.pid, signal.SIGKILL)
            break
        assert time.time() < deadline, "no epoch finished in time"
    proc.wait()
    time.sleep(22)  # Optuna's grace period for a silent heartbeat
    res = subprocess.run(cmd, capture_output=True, text=True, env=sweep_env["env"], timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    study = optuna.load_study(study_name="kill", storage=sweep_env["storage"])
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) == 2
    killed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(killed) == 1 and "error" not in killed[0].user_attrs  # failed by heartbeat, then retried
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed[0].number]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE
    runs = _runs()
    assert not [r for r in runs if r.info.status == "RUNNING"]
    dead_trial_run = [r for r in runs if r.data.tags.get("cloudseg.trial") == str(killed[0].number)]
    assert len(dead_trial_run) == 1 and dead_trial_run[0].info.status == "KILLED"


def _fresh_study(tmp_path, name, seed=0, worker=0):
    from cloudseg.config import Config
    from cloudseg.tracking.study import make_storage, open_study

    space = {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}
    url = f"sqlite:///{tmp_path / (name + '.db')}"
    return open_study(name, make_storage(url), space, Config(seed=seed), worker), url


def _first_draws(study, n=3):
    draws = []
    for _ in range(n):
        t = study.ask()
        draws.append(t.suggest_float("lr", 1e-4, 1e-2, log=True))
        study.tell(t, 0.5)
    return draws


def test_one_worker_on_a_fresh_study_proposes_the_same_trials(tmp_path):
    a, _ = _fresh_study(tmp_path, "a")
    b, _ = _fresh_study(tmp_path, "b")
    c, _ = _fresh_study(tmp_path, "c", seed=1)
    d, _ = _fresh_study(tmp_path, "d", worker=1)
    first = _first_draws(a)
    assert _first_draws(b) == first
    assert _first_draws(c) != first and _first_draws(d) != first
    # a worker restarted on the study in progress does not replay its first draws
    again, _ = _fresh_study(tmp_path, "a")
    assert _first_draws(again, 1)[0] not in first


def test_claims_never_exceed_the_study(tmp_path):
    from cloudseg.tracking.study import claim_trial, counted

    study, url = _fresh_study(tmp_path, "claims")
    assert claim_trial(study, url, 2) and claim_trial(study, url, 2)  # two workers, one trial each
    assert not claim_trial(study, url, 2)  # a third finds the study full
    for _ in range(2):
        t = study.ask()  # what optimize() does: takes a waiting trial
        t.suggest_float("lr", 1e-4, 1e-2, log=True)
        study.tell(t, 0.5)
    assert counted(study) == 2 and not claim_trial(study, url, 2)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
    assert claim_trial(study, url, 3)  # resumed with a larger budget
