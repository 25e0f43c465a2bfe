"""experiments/bench_sweep.py: epochs counted per arm (pruned trials count the epochs they ran), the seeds'
aggregate and its noise, and one real arm in this process."""

from __future__ import annotations

import importlib.util
import math

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from cloudseg.paths import REPO_ROOT


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_sweep", REPO_ROOT / "experiments" / "bench_sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _trial(state, curve, value=None, error=None):
    return create_trial(state=state, value=value if state == TrialState.COMPLETE else None,
                        params={"lr": 0.001}, distributions={"lr": FloatDistribution(1e-4, 1e-2, log=True)},
                        intermediate_values=dict(enumerate(curve, start=1)),
                        user_attrs={"error": error} if error else {})


def test_summarize_counts_the_epochs_each_trial_ran(bench):
    study = optuna.create_study(direction="maximize")
    study.add_trial(_trial(TrialState.COMPLETE, [0.2, 0.4, 0.5], value=0.5))
    study.add_trial(_trial(TrialState.PRUNED, [0.1]))
    study.add_trial(_trial(TrialState.PRUNED, [0.2, 0.25]))
    study.add_trial(_trial(TrialState.COMPLETE, [0.3, 0.6, 0.55], value=0.6))
    study.add_trial(_trial(TrialState.FAIL, [0.1], error="ValueError: boom"))
    r = bench.summarize_study(study, {"seed": 1, "pruner": "median", "study": "s", "n_trials": 6})
    assert (r["trials"], r["pruned"], r["failed"], r["epochs"]) == (5, 2, 1, 3 + 1 + 2 + 3 + 1)
    assert r["best"] == 0.6
    assert r["cut_short"] is True  # 5 of 6 trials
    assert r["errors"] == ["ValueError: boom"]


def test_aggregate_means_over_seeds_and_reports_noise(bench):
    results = [
        {"seed": 0, "pruner": "median", "epochs": 12, "best": 0.70},
        {"seed": 0, "pruner": "none", "epochs": 20, "best": 0.72},
        {"seed": 1, "pruner": "median", "epochs": 10, "best": 0.66},
        {"seed": 1, "pruner": "none", "epochs": 20, "best": 0.66},
        {"seed": 2, "pruner": "median", "epochs": 16, "best": 0.81},
        {"seed": 2, "pruner": "none", "epochs": 20, "best": 0.80},
    ]
    agg = bench.aggregate(results, "median")
    assert agg["epochs_saved_per_seed"] == pytest.approx([0.4, 0.5, 0.2])
    assert agg["epochs_saved"] == pytest.approx(1 / 3 * (0.4 + 0.5 + 0.2))
    assert agg["best_delta_per_seed"] == pytest.approx([-0.02, 0.0, 0.01])
    assert agg["best_delta"] == pytest.approx(-0.01 / 3)
    d = [-0.02, 0.0, 0.01]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    assert agg["best_delta_sem"] == pytest.approx(sd / math.sqrt(3))
    b = [0.72, 0.66, 0.80]
    mb = sum(b) / 3
    assert agg["unpruned_best_sd"] == pytest.approx(math.sqrt(sum((x - mb) ** 2 for x in b) / 2))


def test_one_arm_runs_a_logged_study(bench, tiny_data, mlflow_tmp, tmp_path, monkeypatch):
    monkeypatch.setenv("CLOUDSEG_STATE_ROOT", str(tmp_path / "state"))
    monkeypatch.setattr(bench, "CACHE", tmp_path / "cache")
    space = tmp_path / "space.yaml"
    space.write_text("lr: {type: float, low: 0.0001, high: 0.01, log: true}\n")
    spec = {"config": str(REPO_ROOT / "experiments" / "configs" / "bench-sweep.yaml"), "space": str(space),
            "sets": ["encoder=resnet18", "epochs=2", "batch_size=2", "crop_size=64", "n_folds=3",
                     "steps_per_epoch=1", "plot_chips=1"],
            "data": str(tiny_data), "seed": 3, "pruner": "none", "study": "arm", "n_trials": 2,
            "deadline": 1e12}
    r = bench.run_arm(spec)
    assert (r["trials"], r["pruned"], r["failed"], r["epochs"]) == (2, 0, 0, 4)  # nothing pruned: 2 x 2 epochs
    assert r["best"] is not None and not r["cut_short"]
    client = MlflowClient()
    exp = client.get_experiment_by_name(bench.EXPERIMENT)
    runs = client.search_runs([exp.experiment_id])
    trials = [x for x in runs if x.data.tags.get("cloudseg.kind") == "trial"]
    assert len(trials) == 2 and all(x.info.status == "FINISHED" for x in trials)
    assert all(x.data.tags["mlflow.parentRunId"] == r["parent_run"] for x in trials)
    parent = client.get_run(r["parent_run"])
    assert parent.info.status == "FINISHED" and parent.data.metrics["epochs"] == 4
    assert parent.data.tags["cloudseg.arm"] == "none"
