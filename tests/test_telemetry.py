"""Privacy (#20): cloudseg's processes send nothing anywhere unasked.

MLflow 3 turns its usage telemetry off by itself when ``CI`` or ``PYTEST_CURRENT_TEST`` is set, so a test that
runs in the pytest process never sees it. These tests start real entry points in a child process whose
environment looks like a user's shell (no CI variables, no telemetry switches), with a ``sitecustomize.py``
that logs, and refuses, every network destination the child (or its children) tries to reach.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cloudseg import privacy
from cloudseg.paths import REPO_ROOT

# Every variable MLflow's telemetry (mlflow/telemetry/utils.py: _is_ci_env_or_testing) takes as "CI or testing",
# and every switch cloudseg.privacy sets: a child without them behaves like a user's process outside CI.
CI_VARS = ("CI", "PYTEST_CURRENT_TEST", "GITHUB_ACTIONS", "CIRCLECI", "GITLAB_CI", "JENKINS_URL", "TRAVIS",
           "TF_BUILD", "BITBUCKET_BUILD_NUMBER", "CODEBUILD_BUILD_ARN", "BUILDKITE", "TEAMCITY_VERSION",
           "CLOUD_RUN_EXECUTION", "RUNBOT_HOST_URL", "RUNBOT_BUILD_NAME", "RUNBOT_WORKER_ID")
SWITCHES = ("CLOUDSEG_TELEMETRY", "DO_NOT_TRACK", "DISABLE_TELEMETRY", *privacy.DEFAULTS)

TINY = ["--set", "encoder=resnet18", "--set", "epochs=1", "--set", "batch_size=2", "--set", "crop_size=64",
        "--set", "n_folds=3", "--set", "val_batch_size=2", "--set", "plot_chips=1", "--set", "steps_per_epoch=1",
        "--set", "experiment=tiny"]

# Loaded by every Python process started with this folder on PYTHONPATH (and inherited by their children).
# Logs each attempted destination as one JSON line to $CLOUDSEG_NETLOG, with the library frames that asked;
# anything but loopback is refused (as on an offline machine), so a test never really sends anything.
NETGUARD = textwrap.dedent('''
    import errno, ipaddress, json, os, socket, sys, traceback

    _LOG = os.environ.get("CLOUDSEG_NETLOG")
    _LOCAL_NAMES = {"localhost", "ip6-localhost", "ip6-loopback"}


    def _loopback(host):
        if host is None:
            return True
        if isinstance(host, bytes):
            host = host.decode("ascii", "replace")
        host = str(host).strip("[]").split("%")[0]
        if host.lower() in _LOCAL_NAMES:
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False


    def _record(kind, host, port):
        frames = [f"{os.path.basename(os.path.dirname(f.filename))}/{os.path.basename(f.filename)}:{f.lineno}"
                  for f in traceback.extract_stack()[:-2]]
        entry = {"pid": os.getpid(), "kind": kind, "host": str(host), "port": port,
                 "argv": [os.path.basename(a) for a in sys.argv[:2]], "stack": frames[-30:]}
        if _LOG:
            with open(_LOG, "a") as fh:
                fh.write(json.dumps(entry) + "\\n")


    _getaddrinfo = socket.getaddrinfo
    _connect = socket.socket.connect
    _connect_ex = socket.socket.connect_ex
    _create_connection = socket.create_connection


    def getaddrinfo(host, port, *args, **kwargs):
        _record("getaddrinfo", host, port)
        if not _loopback(host):
            raise socket.gaierror(socket.EAI_NONAME, f"{host}: refused by the test network guard")
        return _getaddrinfo(host, port, *args, **kwargs)


    def _split(sock, address):
        if sock.family == getattr(socket, "AF_UNIX", None):
            return None
        return address[0], address[1]


    def connect(self, address):
        dest = _split(self, address)
        if dest is not None:
            _record("connect", *dest)
            if not _loopback(dest[0]):
                raise OSError(errno.ENETUNREACH, f"{dest[0]}: refused by the test network guard")
        return _connect(self, address)


    def connect_ex(self, address):
        dest = _split(self, address)
        if dest is not None:
            _record("connect_ex", *dest)
            if not _loopback(dest[0]):
                return errno.ENETUNREACH
        return _connect_ex(self, address)


    def create_connection(address, *args, **kwargs):
        _record("create_connection", address[0], address[1])
        return _create_connection(address, *args, **kwargs)


    socket.getaddrinfo = getaddrinfo
    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex
    socket.create_connection = create_connection
''')


def user_env(tmp_path: Path, **extra: str) -> tuple[dict[str, str], Path]:
    """A user's environment (no CI markers, no telemetry switches) with the network guard; returns it and the
    log it writes."""
    guard = tmp_path / "netguard"
    guard.mkdir(exist_ok=True)
    (guard / "sitecustomize.py").write_text(NETGUARD)
    log = tmp_path / "netlog.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in CI_VARS and k not in SWITCHES}
    env["PYTHONPATH"] = os.pathsep.join([str(guard), str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["CLOUDSEG_NETLOG"] = str(log)
    env.update(extra)
    return env, log


def attempts(log: Path) -> list[dict]:
    if not log.is_file():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def unexpected(log: Path, allowed: set[tuple[str, int]] = frozenset()) -> list[dict]:
    """Attempts to anything but ``allowed`` (host, port) pairs; with a sqlite store nothing is allowed."""
    return [a for a in attempts(log) if (a["host"], a["port"]) not in allowed]


_PLUMBING = ("http/", "python3.11/", "urllib/", "urllib3/", "util/", "requests/", "netguard/", "ssl")


def describe(found: list[dict]) -> str:
    """One line per attempt, naming the innermost frames that are not socket/HTTP plumbing (who asked)."""
    lines = []
    for a in found:
        callers = [f for f in a["stack"] if not f.startswith(_PLUMBING)][-3:]
        lines.append(f"{' '.join(a['argv'])}: {a['kind']} {a['host']}:{a['port']} from {' > '.join(callers)}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- fast


def test_defaults_are_set_but_never_override_the_user():
    env = {"PATH": "/bin"}
    applied = privacy.apply_defaults(env)
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert env["NO_ALBUMENTATIONS_UPDATE"] == "1"
    assert env["HF_HUB_DISABLE_TELEMETRY"] == "1"
    assert applied == {k: env[k] for k in privacy.DEFAULTS}
    # a value the user chose stays
    env = {"MLFLOW_DISABLE_TELEMETRY": "false", "NO_ALBUMENTATIONS_UPDATE": "0"}
    applied = privacy.apply_defaults(env)
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "false" and env["NO_ALBUMENTATIONS_UPDATE"] == "0"
    assert "MLFLOW_DISABLE_TELEMETRY" not in applied and env["HF_HUB_DISABLE_TELEMETRY"] == "1"


@pytest.mark.parametrize("value", ["1", "true", "YES", "on"])
def test_opt_in_leaves_the_libraries_defaults(value):
    env = {"CLOUDSEG_TELEMETRY": value}
    assert privacy.apply_defaults(env) == {}
    assert env == {"CLOUDSEG_TELEMETRY": value}


@pytest.mark.parametrize("value", ["", "0", "false", "no", "off"])
def test_opt_out_values_are_the_default(value):
    env = {"CLOUDSEG_TELEMETRY": value}
    privacy.apply_defaults(env)
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "true"


def test_importing_cloudseg_first_leaves_mlflow_without_telemetry(tmp_path):
    """The user's case of #20: no CI variable. `import cloudseg` before mlflow (what experiments/*.py, the CLI
    and the notebooks do) leaves MLflow without a telemetry client, so no thread touches os.environ."""
    env, log = user_env(tmp_path)
    code = ("import os, cloudseg, mlflow\n"
            "from mlflow.telemetry import get_telemetry_client\n"
            "print('client', get_telemetry_client())\n"
            "print('session', os.environ.get('_MLFLOW_TELEMETRY_SESSION_ID'))\n"
            "import albumentations\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "client None" in res.stdout and "session None" in res.stdout, res.stdout
    assert unexpected(log) == [], describe(unexpected(log))
    # the user's explicit opt-in is honoured: CLOUDSEG_TELEMETRY=1 leaves MLflow's own default (telemetry on)
    (tmp_path / "optin").mkdir()
    env, _ = user_env(tmp_path / "optin", CLOUDSEG_TELEMETRY="1")
    res = subprocess.run([sys.executable, "-c", "import os, cloudseg\n"
                          "print(sorted(k for k in os.environ if 'TELEMETRY' in k or 'ALBUMENTATIONS' in k))"],
                         capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "['CLOUDSEG_TELEMETRY']", res.stdout


# ---------------------------------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_entry_points_open_no_connection(mlflow_tmp, tiny_data, tmp_path, monkeypatch):
    """`cloudseg synth`, `cloudseg validate` and a tiny `experiments/train.py` run, each in a user's environment
    with a sqlite tracking store: not one network destination is attempted (no telemetry, no update check)."""
    monkeypatch.setenv("CLOUDSEG_STATE_ROOT", str(tmp_path / "state"))
    env, log = user_env(tmp_path)
    assert env["MLFLOW_TRACKING_URI"].startswith("sqlite:")
    cloudseg_exe = Path(sys.executable).with_name("cloudseg")
    synth = tmp_path / "synth"
    commands = [
        [str(cloudseg_exe), "synth", "--out", str(synth), "--n", "2", "--seed", "0"],
        [str(cloudseg_exe), "validate", str(synth)],
        [sys.executable, str(REPO_ROOT / "experiments" / "train.py"), "--data", str(tiny_data), *TINY],
    ]
    seen = {}
    for cmd in commands:
        before = len(attempts(log))
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
        assert res.returncode == 0, f"{cmd}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
        seen[" ".join(Path(c).name for c in cmd[:2])] = attempts(log)[before:]
    found = unexpected(log)
    assert found == [], "network attempts:\n" + describe(found)
    assert all(v == [] for v in seen.values()), seen


def test_mlflow_imported_first_loses_its_client(monkeypatch):
    """A notebook that imports mlflow before cloudseg: apply_defaults drops the client MLflow already made."""
    import mlflow.telemetry.client as telemetry_client

    calls = []
    monkeypatch.setattr(telemetry_client, "set_telemetry_client", lambda: calls.append(1))
    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY", raising=False)
    monkeypatch.delenv(privacy.OPT_IN_VAR, raising=False)
    assert "MLFLOW_DISABLE_TELEMETRY" in privacy.apply_defaults()
    assert calls == [1] and os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    privacy.apply_defaults()  # already set (by us or the user): MLflow's client is left as it is
    assert calls == [1]
