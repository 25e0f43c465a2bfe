"""Run status of trials: pruned trials end FINISHED (tag cloudseg.pruned=true); failures FAILED; interruptions
KILLED."""

from __future__ import annotations

import optuna
import pytest
from mlflow.tracking import MlflowClient

from cloudseg import tracking
from cloudseg.config import Config, apply_overrides
from cloudseg.tracking.runs import start_run


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
