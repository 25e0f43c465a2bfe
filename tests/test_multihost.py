"""One study shared by workers on two hosts through PostgreSQL and an MLflow tracking server.

The hosts are network namespaces made by the test (tests/services.py) that reach the servers only over their own
addresses; where namespaces cannot be made the workers run on loopback with a warning, except under CI=true, where
that fails. The services skip with a reason where PostgreSQL cannot be started, except under CI=true.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from cloudseg import tracking
from cloudseg.config import Config
from cloudseg.paths import REPO_ROOT
from cloudseg.tracking.study import GRACE_S, counted, load_space, make_storage, open_study
from tests.services import IN_CI, HostNetwork, free_port

pytestmark = pytest.mark.postgres

SWEEP = str(REPO_ROOT / "experiments" / "sweep.py")
EXPERIMENT = "multihost"
TINY = ["--set", "encoder=resnet18", "--set", "epochs=2", "--set", "batch_size=2", "--set", "crop_size=64",
        "--set", "n_folds=3", "--set", "val_batch_size=3", "--set", "plot_chips=1",
        "--set", f"experiment={EXPERIMENT}", "--set", "steps_per_epoch=1", "--set", "pruner=none"]
SPACE = ("lr: {type: float, low: 0.0001, high: 0.01, log: true}\n"
         "loss: {type: categorical, choices: [bce, '0.5*bce+0.5*dice']}\n")


def _env(tmp: Path, tracking_uri: str, host: int = 0) -> dict[str, str]:
    return {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "CLOUDSEG_STATE_ROOT": str(tmp / f"state{host}"),
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1",
            "HF_HUB_OFFLINE": "1"}


def _sweep(study: str, storage: str, space: Path, data: Path, n: int = 3, *extra: str) -> list[str]:
    return [sys.executable, SWEEP, "--study", study, "--n-trials", str(n), "--storage", storage,
            "--space", str(space), "--data", str(data), *TINY, *extra]


@pytest.fixture
def space(tmp_path) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(SPACE)
    return path


def _sweep_module():
    spec = importlib.util.spec_from_file_location("sweep_cli", SWEEP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sweep_main(argv: list[str], capsys) -> tuple[int, str]:
    """experiments/sweep.py's main() in this process: the command's code path without an interpreter start."""
    capsys.readouterr()
    try:
        code = _sweep_module().main(argv)
    except SystemExit as exc:  # what the interpreter would turn into the exit status
        code = exc.code if isinstance(exc.code, int) else 1
        print(exc.code, file=sys.stderr)
    out = capsys.readouterr()
    return code, out.out + out.err


def test_worker_start_up_refuses_bad_stores(postgres, mlflow_server, space, tiny_data, tmp_path, monkeypatch,
                                            capsys):
    """Wrong URL, missing database, unreachable database or tracking server, a different search space: the worker
    stops at start-up with a message naming the problem and a non-zero exit. (``mlflow_server`` is asked for only
    so that it boots meanwhile.)"""
    closed = free_port()
    # one real command: the exit status and the message as a user sees them, in seconds rather than MLflow's
    # minutes of HTTP retries
    tracking_cmd = subprocess.Popen(_sweep("startup-tracking", postgres.url("optuna"), space, tiny_data, 1),
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    env=_env(tmp_path, f"http://127.0.0.1:{closed}"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    other_space = tmp_path / "other.yaml"
    other_space.write_text("lr: {type: float, low: 0.001, high: 0.1, log: true}\n")
    open_study("shared", make_storage(postgres.url("optuna")), load_space(space), Config(), seed=0)
    cases = {  # name: (study, storage URL, space, what the message must say)
        "scheme": ("s1", f"postgres://postgres@127.0.0.1:{postgres.port}/optuna", space,
                   ["cannot open the Optuna storage", "not a usable SQLAlchemy URL", "postgresql+psycopg://"]),
        "database": ("s2", postgres.url("nosuchdb"), space, ['database "nosuchdb" does not exist']),
        "unreachable": ("s3", f"postgresql+psycopg://cloudseg:s3cret@127.0.0.1:{closed}/optuna", space,
                        ["unreachable", "Connection refused", "cloudseg:***@127.0.0.1"]),
        "space": ("shared", postgres.url("optuna"), other_space,
                  ["study 'shared' was created with a different search space"]),
    }
    for name, (study, url, space_file, needles) in cases.items():
        code, out = _sweep_main(_sweep(study, url, space_file, tiny_data, 1)[2:], capsys)
        assert code == 2, f"{name}: exit {code}\n{out[-3000:]}"
        for needle in needles:
            assert needle in out, f"{name}: {needle!r} missing from\n{out[-3000:]}"
        assert "s3cret" not in out, out
    shared = optuna.load_study(study_name="shared", storage=postgres.url("optuna"))
    assert shared.trials == [] and shared.user_attrs["space"] == load_space(space)  # the refused worker left it be
    # a shared study whose runs would land in this host's own MLflow store: a warning, not an error
    tracking.check_store(postgres.url("optuna"))
    assert "set MLFLOW_TRACKING_URI to the shared tracking server" in capsys.readouterr().err
    out, _ = tracking_cmd.communicate(timeout=120)  # MLflow's own retries would take about 4 minutes
    assert tracking_cmd.returncode == 1, out[-3000:]
    for needle in ("error: cannot reach the MLflow tracking store", f"http://127.0.0.1:{closed}", "mlflow server"):
        assert needle in out, f"{needle!r} missing from\n{out[-3000:]}"
    assert "Traceback" not in out, out[-3000:]


def test_workers_starting_together_on_an_empty_database(postgres):
    """Workers on several hosts starting at the same moment race to create Optuna's tables; none of them fails."""
    postgres.create_database("race")
    barrier = threading.Barrier(4)
    errors: list[str] = []

    def open_storage() -> None:
        barrier.wait()
        try:
            make_storage(postgres.url("race"))
        except Exception as exc:  # the test reports every loser
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=open_storage) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    assert optuna.create_study(study_name="after-race", storage=postgres.url("race")).trials == []


def test_worker_hosts_reach_servers_only_over_their_addresses(host_network, postgres, mlflow_uri):
    """Inside a worker namespace the servers answer on the bridge address, its own 127.0.0.1 is not the servers',
    nothing off this machine is routed, and the host has its own name."""
    probe = ("import socket, sys\n"
             "for a in sys.argv[1:]:\n"
             "    h, p = a.rsplit(':', 1)\n"
             "    try:\n"
             "        socket.create_connection((h, int(p)), 3).close(); print(a, 'open')\n"
             "    except OSError as e:\n"
             "        print(a, 'closed', e.strerror)\n")
    server, ml_port = host_network.server_address, mlflow_uri.rsplit(":", 1)[1]
    for i, host in enumerate(host_network.hosts):
        res = subprocess.run([*host_network.prefix(i), sys.executable, "-c", probe, f"{server}:{postgres.port}",
                              f"{server}:{ml_port}", f"127.0.0.1:{postgres.port}", "198.51.100.1:80"],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        seen = dict(line.split(" ", 1) for line in res.stdout.splitlines())
        assert seen[f"{server}:{postgres.port}"] == "open" and seen[f"{server}:{ml_port}"] == "open", seen
        assert seen[f"127.0.0.1:{postgres.port}"].startswith("closed"), seen
        assert seen["198.51.100.1:80"] == "closed Network is unreachable", seen
        addr = subprocess.run([*host_network.prefix(i), "ip", "-4", "-o", "addr"], capture_output=True, text=True)
        assert host.address in addr.stdout and server not in addr.stdout
        name = subprocess.run([*host_network.prefix(i), "hostname"], capture_output=True, text=True)
        assert name.stdout.strip() == host.namespace


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_hosts_share_a_study_and_survive_sigkill(postgres, mlflow_server, mlflow_uri, host_network_or_reason,
                                                     space, tiny_data, tmp_path):
    """Two workers on two hosts run one 3-trial study; the first is SIGKILLed mid-trial and restarted on its host.
    Every trial is accounted for, the killed one retried, one child run per trial, nothing left RUNNING.

    The hosts are network namespaces. Where they cannot be made the workers share loopback, which tests the kill
    and the retry but not two hosts: under CI=true that fails; elsewhere the run goes on with a warning that names
    the reason (shown in the test summary)."""
    net = host_network_or_reason if isinstance(host_network_or_reason, HostNetwork) else None
    if net is None:
        if IN_CI:
            pytest.fail(f"two hosts need network namespaces, which cannot be made here: {host_network_or_reason} "
                        "(required under CI=true: run as root with iproute2 and util-linux)", pytrace=False)
        warnings.warn(f"the two hosts share loopback: {host_network_or_reason}", pytest.PytestWarning, stacklevel=1)
    server = net.server_address if net else "127.0.0.1"
    prefix = [net.prefix(0), net.prefix(1)] if net else [[], []]
    postgres.create_database("two_hosts")  # empty: the two workers also race to create Optuna's tables
    storage = postgres.url("two_hosts", host=server)
    cmd = _sweep("two-hosts", storage, space, tiny_data, 3)

    procs: list[subprocess.Popen] = []

    def start(host: int, name: str) -> subprocess.Popen:
        with (tmp_path / f"{name}.log").open("w") as log:
            procs.append(subprocess.Popen(prefix[host] + cmd, stdout=log, stderr=subprocess.STDOUT,
                                          env=_env(tmp_path, mlflow_uri, host)))
        return procs[-1]

    def finish(proc: subprocess.Popen, name: str) -> None:
        proc.wait(timeout=600)
        assert proc.returncode == 0, f"{name} worker:\n{(tmp_path / f'{name}.log').read_text()[-4000:]}"

    t0 = time.time()
    try:
        first = subprocess.Popen(prefix[0] + cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 env=_env(tmp_path, mlflow_uri, 0))
        procs.append(first)
        second = start(1, "second")
        first_out = []
        for line in first.stdout:  # every step of the prefix execs, so first.pid is the worker itself
            first_out.append(line)
            if line.startswith("epoch 1/2"):
                assert "sweep.py" in Path(f"/proc/{first.pid}/cmdline").read_text()
                first.send_signal(signal.SIGKILL)
                killed_at = time.time()
                break
        else:
            pytest.fail("the first worker ended before its first epoch:\n" + "".join(first_out)[-3000:])
        first.wait()
        first.stdout.close()
        first_run = next(line.split()[1].rstrip(":") for line in first_out if line.startswith("run "))
        # Restarted on its host at once, the worker's start closes the dead worker's runs; the killed trial is
        # retried by whichever worker starts a trial after its heartbeat is GRACE_S old.
        restarted = [start(0, "restarted")]
        finish(second, "second")
        finish(restarted[0], "restarted")
        if counted(optuna.load_study(study_name="two-hosts", storage=postgres.url("two_hosts"))) < 3:
            # every worker stopped before the heartbeat went stale (a fast machine): the next start retries it
            time.sleep(max(0.0, killed_at + GRACE_S + 2 - time.time()))
            restarted.append(start(0, "restarted-again"))
            finish(restarted[1], "restarted-again")
    finally:  # a failed test leaves no worker behind
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    wall = time.time() - t0

    study = optuna.load_study(study_name="two-hosts", storage=postgres.url("two_hosts"))
    trials = study.get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    assert counted(study) == 3
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 3
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    killed = [t for t in trials if t.state == TrialState.FAIL and "error" not in t.user_attrs
              and not t.user_attrs.get("surplus")]
    assert len(killed) == 1 and killed[0].user_attrs["mlflow_run_id"] == first_run  # failed by its heartbeat
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == killed[0].number]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE
    surplus = [t for t in trials if t.user_attrs.get("surplus")]
    assert all("mlflow_run_id" not in t.user_attrs for t in surplus)

    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    assert not [r.info.run_id for r in runs if r.info.status == "RUNNING"]
    child = {r.info.run_id: r for r in runs if r.data.tags.get("cloudseg.kind") == "trial"}
    ran = {t.user_attrs["mlflow_run_id"]: t for t in trials if "mlflow_run_id" in t.user_attrs}
    assert set(child) == set(ran) and len(child) == 4  # one child run per trial that started: 3 + the killed one
    for run_id, t in ran.items():
        assert child[run_id].data.tags["cloudseg.trial"] == str(t.number)
        assert child[run_id].info.status == ("FINISHED" if t.state == TrialState.COMPLETE else "KILLED")
    parents = {r.data.tags["cloudseg.proc"].split(":")[1]: r for r in runs
               if r.data.tags.get("cloudseg.kind") == "sweep"}
    assert set(parents) == {str(p.pid) for p in (first, second, *restarted)}
    if net:  # each worker ran under its host's name; the dead one's runs were closed by a start on its own host
        hosts = {pid: r.data.tags["cloudseg.proc"].split(":")[0] for pid, r in parents.items()}
        assert {hosts[str(p.pid)] for p in (first, *restarted)} == {net.hosts[0].namespace}
        assert hosts[str(second.pid)] == net.hosts[1].namespace
    dead = parents.pop(str(first.pid))
    assert dead.info.status == "KILLED" and "stale-run repair" in dead.data.tags["cloudseg.closed_by"]
    assert all(p.info.status == "FINISHED" for p in parents.values())
    assert {r.data.tags["mlflow.parentRunId"] for r in child.values()} <= {dead.info.run_id} | {
        p.info.run_id for p in parents.values()}
    # artifacts went through the server (mlflow-artifacts:/), so any host can read any run's model
    done = child[complete[0].user_attrs["mlflow_run_id"]]
    assert done.info.artifact_uri.startswith("mlflow-artifacts:")
    assert [a.path for a in client.list_artifacts(done.info.run_id, "checkpoint")]
    if net:  # both hosts talked to both servers over their own addresses
        for host in net.hosts:
            assert f"connection received: host={host.address} " in postgres.log()
            assert f"{host.address}:" in mlflow_server.log()
    print(f"hosts={'netns ' + ', '.join(h.address for h in net.hosts) if net else 'loopback'} "
          f"trials={len(trials)} (complete={len(complete)}, killed={len(killed)}, surplus={len(surplus)}) "
          f"child_runs={len(child)} parent_runs={len(parents) + 1} restarts={len(restarted)} wall_s={wall:.1f}")


def _as_a_user(env: dict[str, str]) -> dict[str, str]:
    """The child's environment as on a user's machine: no CI, no pytest marker, no telemetry switches of ours, so
    MLflow's telemetry is on unless cloudseg itself turns it off."""
    drop = {"CI", "PYTEST_CURRENT_TEST", "GITHUB_ACTIONS", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK",
            "NO_ALBUMENTATIONS_UPDATE", "HF_HUB_DISABLE_TELEMETRY"}
    return {k: v for k, v in env.items() if k not in drop}


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_two_workers_outside_ci_end_with_exactly_the_trials(postgres, mlflow_server, mlflow_uri, space, tiny_data,
                                                            tmp_path):
    """Two workers of one 4-trial study on PostgreSQL + an MLflow server, with CI unset: the command exits 0 and
    the study holds exactly 4 trials, all COMPLETE, none FAIL (no telemetry race, no surplus trial).
    ``CLOUDSEG_REHEARSALS=N`` repeats it N times, each on a new study."""
    reps = int(os.environ.get("CLOUDSEG_REHEARSALS", "1"))
    postgres.create_database("outside_ci")
    storage = postgres.url("outside_ci")
    seen = []
    for rep in range(reps):
        name = f"outside-ci-{rep}"
        res = subprocess.run(_sweep(name, storage, space, tiny_data, 4, "--workers", "2"), capture_output=True,
                             text=True, env=_as_a_user(_env(tmp_path, mlflow_uri)), timeout=1200)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert "_MLFLOW_TELEMETRY_SESSION_ID" not in res.stderr
        study = optuna.load_study(study_name=name, storage=storage)
        states = [t.state for t in study.get_trials(deepcopy=False)]
        assert states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED) == 4, states
        assert len(states) == 4 and TrialState.FAIL not in states, states
        seen.append(len(states))
    print(f"rehearsals={reps} trials={seen} fail=0")


def test_the_tracking_server_refuses_clients_without_a_login(mlflow_server, mlflow_uri, monkeypatch):
    """The server has a login: a client without credentials is refused, one with them (MLflow's standard
    variables, as the workers get them) is let in."""
    from mlflow.exceptions import MlflowException

    name = f"login-{os.getpid()}-{time.time_ns()}"
    made = MlflowClient(mlflow_uri).create_experiment(name)  # the login may write...
    assert MlflowClient(mlflow_uri).get_experiment_by_name(name).experiment_id == made  # ...and read it back
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    for attempt in (lambda c: c.search_experiments(max_results=1), lambda c: c.get_experiment(made),
                    lambda c: c.create_experiment(name + "-anonymous")):
        with pytest.raises(MlflowException, match="401|Unauthorized|credentials"):
            attempt(MlflowClient(mlflow_uri))
    # a wrong password is no better than none
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "cloudseg-admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
    with pytest.raises(MlflowException, match="401|Unauthorized|credentials"):
        MlflowClient(mlflow_uri).get_experiment(made)
