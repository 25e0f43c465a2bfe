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
    # one line per process the guard is loaded in, so a test can tell "no attempt" from "no guard"
    if _LOG:
        with open(_LOG, "a") as fh:
            fh.write(json.dumps({"pid": os.getpid(), "kind": "loaded",
                                 "argv": [os.path.basename(a) for a in sys.argv[:2]]}) + "\\n")
''')

# Run in the environment under test: a process that does try the network. Each attempt must be logged and refused.
CONTROL = textwrap.dedent('''
    import socket
    try:
        socket.getaddrinfo("pypi.org", 443)
        print("resolved pypi.org")
    except socket.gaierror:
        print("refused pypi.org")
    s = socket.socket()
    try:
        s.settimeout(5)
        s.connect(("192.0.2.1", 443))  # TEST-NET-1: never routed
        print("connected 192.0.2.1")
    except OSError as exc:
        print("refused 192.0.2.1" if "network guard" in str(exc) else f"not guarded: {exc}")
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


def _entries(log: Path) -> list[dict]:
    if not log.is_file():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def attempts(log: Path) -> list[dict]:
    """The network destinations tried, in order."""
    return [e for e in _entries(log) if e["kind"] != "loaded"]


def guarded(log: Path) -> list[list[str]]:
    """The first two command-line words (base names) of every process the guard was loaded in."""
    return [e["argv"] for e in _entries(log) if e["kind"] == "loaded"]


def assert_guard_catches(env: dict[str, str], tmp_path: Path) -> None:
    """Positive control: in ``env``, a process that tries the network has each attempt logged and refused (so an
    empty log elsewhere means no attempt, not a guard that never loaded)."""
    log = tmp_path / "control-netlog.jsonl"
    res = subprocess.run([sys.executable, "-c", CONTROL], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={**env, "CLOUDSEG_NETLOG": str(log)})
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split("\n")[:2] == ["refused pypi.org", "refused 192.0.2.1"], res.stdout
    tried = {(a["kind"], a["host"]) for a in attempts(log)}
    assert {("getaddrinfo", "pypi.org"), ("connect", "192.0.2.1")} <= tried, tried
    assert guarded(log) == [["-c"]]


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
    assert guarded(log) == [["-c"]]  # the guard watched that process
    assert unexpected(log) == [], describe(unexpected(log))
    assert_guard_catches(env, tmp_path)
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
    # the guard watched each of the three commands, and it catches what it should in this environment
    assert {"cloudseg synth", "cloudseg validate", "train.py"} <= {
        " ".join(a[:2]) if a[0] == "cloudseg" else a[0] for a in guarded(log)}, guarded(log)
    assert_guard_catches(env, tmp_path)


def test_mlflow_imported_first_loses_its_client(tmp_path):
    """A notebook that imports mlflow before cloudseg, in a user's environment: MLflow's real telemetry client
    exists until `import cloudseg`, which drops it; a switch the user set themselves is left alone."""
    code = ("import os, mlflow\n"
            "from mlflow.telemetry import get_telemetry_client\n"
            "print('before', type(get_telemetry_client()).__name__)\n"
            "import cloudseg\n"
            "print('after', type(get_telemetry_client()).__name__)\n"
            "print('switch', os.environ.get('MLFLOW_DISABLE_TELEMETRY'))\n")
    env, log = user_env(tmp_path)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert lines[0] != "before NoneType", lines  # positive control: outside CI, MLflow made its client
    assert lines[1:] == ["after NoneType", "switch true"], lines
    assert unexpected(log) == [], describe(unexpected(log))  # the guard refused whatever the client tried
    # the user's own choice (telemetry on) stays, and so does the client MLflow made for it
    env, _ = user_env(tmp_path, MLFLOW_DISABLE_TELEMETRY="false")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert lines[0] == lines[1].replace("after", "before") != "before NoneType" and lines[2] == "switch false", lines
