"""Throwaway services for the tests: PostgreSQL, an MLflow tracking server on it, and network namespaces that
stand in for separate worker hosts.

A pytest plugin (``pytest_plugins = ["tests.services"]`` in tests/conftest.py). Every fixture is session-scoped,
started on first use and stopped at the end of the session, also when tests fail. Where a service cannot be started
the tests that need it skip with the reason, except under ``CI=true``, where that is a failure. A session killed
outright leaves its folder ``/tmp/cloudseg-services-<pid>-*`` behind; the next session stops what that folder
records (servers, namespaces) and removes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NoReturn

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SESSION_PREFIX = "cloudseg-services-"
NET_PREFIX = "10.213"  # worker hosts live in 10.213.N.0/24, N picked unused on this machine; never routed off it
PG_USER = "postgres"  # the cluster's superuser (trust auth: no password)


class ServiceError(RuntimeError):
    """A service could not be started; the message says why."""


def unavailable(reason: str, required: bool = IN_CI) -> NoReturn:
    """Skip the test with ``reason``, or fail it where the service is required (CI=true)."""
    if required:
        pytest.fail(f"{reason} (required under CI=true)", pytrace=False)
    pytest.skip(reason)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on at ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _run(cmd: list[str], what: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if res.returncode != 0:
        raise ServiceError(f"{what} failed (exit {res.returncode}): {' '.join(map(str, cmd))}\n"
                           f"{(res.stdout + res.stderr).strip()[-2000:]}")
    return res


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------------------------- session folder

def make_session_dir() -> Path:
    """A fresh folder for this session's services, after releasing those of sessions that died."""
    reap_stale_sessions()
    root = Path(tempfile.mkdtemp(prefix=f"{SESSION_PREFIX}{os.getpid()}-"))
    root.chmod(0o711)  # the postgres user must reach its data folder inside
    return root


def reap_stale_sessions(tmp: Path | None = None) -> list[Path]:
    """Release the folders of earlier sessions whose pytest process is gone. Returns the folders released."""
    released = []
    for folder in Path(tmp or tempfile.gettempdir()).glob(SESSION_PREFIX + "*"):
        m = re.match(re.escape(SESSION_PREFIX) + r"(\d+)-", folder.name)
        if not m or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        release(folder)
        released.append(folder)
    return released


def release(folder: Path) -> None:
    """Stop what a session folder records (MLflow server, PostgreSQL, namespaces) and remove the folder."""
    with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        os.killpg(int((folder / "mlflow" / "server.pgid").read_text()), signal.SIGKILL)
    with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        # SIGQUIT is PostgreSQL's immediate shutdown; its children follow the postmaster
        os.kill(int((folder / "pg" / "data" / "postmaster.pid").read_text().split()[0]), signal.SIGQUIT)
    with contextlib.suppress(FileNotFoundError, ValueError):
        HostNetwork.remove_recorded(json.loads((folder / "netns.json").read_text()))
    shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------- PostgreSQL

def find_pg_bindir() -> Path | None:
    """The folder holding initdb and pg_ctl: ``$CLOUDSEG_PG_BINDIR``, Debian's newest, or the PATH."""
    candidates = []
    if os.environ.get("CLOUDSEG_PG_BINDIR"):
        candidates.append(Path(os.environ["CLOUDSEG_PG_BINDIR"]))
    debian = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if p.parent.name.isdigit()]
    candidates += sorted(debian, key=lambda p: int(p.parent.name), reverse=True)
    if shutil.which("initdb"):
        candidates.append(Path(shutil.which("initdb")).parent)
    for c in candidates:
        if (c / "initdb").is_file() and (c / "pg_ctl").is_file():
            return c
    return None


@dataclass
class Postgres:
    """A throwaway PostgreSQL cluster with trust auth, owned by the ``postgres`` user when we run as root."""

    bindir: Path
    folder: Path
    port: int
    addresses: tuple[str, ...]
    owner: tuple[int, int] | None  # (uid, gid) the server runs as; None = this process's user

    def url(self, db: str, host: str | None = None) -> str:
        """SQLAlchemy URL of database ``db`` as reached through ``host`` (default: the first listen address)."""
        return f"postgresql+psycopg://{PG_USER}@{host or self.addresses[0]}:{self.port}/{db}"

    def create_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=PG_USER, dbname="postgres",
                             autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')

    def log(self) -> str:
        path = self.folder / "server.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def stop(self) -> None:
        if (self.folder / "data" / "postmaster.pid").is_file():  # immediate: nothing here is worth a checkpoint
            subprocess.run([str(self.bindir / "pg_ctl"), "-D", str(self.folder / "data"), "-m", "immediate", "-w",
                            "-t", "30", "stop"], capture_output=True, timeout=60, **self._as_owner())
        shutil.rmtree(self.folder, ignore_errors=True)

    def _as_owner(self) -> dict:
        if self.owner is None:
            return {}
        return {"user": self.owner[0], "group": self.owner[1], "extra_groups": [],
                "env": {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "HOME": str(self.folder)}}


def start_postgres(folder: Path, addresses: list[str], trusted_nets: list[str] = ()) -> Postgres:
    """initdb a cluster in ``folder``, start it listening on ``addresses`` at a free port, trusting loopback and
    ``trusted_nets`` (CIDR). Raises ServiceError with the reason when it cannot."""
    bindir = find_pg_bindir()
    if bindir is None:
        raise ServiceError("no PostgreSQL server found (initdb/pg_ctl; Debian: apt-get install postgresql, or set "
                           "CLOUDSEG_PG_BINDIR)")
    try:
        import psycopg  # noqa: F401
    except ImportError as exc:
        raise ServiceError(f"the psycopg driver is missing ({exc}): pip install 'psycopg[binary]'") from exc
    owner = None
    if os.geteuid() == 0:  # initdb refuses to run as root
        try:
            pw = pwd.getpwnam(PG_USER)
        except KeyError as exc:
            raise ServiceError(f"running as root and there is no '{PG_USER}' user to run PostgreSQL as") from exc
        owner = (pw.pw_uid, pw.pw_gid)
    folder.mkdir(parents=True)
    pg = Postgres(bindir, folder, 0, tuple(addresses), owner)
    if owner:
        os.chown(folder, *owner)
    data = folder / "data"
    _run([str(bindir / "initdb"), "-D", str(data), "-U", PG_USER, "--auth=trust", "-E", "UTF8", "--no-locale",
          "--no-sync"], "initdb", **pg._as_owner())
    hba = "local all all trust\nhost all all 127.0.0.1/32 trust\n" + "".join(
        f"host all all {net} trust\n" for net in trusted_nets)
    (data / "pg_hba.conf").write_text(hba)
    with (data / "postgresql.conf").open("a") as f:
        # a throwaway cluster: durability off for speed, every connection logged so tests can see who came
        f.write(f"\nlisten_addresses = '{','.join(addresses)}'\nunix_socket_directories = '{folder}'\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nlog_connections = on\n"
                "max_connections = 200\n")
    last = ""
    for _ in range(3):  # the free port may be taken between the check and the start
        pg.port = free_port()
        res = subprocess.run([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(folder / "server.log"), "-w",
                              "-t", "60", "-o", f"-p {pg.port}", "start"], capture_output=True, text=True,
                             timeout=90, **pg._as_owner())
        if res.returncode == 0:
            return pg
        last = (res.stdout + res.stderr + pg.log()).strip()[-2000:]
    pg.stop()
    raise ServiceError(f"PostgreSQL did not start in {folder}:\n{last}")


# ---------------------------------------------------------------------------------------------------------- MLflow

@dataclass
class MlflowServer:
    """``mlflow server`` on a PostgreSQL backend store, serving artifacts itself (``mlflow-artifacts:/``) so every
    worker uploads through it."""

    url: str
    proc: subprocess.Popen
    folder: Path
    username: str = ""  # MLflow's basic-auth admin (the server refuses unauthenticated clients)
    password: str = ""
    ready: bool = False

    def wait_ready(self, timeout: float = 300) -> str:
        """Block until ``/health`` answers; returns the tracking URI. Raises ServiceError if the server died."""
        deadline = time.time() + timeout
        while not self.ready:
            if self.proc.poll() is not None:
                raise ServiceError(f"mlflow server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    self.ready = r.status == 200
            if not self.ready:
                if time.time() > deadline:
                    raise ServiceError(f"mlflow server at {self.url} not ready after {timeout:.0f} s:\n"
                                       f"{self.log()[-3000:]}")
                time.sleep(0.5)
        return self.url

    def log(self) -> str:
        path = self.folder / "server.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def stop(self) -> None:
        # the CLI, its uvicorn and anything they started; nothing to keep, and a graceful stop takes seconds
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        (self.folder / "server.pgid").unlink(missing_ok=True)


def start_mlflow_server(backend_uri: str, folder: Path, host: str = "127.0.0.1") -> MlflowServer:
    """Start ``mlflow server`` with MLflow's basic-auth app (an admin with a fresh password, no permission for
    anyone else) without waiting for it (it takes tens of seconds); call ``wait_ready()``."""
    import secrets

    exe = Path(sys.executable).with_name("mlflow")
    if not exe.is_file():
        exe = Path(shutil.which("mlflow") or "mlflow")
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port(host)
    password = secrets.token_urlsafe(16)
    (folder / "auth.ini").write_text(
        "[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{folder / 'auth.db'}\nadmin_username = cloudseg-admin\n"
        f"admin_password = {password}\nauthorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    cmd = [str(exe), "server", "--app-name", "basic-auth", "--backend-store-uri", backend_uri, "--serve-artifacts",
           "--artifacts-destination", str(folder / "artifacts"), "--host", host, "--port", str(port),
           "--workers", "1"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no background job runner: three fewer processes
    env["MLFLOW_AUTH_CONFIG_PATH"] = str(folder / "auth.ini")
    env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = secrets.token_hex(16)  # CSRF protection of the auth app
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    with (folder / "server.log").open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=folder, env=env,
                                start_new_session=True)
    (folder / "server.pgid").write_text(str(proc.pid))
    return MlflowServer(f"http://{host}:{port}", proc, folder, "cloudseg-admin", password)


# --------------------------------------------------------------------------------------------- network namespaces

@dataclass
class NetHost:
    namespace: str  # also its host name
    address: str


@dataclass
class HostNetwork:
    """Worker hosts as network namespaces on a bridge in this (root) namespace.

    The bridge holds ``server_address`` (10.213.N.1/24); each namespace gets one end of a veth pair with
    10.213.N.(i+2)/24 and its own loopback, and no route anywhere else, so its traffic stays on this machine and
    its 127.0.0.1 is not the servers'. Commands run there also get their own host name (a UTS namespace), as on
    another machine.
    """

    bridge: str
    server_address: str
    subnet: str
    hosts: list[NetHost] = field(default_factory=list)

    def prefix(self, i: int) -> list[str]:
        """Command prefix that runs a command on worker host ``i``; every step execs, so the pid is the command's."""
        name = self.hosts[i].namespace
        return ["ip", "netns", "exec", name, "unshare", "--uts", "--", "sh", "-c", 'hostname "$0" && exec "$@"', name]

    def names(self) -> dict:
        return {"bridge": self.bridge, "namespaces": [h.namespace for h in self.hosts]}

    def remove(self) -> None:
        self.remove_recorded(self.names())

    @staticmethod
    def remove_recorded(names: dict) -> None:
        """Kill what still runs in the namespaces, delete them (their veth pairs go with them) and the bridge;
        missing ones are fine."""
        for ns in names.get("namespaces", []):
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30).stdout
            for pid in pids.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        if names.get("bridge"):
            subprocess.run(["ip", "link", "del", names["bridge"]], capture_output=True, timeout=30)


def create_host_network(folder: Path, n_hosts: int = 2) -> HostNetwork:
    """Make the bridge and ``n_hosts`` namespaces; records their names in ``folder/netns.json`` first so a crashed
    session's leftovers are found. Raises ServiceError where namespaces cannot be made (not root, no ``ip``)."""
    if os.geteuid() != 0:
        raise ServiceError("network namespaces need root")
    for tool, package in (("ip", "iproute2"), ("unshare", "util-linux")):
        if not shutil.which(tool):
            raise ServiceError(f"the `{tool}` command ({package}) is missing")
    # one lock across sessions: two sessions must not pick the same subnet
    with open(Path(tempfile.gettempdir()) / "cloudseg-netns.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        in_use = _run(["ip", "-o", "addr"], "ip addr").stdout + _run(["ip", "-o", "route"], "ip route").stdout
        links = _run(["ip", "-o", "link"], "ip link").stdout
        spaces = _run(["ip", "netns", "list"], "ip netns list").stdout
        free = [n for n in range(1, 255) if f"{NET_PREFIX}.{n}." not in in_use and f"csbr{n}:" not in links
                and f"cloudseg-{n}-" not in spaces]
        if not free:
            raise ServiceError(f"no free {NET_PREFIX}.N.0/24 subnet on this machine")
        n = random.choice(free)
        net = HostNetwork(f"csbr{n}", f"{NET_PREFIX}.{n}.1", f"{NET_PREFIX}.{n}.0/24",
                          [NetHost(f"cloudseg-{n}-{i}", f"{NET_PREFIX}.{n}.{i + 2}") for i in range(n_hosts)])
        (folder / "netns.json").write_text(json.dumps(net.names()))
        try:
            _run(["ip", "link", "add", net.bridge, "type", "bridge"], "creating the bridge")
            _run(["ip", "addr", "add", f"{net.server_address}/24", "dev", net.bridge], "addressing the bridge")
            _run(["ip", "link", "set", net.bridge, "up"], "bridge up")
            for i, host in enumerate(net.hosts):
                outer, inner = f"csv{n}h{i}", f"csv{n}n{i}"
                ns = ["ip", "-n", host.namespace]
                _run(["ip", "netns", "add", host.namespace], "ip netns add")
                _run(["ip", "link", "add", outer, "type", "veth", "peer", "name", inner, "netns", host.namespace],
                     "creating a veth pair")
                _run(["ip", "link", "set", outer, "master", net.bridge, "up"], "joining the bridge")
                _run([*ns, "addr", "add", f"{host.address}/24", "dev", inner], "addressing a namespace")
                _run([*ns, "link", "set", inner, "up"], "veth up")
                _run([*ns, "link", "set", "lo", "up"], "loopback up")
        except (ServiceError, OSError, subprocess.TimeoutExpired) as exc:
            net.remove()
            raise ServiceError(f"network namespaces cannot be made: {exc}") from exc
    return net


# --------------------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def services_dir() -> Iterator[Path]:
    """This session's folder for service data; everything it records is released at the end."""
    folder = make_session_dir()
    try:
        yield folder
    finally:
        release(folder)


@pytest.fixture(scope="session")
def host_network_or_reason(services_dir) -> Iterator[HostNetwork | str]:
    """Two worker hosts as network namespaces, or the reason they cannot be made here."""
    try:
        net = create_host_network(services_dir, n_hosts=2)
    except ServiceError as exc:
        yield str(exc)
        return
    try:
        yield net
    finally:
        net.remove()


@pytest.fixture(scope="session")
def host_network(host_network_or_reason) -> HostNetwork:
    """Two worker hosts as network namespaces. Skips where they cannot be made; under CI=true as root that fails."""
    if isinstance(host_network_or_reason, str):
        unavailable(host_network_or_reason, required=IN_CI and os.geteuid() == 0)
    return host_network_or_reason


@pytest.fixture(scope="session")
def postgres(services_dir, host_network_or_reason) -> Iterator[Postgres]:
    """A throwaway PostgreSQL with databases ``optuna`` and ``mlflow``, on loopback and on the worker hosts'
    bridge address where there is one."""
    net = host_network_or_reason if isinstance(host_network_or_reason, HostNetwork) else None
    addresses = ["127.0.0.1"] + ([net.server_address] if net else [])
    try:
        pg = start_postgres(services_dir / "pg", addresses, [net.subnet] if net else [])
    except ServiceError as exc:
        unavailable(f"no throwaway PostgreSQL: {exc}")
    try:
        pg.create_database("optuna")
        pg.create_database("mlflow")
        yield pg
    finally:
        pg.stop()


@pytest.fixture(scope="session")
def mlflow_server(services_dir, postgres, host_network_or_reason) -> Iterator[MlflowServer]:
    """An MLflow tracking server on the ``mlflow`` database, started but not yet waited for (see ``mlflow_uri``):
    ask for it early to let it boot while other tests run. Listens on the bridge address where there is one."""
    net = host_network_or_reason
    host = net.server_address if isinstance(net, HostNetwork) else "127.0.0.1"
    server = start_mlflow_server(postgres.url("mlflow"), services_dir / "mlflow", host)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mlflow_uri(mlflow_server) -> Iterator[str]:
    """Tracking URI of the running MLflow server (waits for it). Its login reaches this process and the workers it
    starts through MLflow's standard variables (MLFLOW_TRACKING_USERNAME / _PASSWORD), never a command line."""
    try:
        uri = mlflow_server.wait_ready()
    except ServiceError as exc:
        unavailable(f"no MLflow tracking server: {exc}")
    with pytest.MonkeyPatch.context() as mp:  # a session fixture: the function-scoped monkeypatch is not there
        mp.setenv("MLFLOW_TRACKING_USERNAME", mlflow_server.username)
        mp.setenv("MLFLOW_TRACKING_PASSWORD", mlflow_server.password)
        yield uri
