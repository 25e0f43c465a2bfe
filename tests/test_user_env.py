"""#20 outside CI: train, then promote, each in a child process whose environment has no CI variable.

MLflow 3 turns its telemetry off by itself under CI/pytest, so the suite's in-process runs never meet the
telemetry thread that killed sweep workers on users' machines (KeyError '_MLFLOW_TELEMETRY_SESSION_ID'). Here
the children look like a user's shell on an offline machine (the network guard of test_telemetry refuses every
non-loopback destination and logs it), and must finish cleanly without attempting any.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cloudseg.paths import REPO_ROOT
from tests.test_telemetry import TINY, assert_guard_catches, describe, guarded, unexpected, user_env

# experiments/promote.py as a user runs it, except that the submission goes to a temporary folder instead of
# the repository's submissions/ (the tests' usual patch, applied inside the child).
PROMOTE = """
import runpy, sys
from pathlib import Path
import cloudseg.tracking.promote as promote
script, out, argv = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
real_write = promote.write_submission
promote.write_submission = lambda *a, **k: real_write(*a, **{**k, "out_root": out})
sys.argv = [script, *argv]
runpy.run_path(script, run_name="__main__")
"""


def _run(cmd: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=cwd)
    assert res.returncode == 0, f"{cmd[:3]} exited {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    assert "_MLFLOW_TELEMETRY_SESSION_ID" not in res.stderr, res.stderr[-4000:]
    return res


@pytest.mark.slow
def test_train_then_promote_without_ci(mlflow_tmp, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("CLOUDSEG_STATE_ROOT", str(tmp_path / "state"))
    env, log = user_env(tmp_path)
    assert "CI" not in env and "PYTEST_CURRENT_TEST" not in env

    res = _run([sys.executable, str(REPO_ROOT / "experiments" / "train.py"), "--data", str(tiny_data), *TINY],
               env, tmp_path)
    run_id = [line.split("=", 1)[1].strip() for line in res.stdout.splitlines() if line.startswith("run_id=")][-1]
    client = MlflowClient(tracking_uri=mlflow_tmp)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED", run.data.tags.get("cloudseg.error")
    assert "best_val_jaccard" in run.data.metrics

    out = tmp_path / "submissions"
    res = _run([sys.executable, "-c", PROMOTE, str(REPO_ROOT / "experiments" / "promote.py"), str(out),
                "--run-id", run_id, "--name", "userenv"], env, tmp_path)
    assert f"promoted run {run_id}" in res.stdout, res.stdout
    assert (out / "userenv" / "main.py").is_file() and (out / "userenv.zip").is_file()
    assert client.get_run(run_id).info.status == "FINISHED"

    found = unexpected(log)
    assert found == [], "network attempts:\n" + describe(found)
    # the guard watched both commands, and catches attempts in this environment (positive control)
    assert ["train.py"] in [a[:1] for a in guarded(log)] and ["-c", "promote.py"] in guarded(log), guarded(log)
    assert_guard_catches(env, tmp_path)
